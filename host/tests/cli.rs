//! The `tether` binary refuses bad input with one clear line and a non-zero exit.

use std::process::Command;

fn tether(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether")).args(args).env("RUST_LOG", "off").output().expect("tether runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_file_that_is_not_a_component_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.wasm");
    std::fs::write(&path, b"#!/bin/sh\necho not wasm\n").expect("write");
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, format!("[host]\nhttp_listen = \"127.0.0.1:0\"\ncache_dir = {:?}\nstore_dir = {:?}\n", dir.path().join("c"), dir.path().join("s"))).expect("write");
    let (code, stderr) = tether(&["run", path.to_str().unwrap_or_default(), "--config", config.to_str().unwrap_or_default()]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: cannot load ") && stderr.contains("not a WebAssembly component"), "{stderr}");
}

#[test]
fn a_missing_file_is_named() {
    let (code, stderr) = tether(&["run", "/nonexistent/agent.wasm", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/agent.wasm") && stderr.contains("No such file"), "{stderr}");
}

#[test]
fn a_malformed_config_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "[host]\nhttp_listen = \"127.0.0.1:0\"\n\n[limits]\nmemory = 12\n").expect("write");
    let (code, stderr) = tether(&["run", "x.wasm", "--config", config.to_str().unwrap_or_default()]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tether.toml") && stderr.contains("line 4"), "{stderr}");
}

#[test]
fn out_of_range_limits_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "[host.limits]\nmemory_mib = 0\n").expect("write");
    let (code, stderr) = tether(&["run", "x.wasm", "--config", config.to_str().unwrap_or_default()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("limits.memory_mib must be 1..=4096"), "{stderr}");
}
