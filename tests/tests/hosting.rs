//! Multi-tenant hosting end to end: agents from a manifest, the management API with
//! per-tenant tokens, deploys, allowed destinations and rates, a noisy neighbour. The
//! console in a browser is tested in `console.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_host::config::HostConfig;
use tether_host::manage::ManageServer;
use tether_host::manifest::Manifest;
use tether_host::{AgentStatus, Host};
use tether_tests::{LogWatch, build_agent, build_bin, manifest_head, silent_server};

const WAIT: Duration = Duration::from_secs(30);
const TOKEN_A: &str = "tenant-a-token-0123456789";
const TOKEN_B: &str = "tenant-b-token-0123456789";

/// A host started from a manifest, with its management API.
struct Served {
    host: Arc<Host>,
    manage: ManageServer,
    logs: LogWatch,
    http: reqwest::Client,
    tmp: Option<tempfile::TempDir>,
}

/// The manifest's head: host on free ports in `dir`, tenants `a` and `b`; `modules` adds
/// keys to `[host.modules]`.
fn head(dir: &Path, modules: &str) -> String {
    let head = manifest_head(dir, &format!("[host.modules]\nmax_module_bytes = 1048576\n{modules}"), "max_log_streams = 4");
    format!(
        r#"{head}
[[tenant]]
name = "a"
token = "{TOKEN_A}"

[[tenant]]
name = "b"
token = "{TOKEN_B}"
"#
    )
}

/// An `[[agent]]` entry running the probe.
fn probe_entry(id: &str, tenant: &str, extra: &str) -> anyhow::Result<String> {
    let probe = build_agent("probe")?;
    Ok(format!("\n[[agent]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nmodule = \"{}\"\n{extra}\n", probe.display()))
}

impl Served {
    async fn start(entries: &str, modules: &str) -> anyhow::Result<Served> {
        let dir = tempfile::tempdir()?;
        let mut served = Served::start_in(dir.path(), entries, modules).await?;
        served.tmp = Some(dir);
        Ok(served)
    }

    /// A host whose manifest, stores and cache are in `dir`, which outlives it.
    async fn start_in(dir: &Path, entries: &str, modules: &str) -> anyhow::Result<Served> {
        let path = dir.join("manifest.toml");
        std::fs::write(&path, head(dir, modules) + entries)?;
        let manifest = Manifest::load(&path)?;
        // Compiled as `tether serve` compiles: in a child process, with a deadline.
        let worker = Some(build_bin("tether")?);
        let host = Arc::new(Host::start(HostConfig { compile_worker: worker, ..manifest.host.clone() }).await?);
        let logs = LogWatch::new(host.logs());
        manifest.spawn_agents(&host)?;
        let listen = manifest.manage.listen.ok_or_else(|| anyhow::anyhow!("no manage.listen"))?;
        let manage = ManageServer::start(host.clone(), manifest.access(), &manifest.manage, listen).await?;
        Ok(Served { host, manage, logs, http: reqwest::Client::new(), tmp: None })
    }

    /// Where the manifest, stores and cache are.
    fn dir(&self) -> &Path {
        self.tmp.as_ref().map_or(Path::new("."), |d| d.path())
    }

    fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.manage.addr())
    }

    /// A management call: status and body.
    async fn call(&self, method: &str, path: &str, token: &str, body: Vec<u8>) -> (u16, String) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let request = self.http.request(method, self.api(path)).bearer_auth(token).body(body);
        match request.send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Agent `id`'s `tether_agent_limit_refusals_total`, as tenant `a` reads it.
    async fn limit_refusals(&self, id: &str, tenant: &str) -> Option<u64> {
        let (_, metrics) = self.call("GET", "/metrics", TOKEN_A, vec![]).await;
        let series = format!("tether_agent_limit_refusals_total{{agent=\"{id}\",tenant=\"{tenant}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
    }

    async fn agent_get(&self, id: &str, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.host.agent_url(id))).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    async fn wait_running(&self, ids: &[&str]) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if ids.iter().all(|id| self.host.agent(id).is_some_and(|r| r.status == AgentStatus::Running)) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "agents not running: {:?}", self.host.agents().iter().map(|r| (r.id.clone(), r.status.clone())).collect::<Vec<_>>());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.manage.stop().await;
        if let Ok(host) = Arc::try_unwrap(self.host) {
            host.shutdown().await;
        }
    }
}

