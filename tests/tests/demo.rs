//! `tether demo`, the main job, run as a user runs it: the binary, the device simulator
//! and the demo agent; a direct method through the printed endpoint; a clean SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_tests::{build_agent, build_bin};

#[test]
fn demo_provisions_forwards_telemetry_and_answers_a_method() -> anyhow::Result<()> {
    let agent = build_agent("azure-demo")?;
    let tether = build_bin("tether")?;
    build_bin("device-sim")?;
    let state = tempfile::tempdir()?;
    let mut child = Command::new(&tether)
        .args(["demo", "--mqtt-port", "0", "--https-port", "0", "--page-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0", "--interval", "0.5"])
        .arg("--state-dir")
        .arg(state.path())
        .arg("--agent")
        .arg(&agent)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // What it prints for the user (stdout) and its log (stderr), as one stream.
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [Box::new(stdout) as Box<dyn std::io::Read + Send>, Box::new(stderr)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let mut seen: Vec<String> = Vec::new();
    // Over every line so far: stdout and stderr come through two threads, so a log line can
    // arrive before printed lines that were written first.
    let mut wait_for = |what: &dyn Fn(&str) -> bool| -> anyhow::Result<String> {
        if let Some(line) = seen.iter().find(|l| what(l)) {
            return Ok(line.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            seen.push(line.clone());
            if what(&line) {
                return Ok(line);
            }
        }
        anyhow::bail!("not seen; output so far:\n{}", seen.join("\n"))
    };
    let token_line = wait_for(&|l| l.contains("export TOKEN="))?;
    let token = token_line.split("export TOKEN='").nth(1).and_then(|t| t.strip_suffix('\'')).unwrap_or_default().to_owned();
    let control_line = wait_for(&|l| l.contains("export CONTROL_TOKEN="))?;
    let control_token = control_line.split("export CONTROL_TOKEN='").nth(1).and_then(|t| t.strip_suffix('\'')).unwrap_or_default().to_owned();
    let url_line = wait_for(&|l| l.contains("/methods?api-version="))?;
    let url = url_line.trim().trim_matches('\'').to_owned();
    let c2d_line = wait_for(&|l| l.contains("/emulator/devices/"))?;
    let c2d_url = c2d_line.trim().trim_matches('\'').to_owned();
    wait_for(&|l| l.contains("registered through DPS"))?;
    wait_for(&|l| l.contains("[hub]") && l.contains(r#""type":"telemetry""#) && l.contains("temperature"))?;

    let ca = std::fs::read(state.path().join("ca.pem"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let (status, body) = runtime.block_on(async {
        let client = reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(&ca)?]).build()?;
        let response = client
            .post(&url)
            .header("authorization", &token)
            .header("content-type", "application/json")
            .body(r#"{"methodName":"blink","payload":{"times":2},"responseTimeoutInSeconds":10}"#)
            .send()
            .await?;
        anyhow::Ok((response.status().as_u16(), response.text().await?))
    })?;
    assert_eq!((status, body.as_str()), (200, r#"{"payload":{"blinked":2},"status":200}"#));

    // The printed C2D command: it needs the printed control token.
    let (without, with) = runtime.block_on(async {
        let client = reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(&ca)?]).build()?;
        let send = |auth: Option<&str>| {
            let request = client.post(&c2d_url).body(r#"{"led": true}"#);
            match auth {
                Some(token) => request.bearer_auth(token),
                None => request,
            }
            .send()
        };
        anyhow::Ok((send(None).await?.status().as_u16(), send(Some(&control_token)).await?.status().as_u16()))
    })?;
    assert_eq!((without, with), (401, 200), "C2D without and with the control token");

    // SIGTERM ends it cleanly.
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            assert!(status.success(), "{status}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `tether hub` on free ports over `state` with `extra` arguments, and what it prints.
fn start_hub(tether: &std::path::Path, state: &std::path::Path, extra: &[&str]) -> anyhow::Result<(std::process::Child, std::process::ChildStdout)> {
    let mut child = Command::new(tether)
        .args(["hub", "--mqtt-port", "0", "--https-port", "0", "--page-listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .args(extra)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    Ok((child, stdout))
}

/// `tether hub --persist` keeps its demo enrollment's key across restarts, so devices
/// provisioned with it can register again.
#[test]
fn hub_keeps_the_demo_enrollment_across_restarts() -> anyhow::Result<()> {
    let tether = build_bin("tether")?;
    let state = tempfile::tempdir()?;
    let dps_line = || -> anyhow::Result<String> {
        let (mut child, stdout) = start_hub(&tether, state.path(), &["--persist"])?;
        let line = BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.contains("DPS: scope"));
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        anyhow::ensure!(child.wait()?.success(), "tether hub did not stop cleanly");
        line.ok_or_else(|| anyhow::anyhow!("no DPS line printed"))
    };
    let first = dps_line()?;
    assert!(first.contains("registration id demo-registration, key "), "{first}");
    assert_eq!(dps_line()?, first);
    Ok(())
}

/// `tether hub` prints a service token and curl lines a user can paste: the token reads
/// the twin, the control token sends C2D.
#[test]
fn hub_prints_tokens_and_curl_lines_that_work() -> anyhow::Result<()> {
    let tether = build_bin("tether")?;
    let state = tempfile::tempdir()?;
    let (mut child, stdout) = start_hub(&tether, state.path(), &[])?;
    let mut printed = Vec::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let last = line.contains("/emulator/devices/demo-device/c2d");
        printed.push(line);
        if last {
            break;
        }
    }
    let quoted = |prefix: &str| printed.iter().find_map(|l| l.trim().strip_prefix(prefix)?.strip_suffix('\'').map(str::to_owned));
    let token = quoted("export TOKEN='").ok_or_else(|| anyhow::anyhow!("no TOKEN in {printed:?}"))?;
    let control = quoted("export CONTROL_TOKEN='").ok_or_else(|| anyhow::anyhow!("no CONTROL_TOKEN in {printed:?}"))?;
    let url = |needle: &str| printed.iter().find_map(|l| Some(l.split('\'').find(|p| p.contains(needle))?.to_owned()));
    let twin = url("/twins/demo-device?").ok_or_else(|| anyhow::anyhow!("no twin URL in {printed:?}"))?;
    let c2d = url("/c2d").ok_or_else(|| anyhow::anyhow!("no C2D URL in {printed:?}"))?;
    let ca = std::fs::read(state.path().join("ca.pem"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let (twin_status, c2d_status) = runtime.block_on(async {
        let client = reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(&ca)?]).build()?;
        let twin = client.get(&twin).header("authorization", &token).send().await?.status().as_u16();
        let c2d = client.post(&c2d).bearer_auth(&control).body("hello").send().await?.status().as_u16();
        anyhow::Ok((twin, c2d))
    })?;
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
    child.wait()?;
    assert_eq!((twin_status, c2d_status), (200, 200), "{printed:#?}");
    Ok(())
}
