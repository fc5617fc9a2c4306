//! The AzureIoTHub library in an agent, against the hub emulator: the documented error
//! code of each client method in each state, twins, direct methods, C2D, token refresh,
//! DPS and the registry.

use std::time::Duration;

use serde_json::json;
use tether_hub_emulator::{C2dRequest, Enrollment, EventFilter};
use tether_tests::azure::AzureEnv;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn telemetry_c2d_twin_and_methods_flow() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    az.new_client("dev1", &[]).await?;
    assert_eq!(az.call("/connect", &[]).await?, "connected 0");
    assert_eq!(az.call("/connected", &[]).await?, "true");

    // Telemetry with properties arrives at the hub as sent.
    let since = az.hub.control().events(0, &EventFilter::default()).last().map_or(0, |e| e.seq);
    assert_eq!(az.call("/send", &[("body", "22.5 C"), ("props", "unit:celsius,$.ct:text/plain")]).await?, "sent [0]");
    let filter = EventFilter { device_id: Some("dev1".into()), kind: Some("telemetry".into()) };
    let events = az.hub.control().wait_events(since, &filter, WAIT).await;
    let event = serde_json::to_value(events.first().ok_or_else(|| anyhow::anyhow!("no telemetry"))?)?;
    assert_eq!(event["body"], "22.5 C");
    assert_eq!(event["properties"]["unit"], "celsius");
    assert_eq!(event["systemProperties"]["contentType"], "text/plain", "{event}");

    // C2D, with properties.
    assert_eq!(az.call("/enable", &[("f", "messages")]).await?, "done 0");
    let mut c2d = C2dRequest { body: b"to the device".to_vec(), ..C2dRequest::default() };
    c2d.properties.insert("color".into(), Some("blue".into()));
    az.hub.control().send_c2d("dev1", c2d)?;
    let line = az.t.logs.wait_for("az", "c2d to the device", WAIT).await?;
    assert!(line.text.contains(r#""color": "blue""#), "{}", line.text);

    // Twin: reported patch, retrieve, desired notification.
    assert_eq!(az.call("/enable", &[("f", "twin")]).await?, "done 0");
    assert_eq!(az.call("/update", &[("json", r#"{"interval": 5}"#)]).await?, "updated [0]");
    let retrieved = az.call("/retrieve", &[]).await?;
    assert!(retrieved.starts_with("0 {") && retrieved.contains(r#""interval":5"#), "{retrieved}");
    let (status, _) = az.service("PATCH", "/twins/dev1", Some(json!({"properties": {"desired": {"interval": 10}}}))).await?;
    assert_eq!(status, 200);
    let line = az.t.logs.wait_for("az", "desired {", WAIT).await?;
    assert!(line.text.contains(r#""interval":10"#) && line.text.contains("$version"), "{}", line.text);

    // A direct method invoked through the service API and answered by the agent.
    assert_eq!(az.call("/enable", &[("f", "methods")]).await?, "done 0");
    let (status, body) = az
        .service("POST", "/twins/dev1/methods", Some(json!({"methodName": "blink", "payload": {"times": 3}, "responseTimeoutInSeconds": 10})))
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], 200);
    assert_eq!(body["payload"], json!({"method": "blink", "params": {"times": 3}}));
    az.t.logs.wait_for("az", "reply sent 0", WAIT).await?;

    assert_eq!(az.call("/disconnect", &[]).await?, "disconnected 0");
    assert_eq!(az.call("/connected", &[]).await?, "false");
    Ok(())
}

#[tokio::test]
async fn every_method_gives_the_documented_code_in_each_state() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    az.new_client("dev2", &[]).await?;

    // Not connected: 1000 everywhere.
    assert_eq!(az.call("/send", &[]).await?, "sent [1000]");
    assert_eq!(az.call("/enable", &[("f", "twin")]).await?, "done 1000");
    assert_eq!(az.call("/enable", &[("f", "messages")]).await?, "done 1000");
    assert_eq!(az.call("/enable", &[("f", "methods"), ("on", "0")]).await?, "done 1000");
    assert_eq!(az.call("/retrieve", &[]).await?, "1000 null null");
    assert_eq!(az.call("/update", &[("json", "{}")]).await?, "updated [1000]");

    // Connecting: a second connect and every other call get 1004, then the first succeeds.
    assert_eq!(az.call("/connect", &[("twice", "1"), ("probe", "1")]).await?, "connected 1004");
    for op in ["send", "enable", "retrieve", "update"] {
        az.t.logs.wait_for("az", &format!("{op} while connecting 1004"), WAIT).await?;
    }
    az.t.logs.wait_for("az", "connected 0", WAIT).await?;
    // Connected: connect again is 1001.
    assert_eq!(az.call("/connect", &[]).await?, "connected 1001");

    // Enable/disable sequences.
    assert_eq!(az.call("/retrieve", &[]).await?, "1002 null null");
    assert_eq!(az.call("/update", &[("json", "{}")]).await?, "updated [1002]");
    assert_eq!(az.call("/enable", &[("f", "messages"), ("on", "0")]).await?, "done 1002");
    assert_eq!(az.call("/enable", &[("f", "twin")]).await?, "done 0");
    assert_eq!(az.call("/enable", &[("f", "twin")]).await?, "done 1003");
    assert_eq!(az.call("/enable", &[("f", "twin"), ("on", "0")]).await?, "done 0");
    assert_eq!(az.call("/enable", &[("f", "twin"), ("on", "0")]).await?, "done 1002");
    assert_eq!(az.call("/enable", &[("f", "twin")]).await?, "done 0");

    // Limits: the 4th pending send or update, the 2nd pending retrieve.
    let sent = az.call("/send", &[("n", "4")]).await?;
    assert_eq!(sent, "sent [1004, 0, 0, 0]");
    let updated = az.call("/update", &[("n", "4"), ("json", r#"{"a":1}"#)]).await?;
    assert_eq!(updated, "updated [1004, 0, 0, 0]");
    let retrieved = az.call("/retrieve", &[("n", "2")]).await?;
    assert!(retrieved.starts_with("1004 null null | 0 {"), "{retrieved}");

    // Disconnecting: 1004; a second disconnect does nothing. Then disconnected: features
    // are off and codes are 1000 again.
    assert_eq!(az.call("/disconnect", &[("probe", "1")]).await?, "disconnected 0");
    for op in ["send", "enable", "retrieve", "update"] {
        az.t.logs.wait_for("az", &format!("{op} while disconnecting 1004"), WAIT).await?;
    }
    az.t.logs.drain();
    assert_eq!(az.t.logs.texts("az").iter().filter(|l| l.starts_with("disconnected")).count(), 1);
    assert_eq!(az.call("/send", &[]).await?, "sent [1000]");
    assert_eq!(az.call("/connect", &[]).await?, "connected 0");
    assert_eq!(az.call("/retrieve", &[]).await?, "1002 null null", "twin must be re-enabled after a reconnect");
    Ok(())
}

#[tokio::test]
async fn lost_connection_reports_1100_and_answers_pending_calls() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    az.new_client("dev3", &[]).await?;
    assert_eq!(az.call("/connect", &[]).await?, "connected 0");
    assert!(az.hub.control().disconnect("dev3"));
    az.t.logs.wait_for("az", "disconnected 1100", WAIT).await?;
    assert_eq!(az.call("/connected", &[]).await?, "false");
    Ok(())
}

#[tokio::test]
async fn late_direct_method_reply_is_1005() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    az.new_client("dev4", &[("dm_timeout", "1")]).await?;
    assert_eq!(az.call("/connect", &[]).await?, "connected 0");
    assert_eq!(az.call("/enable", &[("f", "methods")]).await?, "done 0");
    assert_eq!(az.call("/method-reply", &[("delay", "2")]).await?, "ok");
    let (status, body) = az.service("POST", "/twins/dev4/methods", Some(json!({"methodName": "slow", "responseTimeoutInSeconds": 5}))).await?;
    assert_eq!(status, 504, "{body}");
    az.t.logs.wait_for("az", "reply sent 1005", WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn token_refresh_keeps_twin_and_methods_working() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    // 10 s tokens: refreshed a second before expiry, invisibly.
    az.new_client("dev5", &[("ttl", "10")]).await?;
    assert_eq!(az.call("/connect", &[]).await?, "connected 0");
    assert_eq!(az.call("/enable", &[("f", "twin")]).await?, "done 0");
    assert_eq!(az.call("/enable", &[("f", "methods")]).await?, "done 0");
    // Calls made just after the refresh starts are queued, then served; a slow CONNACK
    // keeps the refresh under way long enough to see it. The refresh is due one second
    // before the token's `se`, which is in whole seconds: it starts 9 s after "connected",
    // or 8 s when a second boundary fell between making the token and the CONNACK (a few
    // percent of runs, more on a loaded machine). A 2 s delay keeps the refresh going at
    // the probe's 9.1 s in both cases (0.5 s did only in the first), and stays well inside
    // the client's 5 s connect timeout.
    az.hub.control().delay_connack("dev5", Duration::from_secs(2));
    assert_eq!(az.call("/probe-later", &[("after", "9.1")]).await?, "scheduled");
    let filter = EventFilter { device_id: Some("dev5".into()), kind: Some("connected".into()) };
    let connects = az.hub.control().events(0, &filter).len();
    // Wait for a reconnect with a new token.
    let deadline = std::time::Instant::now() + WAIT;
    while az.hub.control().events(0, &filter).len() == connects {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no token refresh within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for op in ["send", "enable", "retrieve", "update"] {
        az.t.logs.wait_for("az", &format!("{op} later 0"), WAIT).await?;
    }
    az.t.logs.wait_for("az", "queued until the token refresh completes", WAIT).await?;
    assert_eq!(az.call("/update", &[("json", r#"{"after":"refresh"}"#)]).await?, "updated [0]");
    assert!(az.call("/retrieve", &[]).await?.contains(r#""after":"refresh""#));
    let (status, body) = az.service("POST", "/twins/dev5/methods", Some(json!({"methodName": "ping", "responseTimeoutInSeconds": 10}))).await?;
    assert_eq!(status, 200, "{body}");
    az.t.logs.drain();
    let lines = az.t.logs.texts("az");
    assert_eq!(lines.iter().filter(|l| *l == "connected 0").count(), 1, "on_connected must not run for a refresh: {lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("disconnected")), "on_disconnected must not run for a refresh: {lines:?}");
    Ok(())
}

#[tokio::test]
async fn dps_individual_and_group_registration() -> anyhow::Result<()> {
    let az = AzureEnv::start().await?;
    let scope = az.hub.dps_scope_id().to_owned();
    let endpoint = az.dps_endpoint();
    let individual = az.hub.add_enrollment(Enrollment::Individual { registration_id: "reg-1".into(), device_id: None, primary_key: None, secondary_key: None })?;
    let q = |reg: &'static str, key: &str| vec![("scope", scope.clone()), ("reg", reg.to_owned()), ("key", key.to_owned()), ("endpoint", endpoint.clone())];
    let call = |path: &'static str, query: Vec<(&'static str, String)>| {
        let az = &az;
        async move {
            let query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
            az.call(path, &query).await
        }
    };
    assert_eq!(call("/dps/get", q("reg-1", &individual.primary_key)).await?, "1010 ");
    let registered = call("/dps/register", q("reg-1", &individual.primary_key)).await?;
    assert_eq!(registered, format!("0 HostName=localhost;DeviceId=reg-1;SharedAccessKey={}", individual.primary_key));
    assert_eq!(call("/dps/get", q("reg-1", &individual.primary_key)).await?, registered);
    // A wrong key is refused by DPS with 401.
    assert!(call("/dps/register", q("reg-1", "AAAAAAAAAAAAAAAAAAAAAA==")).await?.starts_with("401 "));

    let group = az.hub.add_enrollment(Enrollment::Group { group_id: "fleet".into(), primary_key: None, secondary_key: None })?;
    let mut query = q("fleet-7", "");
    query.push(("group_key", group.primary_key.clone()));
    let registered = call("/dps/register", query).await?;
    assert!(registered.starts_with("0 HostName=localhost;DeviceId=fleet-7;SharedAccessKey="), "{registered}");
    // The provisioned device connects with the connection string DPS gave.
    assert!(az.hub.control().device_info("fleet-7").is_some());
    Ok(())
}

#[tokio::test]
async fn registry_crud_and_iot_hub_errors() -> anyhow::Result<()> {
    let az = AzureEnv::start().await?;
    let cs = az.hub.service_connection_string();
    let call = |path: &'static str, extra: Vec<(&'static str, String)>| {
        let (az, cs) = (&az, cs.clone());
        async move {
            let mut query = vec![("cs", cs)];
            query.extend(extra);
            let query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
            az.call(path, &query).await
        }
    };
    let id = |s: &str| vec![("id", s.to_owned())];
    let missing = call("/registry/get", id("nope")).await?;
    assert!(missing.starts_with("err 404 ") && missing.contains("404001"), "{missing}");
    let created = call("/registry/create", id("r1")).await?;
    assert!(created.starts_with(r#"ok {"#) && created.contains(r#""deviceId":"r1""#) && created.contains("primaryKey"), "{created}");
    let conflict = call("/registry/create", id("r1")).await?;
    assert!(conflict.starts_with("err 409 ") && conflict.contains("409001"), "{conflict}");
    let mut stale = id("r1");
    stale.push(("etag", "\"stale-etag\"".to_owned()));
    stale.push(("status", "Disabled".to_owned()));
    let precondition = call("/registry/update", stale).await?;
    assert!(precondition.starts_with("err 412 ") && precondition.contains("412001"), "{precondition}");
    let mut update = id("r1");
    update.push(("status", "Disabled".to_owned()));
    let updated = call("/registry/update", update).await?;
    assert!(updated.contains(r#""status":"disabled""#), "{updated}");
    let listed = call("/registry/list", vec![]).await?;
    assert!(listed.starts_with("ok ") && listed.split(' ').nth(1).unwrap_or_default().split(',').any(|d| d == "r1"), "{listed}");
    let cs_r1 = call("/registry/connection-string", id("r1")).await?;
    assert!(cs_r1.starts_with("HostName=localhost;DeviceId=r1;SharedAccessKey="), "{cs_r1}");
    assert_eq!(call("/registry/remove", id("r1")).await?, "ok");
    assert!(call("/registry/get", id("r1")).await?.starts_with("err 404 "));
    // A connection string without a key is refused before anything is sent.
    let bad = az.call("/registry/get", &[("cs", "HostName=localhost"), ("id", "x")]).await?;
    assert_eq!(bad, "err 0 the connection string needs HostName, SharedAccessKeyName and SharedAccessKey");
    Ok(())
}

#[tokio::test]
async fn sas_tokens_match_microsofts_python_sdk() -> anyhow::Result<()> {
    let az = AzureEnv::start().await?;
    let python = tether_tests::python()?;
    let cases = [
        ("myhub.azure-devices.net/devices/dev1", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "", "1700086400"),
        ("0ne000366B8/registrations/my-device", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "registration", "1700003600"),
        ("h.azure-devices.net/devices/a b+c", "c2VjcmV0IGtleSBmb3IgdGVzdHM=", "iothubowner", "2000000000"),
    ];
    for (uri, key, skn, se) in cases {
        let script = format!(
            "from azure.iot.device.common.auth import sastoken\n\
             from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism as M\n\
             t = sastoken.RenewableSasToken.__new__(sastoken.RenewableSasToken)\n\
             t._uri = {uri:?}; t._signing_mechanism = M({key:?}); t._key_name = {skn:?} or None; t._expiry_time = {se}\n\
             print(t._build_token())\n"
        );
        let out = std::process::Command::new(&python).arg("-c").arg(&script).output()?;
        anyhow::ensure!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
        let theirs = String::from_utf8(out.stdout)?.trim().to_owned();
        let encoded: String = uri.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
        let mut query = vec![("sr", encoded.as_str()), ("key", key), ("se", se)];
        if !skn.is_empty() {
            query.push(("skn", skn));
        }
        let ours = az.call("/sas", &query).await?;
        assert_eq!(ours, theirs);
    }
    Ok(())
}

#[tokio::test]
async fn withheld_twin_responses_time_out_with_1005() -> anyhow::Result<()> {
    let az = AzureEnv::start().await?;
    az.new_client("dev6", &[("twins_timeout", "1")]).await?;
    assert_eq!(az.call("/connect", &[]).await?, "connected 0");
    assert_eq!(az.call("/enable", &[("f", "twin")]).await?, "done 0");
    az.hub.control().withhold_twin_responses("dev6", true);
    assert_eq!(az.call("/retrieve", &[]).await?, "1005 null null");
    assert_eq!(az.call("/update", &[("n", "2"), ("json", r#"{"x":1}"#)]).await?, "updated [1005, 1005]");
    az.hub.control().withhold_twin_responses("dev6", false);
    assert!(az.call("/retrieve", &[]).await?.starts_with("0 {"));
    Ok(())
}

#[tokio::test]
async fn dps_waits_out_429_as_retry_after_says() -> anyhow::Result<()> {
    let az = AzureEnv::start().await?;
    let enrollment = az.hub.add_enrollment(Enrollment::Individual { registration_id: "slow".into(), device_id: None, primary_key: None, secondary_key: None })?;
    az.hub.control().throttle_dps_polls(2);
    let (scope, endpoint) = (az.hub.dps_scope_id().to_owned(), az.dps_endpoint());
    let started = std::time::Instant::now();
    let query = [("scope", scope.as_str()), ("reg", "slow"), ("key", enrollment.primary_key.as_str()), ("endpoint", endpoint.as_str())];
    let registered = az.call("/dps/register", &query).await?;
    assert!(registered.starts_with("0 HostName=localhost;DeviceId=slow;"), "{registered}");
    // Two 429s, each with Retry-After: 1, were waited out rather than hammered.
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn an_oversize_message_is_refused_before_sending_and_the_connection_stays() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    az.new_client("big", &[("qos", "1")]).await?;
    assert_eq!(az.call("/connect", &[]).await?, "connected 0");
    // IoT Hub counts the body and the properties against 256 KB: the body alone fits.
    let size = (256 * 1024 - 4).to_string();
    assert_eq!(az.call("/send", &[("size", size.as_str()), ("props", "unit:C")]).await?, "sent [1006]");
    az.t.logs.wait_for("az", "over IoT Hub's 262144; not sent", WAIT).await?;
    assert_eq!(az.call("/connected", &[]).await?, "true", "the connection is untouched");
    assert_eq!(az.call("/send", &[("body", "small")]).await?, "sent [0]");
    let size = (256 * 1024 - 6).to_string();
    assert_eq!(az.call("/send", &[("size", size.as_str()), ("props", "a:b")]).await?, "sent [0]", "at the limit it goes");
    Ok(())
}

/// A self-signed certificate and its key, as PEM, with `cn` as its common name; and the
/// certificate's SHA-256 thumbprint, as IoT Hub's registry holds it.
fn self_signed(cn: &str) -> anyhow::Result<(String, String, String)> {
    use sha2::Digest;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key)?;
    let thumbprint = sha2::Sha256::digest(cert.der()).iter().map(|b| format!("{b:02X}")).collect();
    Ok((cert.pem(), key.serialize_pem(), thumbprint))
}

/// A new client for `device` with `cert` and `key`, connected: what `on_connected` got.
async fn connect_x509(az: &AzureEnv, device: &str, cert: Option<&str>, key: &str) -> anyhow::Result<String> {
    let cs = az.hub.device_connection_string(device).unwrap_or_default();
    let port = az.hub.mqtt_addr().port().to_string();
    let mut query = vec![("cs", cs.as_str()), ("port", port.as_str()), ("key", key)];
    query.extend(cert.map(|c| ("cert", c)));
    anyhow::ensure!(az.call("/new", &query).await? == "ok");
    az.call("/connect", &[]).await
}

#[tokio::test]
async fn x509_devices_connect_with_the_certificate_the_agent_presents() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;

    // Self-signed: the registry holds the certificate's thumbprint, and the connection
    // string IoT Hub gives such a device has no key.
    let (cert, key, thumbprint) = self_signed("x-self")?;
    let (status, body) = az
        .service("PUT", "/devices/x-self", Some(json!({"deviceId": "x-self", "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumbprint}}})))
        .await?;
    assert_eq!(status, 200, "{body}");
    assert!(az.hub.device_connection_string("x-self").unwrap_or_default().ends_with(";x509=true"));
    assert_eq!(connect_x509(&az, "x-self", Some(&cert), &key).await?, "connected 0");
    let since = az.hub.control().events(0, &EventFilter::default()).last().map_or(0, |e| e.seq);
    assert_eq!(az.call("/send", &[("body", "by certificate")]).await?, "sent [0]");
    let filter = EventFilter { device_id: Some("x-self".into()), kind: Some("telemetry".into()) };
    let events = az.hub.control().wait_events(since, &filter, WAIT).await;
    assert_eq!(serde_json::to_value(events.first().ok_or_else(|| anyhow::anyhow!("no telemetry"))?)?["body"], "by certificate");
    assert_eq!(az.call("/disconnect", &[]).await?, "disconnected 0");

    // Another certificate for the same device: IoT Hub refuses it (CONNACK 5).
    let (other, other_key, _) = self_signed("x-self")?;
    assert_eq!(connect_x509(&az, "x-self", Some(&other), &other_key).await?, "connected 5");
    // A key that is not the certificate's, or no certificate at all for an x509=true
    // device: refused in the agent before any connection, with the reason in its log.
    assert_eq!(connect_x509(&az, "x-self", Some(&cert), &other_key).await?, "connected -1");
    az.t.logs.wait_for("az", "the key does not fit the certificate", WAIT).await?;
    assert_eq!(connect_x509(&az, "x-self", None, "").await?, "connected 1100");
    az.t.logs.wait_for("az", "says x509=true: set ClientOptions.client_certificate", WAIT).await?;

    // CA-signed: the device certificate is signed by a CA verified in the hub.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tether test device CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    az.hub.control().add_ca(&ca.pem())?;
    let (status, body) = az.service("PUT", "/devices/x-ca", Some(json!({"deviceId": "x-ca", "authentication": {"type": "certificateAuthority"}}))).await?;
    assert_eq!(status, 200, "{body}");
    let leaf_key = rcgen::KeyPair::generate()?;
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new())?;
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "x-ca");
    let leaf = leaf.signed_by(&leaf_key, &ca)?;
    assert_eq!(connect_x509(&az, "x-ca", Some(&leaf.pem()), &leaf_key.serialize_pem()).await?, "connected 0");
    assert_eq!(az.call("/disconnect", &[]).await?, "disconnected 0");
    Ok(())
}
