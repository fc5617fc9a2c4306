//! The console of `tether serve`, in headless Chromium over WebDriver: a login that leaves
//! no token in any URL, the overview with its filter and pages, an agent's page whose
//! plots fill as traffic flows and whose log shows markup as text, deploy and rollback
//! through the page, and no error in the browser's console on any page. Screenshots of
//! each page land in `target/console-screenshots/`.

use std::ffi::OsStr;
use std::time::Duration;

use tether_tests::browser::Browser;
use tether_tests::{build_agent, manifest_head};
use tether_tests::tether_run::TetherRun;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN_A: &str = "token-of-tenant-a-0123456789";
const TOKEN_B: &str = "token-of-tenant-b-0123456789";

/// A `tether serve` with tenants `a` and `b`, and what it printed.
struct Served {
    run: TetherRun,
    /// The management API and console, without a trailing slash.
    manage: String,
    /// The agents' URLs' base.
    agents: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Served {
    /// Serves `entries` (`[[agent]]` tables), sampling the plots' history every 200 ms.
    async fn start(entries: &str) -> anyhow::Result<Served> {
        let dir = tempfile::tempdir()?;
        let head = manifest_head(dir.path(), "", "history_interval_ms = 200");
        let manifest = format!(
            r#"{head}
[[tenant]]
name = "a"
token = "{TOKEN_A}"

[[tenant]]
name = "b"
token = "{TOKEN_B}"
{entries}"#
        );
        let path = dir.path().join("manifest.toml");
        std::fs::write(&path, manifest)?;
        let run = TetherRun::spawn(&[OsStr::new("serve"), OsStr::new("--manifest"), path.as_os_str()], "console login for tenant b", WAIT).await?;
        let manage = run.word_after("management API and console: ")?;
        let agents = run.word_after("agent URLs under ")?;
        Ok(Served { run, manage, agents, http: reqwest::Client::new(), dir })
    }

    /// The one-time login link `tether serve` printed for `tenant`.
    fn printed_link(&self, tenant: &str) -> anyhow::Result<String> {
        self.run.word_after(&format!("console login for tenant {tenant}: "))
    }

    /// A fresh one-time link for `token`'s tenant, from `tether agents console`.
    fn new_link(&self, token: &str) -> anyhow::Result<String> {
        let out = std::process::Command::new(tether_tests::build_bin("tether")?).args(["agents", "--url", &self.manage, "console"]).env("TETHER_TOKEN", token).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success(), "tether agents console: {}", String::from_utf8_lossy(&out.stderr));
        stdout.split_whitespace().next().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("no link in {stdout:?}"))
    }

    /// `GET` of agent `id`'s `path`: status and body.
    async fn agent_get(&self, id: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let response = self.http.get(format!("{}/{id}{path}", self.agents)).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// Waits until agent `id` answers `path` with `body`.
    async fn wait_answer(&self, id: &str, path: &str, body: &str) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let got = self.agent_get(id, path).await?;
            if got == (200, body.to_owned()) {
                return Ok(());
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "{id}{path} answers {got:?}, not {body:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn probe_entry(id: &str, tenant: &str) -> anyhow::Result<String> {
    Ok(format!("\n[[agent]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nmodule = \"{}\"\n", build_agent("probe")?.display()))
}

/// Fails with the browser console's warnings and errors, if it has any but those that
/// contain one of `expected`.
async fn no_console_problems_but(browser: &Browser, page: &str, expected: &[&str]) -> anyhow::Result<()> {
    let mut problems = browser.console_problems().await?;
    problems.retain(|p| !expected.iter().any(|e| p.contains(e)));
    anyhow::ensure!(problems.is_empty(), "the browser console on {page}: {problems:#?}");
    Ok(())
}

/// Fails with the browser console's warnings and errors, if it has any.
async fn no_console_problems(browser: &Browser, page: &str) -> anyhow::Result<()> {
    no_console_problems_but(browser, page, &[]).await
}

#[tokio::test]
async fn the_console_logs_in_once_and_keeps_the_token_out_of_every_url() -> anyhow::Result<()> {
    let s = Served::start(&(probe_entry("a1", "a")? + &probe_entry("b1", "b")?)).await?;
    // Nothing without a login; every answer carries the CSP, which allows no inline script.
    let page = s.http.get(format!("{}/", s.manage)).send().await?;
    let csp = page.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.headers().get("referrer-policy").and_then(|v| v.to_str().ok()), Some("no-referrer"));
    assert_eq!(s.http.get(format!("{}/api/agents", s.manage)).send().await?.status(), 401);

    let browser = Browser::start().await?;
    let link = s.printed_link("a")?;
    browser.goto(&link).await?;
    browser.find("tr[data-agent=a1]").await?;
    assert_eq!(browser.url().await?, format!("{}/", s.manage), "the code is gone from the address bar");
    assert!(browser.client().find(fantoccini::Locator::Css("tr[data-agent=b1]")).await.is_err(), "tenant b's agent is not shown");
    browser.wait_text("#tenant", "tenant a").await?;
    let cookies = browser.client().get_all_cookies().await?;
    let session = cookies.iter().find(|c| c.name() == "tether_session").ok_or_else(|| anyhow::anyhow!("no session cookie: {cookies:?}"))?;
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(session.same_site().map(|s| s.to_string()).as_deref(), Some("Strict"));
    assert!(!session.value().contains(TOKEN_A));
    browser.screenshot("overview").await?;
    no_console_problems(&browser, "the overview").await?;

    // The cookie alone cannot change anything: a changing request needs the CSRF token.
    let cookie = format!("tether_session={}", session.value());
    let stop = |csrf: Option<String>| {
        let mut request = s.http.post(format!("{}/api/agents/a1/stop", s.manage)).header("cookie", &cookie);
        if let Some(csrf) = csrf {
            request = request.header("x-csrf-token", csrf);
        }
        request.send()
    };
    assert_eq!(stop(None).await?.status(), 403);
    assert_eq!(stop(Some("guess".into())).await?.status(), 403);
    let me: serde_json::Value = serde_json::from_str(&s.http.get(format!("{}/api/session", s.manage)).header("cookie", &cookie).send().await?.text().await?)?;
    assert_eq!(me["tenant"], "a");
    assert_eq!(stop(me["csrf"].as_str().map(str::to_owned)).await?.status(), 202);
    browser.find("tr[data-agent=a1][data-status=stopped]").await?;

    // A link works once.
    browser.goto(&link).await?;
    browser.wait_text("#message", "used already").await?;
    assert_eq!(browser.url().await?, format!("{}/login?expired", s.manage));

    // The form: a wrong token, then tenant b's; the token never shows in a URL.
    browser.goto(&format!("{}/login", s.manage)).await?;
    browser.find("#token").await?.send_keys("not-a-token-of-anyone").await?;
    browser.click("#login button").await?;
    browser.wait_text("#message", "not one of this host's tenants").await?;
    browser.screenshot("login").await?;
    browser.find("#token").await?.send_keys(TOKEN_B).await?;
    browser.click("#login button").await?;
    browser.find("tr[data-agent=b1]").await?;
    assert!(!browser.url().await?.contains(TOKEN_B));
    browser.wait_text("#tenant", "tenant b").await?;

    // Logging out ends the session on the server, not only in the browser.
    let cookies = browser.client().get_all_cookies().await?;
    let b_cookie = cookies.iter().find(|c| c.name() == "tether_session").map(|c| format!("tether_session={}", c.value())).unwrap_or_default();
    assert_eq!(s.http.get(format!("{}/api/agents", s.manage)).header("cookie", &b_cookie).send().await?.status(), 200);
    browser.click("#logout").await?;
    browser.find("#login").await?;
    assert_eq!(s.http.get(format!("{}/api/agents", s.manage)).header("cookie", &b_cookie).send().await?.status(), 401);
    assert_eq!(s.http.get(format!("{}/api/agents", s.manage)).header("cookie", &cookie).send().await?.status(), 200, "tenant a's session is another, still live");
    let fresh = s.new_link(TOKEN_A)?;
    assert!(fresh.starts_with(&format!("{}/login/", s.manage)), "{fresh}");
    browser.goto(&fresh).await?;
    browser.find("tr[data-agent=a1]").await?;
    no_console_problems(&browser, "the login and overview").await?;
    browser.close().await;
    Ok(())
}

