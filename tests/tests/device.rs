//! The device channel over real ptys: the host's serial driver against `device-sim`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tether_tests::{DeviceSim, TestHost};

const WAIT: Duration = Duration::from_secs(20);
/// The link's default silence timeout (docs/device-link.md §9).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(3500);

async fn get(url: &str) -> String {
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("request failed: {e}"),
    }
}

async fn post(url: &str, body: &str) -> (u16, String) {
    match reqwest::Client::new().post(url).body(body.to_owned()).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, format!("request failed: {e}")),
    }
}

/// A stable device path in the test's directory, as `/dev/serial/by-id/...` would be.
fn link_path(t: &TestHost) -> PathBuf {
    t.dir.path().join("ttyDEVICE")
}

fn arg(path: &std::path::Path) -> &str {
    path.to_str().unwrap_or_default()
}

#[tokio::test]
async fn bridge_reads_and_switches_the_led_through_the_device() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    let link = link_path(&t);
    let _sim = DeviceSim::start(&["--link", arg(&link), "--device-id", "board-1", "--interval", "0.1"])?;
    t.spawn_with_device("bridge", "device-bridge", &[], Some(&link))?;
    t.logs.wait_for("bridge", "device connected: board-1", WAIT).await?;
    t.logs.wait_for_count("bridge", "temperature", 3, WAIT).await?;

    let url = t.url("bridge", "/led");
    assert_eq!(get(&url).await, "off\n");
    assert_eq!(post(&url, "on").await, (200, "on\n".to_owned()));
    assert_eq!(get(&url).await, "on\n");
    assert_eq!(post(&url, "off").await, (200, "off\n".to_owned()));
    assert_eq!(get(&url).await, "off\n");
    assert_eq!(post(&url, "maybe").await.0, 400);
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn messages_held_for_an_absent_device_stop_at_the_agents_limit() -> anyhow::Result<()> {
    let mut t = TestHost::start(|c| c.limits.device_queue_messages = 3).await?;
    // No device on the line: queued messages wait for one.
    t.spawn_with_device("probe", "device-probe", &[], Some(&link_path(&t)))?;
    let base = t.url("probe", "");
    for _ in 0..3 {
        assert!(get(&format!("{base}/send?name=led&data=true&queued")).await.starts_with("sent "));
    }
    assert_eq!(get(&format!("{base}/send?name=led&data=true&queued")).await, "refused QueueFull");
    t.logs.wait_for("probe", "at limits.device_queue_messages", WAIT).await?;
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_request_the_agent_stopped_waiting_for_is_not_reported_undelivered_later() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    let link = link_path(&t);
    t.spawn_with_device("probe", "device-probe", &[], Some(&link))?;
    let base = t.url("probe", "");
    let u = |path: &str| format!("{base}{path}");
    // No device yet: the request waits on the host, and the agent's own timeout ends it.
    assert_eq!(get(&u("/request?name=no-such-handler&queued&timeout=0.2")).await, "fail timed out");
    // The device comes and refuses it, then a second request the same way: by the second's
    // answer the first's has come, and nothing is said of it (the agent was told already,
    // by its timeout).
    let _sim = DeviceSim::start(&["--link", arg(&link), "--interval", "0"])?;
    t.logs.wait_for("probe", "device connected", WAIT).await?;
    assert_eq!(get(&u("/request?name=no-such-handler")).await, "fail no handler");
    // The host writes an agent's log line during its call, before the answer goes out.
    t.logs.drain();
    let undelivered: Vec<String> = t.logs.texts("probe").into_iter().filter(|l| l.contains("not delivered")).collect();
    assert!(undelivered.is_empty(), "{undelivered:?}");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn unplug_is_noticed_sending_fails_at_once_and_replug_resumes() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    let link = link_path(&t);
    let mut sim = DeviceSim::start(&["--link", arg(&link), "--interval", "0"])?;
    t.spawn_with_device("probe", "device-probe", &[], Some(&link))?;
    t.logs.wait_for("probe", "device connected", WAIT).await?;
    let base = t.url("probe", "");
    let u = |path: &str| format!("{base}{path}");
    assert_eq!(get(&u("/request?name=ping")).await, "reply \"pong\"");
    assert_eq!(get(&u("/request?name=no-such-handler")).await, "fail no handler");

    // Unplug: the agent hears of it within the heartbeat timeout.
    sim.stop();
    let unplugged = Instant::now();
    t.logs.wait_for("probe", "device disconnected", WAIT).await?;
    assert!(unplugged.elapsed() <= HEARTBEAT_TIMEOUT, "disconnect noticed after {:?}", unplugged.elapsed());
    assert_eq!(get(&u("/connected")).await, "false");

    // Offline: a plain send is refused at once; a queued one waits for the device.
    let asked = Instant::now();
    assert_eq!(get(&u("/send?name=led&data=true")).await, "refused NotConnected");
    // "At once" rather than after waiting for the device or the link's 10 s ack timeout;
    // 5 s leaves room for one HTTP round trip on a loaded machine (1 s did not always).
    assert!(asked.elapsed() < Duration::from_secs(5), "refused after {:?}", asked.elapsed());
    assert!(get(&u("/send?name=led&data=true&queued")).await.starts_with("sent "));

    // Replug on the same path (a new pty behind it): connect event, queued message
    // delivered, traffic resumes.
    let _sim = DeviceSim::start(&["--link", arg(&link), "--interval", "0"])?;
    t.logs.wait_for_count("probe", "device connected", 2, WAIT).await?;
    assert_eq!(get(&u("/request?name=get-led")).await, "reply true");
    assert_eq!(get(&u("/request?name=echo&data=%7B%22a%22%3A%5B1%2C2.5%2C%22x%22%5D%7D")).await, r#"reply {"a":[1,2.5,"x"]}"#);
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn line_noise_and_corrupted_frames_never_get_through() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    let link = link_path(&t);
    let _sim = DeviceSim::start(&["--link", arg(&link), "--interval", "0.02", "--noise", "5"])?;
    t.spawn_with_device("probe", "device-probe", &[], Some(&link))?;
    t.logs.wait_for("probe", "device connected", WAIT).await?;
    for i in 0..100 {
        let reply = get(&t.url("probe", &format!("/request?name=echo&data=%5B{i}%2C%22{}%22%5D", "z".repeat(i)))).await;
        assert_eq!(reply, format!("reply [{i},\"{}\"]", "z".repeat(i)));
    }
    t.logs.wait_for_count("probe", "temperature", 50, WAIT).await?;
    // Corrupted frames carry `led` = true and `temperature` = 999: neither may arrive.
    assert_eq!(get(&t.url("probe", "/request?name=get-led")).await, "reply false");
    t.logs.drain();
    let texts = t.logs.texts("probe");
    assert!(!texts.iter().any(|l| l.contains("999") || l.contains("\"led\"")), "corrupted message delivered: {texts:#?}");
    assert_eq!(texts.iter().filter(|l| l.contains("device connected")).count(), 1, "the link dropped: {texts:#?}");
    // The host counted what it dropped, and said so in the agent's log.
    let stats = t.host.device_stats("probe").ok_or_else(|| anyhow::anyhow!("no device stats"))?;
    assert!(stats.crc_errors > 0 && stats.frames_rx > 150, "{stats:?}");
    t.logs.wait_for("probe", "device line errors so far:", WAIT).await?;
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn both_directions_at_full_speed_lose_duplicate_and_reorder_nothing() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    let link = link_path(&t);
    let _sim = DeviceSim::start(&["--link", arg(&link), "--interval", "0"])?;
    t.spawn_with_device("probe", "device-probe", &[], Some(&link))?;
    t.logs.wait_for("probe", "device connected", WAIT).await?;
    const N: usize = 3000;
    let seq_url = t.url("probe", &format!("/seq?count={N}&size=64"));
    assert!(get(&t.url("probe", &format!("/burst?count={N}&size=64"))).await.starts_with("sent "));
    let (to_device, from_device) = tokio::join!(get(&seq_url), t.logs.wait_for("probe", "burst done", WAIT));
    assert_eq!(to_device, format!("acked {N} failed 0"));
    from_device?;
    let received = format!("device seq: received {N} out-of-order 0");
    t.logs.wait_for("probe", &received, WAIT).await?;
    assert!(t.logs.texts("probe").iter().any(|l| l.contains(&format!("\"acked\": Int({N})")) && l.contains("\"failed\": Int(0)")));
    let seen = get(&t.url("probe", "/request?name=get-seq")).await;
    assert_eq!(seen, format!(r#"reply {{"errors":0,"next":{N},"received":{N}}}"#));
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_scripted_simulator_sends_and_answers_what_it_is_told() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    let link = link_path(&t);
    let script = t.dir.path().join("board.script");
    // `21` is a CBOR integer: the agent's f64 handler takes it.
    std::fs::write(&script, "# a fan board\non get-fan true\nsend temperature 21\n")?;
    let mut sim = DeviceSim::start(&["--link", arg(&link), "--interval", "0", "--control", "--script", arg(&script), "--send", "temperature=22.5"])?;
    t.spawn_with_device("probe", "device-probe", &[], Some(&link))?;
    t.logs.wait_for("probe", "temperature 21", WAIT).await?;
    t.logs.wait_for("probe", "temperature 22.5", WAIT).await?;
    assert_eq!(get(&t.url("probe", "/request?name=get-fan")).await, "reply true");
    // Typed on its control line, sent at once.
    sim.command("send temperature 23.25")?;
    t.logs.wait_for("probe", "temperature 23.25", WAIT).await?;
    t.stop().await;
    Ok(())
}
