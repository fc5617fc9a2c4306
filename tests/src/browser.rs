//! Headless Chromium over WebDriver (Debian's `chromium` and `chromium-driver`, driven by
//! fantoccini), for the console's tests: a fresh profile per browser, the browser's
//! console messages readable, screenshots into the target dir, and the driver's process
//! group killed on drop so that no Chromium outlives its test.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};

/// How long a wait for the page lasts before the test fails.
const WAIT: Duration = Duration::from_secs(30);

/// A headless Chromium session.
pub struct Browser {
    client: Client,
    driver: std::process::Child,
    _profile: tempfile::TempDir,
}

fn first_existing(paths: &[&str], what: &str) -> anyhow::Result<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.exists()).ok_or_else(|| anyhow::anyhow!("no {what}; run scripts/setup.sh --with-test-deps"))
}

/// The legacy `POST /session/{id}/se/log` command, which chromedriver still answers: the
/// browser's console messages since the last call. WebDriver proper has none.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session at
    /// 1280×800, with the flags this machine's closed network needs.
    pub async fn start() -> anyhow::Result<Browser> {
        let driver_bin = first_existing(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"], "chromedriver")?;
        let chromium = first_existing(&["/usr/bin/chromium", "/usr/bin/chromium-browser"], "chromium")?;
        let port = crate::free_port();
        // A group of its own: Chromium inherits it, so killing the group ends both.
        let driver = std::process::Command::new(driver_bin)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let profile = tempfile::tempdir()?;
        let mut browser = BrowserGuard(Some(driver));
        crate::wait_for_port(port, WAIT).await?;
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,800",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = serde_json::json!({
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let serde_json::Value::Object(caps) = caps else { anyhow::bail!("capabilities are an object") };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await?;
        let driver = browser.0.take().ok_or_else(|| anyhow::anyhow!("driver gone"))?;
        Ok(Browser { client, driver, _profile: profile })
    }

    /// The WebDriver client, for what the helpers below do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        Ok(self.client.goto(url).await?)
    }

    /// Waits for an element matching `css`.
    pub async fn find(&self, css: &str) -> anyhow::Result<Element> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.client.find(Locator::Css(css)).await {
                Ok(found) => return Ok(found),
                Err(e) if Instant::now() > deadline => anyhow::bail!("no {css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Clicks the element matching `css`, finding it again if the page replaced it
    /// between finding and clicking (tables that refresh do).
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.find(css).await?.click().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => anyhow::bail!("cannot click {css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until `check` holds for the text of `css`; the text.
    pub async fn wait_text_where(&self, css: &str, check: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            // The element may be replaced between finding and reading it: read again.
            let text = self.find(css).await?.text().await.unwrap_or_default();
            if check(&text) {
                return Ok(text);
            }
            anyhow::ensure!(Instant::now() < deadline, "{css} never showed what was waited for; it shows {text:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the text of `css` contains `needle`; the text.
    pub async fn wait_text(&self, css: &str, needle: &str) -> anyhow::Result<String> {
        self.wait_text_where(css, |t| t.contains(needle)).await.map_err(|e| anyhow::anyhow!("waiting for {needle:?}: {e}"))
    }

    /// Waits until `script` (a function body) returns something `check` accepts; that.
    pub async fn wait_js(&self, script: &str, check: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.client.execute(script, vec![]).await?;
            if check(&value) {
                return Ok(value);
            }
            anyhow::ensure!(Instant::now() < deadline, "{script} never gave what was waited for; it gives {value}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's URL now.
    pub async fn url(&self) -> anyhow::Result<String> {
        Ok(self.client.current_url().await?.to_string())
    }

    /// The browser console's warnings and errors since the last call (CSP violations,
    /// script errors, failed loads), as "LEVEL message".
    pub async fn console_problems(&self) -> anyhow::Result<Vec<String>> {
        let entries = self.client.issue_cmd(BrowserLog).await?;
        Ok(entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| matches!(e["level"].as_str(), Some("SEVERE" | "WARNING")))
            .map(|e| format!("{} {}", e["level"].as_str().unwrap_or_default(), e["message"].as_str().unwrap_or_default()))
            .collect())
    }

    /// Saves PNGs of the page in `target/console-screenshots/`: `<name>.png` at
    /// 1280×800 and `<name>-phone.png` at a phone's 390×844; the path of the first.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = crate::workspace_root().join("target").join("console-screenshots");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, self.client.screenshot().await?)?;
        self.client.set_window_size(390, 844).await?;
        // A frame for the layout to follow the new width.
        self.client.execute("return new Promise(r => requestAnimationFrame(() => r()))", vec![]).await?;
        std::fs::write(dir.join(format!("{name}-phone.png")), self.client.screenshot().await?)?;
        self.client.set_window_size(1280, 800).await?;
        Ok(path)
    }

    /// Picks `file` in the file input `css`.
    pub async fn choose_file(&self, css: &str, file: &Path) -> anyhow::Result<()> {
        Ok(self.find(css).await?.send_keys(&file.display().to_string()).await?)
    }

    /// Ends the session and the browser.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// Kills the driver's process group, and with it Chromium.
struct BrowserGuard(Option<std::process::Child>);

impl Drop for BrowserGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            kill_group(child);
        }
    }
}

fn kill_group(child: &mut std::process::Child) {
    // The child leads its group (`process_group(0)`), so its pid is the group's id.
    let group = child.id() as i32;
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is shared.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let _ = child.wait();
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}