#[tokio::test]
async fn a_new_version_is_deployed_from_the_overview_and_its_log_shows_live() -> anyhow::Result<()> {
    let s = Served::start(&probe_entry("a1", "a")?).await?;
    let browser = Browser::start().await?;
    browser.goto(&s.printed_link("a")?).await?;
    browser.find("#deploy-agent option[value=a1]").await?;
    browser.choose_file("#deploy-file", &build_agent("http-echo")?).await?;
    browser.click("#deploy button").await?;
    browser.wait_text("#message", "Deployed").await?;
    s.wait_answer("a1", "/x", "GET /x {} ").await?;
    browser.wait_text("#logs", "[a1] Agent restarted: reload").await?;
    no_console_problems(&browser, "the overview").await?;
    browser.close().await;
    Ok(())
}

#[tokio::test]
async fn the_overview_filters_and_pages_many_agents() -> anyhow::Result<()> {
    let mut entries = String::new();
    for i in 0..120 {
        entries += &probe_entry(&format!("a-{i:03}"), "a")?;
    }
    let s = Served::start(&entries).await?;
    let browser = Browser::start().await?;
    browser.goto(&s.printed_link("a")?).await?;
    browser.wait_text("#count", "1–50 of 120").await?;
    browser.click("#next").await?;
    browser.wait_text("#count", "51–100 of 120").await?;
    browser.find("tr[data-agent=a-050]").await?;
    browser.find("#filter").await?.send_keys("a-11").await?;
    browser.wait_text("#count", "1–10 of 10").await?;
    browser.find("tr[data-agent=a-119]").await?;
    // Every shown row has its sparkline, drawn by uPlot.
    browser.wait_js("return document.querySelectorAll('#agents tbody tr .spark canvas').length", |n| n == 10).await?;
    browser.screenshot("overview-filtered").await?;
    no_console_problems(&browser, "the overview").await?;
    browser.close().await;
    Ok(())
}

