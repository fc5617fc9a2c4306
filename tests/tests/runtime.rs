//! The agent runtime end to end: real components in a real host, driven over real HTTP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_host::{AgentStatus, LoadError, Level};
use tether_tests::tether_run::TetherRun;
use tether_tests::{ClosedPort, TestHost, build_agent};

const WAIT: Duration = Duration::from_secs(20);

/// A `tether run` config in `dir` for agent `id`: a free port, the store and cache in `dir`.
fn run_config(dir: &Path, id: &str) -> anyhow::Result<PathBuf> {
    let config = dir.join("tether.toml");
    let (store, cache) = (dir.join("store"), dir.join("cache"));
    std::fs::write(&config, format!("[host]\nhttp_listen = \"127.0.0.1:0\"\nstore_dir = {store:?}\ncache_dir = {cache:?}\n\n[agent]\nid = {id:?}\n"))?;
    Ok(config)
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test]
async fn timers_fire_in_order_and_cancelled_ones_never() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    t.spawn("hello", "hello", &[])?;
    t.logs.wait_for("hello", "tick 1", WAIT).await?;
    let lines = t.logs.texts("hello");
    let pos = |s: &str| lines.iter().position(|l| l.contains(s));
    assert_eq!(pos("hello from hello"), Some(0), "{lines:?}");
    assert!(pos("timer 1 fired") < pos("timer 2 fired"), "{lines:?}");
    assert!(pos("timer 2 fired") < pos("tick 1"), "{lines:?}");
    // The cancelled timer was due at 0.3 s, well before tick 1 at 0.6 s.
    assert_eq!(pos("cancelled timer fired"), None, "{lines:?}");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn agent_answers_its_url_now_and_after_a_timer() -> anyhow::Result<()> {
    let t = TestHost::start(|_| {}).await?;
    t.spawn("echo", "http-echo", &[])?;
    let (status, body) = get(&t.url("echo", "/some/path?a=1&b=two")).await;
    assert_eq!(status, 200);
    assert_eq!(body, r#"GET /some/path {"a": "1", "b": "two"} "#);
    let (status, body) = get(&t.url("echo", "/later?secs=0.2")).await;
    assert_eq!((status, body.as_str()), (200, "answered after 0.2 s\n"));
    // Unknown agents are the host's 404, not an agent's.
    let (status, _) = get(&t.url("nobody", "/x")).await;
    assert_eq!(status, 404);
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn outgoing_http_reaches_a_real_server_and_reports_refusal_as_curl_7() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let app = axum::Router::new().route("/data", axum::routing::get(|| async { "served by the test" }));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let t = TestHost::start(|_| {}).await?;
    t.spawn("echo", "http-echo", &[])?;
    let (status, body) = get(&t.url("echo", &format!("/fetch?url=http://{server_addr}/data"))).await;
    assert_eq!((status, body.as_str()), (200, "200 served by the test"));

    // Held until the request is refused: no other test's server can be listening there.
    let closed = ClosedPort::new()?;
    let (_, body) = get(&t.url("echo", &format!("/fetch?url=http://127.0.0.1:{}/", closed.port))).await;
    assert!(body.starts_with("error 7 "), "{body}");
    let (_, body) = get(&t.url("echo", "/fetch?url=notaurl")).await;
    assert!(body.starts_with("error 3 "), "{body}");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn store_survives_host_restart_and_is_capped() -> anyhow::Result<()> {
    let t = TestHost::start(|_| {}).await?;
    t.spawn("probe", "probe", &[])?;
    assert_eq!(get(&t.url("probe", "/count")).await, (200, "1".into()));
    assert_eq!(get(&t.url("probe", "/count")).await, (200, "2".into()));
    let (_, body) = get(&t.url("probe", "/save?bytes=70000")).await;
    assert_eq!(body, "save failed: value too large for the persistent store");
    let dir = t.stop().await;

    let t = TestHost::start_in(dir, |_| {}).await?;
    t.spawn("probe", "probe", &[])?;
    assert_eq!(get(&t.url("probe", "/count")).await, (200, "3".into()));
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn stdout_and_stderr_go_to_the_agent_log() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    t.spawn("probe", "probe", &[])?;
    assert_eq!(get(&t.url("probe", "/print")).await, (200, "printed".into()));
    let out = t.logs.wait_for("probe", "to stdout", WAIT).await?;
    let err = t.logs.wait_for("probe", "to stderr", WAIT).await?;
    assert_eq!((out.level, err.level), (Level::Info, Level::Error));
    t.stop().await;
    Ok(())
}

/// Sends `path` to agent "bad", checks that it crashes with `cause`, that the other agent
/// answers meanwhile, and that "bad" comes back with its store intact.
async fn crash_and_recover(path: &str, cause: &str) -> anyhow::Result<()> {
    let mut t = TestHost::start(|c| {
        c.limits.cpu_ms_per_event = 200;
        c.limits.memory_mib = 32;
    })
    .await?;
    t.spawn("bad", "probe", &[])?;
    t.spawn("good", "probe", &[])?;
    assert_eq!(get(&t.url("bad", "/count")).await, (200, "1".into()));

    let bad_url = t.url("bad", path);
    let crashing = tokio::spawn(async move { get(&bad_url).await });
    // The neighbour keeps answering while "bad" spins or allocates.
    for _ in 0..5 {
        assert_eq!(get(&t.url("good", "/ping")).await, (200, "pong".into()));
    }
    let (status, body) = crashing.await?;
    assert_eq!(status, 503, "{body}");
    let line = t.logs.wait_for("bad", "agent crashed", WAIT).await?;
    assert!(line.text.contains(cause), "{}", line.text);
    assert_eq!(line.level, Level::Error);

    t.logs.wait_for_count("bad", "probe started", 2, WAIT).await?;
    assert_eq!(get(&t.url("bad", "/count")).await, (200, "2".into()));
    let (status, restarts) = t.host.status("bad").ok_or_else(|| anyhow::anyhow!("no status"))?;
    assert_eq!((status, restarts), (AgentStatus::Running, 1));
    assert_eq!(t.host.status("good").map(|s| s.1), Some(0));
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn infinite_loop_is_stopped_by_the_cpu_limit() -> anyhow::Result<()> {
    crash_and_recover("/spin", "CPU limit exceeded").await
}

/// Events waiting together are taken in one call into the agent (`events.next`), and each
/// keeps the CPU budget of an event: five timers of 100 ms each under a 200 ms budget all
/// run, in fewer calls than events.
#[tokio::test]
async fn a_burst_of_events_is_one_call_with_a_budget_per_event() -> anyhow::Result<()> {
    let t = TestHost::start(|c| c.limits.cpu_ms_per_event = 200).await?;
    t.spawn("burst", "probe", &[])?;
    assert_eq!(get(&t.url("burst", "/ping")).await, (200, "pong".into()));
    // A call's events are counted just after it returns, so after the answer that came
    // out of it: wait for the count rather than read it at once.
    let host = &t.host;
    let settled = |at_least: u64| async move {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let m = host.agent("burst").map(|a| a.metrics).ok_or_else(|| anyhow::anyhow!("no agent"))?;
            if m.events >= at_least {
                return anyhow::Ok(m);
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "only {} events counted", m.events);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // Start and the ping.
    let before = settled(2).await?;
    assert_eq!(get(&t.url("burst", "/burst?n=8&ms=100")).await, (200, "burst 8".into()));
    // The request and its eight timers.
    let after = settled(before.events + 9).await?;
    assert_eq!(t.host.status("burst").map(|s| s.1), Some(0), "no crash: {:?}", t.logs.texts("burst"));
    // The timers fire while the first of them runs, so at least the last seven come in the
    // same call as another event.
    let (events, calls) = (after.events - before.events, after.calls - before.calls);
    assert!(calls + 7 <= events, "{events} events in {calls} calls");
    // Together they ran past one event's budget (charged by the clock, or by CPU time in
    // the slow lane, which a loaded machine makes less than the 0.8 s they spun) in one
    // call, and were not stopped: each had a budget of its own.
    let charged = after.busy_seconds - before.busy_seconds;
    assert!(charged > 0.2, "charged {charged} s");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn memory_hog_is_stopped_by_the_memory_cap() -> anyhow::Result<()> {
    crash_and_recover("/hog", "memory limit exceeded (32 MiB)").await
}

#[tokio::test]
async fn a_busy_agent_runs_in_the_slow_lane_until_it_quiets_down() -> anyhow::Result<()> {
    let t = TestHost::start(|_| {}).await?;
    t.spawn("busy", "probe", &[])?;
    t.spawn("quiet", "probe", &[])?;
    let lane = |id: &str| t.host.agent(id).map(|r| r.slow_lane);
    assert_eq!(lane("busy"), Some(false));
    // From now on "busy" makes 200,000 host calls per event, one event after another: each
    // event runs for many ticks, but well inside its 1 s of CPU even in a debug build on a
    // loaded machine (a million came close to it and crashed the agent there).
    assert_eq!(get(&t.url("busy", "/noise?kind=calls&n=200000")).await, (200, "noise started".into()));
    let deadline = std::time::Instant::now() + WAIT;
    while lane("busy") != Some(true) {
        assert!(std::time::Instant::now() < deadline, "busy agent never moved to the slow lane");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its neighbour answers all along and stays in the normal lane.
    for _ in 0..20 {
        assert_eq!(get(&t.url("quiet", "/ping")).await, (200, "pong".into()));
    }
    assert_eq!(lane("quiet"), Some(false));
    let busy = t.host.agent("busy").ok_or_else(|| anyhow::anyhow!("no busy agent"))?;
    assert!(busy.metrics.busy_seconds > 0.0 && busy.metrics.events > 1, "{:?}", busy.metrics);
    assert_eq!(busy.restarts, 0, "within its CPU limit, the busy agent is slowed, not stopped");
    // A restart ends the noise, and the fresh instance is light again.
    t.host.restart_agent("busy")?;
    while lane("busy") != Some(false) || get(&t.url("busy", "/ping")).await != (200, "pong".into()) {
        assert!(std::time::Instant::now() < deadline + WAIT, "busy agent stayed in the slow lane: {:?}", t.host.agent("busy"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn panic_is_logged_and_the_agent_restarts() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    t.spawn("p", "probe", &[])?;
    assert_eq!(get(&t.url("p", "/panic")).await.0, 503);
    t.logs.wait_for("p", "panic: ", WAIT).await.map(|l| assert!(l.text.contains("asked to panic"), "{}", l.text))?;
    t.logs.wait_for("p", "agent crashed: trap", WAIT).await?;
    t.logs.wait_for("p", "restarting in 100 ms", WAIT).await?;
    // Back after the backoff.
    let deadline = std::time::Instant::now() + WAIT;
    while get(&t.url("p", "/ping")).await != (200, "pong".into()) {
        assert!(std::time::Instant::now() < deadline, "agent did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn crash_loop_marks_the_agent_failed_and_the_host_stays_up() -> anyhow::Result<()> {
    let mut t = TestHost::start(|c| c.limits.max_restarts = 2).await?;
    t.spawn("p", "probe", &[])?;
    t.spawn("other", "probe", &[])?;
    for round in 1..=3 {
        t.logs.wait_for_count("p", "probe started", round, WAIT).await?;
        assert_eq!(get(&t.url("p", "/panic")).await.0, 503);
        t.logs.drain();
        // Wait for the restart (or the failure) before the next panic.
        let deadline = std::time::Instant::now() + WAIT;
        while !matches!(t.host.status("p"), Some((AgentStatus::Running | AgentStatus::Failed { .. }, _))) {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    t.logs.wait_for("p", "agent failed: 3 crashes in a row", WAIT).await?;
    assert!(matches!(t.host.status("p"), Some((AgentStatus::Failed { .. }, 3))), "{:?}", t.host.status("p"));
    let (status, body) = get(&t.url("p", "/ping")).await;
    assert_eq!((status, body.as_str()), (503, "agent failed: it crashed repeatedly"));
    assert_eq!(get(&t.url("other", "/ping")).await, (200, "pong".into()));
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_modules_are_refused_with_a_reason() -> anyhow::Result<()> {
    let t = TestHost::start(|_| {}).await?;
    let rt = t.host.runtime();
    let err = |r: Result<_, LoadError>| r.err().map(|e| e.to_string()).unwrap_or_default();

    let text = err(rt.load(b"hello, not wasm"));
    assert!(text.contains("not a WebAssembly component") && text.contains("magic"), "{text}");
    let core = wat::parse_str("(module)")?;
    let text = err(rt.load(&core));
    assert!(text.contains("core WebAssembly module"), "{text}");
    let no_exports = wat::parse_str("(component)")?;
    let text = err(rt.load(&no_exports));
    assert!(text.starts_with("not a tether:agent@0.1.0 agent: no export `"), "{text}");
    let unknown_import = wat::parse_str(r#"(component (import "acme:nope/thing@1.0.0" (instance (export "f" (func)))))"#)?;
    let text = err(rt.load(&unknown_import));
    assert!(text.contains("acme:nope/thing@1.0.0"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    let truncated = &std::fs::read(tether_tests::build_agent("hello")?)?[..1000];
    let text = err(rt.load(truncated));
    assert!(text.starts_with("not valid WebAssembly: unexpected end-of-file"), "{text}");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn compiled_components_are_cached_by_content_hash() -> anyhow::Result<()> {
    let t = TestHost::start(|_| {}).await?;
    let path = tether_tests::build_agent("hello")?;
    let first = t.host.runtime().load_file(&path)?;
    let cached: Vec<_> = std::fs::read_dir(t.dir.path().join("cache"))?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(cached.len(), 1);
    assert!(cached[0].to_string_lossy().starts_with(&first.digest), "{cached:?}");
    // A second load takes the cached artefact: same digest, no second file.
    let second = t.host.runtime().load_file(&path)?;
    assert_eq!(first.digest, second.digest);
    assert_eq!(std::fs::read_dir(t.dir.path().join("cache"))?.count(), 1);
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_forge_host_log_lines_or_flood_one_line() -> anyhow::Result<()> {
    let agent = build_agent("probe")?;
    let dir = tempfile::tempdir()?;
    let config = run_config(dir.path(), "probe")?;
    let run = TetherRun::start(&agent, &config, WAIT).await?;
    // What a line of tether's own log looks like, for another agent, after a newline.
    let forged = "ok%0D%0A2026-12-02T00:00:00.000000Z%20ERROR%20agent%20crashed%20agent%3Dvictim";
    assert_eq!(get(&format!("{}/log?text={forged}", run.url)).await, (200, "logged".to_owned()));
    assert_eq!(get(&format!("{}/log?bytes=5000000", run.url)).await, (200, "logged".to_owned()));
    run.wait_until("the long line", WAIT, |lines| lines.iter().any(|l| l.contains("xxxx"))).await?;
    let lines = run.lines();
    let crashed: Vec<&String> = lines.iter().filter(|l| l.contains("agent crashed")).collect();
    assert_eq!(crashed.len(), 1, "{lines:#?}");
    assert!(crashed[0].contains(r"ok\r\n2026-12-02") && crashed[0].contains("agent=probe"), "{}", crashed[0]);
    let long = lines.iter().find(|l| l.contains("xxxx")).map_or(0, String::len);
    assert!(long < 17 * 1024, "a 5 MB line reached the host log as {long} bytes");
    Ok(())
}

/// What the peer sends back on `stream` until it closes, or `None` if it did not close
/// within 10 s.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    });
    read.await.ok().map(|()| String::from_utf8_lossy(&got).into_owned())
}

/// Sends one request on `stream` and reads its whole answer (by its content-length),
/// keeping the connection open.
async fn keep_alive_request(stream: &mut tokio::net::TcpStream) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /echo/held HTTP/1.1\r\nHost: t\r\n\r\n").await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:")?.trim().parse::<usize>().ok());
            if length.is_some_and(|n| body.len() >= n) {
                return Ok(text);
            }
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "closed after {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn agent_urls_cut_off_slow_headers_and_slow_bodies() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let t = TestHost::start(|c| {
        c.http_header_timeout_secs = 1;
        c.limits.inbound_timeout_secs = 1;
    })
    .await?;
    t.spawn("echo", "http-echo", &[])?;
    assert_eq!(get(&t.url("echo", "/x")).await.0, 200);

    // Headers that never end: the connection is closed after the header timeout.
    let mut slow = tokio::net::TcpStream::connect(t.host.http_addr()).await?;
    slow.write_all(b"GET /echo/x HTTP/1.1\r\nHost: t\r\nX-Slow: 1\r\n").await?;
    let started = std::time::Instant::now();
    let answer = until_closed(&mut slow).await;
    assert!(answer.is_some(), "a slowloris client was never cut off");
    assert!(started.elapsed() < Duration::from_secs(8), "cut off after {:?}", started.elapsed());

    // A body that never arrives in full: 408 once the agent's answer time is up.
    let mut slow = tokio::net::TcpStream::connect(t.host.http_addr()).await?;
    slow.write_all(b"POST /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789").await?;
    let answer = until_closed(&mut slow).await.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");

    assert_eq!(get(&t.url("echo", "/x")).await.0, 200, "the agent still answers");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn one_address_gets_its_share_of_connections_and_another_is_still_served() -> anyhow::Result<()> {
    const PER_ADDRESS: usize = 3;
    let t = TestHost::start(|c| c.http_max_connections_per_address = PER_ADDRESS).await?;
    t.spawn("echo", "http-echo", &[])?;
    let addr = t.host.http_addr();
    // Connections from 127.0.0.2 that never send a request.
    let from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::from((ip, 0)))?;
        socket.connect(addr).await
    };
    let mut held = Vec::new();
    for _ in 0..PER_ADDRESS {
        held.push(from([127, 0, 0, 2]).await?);
    }
    // The next one from that address is closed at once, before a byte is read.
    let mut over = from([127, 0, 0, 2]).await?;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut over, &mut buf)).await?;
    assert!(matches!(read, Ok(0) | Err(_)), "a connection over the address's share was kept: {read:?}");
    // Another address is served, once the agent has started.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut stream = from([127, 0, 0, 3]).await?;
        if keep_alive_request(&mut stream).await.is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "127.0.0.3 was not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn agent_urls_close_connections_over_the_cap_and_take_new_ones_once_below() -> anyhow::Result<()> {
    const CAP: usize = 4;
    let t = TestHost::start(|c| c.http_max_connections = CAP).await?;
    t.spawn("echo", "http-echo", &[])?;
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut stream = tokio::net::TcpStream::connect(t.host.http_addr()).await?;
        // Retried until the agent has started; a refused try is a closed connection.
        let deadline = std::time::Instant::now() + WAIT;
        while !keep_alive_request(&mut stream).await.is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "the agent does not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream = tokio::net::TcpStream::connect(t.host.http_addr()).await?;
        }
        held.push(stream);
    }
    let mut over = tokio::net::TcpStream::connect(t.host.http_addr()).await?;
    assert!(keep_alive_request(&mut over).await.is_err(), "a connection over the cap was served");

    held.pop();
    let deadline = std::time::Instant::now() + WAIT;
    while get(&t.url("echo", "/x")).await.0 != 200 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no connection taken after one closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn lowered_module_limits_hold_for_a_module_compiled_before() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let wasm = build_agent("probe")?;
    let first = TestHost::start(|c| c.cache_dir = cache.path().to_owned()).await?;
    first.host.runtime().load_file(&wasm)?;
    first.stop().await;
    assert!(std::fs::read_dir(cache.path())?.count() > 0, "the module was cached");
    // The same module, from the same cache, under a limit it is over.
    let strict = TestHost::start(|c| {
        c.cache_dir = cache.path().to_owned();
        c.modules.max_functions = 10;
    })
    .await?;
    match strict.host.runtime().load_file(&wasm) {
        Err(LoadError::Shape(e)) => assert!(e.to_string().contains("over modules.max_functions = 10"), "{e}"),
        Err(e) => anyhow::bail!("refused for another reason: {e}"),
        Ok(_) => anyhow::bail!("a cached module skipped the shape limits"),
    }
    strict.stop().await;
    Ok(())
}

#[tokio::test]
async fn without_a_slow_lane_a_busy_agent_stays_on_the_io_threads() -> anyhow::Result<()> {
    let t = TestHost::start(|c| c.slow_lane = false).await?;
    t.spawn("busy", "probe", &[])?;
    t.spawn("quiet", "probe", &[])?;
    // The same noise that moves an agent to the slow lane in the test above.
    assert_eq!(get(&t.url("busy", "/noise?kind=calls&n=200000")).await, (200, "noise started".into()));
    let deadline = std::time::Instant::now() + WAIT;
    while t.host.agent("busy").is_none_or(|r| r.metrics.events < 5) {
        assert!(std::time::Instant::now() < deadline, "the noise did not run: {:?}", t.host.agent("busy"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Busy, it is never reported behind lighter agents; the CPU budget still holds it, and
    // its neighbour is still served.
    for _ in 0..20 {
        assert_eq!(get(&t.url("quiet", "/ping")).await, (200, "pong".into()));
        assert_eq!(t.host.agent("busy").map(|r| (r.slow_lane, r.restarts)), Some((false, 0)));
    }
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn tether_runs_its_agents_on_one_thread_when_told() -> anyhow::Result<()> {
    let agent = build_agent("probe")?;
    let dir = tempfile::tempdir()?;
    let config = run_config(dir.path(), "one")?;
    let run = TetherRun::start_with(&["--io-threads", "1"], &agent, &config, WAIT).await?;
    let url = &run.url;
    // Answers, saves (a disk write on the one thread) and answers again.
    assert_eq!(get(&format!("{url}/ping")).await, (200, "pong".into()));
    assert_eq!(get(&format!("{url}/count")).await, (200, "1".into()));
    assert_eq!(get(&format!("{url}/count")).await, (200, "2".into()));
    // Zero threads is refused before anything starts.
    let refused = std::process::Command::new(tether_tests::build_bin("tether")?).args(["--io-threads", "0", "hub"]).output()?;
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--io-threads"), "{refused:?}");
    Ok(())
}
