//! `tether build`: builds an agent crate with cargo and checks the component against the
//! agent world, as a deploy would, so that a module that cannot run is refused here.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use tether_host::Runtime;
use tether_host::config::HostConfig;

/// `tether build`'s arguments.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// The agent crate's directory.
    #[arg(default_value = ".")]
    dir: PathBuf,
}

/// Builds and checks; prints the component's path.
pub fn build(args: &BuildArgs) -> anyhow::Result<()> {
    let wasm = build_crate(&args.dir)?;
    println!("{}", wasm.display());
    Ok(())
}

/// `cargo build --release` in `dir`, then the same checks as a deploy (shape, compile,
/// link against the world). Returns the component's path.
pub fn build_crate(dir: &Path) -> anyhow::Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!("{} has no Cargo.toml: give an agent crate's directory (`tether new NAME` makes one)", dir.display());
    }
    // In the crate's directory, so that its own .cargo/config.toml counts; the target is
    // named too, for a crate in a workspace that builds for this machine by default.
    let status = Command::new(cargo())
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(dir)
        .status()
        .context("cannot run cargo; is Rust installed (https://rustup.rs)?")?;
    if !status.success() {
        bail!("cargo build failed ({status}); if it says the target may not be installed: rustup target add wasm32-wasip2");
    }
    let wasm = artefact(dir)?;
    check(&wasm)?;
    let size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
    eprintln!("built {} ({} KiB), a component of the tether:agent world", wasm.display(), size.div_ceil(1024));
    Ok(wasm)
}

/// The cargo that runs us (under cargo), or the one on the `PATH`.
pub(super) fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Where cargo put the crate's component: `<target dir>/wasm32-wasip2/release/<lib>.wasm`.
fn artefact(dir: &Path) -> anyhow::Result<PathBuf> {
    let output = Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(dir)
        .output()
        .context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).context("cargo metadata printed no JSON")?;
    let target_dir = metadata["target_directory"].as_str().context("cargo metadata has no target_directory")?;
    // In a workspace, metadata lists every member: the crate is the one whose manifest
    // this is.
    let manifest = dir.join("Cargo.toml").canonicalize().with_context(|| format!("cannot read {}", dir.join("Cargo.toml").display()))?;
    let package = metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["manifest_path"].as_str().is_some_and(|m| Path::new(m) == manifest)))
        .with_context(|| format!("cargo metadata does not list {}", manifest.display()))?;
    let lib = package["targets"]
        .as_array()
        .and_then(|targets| targets.iter().find(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib"))))
        .and_then(|t| t["name"].as_str())
        .context("the crate has no cdylib target: an agent needs [lib] crate-type = [\"cdylib\"]")?;
    let wasm = Path::new(target_dir).join("wasm32-wasip2/release").join(format!("{}.wasm", lib.replace('-', "_")));
    if !wasm.is_file() {
        bail!("cargo built no {}", wasm.display());
    }
    Ok(wasm)
}

/// Loads the component as a host would (the compile cache goes next to it).
fn check(wasm: &Path) -> anyhow::Result<()> {
    let cache = wasm.with_extension("tether-cache");
    let config = HostConfig { cache_dir: cache, max_agents: 1, compile_worker: super::compile_worker(), ..HostConfig::default() };
    let runtime = Runtime::new(&config)?;
    runtime.load_file(wasm).with_context(|| format!("{} cannot run as an agent", wasm.display()))?;
    Ok(())
}