#[tokio::test]
async fn an_agents_page_plots_its_traffic_and_shows_its_log_as_text() -> anyhow::Result<()> {
    let s = Served::start(&probe_entry("a1", "a")?).await?;
    let browser = Browser::start().await?;
    browser.goto(&s.printed_link("a")?).await?;
    browser.click("tr[data-agent=a1] a").await?;
    browser.wait_text("#agent-id", "a1").await?;
    assert_eq!(browser.url().await?, format!("{}/agents/a1", s.manage));
    browser.wait_text("#facts", &format!("{}/a1", s.agents)).await?;
    browser.wait_js("return document.querySelectorAll('#plots canvas').length", |n| n == 6).await?;

    // Traffic: the events plot fills.
    for _ in 0..50 {
        assert_eq!(s.agent_get("a1", "/ping").await?, (200, "pong".into()));
    }
    assert_eq!(s.agent_get("a1", "/save?bytes=100").await?, (200, "saved".into()));
    browser.wait_js("return Number(document.getElementById('plots').dataset.eventsMax || 0)", |n| n.as_f64().is_some_and(|n| n > 0.0)).await?;
    // The store holds the value as JSON: 100 characters and two quotes.
    browser.wait_text("#facts", "store102 B").await?;

    // Markup an agent logs stays text.
    let markup = "<img src=x id=injected><b>bold</b>";
    let query = format!("/log?text={}", url::form_urlencoded::byte_serialize(markup.as_bytes()).collect::<String>());
    assert_eq!(s.agent_get("a1", &query).await?, (200, "logged".into()));
    browser.wait_text("#logs", markup).await?;
    let injected = browser.client().execute("return document.querySelectorAll('#logs img, #logs b, #injected').length", vec![]).await?;
    assert_eq!(injected, 0, "no element was made from the log line");
    // Search and the level filter.
    browser.find("#log-search").await?.send_keys("bold").await?;
    browser.wait_text("#log-count", "1 of").await?;
    browser.find("#log-search").await?.clear().await?;
    browser.click("#log-level option[value=error]").await?;
    browser.wait_text_where("#logs", |t| !t.contains("bold")).await?;
    browser.client().execute("window.scrollTo(0, 0)", vec![]).await?;
    browser.screenshot("agent").await?;
    browser.client().execute("document.getElementById('plots').scrollIntoView()", vec![]).await?;
    browser.screenshot("agent-plots").await?;
    no_console_problems(&browser, "the agent's page").await?;
    browser.close().await;
    Ok(())
}

