//! The Grafana dashboard and scrape config under `deploy/`, against the real thing:
//! Debian's Prometheus scrapes a `tether serve` (with a tenant's token) and a `tether hub`
//! (with its control token file, as `deploy/prometheus/prometheus.yml` does), and every
//! expression of the dashboard must return data. Prometheus parses both expositions as
//! OpenMetrics (promtool 2.42's `check metrics` knows only the older text format, so it is
//! not the judge here): a target it cannot parse is down, with the parse error.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use tether_tests::{build_agent, manifest_head};
use tether_tests::tether_run::TetherRun;

const WAIT: Duration = Duration::from_secs(90);
const TOKEN: &str = "token-of-tenant-a-0123456789";

/// A child process killed (with what it started) when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn prometheus_scrapes_host_and_hub_and_every_dashboard_query_returns_data() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let probe = build_agent("probe")?;
    let head = manifest_head(dir.path(), "", "");
    let manifest = format!(
        r#"{head}
[[tenant]]
name = "a"
token = "{TOKEN}"

[[agent]]
id = "a1"
tenant = "a"
module = "{probe}"

[[agent]]
id = "a2"
tenant = "a"
module = "{probe}"
"#,
        probe = probe.display(),
    );
    let path = dir.path().join("manifest.toml");
    std::fs::write(&path, manifest)?;
    let serve = TetherRun::spawn(&[OsStr::new("serve"), OsStr::new("--manifest"), path.as_os_str()], "console login for tenant a", WAIT).await?;
    let manage = serve.word_after("management API and console: ")?;
    let agents = serve.word_after("agent URLs under ")?;
    let hub_dir = dir.path().join("hub");
    let hub_args = [
        OsStr::new("hub"),
        OsStr::new("--mqtt-port"),
        OsStr::new("0"),
        OsStr::new("--https-port"),
        OsStr::new("0"),
        OsStr::new("--page-listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--state-dir"),
        hub_dir.as_os_str(),
    ];
    let hub = TetherRun::spawn(&hub_args, "hub page login, once within 10 minutes: ", WAIT).await?;
    let page = hub.word_after("hub page: ")?;

    // Some traffic, so that rates have something to say.
    let http = reqwest::Client::new();
    for _ in 0..20 {
        for id in ["a1", "a2"] {
            http.get(format!("{agents}/{id}/ping")).send().await?.error_for_status()?;
        }
    }

    // The shipped scrape config, pointed at these processes, scraping every second.
    let shipped = std::fs::read_to_string(tether_tests::workspace_root().join("deploy/prometheus/prometheus.yml"))?;
    let config = shipped
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("a-long-random-secret", TOKEN)
        .replace("127.0.0.1:9090", manage.trim_start_matches("http://"))
        .replace("tether-data/hub/control-token", &hub_dir.join("control-token").display().to_string())
        .replace("127.0.0.1:8090", page.trim_start_matches("http://"));
    anyhow::ensure!(config != shipped, "the shipped config changed shape: {shipped}");
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config)?;
    let port = tether_tests::free_port();
    let prometheus = Child(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("prometheus: {e}; run scripts/setup.sh --with-test-deps"))?,
    );
    tether_tests::wait_for_port(port, WAIT).await?;
    // The port opens before the storage is; `/-/ready` says when queries will be answered.
    let deadline = Instant::now() + WAIT;
    while !http.get(format!("http://127.0.0.1:{port}/-/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
        anyhow::ensure!(Instant::now() < deadline, "prometheus never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let api = format!("http://127.0.0.1:{port}/api/v1");

    // Every query of every panel, with the dashboard's variables set to "all".
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tether_tests::workspace_root().join("deploy/grafana/tether-dashboard.json"))?)?;
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    let deadline = Instant::now() + WAIT;
    for expr in &exprs {
        let query = expr.replace("$__rate_interval", "10s").replace("$tenant", ".*").replace("$agent", ".*");
        loop {
            let response = http.get(format!("{api}/query?query={}", url::form_urlencoded::byte_serialize(query.as_bytes()).collect::<String>())).send().await?;
            let status = response.status();
            let text = response.text().await?;
            let answer: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{query}: {status} {text:?}: {e}"))?;
            anyhow::ensure!(answer["status"] == "success", "{query}: {answer}");
            if answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "no data for {query}: {answer}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Every target is up, with no scrape error: the tokens in the config are right, and
    // both expositions parse.
    let targets: serde_json::Value = serde_json::from_str(&http.get(format!("{api}/targets")).send().await?.text().await?)?;
    let health: Vec<(&str, &str)> = targets["data"]["activeTargets"].as_array().into_iter().flatten().map(|t| (t["health"].as_str().unwrap_or_default(), t["lastError"].as_str().unwrap_or_default())).collect();
    assert_eq!(health, [("up", ""), ("up", "")], "{targets}");
    drop(prometheus);
    drop((serve, hub));
    Ok(())
}
