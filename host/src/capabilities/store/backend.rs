//! Where agents' values are kept, behind a trait so that another backend needs no change
//! to the capability.

/// Where an agent's value is kept. Today a file per agent (`FileStore`).
pub(crate) trait Backend: Send + Sync {
    /// The value, or `None` if none was ever saved.
    fn load(&self) -> std::io::Result<Option<Vec<u8>>>;
    /// Replaces the value; durable when it returns.
    fn save(&self, data: &[u8]) -> std::io::Result<()>;
    /// Where the value is kept, for log lines.
    fn location(&self) -> String;
}