#[tokio::test]
async fn a_version_is_deployed_and_rolled_back_from_the_agents_page() -> anyhow::Result<()> {
    let s = Served::start(&probe_entry("a1", "a")?).await?;
    let browser = Browser::start().await?;
    browser.goto(&s.printed_link("a")?).await?;
    browser.find("tr[data-agent=a1]").await?;
    browser.goto(&format!("{}/agents/a1", s.manage)).await?;
    browser.wait_text("#deploys", "no deploys through the API yet").await?;

    // A refused module: its reason is shown, and the old version keeps answering.
    let bad = s.dir.path().join("not-a-module.wasm");
    std::fs::write(&bad, b"hello")?;
    browser.choose_file("#deploy-file", &bad).await?;
    browser.click("#deploy button").await?;
    browser.wait_text("#message", "not a WebAssembly component").await?;
    s.wait_answer("a1", "/ping", "pong").await?;
    // The refused upload's 400, which the page shows, is the one entry Chromium logs.
    no_console_problems_but(&browser, "the agent's page", &["/api/agents/a1/deploy - Failed to load resource: the server responded with a status of 400"]).await?;

    let echo = build_agent("http-echo")?;
    browser.choose_file("#deploy-file", &echo).await?;
    browser.click("#deploy button").await?;
    browser.wait_text("#message", "Deployed").await?;
    s.wait_answer("a1", "/x", "GET /x {} ").await?;
    browser.wait_text("#deploys", "the manifest's module").await?;
    browser.screenshot("agent-deployed").await?;

    // Back to the manifest's version, then forward again to the deployed one.
    browser.click("#deploys tr:last-child button").await?;
    browser.wait_text("#message", "Rolled back").await?;
    s.wait_answer("a1", "/ping", "pong").await?;
    browser.wait_text("#deploys", "rollback").await?;
    let echo_digest = browser.wait_js("return document.querySelector('#deploys tr[data-via=deploy]')?.dataset.module", |v| v.is_string()).await?;
    let echo_digest = echo_digest.as_str().unwrap_or_default().to_owned();
    browser.click(&format!("#deploys tr[data-module='{echo_digest}'] button")).await?;
    s.wait_answer("a1", "/x", "GET /x {} ").await?;
    browser.wait_text("#message", "Rolled back").await?;
    browser.screenshot("agent-rolled-back").await?;
    no_console_problems(&browser, "the agent's page").await?;
    browser.close().await;
    Ok(())
}

