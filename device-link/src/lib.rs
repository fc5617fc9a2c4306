#![no_std]
//! Wire protocol of the Tether serial device channel (work in progress).
