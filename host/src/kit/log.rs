//! An agent's log: every line goes to tracing with the agent id, to subscribers (tests,
//! the management API's log stream), and to the agent's recent lines, which a log stream
//! shows first. Every part of an agent writes here: the `log` capability and stdout/stderr
//! for the agent's own lines, the other capabilities and the runtime for host notes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::metrics::{AgentMetrics, Count};
use crate::policy::rate::{Rate, TokenBucket};

/// An agent's recent lines kept for a log stream that starts later: at most this many...
const RECENT_LINES: usize = 100;
/// ...and this much text, so that 10,000 agents keep at most ~160 MiB.
const RECENT_BYTES: usize = 16 * 1024;

/// The longest line, bytes, in every sink: a longer one is cut and marked.
const MAX_LINE_BYTES: usize = RECENT_BYTES;

/// Numbers every line, across agents, in the order written.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// Severity of an agent's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// `server.log`, stdout, host notes.
    Info,
    /// `server.error`, stderr, crashes.
    Error,
}

/// One line of an agent's log.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Increases with every line the process writes: a stream that shows an agent's
    /// recent lines skips live ones it has shown.
    pub seq: u64,
    /// The agent it came from.
    pub agent: Arc<str>,
    pub level: Level,
    pub text: String,
    /// When it was written.
    pub at: std::time::SystemTime,
}

/// Writes one agent's log lines.
#[derive(Clone)]
pub(crate) struct Logger {
    agent: Arc<str>,
    /// The host's stream of every line, and the agent's tenant's stream if it has one.
    subscribers: Vec<broadcast::Sender<LogLine>>,
    limit: Arc<LogLimit>,
    recent: Arc<Mutex<Recent>>,
}

/// The newest lines, within [`RECENT_LINES`] and [`RECENT_BYTES`].
#[derive(Default)]
struct Recent {
    lines: VecDeque<LogLine>,
    bytes: usize,
}

/// The agent's own lines are counted and rate-limited, so that a flooding agent cannot
/// drown the host's log; host notes about the agent always pass.
struct LogLimit {
    bucket: Option<Mutex<TokenBucket>>,
    /// Lines dropped since the last one that passed.
    dropped: Mutex<u64>,
    metrics: Arc<AgentMetrics>,
}

impl Logger {
    pub fn new(agent: &str, subscribers: Vec<broadcast::Sender<LogLine>>, rate: Option<Rate>, metrics: Arc<AgentMetrics>) -> Logger {
        let limit = LogLimit { bucket: rate.map(|r| Mutex::new(TokenBucket::new(r))), dropped: Mutex::new(0), metrics };
        Logger { agent: agent.into(), subscribers, limit: Arc::new(limit), recent: Arc::default() }
    }

    /// The agent's recent lines, oldest first.
    pub fn recent(&self) -> Vec<LogLine> {
        self.recent.lock().map(|r| r.lines.iter().cloned().collect()).unwrap_or_default()
    }

    /// The text of the newest error among the recent lines, found without copying the
    /// rest: the agent list asks it of every agent it shows.
    pub fn last_error(&self) -> Option<String> {
        self.recent.lock().ok()?.lines.iter().rev().find(|l| l.level == Level::Error).map(|l| l.text.clone())
    }

    /// A line the agent wrote: over its log rate it is dropped, and the next line that
    /// passes is preceded by a note of how many were.
    pub fn write_agent(&self, level: Level, text: &str) {
        let limit = &*self.limit;
        limit.metrics.add(Count::LogLine);
        if let Some(bucket) = &limit.bucket {
            let passed = bucket.lock().map(|mut b| b.take()).unwrap_or(true);
            let mut dropped = limit.dropped.lock().unwrap_or_else(|p| p.into_inner());
            if !passed {
                *dropped += 1;
                limit.metrics.add(Count::LogDropped);
                return;
            }
            if *dropped > 0 {
                let n = std::mem::take(&mut *dropped);
                drop(dropped);
                self.write(Level::Error, &format!("{n} lines dropped: over the log rate"));
            }
        }
        self.write(level, text);
    }

    /// A call refused at one of the agent's limits: counted, and said in the log when
    /// `quiet` allows, as an agent (or a peer) can repeat it in a loop.
    pub fn limit_refused(&self, quiet: &Quiet, text: impl FnOnce() -> String) {
        self.limit.metrics.add(Count::LimitRefused);
        if quiet.due() {
            self.write(Level::Error, &text());
        }
    }