/// A local HTTP server answering `/data` with "served".
async fn local_server() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route("/data", axum::routing::get(|| async { "served" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// The probe's `/fetch` answer for a `not-allowed` transport error.
fn denied(body: &str) -> bool {
    body.starts_with("error 1 ") && body.contains("not-allowed")
}

fn two_tenants() -> anyhow::Result<String> {
    Ok(probe_entry("a1", "a", "config = { k = \"v\" }\nsecrets = { s = \"hidden\" }")? + &probe_entry("b1", "b", "")?)
}

#[tokio::test]
async fn a_tenant_sees_and_changes_only_its_own_agents() -> anyhow::Result<()> {
    let s = Served::start(&two_tenants()?, "").await?;
    s.wait_running(&["a1", "b1"]).await?;

    let (status, body) = s.call("GET", "/api/agents", TOKEN_A, vec![]).await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body)?;
    let ids: Vec<&str> = list["agents"].as_array().into_iter().flatten().filter_map(|a| a["id"].as_str()).collect();
    assert_eq!(ids, ["a1"]);
    assert_eq!(list["agents"][0]["status"], "running");
    assert!(!body.contains("hidden"), "secrets never leave the host: {body}");

    for (method, path) in [
        ("GET", "/api/agents/b1"),
        ("POST", "/api/agents/b1/stop"),
        ("POST", "/api/agents/b1/restart"),
        ("POST", "/api/agents/b1/deploy"),
        ("GET", "/api/agents/b1/logs"),
    ] {
        // The same answer as for an agent that does not exist: ids are not disclosed.
        let (status, body) = s.call(method, path, TOKEN_A, b"x".to_vec()).await;
        assert_eq!((status, body.as_str()), (404, r#"{"error":"no agent \"b1\""}"#), "{method} {path}");
    }
    // A deploy refused before its body is read closes its connection and says so, or the
    // client's next request could go out on a connection the server is closing.
    let refused = s.http.post(s.api("/api/agents/b1/deploy")).bearer_auth(TOKEN_A).body(vec![0u8; 256 << 10]).send().await;
    let refused = refused.map(|r| (r.status().as_u16(), r.headers().get("connection").and_then(|v| v.to_str().ok()).map(str::to_owned)));
    assert_eq!(refused.ok(), Some((404, Some("close".to_owned()))));
    for token in ["", "not-a-token"] {
        let (status, _) = s.call("GET", "/api/agents", token, vec![]).await;
        assert_eq!(status, 401);
    }
    let (status, body) = s.call("GET", "/api/agents/nobody", TOKEN_A, vec![]).await;
    assert_eq!((status, body.as_str()), (404, r#"{"error":"no agent \"nobody\""}"#));

    let (status, metrics) = s.call("GET", "/metrics", TOKEN_B, vec![]).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("tether_agent_events_total{agent=\"b1\",tenant=\"b\"}"), "{metrics}");
    assert!(metrics.contains("tether_agent_event_seconds_bucket{le=\"+Inf\",agent=\"b1\",tenant=\"b\"}"), "{metrics}");
    assert!(metrics.contains("tether_agent_slow_lane{agent=\"b1\",tenant=\"b\"} 0"), "{metrics}");
    assert!(!metrics.contains("a1"), "{metrics}");

    // b1 was never touched.
    assert_eq!(s.agent_get("b1", "/ping").await, (200, "pong".into()));
    assert_eq!(s.host.agent("b1").map(|r| r.restarts), Some(0));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn stop_start_restart_and_logs_through_the_api() -> anyhow::Result<()> {
    let mut s = Served::start(&two_tenants()?, "").await?;
    s.wait_running(&["a1"]).await?;

    // The log stream carries the agent's recent lines, then new ones, each once.
    s.logs.wait_for("a1", "probe started", WAIT).await?;
    let mut stream = s.http.get(s.api("/api/agents/a1/logs")).bearer_auth(TOKEN_A).send().await?;
    assert_eq!(stream.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let mut seen = String::new();
    let mut read_until = async |text: &str, seen: &mut String| -> anyhow::Result<()> {
        while !seen.contains(text) {
            let chunk = tokio::time::timeout(WAIT, stream.chunk()).await??.ok_or_else(|| anyhow::anyhow!("stream ended: {seen}"))?;
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        Ok(())
    };
    read_until("probe started", &mut seen).await?;
    assert_eq!(s.agent_get("a1", "/print").await.0, 200);
    read_until("to stdout", &mut seen).await?;
    assert!(seen.starts_with("data: {"), "{seen}");
    assert_eq!(seen.matches("probe started").count(), 1, "{seen}");
    assert!(seen.find("probe started") < seen.find("to stdout"), "{seen}");
    drop(stream);

    assert_eq!(s.call("POST", "/api/agents/a1/stop", TOKEN_A, vec![]).await.0, 202);
    s.logs.wait_for("a1", "Agent stopped", WAIT).await?;
    assert_eq!(s.host.agent("a1").map(|r| r.status), Some(AgentStatus::Stopped));
    assert_eq!(s.agent_get("a1", "/ping").await.0, 503);
    assert_eq!(s.call("POST", "/api/agents/a1/start", TOKEN_A, vec![]).await.0, 202);
    s.wait_running(&["a1"]).await?;
    assert_eq!(s.agent_get("a1", "/ping").await, (200, "pong".into()));
    assert_eq!(s.call("POST", "/api/agents/a1/restart", TOKEN_A, vec![]).await.0, 202);
    s.logs.wait_for("a1", "Agent restarted: restart", WAIT).await?;
    assert_eq!(s.call("POST", "/api/agents/a1/jump", TOKEN_A, vec![]).await.0, 400);
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_module_that_compiles_too_long_is_stopped_at_its_deadline() -> anyhow::Result<()> {
    // A function of 20,000 nested loops: 60 KB, past max_nesting here raised, and about
    // 13 s of compiling. Its deadline: 1 s + 20 ms per KiB, about 2.2 s.
    let s = Served::start(&two_tenants()?, "max_nesting = 100000\ncompile_ms_per_kib = 20.0").await?;
    s.wait_running(&["a1", "b1"]).await?;
    let depth = 20_000;
    let bomb = wat::parse_str(format!("(component (core module (func {}{})))", "(loop ".repeat(depth), ")".repeat(depth)))?;
    let started = Instant::now();
    let deploy = s.call("POST", "/api/agents/a1/deploy", TOKEN_A, bomb);
    let victim = async {
        // Another tenant's agent answers all along.
        let mut answers = 0;
        while started.elapsed() < Duration::from_secs(2) {
            assert_eq!(s.agent_get("b1", "/ping").await, (200, "pong".into()));
            answers += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        answers
    };
    let ((status, body), answers) = tokio::join!(deploy, victim);
    let took = started.elapsed();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("took longer than its deadline"), "{body}");
    assert!(took < Duration::from_secs(6), "refused after {took:?}");
    assert!(answers >= 10, "the victim answered {answers} times");
    assert_eq!(s.agent_get("a1", "/ping").await, (200, "pong".into()), "the old version runs on");
    let leftovers: Vec<_> = std::fs::read_dir(s.dir().join("cache"))?.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".compiling")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    s.stop().await;
    Ok(())
}

/// The `tether compile-worker` children of process `parent`.
fn compile_workers_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The fields after the command's closing parenthesis: state, then the parent.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains("compile-worker")
        })
        .collect()
}

#[tokio::test]
async fn sigterm_stops_tether_serve_at_once_while_it_compiles() -> anyhow::Result<()> {
    let bin = build_bin("tether")?;
    let dir = tempfile::tempdir()?;
    let depth = 20_000;
    let bomb = dir.path().join("bomb.wasm");
    std::fs::write(&bomb, wat::parse_str(format!("(component (core module (func {}{})))", "(loop ".repeat(depth), ")".repeat(depth)))?)?;
    // A deadline far away: only the signal can end these compiles soon.
    let modules = "max_nesting = 100000\ncompile_max_secs = 120.0\ncompile_ms_per_kib = 5000.0";
    let starting = head(dir.path(), modules) + &format!("\n[[agent]]\nid = \"a1\"\ntenant = \"a\"\nmodule = \"{}\"\n", bomb.display());
    let port = tether_tests::free_port();
    let running = head(dir.path(), modules).replace("\nlisten = \"127.0.0.1:0\"", &format!("\nlisten = \"127.0.0.1:{port}\"")) + &two_tenants()?;
    for (case, manifest) in [("while starting", starting), ("during a deploy", running)] {
        let path = dir.path().join("manifest.toml");
        std::fs::write(&path, manifest)?;
        let mut serve = tokio::process::Command::new(&bin).args(["serve", "--manifest", &path.display().to_string()]).env("RUST_LOG", "off").kill_on_drop(true).spawn()?;
        let pid = serve.id().ok_or_else(|| anyhow::anyhow!("tether serve is gone"))?;
        let deploy = if case == "during a deploy" {
            tether_tests::wait_for_port(port, WAIT).await?;
            let url = format!("http://127.0.0.1:{port}/api/agents/a1/deploy");
            let body = std::fs::read(&bomb)?;
            Some(tokio::spawn(async move { reqwest::Client::new().post(url).bearer_auth(TOKEN_A).body(body).send().await }))
        } else {
            None
        };
        let deadline = Instant::now() + WAIT;
        let workers = loop {
            let workers = compile_workers_of(pid);
            if !workers.is_empty() {
                break workers;
            }
            anyhow::ensure!(Instant::now() < deadline, "{case}: no compile worker started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let signalled = Instant::now();
        std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        let status = tokio::time::timeout(Duration::from_secs(10), serve.wait()).await??;
        let took = signalled.elapsed();
        assert!(took < Duration::from_secs(3), "{case}: SIGTERM took {took:?}");
        if case == "during a deploy" {
            assert!(status.success(), "{case}: {status}");
            let answer = deploy.ok_or_else(|| anyhow::anyhow!("no deploy"))?.await?;
            assert!(answer.map_or(true, |r| r.status() != 200), "{case}: the deploy did not succeed");
        }
        // The compiler dies with the host.
        let deadline = Instant::now() + WAIT;
        while workers.iter().any(|w| std::path::Path::new(&format!("/proc/{w}")).exists() && !std::fs::read_to_string(format!("/proc/{w}/stat")).unwrap_or_default().contains(") Z ")) {
            anyhow::ensure!(Instant::now() < deadline, "{case}: the compile worker outlived the host");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[tokio::test]
async fn log_streams_are_per_tenant_and_capped() -> anyhow::Result<()> {
    let noisy = "limits = { log_rate = { burst = 100000, per_sec = 100000.0 } }";
    let s = Served::start(&(probe_entry("a1", "a", "")? + &probe_entry("b1", "b", noisy)?), "").await?;
    s.wait_running(&["a1", "b1"]).await?;
    let open = async |path: &str, token: &str| s.http.get(s.api(path)).bearer_auth(token).send().await;

    // Tenant a's stream is not read while b's agent writes more lines than a stream holds.
    let mut quiet = open("/api/logs", TOKEN_A).await?;
    assert_eq!(quiet.status(), 200);
    assert_eq!(s.agent_get("b1", "/flood-logs?n=5000").await.0, 200);
    assert_eq!(s.agent_get("a1", "/print").await.0, 200);
    let mut seen = String::new();
    while !seen.contains("to stdout") {
        let chunk = tokio::time::timeout(WAIT, quiet.chunk()).await??.ok_or_else(|| anyhow::anyhow!("stream ended: {seen}"))?;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!seen.contains("skipped") && !seen.contains("b1"), "another tenant's volume shows: {seen}");

    // Four streams per tenant (this manifest's max_log_streams); the fifth is refused.
    let mut held = vec![quiet];
    for _ in 0..3 {
        held.push(open("/api/agents/a1/logs", TOKEN_A).await?);
    }
    assert!(held.iter().all(|r| r.status() == 200));
    let refused = open("/api/logs", TOKEN_A).await?;
    assert_eq!(refused.status(), 429);
    assert!(refused.text().await?.contains("manage.max_log_streams"));
    assert_eq!(open("/api/logs", TOKEN_B).await?.status(), 200, "another tenant is not held up");
    drop(held.pop());
    // The slot is given back once the server sees the client gone.
    let deadline = Instant::now() + WAIT;
    while open("/api/logs", TOKEN_A).await?.status() != 200 {
        anyhow::ensure!(Instant::now() < deadline, "a closed stream's slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_deploys_get_400_and_the_old_version_keeps_answering() -> anyhow::Result<()> {
    let mut s = Served::start(&two_tenants()?, "").await?;
    s.wait_running(&["a1"]).await?;
    assert_eq!(s.agent_get("a1", "/count").await, (200, "1".into()));

    let oversized = vec![0u8; 2 << 20];
    // A compile bomb: cheap to send, slow to compile; refused by its shape.
    let nested = format!("(component (core module (func {}{})))", "(loop ".repeat(301), ")".repeat(301));
    let cases: [(Vec<u8>, &str); 5] = [
        (b"not wasm at all".to_vec(), "not a WebAssembly component"),
        (wat::parse_str("(module)")?, "core WebAssembly module"),
        (wat::parse_str("(component)")?, "not a tether:agent@0.1.0 agent"),
        (oversized, "too large"),
        (wat::parse_str(&nested)?, "function 0's block nesting is 301, over modules.max_nesting = 300"),
    ];
    let cache = s.dir().join("cache");
    let artefacts = || std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    let before = artefacts();
    for (bytes, reason) in cases {
        let (status, body) = s.call("POST", "/api/agents/a1/deploy", TOKEN_A, bytes).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains(reason), "{reason}: {body}");
        assert_eq!(s.agent_get("a1", "/ping").await, (200, "pong".into()));
    }
    assert_eq!(artefacts(), before, "nothing refused was cached");

    // A good version: swapped in, restarted over the kept store.
    let echo = std::fs::read(build_agent("http-echo")?)?;
    let (status, body) = s.call("POST", "/api/agents/a1/deploy", TOKEN_A, echo).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(artefacts(), before + 1, "the compile worker's artefact went into the cache");
    s.logs.wait_for("a1", "Agent restarted: reload", WAIT).await?;
    s.wait_running(&["a1"]).await?;
    assert_eq!(s.agent_get("a1", "/x").await, (200, "GET /x {} ".into()));
    let probe = std::fs::read(build_agent("probe")?)?;
    assert_eq!(s.call("POST", "/api/agents/a1/deploy", TOKEN_A, probe).await.0, 200);
    s.logs.wait_for_count("a1", "Agent restarted: reload", 2, WAIT).await?;
    s.wait_running(&["a1"]).await?;
    assert_eq!(s.agent_get("a1", "/count").await, (200, "2".into()), "the store survived both deploys");
    assert_eq!(s.host.agent("b1").map(|r| (r.status, r.restarts)), Some((AgentStatus::Running, 0)));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_deployed_version_outlives_a_host_restart_until_the_manifest_changes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let probe = probe_entry("a1", "a", "")?;
    let mut s = Served::start_in(dir.path(), &probe, "").await?;
    s.wait_running(&["a1"]).await?;
    let echo = std::fs::read(build_agent("http-echo")?)?;
    assert_eq!(s.call("POST", "/api/agents/a1/deploy", TOKEN_A, echo).await.0, 200);
    s.logs.wait_for("a1", "Agent restarted: reload", WAIT).await?;
    s.stop().await;

    // Started again from the same manifest: the deployed version runs.
    let s = Served::start_in(dir.path(), &probe, "").await?;
    s.wait_running(&["a1"]).await?;
    assert_eq!(s.agent_get("a1", "/x").await, (200, "GET /x {} ".into()));
    s.stop().await;

    // The manifest now names another module: that one runs, and the kept version is gone.
    let hello = build_agent("hello")?;
    let s = Served::start_in(dir.path(), &format!("\n[[agent]]\nid = \"a1\"\ntenant = \"a\"\nmodule = \"{}\"\n", hello.display()), "").await?;
    s.wait_running(&["a1"]).await?;
    let hello_digest = s.host.runtime().load_file(&hello)?.digest;
    assert_eq!(s.host.agent("a1").map(|r| r.module_digest), Some(hello_digest));
    assert!(!dir.path().join("store/deployed/a1.wasm").exists());
    s.stop().await;

    // And back to the probe in the manifest: the probe, not the echo deployed long ago.
    let s = Served::start_in(dir.path(), &probe, "").await?;
    s.wait_running(&["a1"]).await?;
    assert_eq!(s.agent_get("a1", "/ping").await, (200, "pong".into()));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn hot_deploy_loses_no_message_of_the_other_agents() -> anyhow::Result<()> {
    let ids = ["d0", "d1", "d2", "d3"];
    let mut entries = String::new();
    for id in ids {
        entries += &probe_entry(id, "a", "")?;
    }
    let s = Arc::new(Served::start(&entries, "").await?);
    s.wait_running(&ids).await?;
    let probe = std::fs::read(build_agent("probe")?)?;

    // Every other agent counts requests in its store: any lost or repeated message shows
    // as a gap in its sequence.
    let mut flows = Vec::new();
    for id in &ids[1..] {
        let s = s.clone();
        let id = id.to_string();
        flows.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..150 {
                answers.push(s.agent_get(&id, "/count").await);
            }
            answers
        }));
    }
    for _ in 0..5 {
        let (status, body) = s.call("POST", "/api/agents/d0/deploy", TOKEN_A, probe.clone()).await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for flow in flows {
        let answers = flow.await?;
        let expected: Vec<(u16, String)> = (1..=150).map(|n| (200, n.to_string())).collect();
        assert_eq!(answers, expected);
    }
    for id in &ids[1..] {
        assert_eq!(s.host.agent(id).map(|r| r.restarts), Some(0));
    }
    s.wait_running(&["d0"]).await?;
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn destinations_are_denied_unless_allowed_also_after_resolving() -> anyhow::Result<()> {
    let server = local_server().await?;
    let port = server.port();
    let entries = probe_entry("closed", "a", "")?
        + &probe_entry("wild", "a", r#"allowed_hosts = ["http://*:*", "mqtt://*:*"]"#)?
        + &probe_entry("open", "a", &format!("allowed_hosts = [\"http://127.0.0.1:{port}\"]"))?
        + &probe_entry("local", "a", r#"allowed_hosts = ["http://localhost:*"]"#)?;
    let mut s = Served::start(&entries, "").await?;
    s.wait_running(&["closed", "wild", "open", "local"]).await?;
    let fetch = |to: String| format!("/fetch?url={to}");

    // Nothing allowed: refused before anything is sent, with a log line.
    let (_, body) = s.agent_get("closed", &fetch(format!("http://127.0.0.1:{port}/data"))).await;
    assert!(denied(&body), "{body}");
    s.logs.wait_for("closed", "is not an allowed destination", WAIT).await?;
    // A wildcard does not cover loopback, link-local or metadata addresses, whether given
    // as an IP or as a name that resolves to one.
    for to in [format!("http://127.0.0.1:{port}/data"), "http://169.254.169.254/latest/meta-data/".into(), "http://[::1]:9/".into()] {
        let (_, body) = s.agent_get("wild", &fetch(to.clone())).await;
        assert!(denied(&body), "{to}: {body}");
    }
    let (_, body) = s.agent_get("wild", &fetch(format!("http://localhost:{port}/data"))).await;
    assert!(denied(&body), "{body}");
    s.logs.wait_for("wild", "resolves only to non-public addresses", WAIT).await?;
    // Named explicitly, the same server is reachable.
    assert_eq!(s.agent_get("open", &fetch(format!("http://127.0.0.1:{port}/data"))).await, (200, "200 served".into()));
    let (_, body) = s.agent_get("open", &fetch(format!("http://127.0.0.1:{}/data", port.wrapping_add(1)))).await;
    assert!(body.starts_with("error 1 "), "another port is another destination: {body}");
    assert_eq!(s.agent_get("local", &fetch(format!("http://localhost:{port}/data"))).await, (200, "200 served".into()));

    // MQTT: refused at once when not listed, and after resolving for a wildcard.
    let (_, body) = s.agent_get("closed", "/mqtt/connect?url=tcp://127.0.0.1:1883").await;
    assert!(body.starts_with("refused NotAllowed"), "{body}");
    let (_, body) = s.agent_get("wild", "/mqtt/connect?url=tcp://localhost:1883").await;
    assert_eq!(body, "connect -1");
    s.logs.wait_for("wild", "mqtt: localhost resolves only to non-public addresses", WAIT).await?;
    s.stop().await;
    Ok(())
}

/// A server that counts the requests it gets: a destination the agent was not given.
async fn counting_server(bind: &str, hits: Arc<std::sync::atomic::AtomicUsize>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move || {
        hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { "secret" }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// A server whose `/N` answers 302 to `targets[N]`.
async fn redirecting_server(targets: Vec<String>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut app = axum::Router::new();
    for (i, target) in targets.into_iter().enumerate() {
        app = app.route(&format!("/{i}"), axum::routing::get(move || async move { (axum::http::StatusCode::FOUND, [(axum::http::header::LOCATION, target)], "") }));
    }
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[tokio::test]
async fn a_redirect_goes_back_to_the_agent_and_is_not_followed() -> anyhow::Result<()> {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut forbidden = vec![format!("http://127.0.0.1:{}/secret", counting_server("127.0.0.1:0", hits.clone()).await?.port())];
    // IPv6 loopback too, where the machine has it.
    if let Ok(v6) = counting_server("[::1]:0", hits.clone()).await {
        forbidden.push(format!("http://[::1]:{}/secret", v6.port()));
    }
    let redirector = redirecting_server(forbidden.clone()).await?;
    let entries = probe_entry("open", "a", &format!("allowed_hosts = [\"http://127.0.0.1:{}\"]", redirector.port()))?;
    let s = Served::start(&entries, "").await?;
    s.wait_running(&["open"]).await?;
    for (i, target) in forbidden.iter().enumerate() {
        // The agent sees the redirect itself (status 302, empty body)...
        let answer = s.agent_get("open", &format!("/fetch?url=http://127.0.0.1:{}/{i}", redirector.port())).await;
        assert_eq!(answer, (200, "302 ".to_owned()), "redirect to {target}");
        // ...and asking for where it points is refused like any destination not given.
        let (_, body) = s.agent_get("open", &format!("/fetch?url={target}")).await;
        assert!(denied(&body), "{target}: {body}");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "a server the agent was not given was reached");
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn mqtt_connections_stop_at_the_agents_limit_and_its_neighbour_keeps_answering() -> anyhow::Result<()> {
    // A "broker" that accepts and never answers: every client stays connecting.
    let broker = silent_server().await?;
    let port = broker.port();
    let entries = probe_entry("hoarder", "a", &format!("allowed_hosts = [\"mqtt://127.0.0.1:{port}\"]\nlimits = {{ mqtt_connections = 3 }}"))?
        + &probe_entry("victim", "b", "")?;
    let mut s = Served::start(&entries, "").await?;
    s.wait_running(&["hoarder", "victim"]).await?;
    let hoard = format!("/mqtt/hoard?n=10&url=tcp://127.0.0.1:{port}");
    assert_eq!(s.agent_get("hoarder", &hoard).await, (200, "opened 3 refused TooManyConnections".to_owned()));
    assert_eq!(s.agent_get("hoarder", &hoard).await, (200, "opened 0 refused TooManyConnections".to_owned()));
    s.logs.wait_for("hoarder", "clients open, the most limits.mqtt_connections allows", WAIT).await?;
    assert_eq!(s.agent_get("victim", "/ping").await, (200, "pong".to_owned()));
    assert_eq!(s.limit_refusals("hoarder", "a").await, Some(2));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn outgoing_requests_in_flight_their_bodies_and_timeouts_are_bounded() -> anyhow::Result<()> {
    let addr = silent_server().await?;
    let allowed = format!("allowed_hosts = [\"http://{addr}\"]");
    let limits = "limits = { http_in_flight = 4, http_body_bytes = 500000, http_in_flight_bytes = 1000000, http_max_timeout_secs = 1 }";
    let entries = probe_entry("a1", "a", &format!("{allowed}\n{limits}"))? + &probe_entry("b1", "b", "")?;
    let mut s = Served::start(&entries, "").await?;
    s.wait_running(&["a1", "b1"]).await?;
    let url = format!("http://{addr}/");
    let hold = |n: u32, bytes: u32| format!("/hold-http?n={n}&bytes={bytes}&timeout_s=3600&url={url}");

    // Six requests: four go out (and stay, the server never answers), two are refused.
    assert_eq!(s.agent_get("a1", &hold(6, 10)).await, (200, r#"{"too-many-in-flight": 2}"#.into()));
    assert_eq!(s.agent_get("b1", "/ping").await, (200, "pong".into()), "another tenant's agent answers");
    // The hour asked for is cut to limits.http_max_timeout_secs: they end within seconds.
    s.logs.wait_for_count("a1", "held request ended: timeout", 4, WAIT).await?;

    // Bodies: one over http_body_bytes is refused, and two of 400 kB fill the 1 MB budget.
    assert_eq!(s.agent_get("a1", &hold(1, 500_001)).await, (200, r#"{"too-large": 1}"#.into()));
    assert_eq!(s.agent_get("a1", &hold(3, 400_000)).await, (200, r#"{"too-many-in-flight": 1}"#.into()));
    assert!(s.limit_refusals("a1", "a").await >= Some(4), "refusals are counted");
    // Said once per 10 s at most: the first refusal's line.
    s.logs.wait_for("a1", "4 requests in flight, the most limits.http_in_flight allows", WAIT).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn connections_to_one_agents_url_stop_at_its_limit_and_its_neighbour_keeps_answering() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Served::start(&(probe_entry("a1", "a", "limits = { http_connections = 3 }")? + &probe_entry("b1", "b", "")?), "").await?;
    s.wait_running(&["a1", "b1"]).await?;
    let addr = s.host.http_addr();
    // Three clients that promise a body and never send it: three requests in progress.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        c.write_all(b"POST /a1/ping HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n").await?;
        slow.push(c);
    }
    // The fourth is refused (once the three are counted) and its connection closed.
    let deadline = Instant::now() + WAIT;
    let answer = loop {
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        c.write_all(b"GET /a1/ping HTTP/1.1\r\nhost: a\r\n\r\n").await?;
        let mut answer = String::new();
        tokio::time::timeout(WAIT, c.read_to_string(&mut answer)).await??;
        if answer.starts_with("HTTP/1.1 503") || Instant::now() > deadline {
            break answer;
        }
    };
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("too many connections to this agent"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert_eq!(s.agent_get("b1", "/ping").await, (200, "pong".into()), "another tenant's agent answers");
    assert_eq!(s.limit_refusals("a1", "a").await.map(|n| n >= 1), Some(true));
    // One slow client leaves: a1 answers again.
    drop(slow.pop());
    let deadline = Instant::now() + WAIT;
    while s.agent_get("a1", "/ping").await != (200, "pong".into()) {
        anyhow::ensure!(Instant::now() < deadline, "a1 never answered again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(slow);
    s.stop().await;
    Ok(())
}

/// An MQTT broker that accepts a connection and then reads nothing and acknowledges
/// nothing: every QoS 1 publish to it stays pending.
async fn mute_broker() -> anyhow::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut connect = [0u8; 256];
            // One read takes the CONNECT packet; CONNACK, accepted.
            if socket.read(&mut connect).await.is_ok() && socket.write_all(&[0x20, 0x02, 0x00, 0x00]).await.is_ok() {
                held.push(socket);
            }
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn mqtt_publishes_waiting_to_be_sent_stop_at_the_agents_byte_budget() -> anyhow::Result<()> {
    let broker = mute_broker().await?;
    let limits = "limits = { mqtt_message_bytes = 10000, mqtt_pending_bytes = 50000 }";
    let entries = probe_entry("a1", "a", &format!("allowed_hosts = [\"mqtt://{broker}\"]\n{limits}"))? + &probe_entry("b1", "b", "")?;
    let mut s = Served::start(&entries, "").await?;
    s.wait_running(&["a1", "b1"]).await?;
    assert_eq!(s.agent_get("a1", &format!("/mqtt/connect?url=tcp://{broker}")).await, (200, "connect 0".into()));
    // 1,000 bytes and the 1-byte topic each: 49 fit in 50,000 bytes, and none is ever acknowledged.
    assert_eq!(s.agent_get("a1", "/mqtt/flood?topic=t&bytes=1000&qos=1&n=100").await, (200, "taken 49 refused QueueFull".into()));
    assert_eq!(s.agent_get("b1", "/ping").await, (200, "pong".into()), "another tenant's agent answers");
    assert!(s.limit_refusals("a1", "a").await >= Some(1));
    s.logs.wait_for("a1", "more would pass limits.mqtt_pending_bytes = 50000", WAIT).await?;
    // The connection closed, what it held is given back.
    assert_eq!(s.agent_get("a1", "/mqtt/disconnect").await.0, 200);
    let deadline = Instant::now() + WAIT;
    loop {
        let _ = s.agent_get("a1", &format!("/mqtt/connect?url=tcp://{broker}")).await;
        if s.agent_get("a1", "/mqtt/flood?topic=t&bytes=1000&qos=1&n=10").await == (200, "taken 10".into()) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the budget was not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn store_saves_stop_at_the_agents_rate() -> anyhow::Result<()> {
    let limits = "limits = { store_rate = { burst = 5, per_sec = 0.01 } }";
    let mut s = Served::start(&(probe_entry("a1", "a", limits)? + &probe_entry("b1", "b", "")?), "").await?;
    s.wait_running(&["a1", "b1"]).await?;
    assert_eq!(s.agent_get("a1", "/save-many?n=10").await, (200, "saved=5 limited=5".into()));
    assert_eq!(s.agent_get("b1", "/save-many?n=10").await, (200, "saved=10 limited=0".into()), "b's default rate, its own credits");
    assert_eq!(s.limit_refusals("a1", "a").await, Some(5));
    s.logs.wait_for("a1", "store: save refused: over limits.store_rate", WAIT).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn timers_stop_at_the_agents_limit_and_its_neighbour_keeps_answering() -> anyhow::Result<()> {
    let entries = probe_entry("hoarder", "a", "limits = { timers = 50 }")? + &probe_entry("victim", "b", "")?;
    let mut s = Served::start(&entries, "").await?;
    s.wait_running(&["hoarder", "victim"]).await?;
    assert_eq!(s.agent_get("hoarder", "/timers?n=40").await, (200, "scheduled 40".to_owned()));
    assert_eq!(s.agent_get("hoarder", "/timers?n=40").await, (200, "scheduled 10 refused TooManyTimers".to_owned()));
    assert_eq!(s.agent_get("hoarder", "/timers?n=1").await, (200, "scheduled 0 refused TooManyTimers".to_owned()));
    s.logs.wait_for("hoarder", "timers pending, the most limits.timers allows", WAIT).await?;
    assert_eq!(s.agent_get("victim", "/timers?n=100").await, (200, "scheduled 100".to_owned()), "another agent's timers are its own");
    assert_eq!(s.limit_refusals("hoarder", "a").await, Some(2));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn requests_waiting_for_a_busy_agent_stop_at_its_backlog_and_its_neighbour_keeps_answering() -> anyhow::Result<()> {
    // Bodies of 50,000 bytes against a backlog of 200,000: at most 3 wait at a time.
    let limits = "limits = { inbound_queue_bytes = 200000, http_body_bytes = 100000, cpu_ms_per_event = 2000, inbound_timeout_secs = 10 }";
    let entries = probe_entry("busy", "a", limits)? + &probe_entry("victim", "b", "")?;
    let mut s = Served::start(&entries, "").await?;
    s.wait_running(&["busy", "victim"]).await?;
    let url = s.host.agent_url("busy");
    // Keeps the agent busy for 2 s of CPU, then it is stopped and restarts.
    let spin = tokio::spawn(reqwest::get(format!("{url}/spin")));
    // The requests below must find it busy: wait until the long event has begun.
    let deadline = Instant::now() + WAIT;
    while !s.host.agent("busy").is_some_and(|r| r.slow_lane) {
        anyhow::ensure!(Instant::now() < deadline, "the agent never started spinning");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut posts = Vec::new();
    for _ in 0..10 {
        let (http, url) = (s.http.clone(), url.clone());
        posts.push(tokio::spawn(async move {
            match http.post(format!("{url}/echo")).body(vec![b'x'; 50_000]).send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        }));
    }
    let mut refused = 0;
    for post in posts {
        let (status, body) = post.await?;
        if status == 503 && body.contains("too many requests waiting") {
            refused += 1;
        }
    }
    assert!(refused >= 5, "only {refused} of 10 requests were refused at a backlog of 3");
    s.logs.wait_for("busy", "the most limits.inbound_queue_bytes allows", WAIT).await?;
    assert_eq!(s.agent_get("victim", "/ping").await, (200, "pong".to_owned()));
    let _ = spin.await;
    // Once it is back, the agent answers again: nothing was left holding its backlog.
    let deadline = Instant::now() + WAIT;
    while s.agent_get("busy", "/ping").await != (200, "pong".to_owned()) {
        anyhow::ensure!(Instant::now() < deadline, "the busy agent never answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.limit_refusals("busy", "a").await, Some(refused));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn http_and_log_rates_are_enforced_per_agent() -> anyhow::Result<()> {
    let server = local_server().await?;
    let entries = probe_entry(
        "limited",
        "a",
        &format!(
            "allowed_hosts = [\"http://127.0.0.1:{}\"]\nlimits = {{ http_rate = {{ burst = 5, per_sec = 0.01 }}, log_rate = {{ burst = 10, per_sec = 20.0 }} }}",
            server.port()
        ),
    )? + &probe_entry("imp", "a", &format!("allowed_hosts = [\"http://127.0.0.1:{}\"]", server.port()))?;
    let mut s = Served::start(&entries, "").await?;
    s.wait_running(&["limited", "imp"]).await?;
    let flood = format!("/flood-http?n=20&url=http://127.0.0.1:{}/data", server.port());
    assert_eq!(s.agent_get("limited", &flood).await, (200, "ok=5 limited=15 other=0".into()));
    // The manifest's default is imp's: 40 requests of credit.
    let flood = format!("/flood-http?n=50&url=http://127.0.0.1:{}/data", server.port());
    let (_, body) = s.agent_get("imp", &flood).await;
    assert!(body == "ok=40 limited=10 other=0" || body == "ok=41 limited=9 other=0", "{body}");

    assert_eq!(s.agent_get("limited", "/flood-logs?n=100").await, (200, "logged 100".into()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.agent_get("limited", "/print").await;
    let note = s.logs.wait_for("limited", "lines dropped: over the log rate", WAIT).await?;
    let dropped: u64 = note.text.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    // 10 of credit (less what "probe started" took, partly refilled), 20/s after that.
    assert!((85..=91).contains(&dropped), "{}", note.text);
    s.logs.drain();
    let flood_lines = s.logs.texts("limited").iter().filter(|l| l.starts_with("flood ")).count();
    assert_eq!(flood_lines as u64 + dropped, 100);
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_malformed_manifest_is_refused_naming_the_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let good = head(dir.path(), "") + &probe_entry("x1", "a", "")?;
    let cases = [
        (good.replace("tenant = \"a\"\nmodule", "tenant = \"zz\"\nmodule"), "unknown tenant"),
        (good.replace("\nlisten = \"127.0.0.1:0\"", "\nlisten = \"nowhere\""), "invalid socket address"),
        (good.clone() + "allowed_hosts = [\"gopher://x\"]\n", "invalid allowed host"),
        (good.clone() + "limits = { memory_mib = 0 }\n", "memory_mib"),
        (good.replace("[[agent]]", "[[agent]\n"), ""),
    ];
    for (text, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text)?;
        let error = Manifest::load(&path).err().map(|e| e.to_string()).unwrap_or_default();
        let line: usize = error.split(':').nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(line > 0 && line <= text.lines().count(), "{error}");
        assert!(error.contains(needle), "{error}");
        let offending = text.lines().nth(line - 1).unwrap_or_default();
        assert!(!offending.trim().is_empty(), "{error} points at an empty line");
    }
    Ok(())
}

#[tokio::test]
async fn a_thousand_agents_from_one_manifest() -> anyhow::Result<()> {
    let mut entries = String::new();
    let ids: Vec<String> = (0..1000).map(|i| format!("agent-{i:04}")).collect();
    for (i, id) in ids.iter().enumerate() {
        entries += &probe_entry(id, if i % 2 == 0 { "a" } else { "b" }, "")?;
    }
    let started = Instant::now();
    let s = Served::start(&entries, "").await?;
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    s.wait_running(&refs).await?;
    eprintln!("1000 agents running after {:?}", started.elapsed());
    for id in ids.iter().step_by(37) {
        assert_eq!(s.agent_get(id, "/ping").await, (200, "pong".into()), "{id}");
    }
    let (_, body) = s.call("GET", "/api/agents", TOKEN_B, vec![]).await;
    let list: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(list["agents"].as_array().map(Vec::len), Some(500));
    s.stop().await;
    Ok(())
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() - 1) * 99 / 100]
}

/// Timer and HTTP latency of the quiet agents: (timer lateness p99, ping p99).
async fn quiet_latencies(s: &Served, quiet: &[&str]) -> anyhow::Result<(Duration, Duration)> {
    let (mut timer, mut ping) = (Vec::new(), Vec::new());
    for round in 0..20 {
        for id in quiet {
            let t = Instant::now();
            assert_eq!(s.agent_get(id, "/ping").await, (200, "pong".into()));
            ping.push(t.elapsed());
            let t = Instant::now();
            assert_eq!(s.agent_get(id, "/later?ms=20").await, (200, "after 20 ms".into()), "round {round}");
            timer.push(t.elapsed().saturating_sub(Duration::from_millis(20)));
        }
    }
    Ok((p99(timer), p99(ping)))
}

/// Correctness only: the others keep answering right while one agent spins, hogs memory,
/// floods its log and HTTP. The latencies are printed; `hosting` bench measures them.
#[tokio::test]
async fn a_noisy_neighbour_does_not_stop_the_others() -> anyhow::Result<()> {
    let server = local_server().await?;
    let quiet = ["q1", "q2", "q3"];
    let mut entries = probe_entry(
        "noisy",
        "b",
        &format!("allowed_hosts = [\"http://127.0.0.1:{}\"]\nlimits = {{ memory_mib = 16, cpu_ms_per_event = 100, max_restarts = 1000, inbound_timeout_secs = 2 }}", server.port()),
    )?;
    for id in quiet {
        entries += &probe_entry(id, "a", "")?;
    }
    let s = Arc::new(Served::start(&entries, "").await?);
    s.wait_running(&["noisy", "q1", "q2", "q3"]).await?;
    let baseline = quiet_latencies(&s, &quiet).await?;

    let noise = {
        let s = s.clone();
        let flood = format!("/flood-http?n=100&url=http://127.0.0.1:{}/data", server.port());
        tokio::spawn(async move {
            let paths = ["/spin", "/hog", "/flood-logs?n=2000", flood.as_str()];
            let deadline = Instant::now() + Duration::from_secs(4);
            while Instant::now() < deadline {
                let mut round = tokio::task::JoinSet::new();
                for path in paths {
                    let (s, path) = (s.clone(), path.to_owned());
                    round.spawn(async move { s.agent_get("noisy", &path).await });
                }
                while round.join_next().await.is_some() {}
            }
        })
    };
    let noisy = quiet_latencies(&s, &quiet).await?;
    noise.await?;
    eprintln!("quiet agents p99: baseline timer {:?} / http {:?}; with the noisy neighbour timer {:?} / http {:?}", baseline.0, baseline.1, noisy.0, noisy.1);
    let report = s.host.agent("noisy").ok_or_else(|| anyhow::anyhow!("noisy gone"))?;
    assert!(report.restarts > 0, "the noisy agent was stopped by its limits");
    assert!(report.metrics.log_dropped > 0);
    for id in quiet {
        assert_eq!(s.host.agent(id).map(|r| r.restarts), Some(0));
    }
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
    Ok(())
}

/// Runs the `tether` binary to completion: exit code, stdout, stderr.
fn tether(bin: &Path, args: &[&str], token: &str) -> anyhow::Result<(i32, String, String)> {
    let out = std::process::Command::new(bin).args(args).env("TETHER_TOKEN", token).env("RUST_LOG", "off").output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[tokio::test]
async fn tether_serve_and_the_agents_cli() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let bin = tether_tests::build_bin("tether")?;
    let dir = tempfile::tempdir()?;
    let port = tether_tests::free_port();
    let manifest = head(dir.path(), "").replace("\nlisten = \"127.0.0.1:0\"", &format!("\nlisten = \"127.0.0.1:{port}\"")) + &two_tenants()?;
    let path = dir.path().join("manifest.toml");
    std::fs::write(&path, &manifest)?;

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, manifest.replace("tenant = \"b\"\nmodule", "tenant = \"c\"\nmodule"))?;
    let (code, _, stderr) = tether(&bin, &["serve", "--manifest", &bad.display().to_string()], "")?;
    assert_eq!(code, 1);
    assert!(stderr.contains("bad.toml:") && stderr.contains("unknown tenant \"c\""), "{stderr}");

    let mut serve = tokio::process::Command::new(&bin)
        .args(["serve", "--manifest", &path.display().to_string()])
        .env("RUST_LOG", "off")
        .kill_on_drop(true)
        .spawn()?;
    tether_tests::wait_for_port(port, WAIT).await?;
    let url = format!("http://127.0.0.1:{port}");
    let cli = |args: &[&str], token: &str| {
        let mut all = vec!["agents", "--url", &url];
        all.extend_from_slice(args);
        tether(&bin, &all, token)
    };

    let deadline = Instant::now() + WAIT;
    loop {
        let (code, stdout, stderr) = cli(&["list"], TOKEN_A)?;
        assert_eq!(code, 0, "{stderr}");
        assert!(!stdout.contains("b1"), "{stdout}");
        if stdout.lines().any(|l| l.starts_with("a1 ") && l.contains("running")) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "a1 not running: {stdout}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The same as JSON, for scripts.
    let (code, stdout, stderr) = cli(&["--json", "list"], TOKEN_A)?;
    assert_eq!(code, 0, "{stderr}");
    let list: serde_json::Value = serde_json::from_str(&stdout)?;
    assert!(list["agents"].as_array().is_some_and(|a| a.iter().any(|a| a["id"] == "a1")), "{stdout}");
    let (code, _, stderr) = cli(&["stop", "b1"], TOKEN_A)?;
    assert_eq!(code, 1);
    assert!(stderr.contains("404") && stderr.contains("no agent"), "{stderr}");
    let (code, _, stderr) = cli(&["deploy", "a1", &path.display().to_string()], TOKEN_A)?;
    assert_eq!(code, 1);
    assert!(stderr.contains("400") && stderr.contains("not a WebAssembly component"), "{stderr}");

    // Follow a1's log while it is redeployed.
    let mut logs = tokio::process::Command::new(&bin)
        .args(["agents", "--url", &url, "logs", "a1"])
        .env("TETHER_TOKEN", TOKEN_A)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(logs.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?).lines();
    // Deploy once the follower shows a1's recent lines (its start), not after a fixed
    // pause: then the reload line reaches it live, as the test means, and not from the
    // backlog of a follower that was slow to connect.
    let following = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("probe started") {
                return true;
            }
        }
        false
    })
    .await?;
    anyhow::ensure!(following, "the log follower ended before showing a1's log");
    let echo = build_agent("http-echo")?;
    let (code, stdout, stderr) = cli(&["deploy", "a1", &echo.display().to_string()], TOKEN_A)?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(&format!("deployed {} to a1: module ", echo.display())), "{stdout}");
    let line = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Agent restarted: reload") {
                return Some(line);
            }
        }
        None
    })
    .await?;
    assert_eq!(line.as_deref(), Some("[a1] Agent restarted: reload"));
    let _ = logs.kill().await;
    let _ = serve.kill().await;
    Ok(())
}
