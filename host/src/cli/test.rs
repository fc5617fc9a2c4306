//! `tether test`: an agent crate's tests, built for this machine, and told which `tether`
//! to run (tether-testkit reads `TETHER_BIN`). A crate of its own builds for WebAssembly
//! by default (its .cargo/config.toml), so plain `cargo test` would build its tests for
//! WebAssembly too: for such a crate this names the host's target instead. A crate in a
//! workspace (this repository's examples) builds for this machine by default and keeps
//! the workspace's target directory as it is.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// `tether test`'s arguments.
#[derive(clap::Args)]
pub struct TestArgs {
    /// The agent crate's directory.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Passed to `cargo test` (after `--`), e.g. a test name.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

/// Runs `cargo test` for this machine in the crate.
pub fn test(args: &TestArgs) -> anyhow::Result<()> {
    if !args.dir.join("Cargo.toml").is_file() {
        bail!("{} has no Cargo.toml: give an agent crate's directory (`tether new NAME` makes one)", args.dir.display());
    }
    let mut cargo = Command::new(super::build::cargo());
    cargo.arg("test");
    if args.dir.join(".cargo/config.toml").is_file() {
        cargo.args(["--target", &host_triple()?]);
    }
    let status = cargo
        .args(&args.cargo_args)
        .current_dir(&args.dir)
        .env("TETHER_BIN", std::env::current_exe().context("cannot tell where this tether is")?)
        .status()
        .context("cannot run cargo; is Rust installed (https://rustup.rs)?")?;
    if !status.success() {
        bail!("the tests failed ({status})");
    }
    Ok(())
}

/// This machine's target triple, as rustc names it.
fn host_triple() -> anyhow::Result<String> {
    let output = Command::new("rustc").arg("-vV").output().context("cannot run rustc -vV")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let host = text.lines().find_map(|l| l.strip_prefix("host: ")).context("rustc -vV names no host")?;
    Ok(host.trim().to_owned())
}
