//! `device-sim`: a simulated sensor board on a pty. Prints the pty's path on the first
//! line of stdout, then runs until killed (or the pty fails).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// A simulated sensor board speaking the Tether device link on a pty.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Seconds between temperature readings (0: none).
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// Device id announced to the host.
    #[arg(long, default_value = "device-sim")]
    device_id: String,
    /// Also make PATH a symlink to the pty, replacing what is there: a stable path across
    /// simulator restarts, like /dev/serial/by-id for a real board.
    #[arg(long, value_name = "PATH")]
    link: Option<PathBuf>,
    /// Inject line noise (random bytes, corrupted and truncated frames) in both directions
    /// every MS milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    noise: u64,
    /// Log events on stderr.
    #[arg(long, short)]
    verbose: bool,
    /// Take N numbered readings, one per interval, and deliver each as `reading` {n} until
    /// the agent replies `true`, keeping them across a lost line (instead of temperatures).
    #[arg(long, value_name = "N", default_value_t = 0)]
    readings: u64,
    /// Obey `unplug`, `replug` and `send NAME JSON` lines on stdin.
    #[arg(long)]
    control: bool,
    /// Answer messages named NAME with JSON (repeatable), e.g. `--on get-fan=true`;
    /// replaces a built-in answer of that name.
    #[arg(long = "on", value_name = "NAME=JSON")]
    replies: Vec<String>,
    /// Send message NAME with JSON each time the agent connects (repeatable), e.g.
    /// `--send humidity=41.5`.
    #[arg(long = "send", value_name = "NAME=JSON")]
    sends: Vec<String>,
    /// `on NAME JSON` and `send NAME JSON` lines from a file (`#` comments), as the
    /// options above.
    #[arg(long, value_name = "FILE")]
    script: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (mut replies, mut sends) = match &args.script {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            device_sim::parse_script(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Default::default(),
    };
    for text in &args.replies {
        replies.push(device_sim::parse_message(text)?);
    }
    for text in &args.sends {
        sends.push(device_sim::parse_message(text)?);
    }
    let pty = device_sim::Pty::open()?;
    if let Some(link) = &args.link {
        pty.symlink(link)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", pty.slave_path.display())?;
    out.flush()?;
    drop(out);
    let options = device_sim::Options {
        device_id: args.device_id,
        interval_s: args.interval,
        noise_ms: args.noise,
        verbose: args.verbose,
        readings: args.readings,
        control: args.control,
        link: args.link,
        replies,
        sends,
    };
    device_sim::run(pty, &options)
}
