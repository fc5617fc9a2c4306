//! An agent of one's own, as a newcomer makes it: `tether new` in a directory outside the
//! repository, `tether build`, `tether run DIR`. Every template builds and passes the
//! world check.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tether_tests::tether_run::TetherRun;
use tether_tests::{build_bin, workspace_root};

/// One target directory for every crate made here: they share their dependencies.
fn target_dir() -> std::path::PathBuf {
    workspace_root().join("target/agent-crates")
}

fn tether(dir: &Path, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let output = Command::new(build_bin("tether")?)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("NO_COLOR", "1")
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), text))
}

#[tokio::test]
async fn a_new_crate_builds_with_plain_cargo_and_runs_outside_the_repository() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    assert!(!dir.path().starts_with(workspace_root()));
    let (ok, text) = tether(dir.path(), &["new", "greeter", "--template", "http"])?;
    assert!(ok, "{text}");
    for file in ["Cargo.toml", ".cargo/config.toml", "src/lib.rs", "tether.toml", ".gitignore"] {
        assert!(dir.path().join("greeter").join(file).is_file(), "{file}");
    }
    let (ok, text) = tether(dir.path(), &["new", "greeter"])?;
    assert!(!ok && text.contains("greeter exists already"), "{text}");
    let (ok, text) = tether(dir.path(), &["new", "Not_A_Name"])?;
    assert!(!ok && text.contains("is not a usable name"), "{text}");

    // Plain cargo in the crate: its own target and profile, no workspace around it.
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--quiet"])
        .current_dir(dir.path().join("greeter"))
        .env("CARGO_TARGET_DIR", target_dir())
        .status()?;
    assert!(status.success());
    assert!(target_dir().join("wasm32-wasip2/release/greeter.wasm").is_file());

    // `tether run DIR` builds it, takes its tether.toml, and serves it.
    let crate_dir = dir.path().join("greeter");
    let args = [OsStr::new("run"), crate_dir.as_os_str(), OsStr::new("--listen"), OsStr::new("127.0.0.1:0")];
    let target = target_dir();
    let run = TetherRun::spawn_with_env(&args, &[("CARGO_TARGET_DIR", target.as_os_str())], "agent URL: ", Duration::from_secs(300)).await?;
    let url = run.lines().iter().find_map(|l| Some(l.split("agent URL: ").nth(1)?.split_whitespace().next()?.to_owned()));
    let url = url.ok_or_else(|| anyhow::anyhow!("no URL: {:?}", run.lines()))?;
    assert!(url.ends_with("/greeter"), "the id from tether.toml: {url}");
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{url}/")).send().await?.text().await?, "hello from greeter\n");
    assert_eq!(http.post(format!("{url}/count")).send().await?.text().await?, r#"{"count":1}"#);
    assert_eq!(http.post(format!("{url}/count")).send().await?.text().await?, r#"{"count":2}"#);
    assert!(crate_dir.join("tether-data/store").is_dir(), "the store is the crate's");
    Ok(())
}

/// Each template's own test (tests/agent.rs, on tether-testkit: the hub emulator, a
/// scripted board, the agent under `tether run`) passes under `tether test`.
#[test]
fn every_template_builds_and_passes_its_own_tests() -> anyhow::Result<()> {
    build_bin("device-sim")?;
    let dir = tempfile::tempdir()?;
    for template in ["hello", "http", "device", "azure"] {
        let name = format!("t-{template}");
        let (ok, text) = tether(dir.path(), &["new", &name, "--template", template])?;
        assert!(ok, "{text}");
        let (ok, text) = tether(dir.path(), &["build", &name])?;
        assert!(ok && text.contains("a component of the tether:agent world"), "{template}: {text}");
        let (ok, text) = tether(dir.path(), &["test", &name])?;
        assert!(ok && text.contains("test result: ok. 1 passed"), "{template}: {text}");
    }
    // Not a crate, and a crate that is not an agent: refused with what to do.
    let (ok, text) = tether(dir.path(), &["build", "."])?;
    assert!(!ok && text.contains("has no Cargo.toml"), "{text}");
    Ok(())
}
