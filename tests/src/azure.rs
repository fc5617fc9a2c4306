//! The hub emulator and an agent host that trusts its CA, for the AzureIoTHub tests.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tether_hub_emulator::{Hub, HubConfig};

use crate::TestHost;

/// An emulator on ephemeral ports, a host trusting its CA, and the `azure-probe` agent
/// (or another) running as `az`.
pub struct AzureEnv {
    pub hub: Hub,
    pub t: TestHost,
    _state: tempfile::TempDir,
    http: reqwest::Client,
}

impl AzureEnv {
    /// Starts everything.
    pub async fn start() -> anyhow::Result<AzureEnv> {
        Self::start_with("azure-probe").await
    }

    /// Starts everything with `package` as the agent `az`.
    pub async fn start_with(package: &str) -> anyhow::Result<AzureEnv> {
        let state = tempfile::tempdir()?;
        let hub = Hub::start(HubConfig { mqtt_port: 0, https_port: 0, state_dir: state.path().to_owned(), ..HubConfig::default() }).await?;
        let ca = hub.ca_cert_path().to_owned();
        let t = TestHost::start(move |c| c.trusted_ca_files = vec![ca]).await?;
        t.spawn("az", package, &[])?;
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(hub.ca_cert_pem().as_bytes())?])
            .build()?;
        Ok(AzureEnv { hub, t, _state: state, http })
    }

    /// Calls the agent: `path` with `query`, returns the answer text.
    pub async fn call(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<String> {
        let url = reqwest::Url::parse_with_params(&self.t.url("az", path), query)?;
        let response = self.http.get(url).timeout(Duration::from_secs(60)).send().await.with_context(|| format!("calling {path}"))?;
        Ok(response.text().await?)
    }

    /// `/new` for a device registered in the emulator, with extra client options.
    pub async fn new_client(&self, device_id: &str, options: &[(&str, &str)]) -> anyhow::Result<()> {
        let cs = match self.hub.device_connection_string(device_id) {
            Some(cs) => cs,
            None => self.hub.create_device(device_id)?.connection_string,
        };
        let port = self.hub.mqtt_addr().port().to_string();
        let mut query = vec![("cs", cs.as_str()), ("port", port.as_str())];
        query.extend_from_slice(options);
        anyhow::ensure!(self.call("/new", &query).await? == "ok");
        Ok(())
    }

    /// A service REST call with an `iothubowner` token: status and JSON body.
    pub async fn service(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let cs = policy_host_and_key(&self.hub.service_connection_string());
        let (host, key) = (cs.0, cs.1);
        let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
        let token = tether_hub_emulator::generate_sas_token(&host, &key, Some("iothubowner"), expiry).context("bad key")?;
        let url = format!("https://{host}{path}{}api-version=2021-04-12", if path.contains('?') { "&" } else { "?" });
        let mut req = self.http.request(method.parse()?, url).header("authorization", token);
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body.to_string());
        }
        let response = req.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// The HTTPS endpoint of DPS, for `Dps::with_endpoint`.
    pub fn dps_endpoint(&self) -> String {
        format!("https://{}", self.hub.dps_endpoint())
    }
}

/// (HostName, SharedAccessKey) of a policy connection string.
fn policy_host_and_key(cs: &str) -> (String, String) {
    let get = |k: &str| cs.split(';').find_map(|p| p.strip_prefix(k).and_then(|v| v.strip_prefix('='))).unwrap_or_default().to_owned();
    (get("HostName"), get("SharedAccessKey"))
}