    /// Writes a line to every sink, made safe first by [`one_line`].
    pub fn write(&self, level: Level, text: &str) {
        let text = one_line(text);
        match level {
            Level::Info => tracing::info!(agent = %self.agent, "{text}"),
            Level::Error => tracing::error!(agent = %self.agent, "{text}"),
        }
        let line = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            // Numbered under the lock, so that an agent's lines are in the ring in `seq` order.
            let line = LogLine { seq: NEXT_SEQ.fetch_add(1, Relaxed), agent: self.agent.clone(), level, text, at: std::time::SystemTime::now() };
            recent.bytes += line.text.len();
            recent.lines.push_back(line.clone());
            while recent.lines.len() > RECENT_LINES || recent.bytes > RECENT_BYTES {
                let Some(old) = recent.lines.pop_front() else { break };
                recent.bytes -= old.text.len();
            }
            line
        };
        // No subscriber is the normal case outside tests and the management API.
        for subscribers in &self.subscribers {
            let _ = subscribers.send(line.clone());
        }
    }
}

/// Lets something repeated be said at most once every [`Quiet::EVERY`].
#[derive(Default)]
pub(crate) struct Quiet(Mutex<Option<Instant>>);

impl Quiet {
    const EVERY: Duration = Duration::from_secs(10);

    /// Whether to say it now; if so, the next time is `EVERY` away.
    pub fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= Self::EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

/// `text` as one line of at most [`MAX_LINE_BYTES`]: line breaks and other control
/// characters escaped (`\n`, `\r`, `\u{1b}`), so that an agent cannot write what looks
/// like a host line about another agent, or drive a terminal; the tail of a longer text
/// cut and marked.
fn one_line(text: &str) -> String {
    const MARK: &str = " … (truncated)";
    let unsafe_char = |c: char| c.is_control() && c != '\t';
    if text.len() <= MAX_LINE_BYTES && !text.chars().any(unsafe_char) {
        return text.to_owned();
    }
    let mut line = String::with_capacity(text.len().min(MAX_LINE_BYTES));
    for c in text.chars() {
        // The longest escape is `\u{10ffff}`.
        let needs = if unsafe_char(c) { 10 } else { c.len_utf8() };
        if line.len() + needs > MAX_LINE_BYTES - MARK.len() {
            line.push_str(MARK);
            break;
        }
        match c {
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            c if unsafe_char(c) => line.extend(c.escape_unicode()),
            c => line.push(c),
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_stays_one_line_within_its_size() {
        assert_eq!(one_line("plain\ttext é"), "plain\ttext é");
        assert_eq!(one_line("a\n2026-12-02T00:00:00Z INFO agent=other\r\x1b[2J"), "a\\n2026-12-02T00:00:00Z INFO agent=other\\r\\u{1b}[2J");
        let long = one_line(&"é".repeat(MAX_LINE_BYTES));
        assert!(long.ends_with(" … (truncated)") && long.len() <= MAX_LINE_BYTES, "{}", long.len());
        let escapes = one_line(&"\n".repeat(MAX_LINE_BYTES));
        assert!(escapes.len() <= MAX_LINE_BYTES && escapes.starts_with("\\n\\n"), "{}", escapes.len());
    }

    #[test]
    fn recent_lines_keep_the_newest_within_their_limits() {
        let logger = Logger::new("a", vec![broadcast::channel(4).0], None, Arc::default());
        for i in 0..150 {
            logger.write(Level::Info, &format!("line {i}"));
        }
        let recent = logger.recent();
        assert_eq!(recent.len(), RECENT_LINES);
        assert_eq!((recent[0].text.as_str(), recent[99].text.as_str()), ("line 50", "line 149"));
        assert!(recent.windows(2).all(|w| w[0].seq < w[1].seq));

        logger.write(Level::Error, &"é".repeat(RECENT_BYTES));
        let recent = logger.recent();
        let last = recent.last().map(|l| l.text.clone()).unwrap_or_default();
        assert!(last.ends_with(" … (truncated)") && last.len() <= RECENT_BYTES, "{}", last.len());
        assert!(recent.iter().map(|l| l.text.len()).sum::<usize>() <= RECENT_BYTES);
    }
}
