//! The serial backend of the device line: a port opened 8N1 with no flow control.

use std::path::PathBuf;

use tokio_serial::{DataBits, FlowControl, Parity, SerialPortBuilderExt, SerialStream, StopBits};

use super::line::Line;

/// A serial port (`/dev/ttyUSB0`, a `/dev/serial/by-id/...` link, or a pty) at `baud`.
pub(crate) struct SerialLine {
    path: PathBuf,
    baud: u32,
}

impl SerialLine {
    pub fn new(path: PathBuf, baud: u32) -> SerialLine {
        SerialLine { path, baud }
    }
}

impl Line for SerialLine {
    type Port = SerialStream;

    async fn open(&mut self) -> std::io::Result<SerialStream> {
        let port = tokio_serial::new(self.path.to_string_lossy(), self.baud)
            .data_bits(DataBits::Eight)
            .parity(Parity::None)
            .stop_bits(StopBits::One)
            .flow_control(FlowControl::None)
            .open_native_async()?;
        Ok(port)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn describe(&self) -> String {
        format!("{} at {} baud", self.path.display(), self.baud)
    }
}
