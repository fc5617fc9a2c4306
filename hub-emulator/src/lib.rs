//! Local Azure IoT Hub + DPS emulator (work in progress).
