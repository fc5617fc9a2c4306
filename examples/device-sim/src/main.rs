//! `device-sim`: a simulated sensor board on a pty. Prints the pty's path on the first
//! line of stdout, then runs until killed (or the pty fails).

use std::io::Write;
use std::path::PathBuf;

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
    /// Obey `unplug` and `replug` lines on stdin (for tests of a lost serial line).
    #[arg(long)]
    control: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    };
    device_sim::run(pty, &options)
}