#[tokio::test]
async fn the_hub_page_shows_telemetry_and_reaches_the_device_with_twin_method_and_c2d() -> anyhow::Result<()> {
    let agent = build_agent("azure-demo")?;
    tether_tests::build_bin("device-sim")?;
    let state = tempfile::tempdir()?;
    let args = [
        OsStr::new("demo"),
        OsStr::new("--mqtt-port"),
        OsStr::new("0"),
        OsStr::new("--https-port"),
        OsStr::new("0"),
        OsStr::new("--page-listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--console-listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--interval"),
        OsStr::new("0.5"),
        OsStr::new("--state-dir"),
        state.path().as_os_str(),
        OsStr::new("--agent"),
        agent.as_os_str(),
    ];
    let run = TetherRun::spawn(&args, "hub page login, once within 10 minutes: ", WAIT).await?;
    let link = run.word_after("hub page login, once within 10 minutes: ")?;
    let page = run.word_after("hub page: ")?;
    run.wait_until("the agent connects", WAIT, |l| l.iter().any(|l| l.contains("cloud-to-device messages enabled"))).await?;

    let browser = Browser::start().await?;
    // A connection string the hub refuses, then the printed link.
    browser.goto(&format!("{page}/login")).await?;
    browser.find("#connection_string").await?.send_keys("HostName=tether-hub;SharedAccessKeyName=iothubowner;SharedAccessKey=bm90LXRoZS1rZXk=").await?;
    browser.click("#login button").await?;
    browser.wait_text("#message", "The hub refused").await?;
    browser.goto(&link).await?;
    browser.click("tr[data-device=demo-device][data-connection=connected] button").await?;
    browser.wait_text("#twin", "reported").await?;
    browser.wait_text("#telemetry", "temperature").await?;

    // A direct method reaches the agent, which asks the board; the answer comes back.
    browser.find("#method-name").await?.send_keys("blink").await?;
    browser.find("#method-payload").await?.clear().await?;
    browser.find("#method-payload").await?.send_keys(r#"{"times":2}"#).await?;
    browser.click("#method-form button").await?;
    browser.wait_text("#method-result", r#""blinked": 2"#).await?;
    run.wait_until("the agent saw the method", WAIT, |l| l.iter().any(|l| l.contains("direct method blink"))).await?;

    // A C2D message with a property.
    browser.find("#c2d-body").await?.send_keys(r#"{"led": true}"#).await?;
    browser.find("#c2d-properties").await?.send_keys("source=page").await?;
    browser.click("#c2d-form button").await?;
    browser.wait_text("#message", "queued").await?;
    run.wait_until("the agent got the C2D message", WAIT, |l| l.iter().any(|l| l.contains(r#"C2D message: {"led": true}"#) && l.contains("source"))).await?;

    // Desired properties, one of them markup: the twin view shows it as text.
    let desired = browser.find("#desired").await?;
    desired.clear().await?;
    desired.send_keys(r#"{"interval": 1, "note": "<img src=x id=injected>"}"#).await?;
    browser.click("#desired-form button").await?;
    browser.wait_text("#twin", "<img src=x id=injected>").await?;
    run.wait_until("the agent took the interval", WAIT, |l| l.iter().any(|l| l.contains("desired reporting interval: 1 s"))).await?;
    assert_eq!(browser.client().execute("return document.querySelectorAll('#injected, #twin img').length", vec![]).await?, 0);

    // A fault: the hub drops the device, which comes back.
    browser.find("#fault-kind").await?.select_by_value("KillTcp").await?;
    browser.click("#fault-form button").await?;
    browser.wait_text("#events", "demo-device disconnected").await?;
    browser.wait_text_where("#events", |t| t.rfind("demo-device connected") > t.rfind("demo-device disconnected")).await?;
    browser.client().execute("window.scrollTo(0, 0)", vec![]).await?;
    browser.screenshot("hub").await?;

    // What the hub counted, for Prometheus: the control token is the bearer.
    let control = run.word_after("export CONTROL_TOKEN='")?.trim_end_matches('\'').to_owned();
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{page}/metrics")).send().await?.status(), 401);
    let metrics = http.get(format!("{page}/metrics")).bearer_auth(&control).send().await?.text().await?;
    // The demo's console: the agent's page with its device line up.
    let console_link = run.word_after("console login, once within 10 minutes: ")?;
    browser.goto(&console_link).await?;
    browser.click("tr[data-agent=demo][data-status=running] a").await?;
    browser.wait_text("#device-link", "connected").await?;
    browser.wait_text("#device", "frames in").await?;
    browser.wait_text("#device", "replugs").await?;
    browser.wait_text("#device", "round trip").await?;
    // The timeline follows a reading from the serial line, through the agent, to the
    // broker's acknowledgement.
    browser.wait_text("#timeline", "device → agent  temperature").await?;
    browser.wait_text("#timeline", "agent log  telemetry sent").await?;
    browser.wait_text("#timeline", "agent → broker  publish").await?;
    browser.wait_text("#timeline", "broker → agent  acknowledged publish").await?;
    browser.client().execute("document.getElementById('timeline').scrollIntoView()", vec![]).await?;
    browser.screenshot("demo-timeline").await?;
    browser.client().execute("window.scrollTo(0, 0)", vec![]).await?;
    browser.screenshot("demo-agent").await?;
    no_console_problems(&browser, "the demo's console").await?;

    for series in [r#"tether_hub_methods_total{kind="answered"} 1"#, "tether_hub_connections 1", r#"tether_hub_events_total{kind="disconnected"}"#, r#"tether_hub_events_total{kind="telemetry"}"#, "tether_hub_method_seconds_count 1"] {
        assert!(metrics.contains(series), "no {series} in {metrics}");
    }
    no_console_problems(&browser, "the hub page").await?;
    browser.close().await;
    Ok(())
}
