//! What the device channel runs over, so that another transport needs no change to the
//! driver or the capability.

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite};

/// The byte stream to a device, which can go away and be opened again: a serial port
/// today; the driver speaks the protocol over whatever this opens.
pub(crate) trait Line: Send + 'static {
    type Port: AsyncRead + AsyncWrite + Send + Unpin;
    /// Opens the line; an error means "not there now", and the driver tries again.
    fn open(&mut self) -> impl Future<Output = std::io::Result<Self::Port>> + Send;
    /// The line's name in log lines (a port's path).
    fn name(&self) -> String;
    /// What the log says once it is open (path and speed).
    fn describe(&self) -> String;
}
