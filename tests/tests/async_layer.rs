//! The SDK's async layer (`task`, `imp::sleep`, `http::Request::send`, `http::serve`,
//! `DeviceClient`) in the `async-probe` agent, against a real HTTP server and the hub
//! emulator; its errors as an agent author reads them. Awaited device requests are
//! covered by the device-bridge test in device.rs and the demo test.

use std::time::Duration;

use serde_json::{Value, json};
use tether_hub_emulator::{C2dRequest, EventFilter};
use tether_tests::azure::AzureEnv;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn awaited_timers_and_requests_give_results_and_errors_a_person_can_act_on() -> anyhow::Result<()> {
    let mut az = AzureEnv::start_with("async-probe").await?;
    assert_eq!(az.call("/sleep", &[("s", "0.05")]).await?, "slept");

    // Each request is a task of its own: one sleeping for long holds no other up.
    let held = tokio::spawn({
        let url = reqwest::Url::parse_with_params(&az.t.url("az", "/sleep"), [("s", "600")])?;
        async move { reqwest::get(url).await }
    });
    assert_eq!(az.call("/sleep", &[("s", "0")]).await?, "slept");
    assert!(!held.is_finished());
    held.abort();

    // Any HTTP status is a response, not an error.
    let hub = format!("https://localhost:{}/nothing-here", az.hub.https_addr().port());
    let answer = az.call("/get", &[("url", &hub)]).await?;
    assert!(answer.starts_with("status 404"), "{answer}");

    // Transport failures: the curl number and what to do.
    let silent = tether_tests::silent_server().await?;
    let answer = az.call("/get", &[("url", &format!("http://{silent}/")), ("timeout", "0.3")]).await?;
    assert_eq!(answer, format!("error 28 GET http://{silent}/: no response within 0.3 s; check the server, or allow longer with .timeout(seconds)"));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let answer = az.call("/get", &[("url", &format!("http://{closed}/"))]).await?;
    assert!(answer.starts_with(&format!("error 7 GET http://{closed}/: cannot connect to {closed} (")) && answer.ends_with("; is the server up, and the port right?"), "{answer}");
    let answer = az.call("/get", &[("url", "not a url")]).await?;
    assert_eq!(answer, r#"error 3 GET not a url: "not a url" is not a URL the host can request; use an absolute http:// or https:// URL"#);

    // A server whose CA the host does not trust: which certificate, why, and the fix.
    let state = tempfile::tempdir()?;
    let config = tether_hub_emulator::HubConfig { mqtt_port: 0, https_port: 0, state_dir: state.path().to_owned(), ..Default::default() };
    let untrusted = tether_hub_emulator::Hub::start(config).await?;
    let address = format!("localhost:{}", untrusted.https_addr().port());
    let answer = az.call("/get", &[("url", &format!("https://{address}/"))]).await?;
    // (Both emulators' CAs have the same name, so rustls says BadSignature, not UnknownIssuer.)
    assert!(answer.starts_with(&format!("error 35 GET https://{address}/: the certificate of {address} is not trusted: ")), "{answer}");
    assert!(answer.ends_with("; for a server whose certificate comes from a private CA, add that CA to the host's trusted_ca_files"), "{answer}");
    // The host says so too, in the agent's log, for an agent that logs only the number.
    let line = az.t.logs.wait_for("az", &format!("http: https://{address}/: the certificate of {address} is not trusted"), WAIT).await?;
    assert!(line.text.ends_with("; add its CA to the host's trusted_ca_files"), "{line:?}");
    Ok(())
}

#[tokio::test]
async fn device_client_connects_sends_keeps_a_twin_and_answers_methods() -> anyhow::Result<()> {
    let mut az = AzureEnv::start_with("async-probe").await?;
    let cs = az.hub.create_device("async-1")?.connection_string;
    let port = az.hub.mqtt_addr().port().to_string();
    assert_eq!(az.call("/hub/send", &[]).await?, "no client: /hub/new first");
    // The port in the connection string's HostName, not in the options.
    let cs_with_port = cs.replace("HostName=localhost;", &format!("HostName=localhost:{port};"));
    assert_ne!(cs_with_port, cs);
    assert_eq!(az.call("/hub/new", &[("cs", &cs_with_port)]).await?, "ok");
    assert_eq!(az.call("/hub/send", &[("body", "early")]).await?, "error 1000 send_message: not connected; connect first");
    assert_eq!(az.call("/hub/connect", &[]).await?, "connected");
    assert_eq!(az.call("/hub/connect", &[]).await?, "connected", "already connected is not an error");

    // Telemetry, at QoS 1: "sent" means the hub has it.
    assert_eq!(az.call("/hub/send", &[("body", "22.5")]).await?, "sent");
    let filter = EventFilter { device_id: Some("async-1".into()), kind: Some("telemetry".into()) };
    assert_eq!(az.hub.control().events(0, &filter).iter().map(|e| serde_json::to_value(e).map(|v| v["body"].clone())).collect::<Result<Vec<_>, _>>()?, [json!("22.5")]);

    // Twin: one type for both sections, `$version` apart from the values.
    assert_eq!(az.call("/hub/report", &[("json", r#"{"fw": "1.2"}"#)]).await?, "reported");
    let twin: Value = serde_json::from_str(&az.call("/hub/twin", &[]).await?)?;
    assert_eq!(twin["reported"], json!({"fw": "1.2"}), "{twin}");
    assert!(twin["reportedVersion"].is_i64() && twin["desiredVersion"].is_i64(), "{twin}");
    assert_eq!(az.call("/hub/report", &[("json", "[1]")]).await?, "error 400 update_reported: the patch must be a JSON object");
    assert_eq!(az.call("/hub/desired", &[]).await?, "watching");
    let (status, _) = az.service("PATCH", "/twins/async-1", Some(json!({"properties": {"desired": {"interval": 7}}}))).await?;
    assert_eq!(status, 200);
    let line = az.t.logs.wait_for("az", "desired {", WAIT).await?;
    assert!(line.text.starts_with(r#"desired {"interval":7} version Some("#), "{}", line.text);

    // A direct method answered by an async handler that waits before it returns.
    assert_eq!(az.call("/hub/methods", &[]).await?, "methods");
    let (status, body) = az
        .service("POST", "/twins/async-1/methods", Some(json!({"methodName": "vent", "payload": {"open": 50}, "responseTimeoutInSeconds": 10})))
        .await?;
    assert_eq!((status, &body), (200, &json!({"status": 201, "payload": {"method": "vent", "params": {"open": 50}}})));

    assert_eq!(az.call("/hub/c2d", &[]).await?, "c2d");
    az.hub.control().send_c2d("async-1", C2dRequest { body: b"hello".to_vec(), ..C2dRequest::default() })?;
    az.t.logs.wait_for("az", "c2d hello", WAIT).await?;
    assert_eq!(az.call("/hub/disconnect", &[]).await?, "disconnected");

    // A key the hub does not know: the code, and what it means.
    let wrong = cs.replace(&cs[cs.len() - 8..], "AAAAAAA=");
    assert_eq!(az.call("/hub/new", &[("cs", &wrong), ("port", &port)]).await?, "ok");
    let answer = az.call("/hub/connect", &[]).await?;
    assert!(answer.starts_with("error 5 connect: not authorized (CONNACK 5): a wrong key or certificate"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn registry_calls_are_awaited_and_fail_in_words() -> anyhow::Result<()> {
    let az = AzureEnv::start_with("async-probe").await?;
    let cs = az.hub.service_connection_string();
    let registry = async |op: &str, extra: &[(&str, &str)]| -> anyhow::Result<String> {
        let mut query = vec![("cs", cs.as_str()), ("op", op)];
        query.extend_from_slice(extra);
        az.call("/registry", &query).await
    };
    let created: Value = serde_json::from_str(&registry("create", &[("id", "reg-1")]).await?)?;
    assert_eq!(created["deviceId"], "reg-1");
    assert!(created["authentication"]["symmetricKey"]["primaryKey"].is_string(), "{created}");
    let conflict = registry("create", &[("id", "reg-1")]).await?;
    assert!(conflict.starts_with("error 409 ") && conflict.contains("409001"), "{conflict}");

    // An update conditional on the etag that get returned goes through; a stale one not.
    let mut device: Value = serde_json::from_str(&registry("get", &[("id", "reg-1")]).await?)?;
    device["status"] = json!("Disabled");
    let updated: Value = serde_json::from_str(&registry("update", &[("json", &device.to_string())]).await?)?;
    assert_eq!(updated["status"], "disabled", "{updated}");
    let stale = registry("update", &[("json", &device.to_string())]).await?;
    assert!(stale.starts_with("error 412 "), "{stale}");

    assert!(registry("list", &[]).await?.split(',').any(|id| id == "reg-1"));
    assert_eq!(registry("remove", &[("id", "reg-1")]).await?, "removed");
    let missing = registry("get", &[("id", "reg-1")]).await?;
    assert!(missing.starts_with("error 404 "), "{missing}");

    // No registry at that address: what happened and what to do, not "Error 7".
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let unreachable = format!("HostName={closed};SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5");
    let answer = az.call("/registry", &[("cs", &unreachable), ("op", "list")]).await?;
    assert!(answer.starts_with(&format!("error 7 cannot connect to {closed} (")) && answer.ends_with("; is the server up, and the port right?"), "{answer}");
    Ok(())
}
