//! `tether agents`: the management API of a `tether serve`, from the command line.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;

/// `tether agents`' arguments.
#[derive(clap::Args)]
pub struct AgentsArgs {
    /// The management API's base URL.
    #[arg(long, env = "TETHER_URL", default_value = "http://127.0.0.1:9090")]
    url: String,
    /// The tenant's bearer token.
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: String,
    /// Print the management API's JSON answers as they are (one per line for logs),
    /// for scripts.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: AgentsAction,
}

/// What to do through the management API.
#[derive(Subcommand)]
pub enum AgentsAction {
    /// Lists the tenant's agents with their status.
    List,
    /// Deploys a new module version to an agent (it restarts over its kept store).
    Deploy { id: String, module: PathBuf },
    /// Stops an agent.
    Stop { id: String },
    /// Starts a stopped or failed agent.
    Start { id: String },
    /// Restarts an agent.
    Restart { id: String },
    /// Follows the log of one agent, or of all the tenant's agents.
    Logs { id: Option<String> },
    /// Prints a one-time link that logs a browser in to the console (valid for 10 minutes).
    Console,
}


/// Calls the management API for `args.action`.
pub async fn agents(args: AgentsArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/');
    let client = reqwest::Client::new();
    let auth = format!("Bearer {}", args.token);
    let (method, path, body) = match &args.action {
        AgentsAction::List => (reqwest::Method::GET, "/api/agents".to_owned(), None),
        AgentsAction::Deploy { id, module } => {
            let bytes = std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
            (reqwest::Method::POST, format!("/api/agents/{id}/deploy"), Some(bytes))
        }
        AgentsAction::Stop { id } => (reqwest::Method::POST, format!("/api/agents/{id}/stop"), None),
        AgentsAction::Start { id } => (reqwest::Method::POST, format!("/api/agents/{id}/start"), None),
        AgentsAction::Restart { id } => (reqwest::Method::POST, format!("/api/agents/{id}/restart"), None),
        AgentsAction::Logs { id: Some(id) } => (reqwest::Method::GET, format!("/api/agents/{id}/logs"), None),
        AgentsAction::Logs { id: None } => (reqwest::Method::GET, "/api/logs".to_owned(), None),
        AgentsAction::Console => (reqwest::Method::POST, "/api/login-links".to_owned(), None),
    };
    let mut request = client.request(method, format!("{base}{path}")).header("authorization", auth);
    if let Some(body) = body {
        request = request.body(body);
    }
    let mut response = request.send().await.with_context(|| format!("cannot reach the management API at {base}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let reason = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["error"].as_str().map(str::to_owned)).unwrap_or(text);
        bail!("{status}: {reason}");
    }
    if let AgentsAction::Logs { .. } = args.action {
        let mut pending = String::new();
        while let Some(chunk) = response.chunk().await.context("the log stream broke")? {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                if let Some(Ok(line)) = event.trim_end().strip_prefix("data: ").map(serde_json::from_str::<serde_json::Value>) {
                    if args.json {
                        println!("{line}");
                    } else {
                        println!("[{}] {}", line["agent"].as_str().unwrap_or("host"), line["text"].as_str().unwrap_or_default());
                    }
                }
            }
        }
        return Ok(());
    }
    let text = response.text().await.context("the management API's answer broke off")?;
    let value: serde_json::Value = serde_json::from_str(&text).context("the management API answered with invalid JSON")?;
    if args.json {
        println!("{value}");
        return Ok(());
    }
    match args.action {
        AgentsAction::List => {
            println!("{:<24} {:<11} {:>8} {:<12} {:<12} cause", "agent", "status", "restarts", "device", "module");
            for a in value["agents"].as_array().into_iter().flatten() {
                let device = match a["device_connected"].as_bool() {
                    None => "none",
                    Some(true) => "connected",
                    Some(false) => "disconnected",
                };
                let module = a["module"].as_str().unwrap_or_default();
                println!(
                    "{:<24} {:<11} {:>8} {:<12} {:<12} {}",
                    a["id"].as_str().unwrap_or_default(),
                    a["status"].as_str().unwrap_or_default(),
                    a["restarts"],
                    device,
                    &module[..module.len().min(12)],
                    a["cause"].as_str().unwrap_or_default()
                );
            }
        }
        AgentsAction::Deploy { id, module } => {
            let digest = value["module"].as_str().unwrap_or_default();
            println!(
                "deployed {} to {id}: module {}, compiled in {} ms; it restarts over its kept store",
                module.display(),
                &digest[..digest.len().min(12)],
                value["compile_ms"]
            );
        }
        AgentsAction::Stop { id } => println!("{id}: stopping"),
        AgentsAction::Start { id } => println!("{id}: starting"),
        AgentsAction::Restart { id } => println!("{id}: restarting"),
        AgentsAction::Logs { .. } => {}
        AgentsAction::Console => println!("{base}{} (logs in once, within 10 minutes)", value["path"].as_str().unwrap_or_default()),
    }
    Ok(())
}

