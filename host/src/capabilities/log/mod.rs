//! The `log` capability: `server.log`/`server.error`, and the agent's stdout/stderr cut
//! into lines. Both write the agent's own lines (counted and rate-limited) to its log.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime::component::{HasSelf, Linker};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::bindings::log as wit;
use crate::kit::log::{Level, Logger};

/// Longest line kept whole; longer output is split, so a guest cannot grow host memory.
const MAX_LINE: usize = 8 * 1024;

/// The capability's state in an instance: the agent's log.
pub(crate) struct Log {
    logger: Logger,
}

impl Log {
    pub fn new(logger: Logger) -> Log {
        Log { logger }
    }
}

impl wit::Host for Log {
    fn log(&mut self, line: String) {
        self.logger.write_agent(Level::Info, &line);
    }

    fn error(&mut self, line: String) {
        self.logger.write_agent(Level::Error, &line);
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Log) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Log>>(linker, get)
}

/// stdout or stderr of an agent, cut into lines.
#[derive(Clone)]
pub(crate) struct LogStream {
    logger: Logger,
    level: Level,
    partial: Arc<Mutex<Vec<u8>>>,
}

impl LogStream {
    pub fn new(logger: Logger, level: Level) -> LogStream {
        LogStream { logger, level, partial: Arc::default() }
    }

    fn push(&self, bytes: &[u8]) {
        let Ok(mut partial) = self.partial.lock() else { return };
        for &b in bytes {
            if b == b'\n' {
                self.emit(&mut partial);
            } else {
                partial.push(b);
                if partial.len() >= MAX_LINE {
                    self.emit(&mut partial);
                }
            }
        }
    }

    fn emit(&self, partial: &mut Vec<u8>) {
        let text = String::from_utf8_lossy(partial);
        self.logger.write_agent(self.level, text.trim_end_matches('\r'));
        partial.clear();
    }

    fn flush_partial(&self) {
        if let Ok(mut partial) = self.partial.lock()
            && !partial.is_empty()
        {
            self.emit(&mut partial);
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        self.flush_partial();
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_LINE)
    }
}

#[async_trait::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl AsyncWrite for LogStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flush_partial();
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flush_partial();
        Poll::Ready(Ok(()))
    }
}

