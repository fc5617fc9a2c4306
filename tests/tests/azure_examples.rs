//! The documentation's examples, ported as agents, run against the hub emulator.

use std::time::Duration;

use serde_json::json;
use tether_hub_emulator::{C2dRequest, Enrollment};
use tether_tests::azure::AzureEnv;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn registry_example_creates_the_device_then_connects() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    let (cs, port) = (az.hub.service_connection_string(), az.hub.mqtt_addr().port().to_string());
    az.t.spawn("registry-example", "azure-registry", &[("registry_connection_string", &cs), ("hub_port", &port)])?;
    az.t.logs.wait_for("registry-example", "Created registry-example", WAIT).await?;
    az.t.logs.wait_for("registry-example", "Connected", WAIT).await?;
    assert!(az.hub.control().is_connected("registry-example"));
    // An agent whose device exists already finds it instead of creating it.
    az.hub.create_device("registry-known")?;
    az.t.spawn("registry-known", "azure-registry", &[("registry_connection_string", &cs), ("hub_port", &port)])?;
    az.t.logs.wait_for("registry-known", "Device registered as registry-known", WAIT).await?;
    az.t.logs.wait_for("registry-known", "Connected", WAIT).await?;
    az.t.logs.drain();
    assert!(!az.t.logs.texts("registry-known").iter().any(|l| l.starts_with("Created")));
    Ok(())
}

#[tokio::test]
async fn dps_example_registers_then_connects() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    let enrollment = az.hub.add_enrollment(Enrollment::Individual { registration_id: "dps-example".into(), device_id: None, primary_key: None, secondary_key: None })?;
    let (scope, endpoint, port) = (az.hub.dps_scope_id().to_owned(), az.dps_endpoint(), az.hub.mqtt_addr().port().to_string());
    let config = [("dps_scope", scope.as_str()), ("dps_registration_id", "dps-example"), ("dps_key", enrollment.primary_key.as_str()), ("dps_endpoint", endpoint.as_str()), ("hub_port", port.as_str())];
    az.t.spawn("dps", "azure-dps", &config)?;
    az.t.logs.wait_for("dps", "Device is not registered. Starting registration...", WAIT).await?;
    az.t.logs.wait_for("dps", "Device has been registered", WAIT).await?;
    az.t.logs.wait_for("dps", "Connected", WAIT).await?;
    // Started again, it finds the registration.
    az.t.spawn("dps-again", "azure-dps", &config)?;
    az.t.logs.wait_for("dps-again", "Device is registered already", WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn client_examples_send_receive_twin_and_methods() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    let cs = az.hub.create_device("client-example")?.connection_string;
    let port = az.hub.mqtt_addr().port().to_string();
    az.t.spawn("client", "azure-client", &[("connection_string", &cs), ("hub_port", &port)])?;
    for line in [
        "Connected",
        "Message sent at",
        "Message receiving enabled successfully",
        "Twins functionality enabled successfully",
        "Twin properties retrieved successfully",
        "Twin properties updated successfully",
        "Direct Methods enabled successfully",
    ] {
        az.t.logs.wait_for("client", line, WAIT).await?;
    }
    az.hub.control().send_c2d("client-example", C2dRequest { body: b"hello device".to_vec(), ..C2dRequest::default() })?;
    az.t.logs.wait_for("client", "Message received: hello device", WAIT).await?;
    let (status, body) = az.service("POST", "/twins/client-example/methods", Some(json!({"methodName": "reboot", "responseTimeoutInSeconds": 10}))).await?;
    assert_eq!((status, &body["payload"]), (200, &json!({"example": "val"})), "{body}");
    az.t.logs.wait_for("client", "Direct Method called. Name = reboot", WAIT).await?;
    az.t.logs.wait_for("client", "Reply was sent successfully", WAIT).await?;
    let (_, twin) = az.service("GET", "/twins/client-example", None).await?;
    assert_eq!(twin["properties"]["reported"]["exampleProp"], "val");
    // Both messages reached the hub.
    let filter = tether_hub_emulator::EventFilter { device_id: Some("client-example".into()), kind: Some("telemetry".into()) };
    let bodies: Vec<String> = az.hub.control().events(0, &filter).iter().filter_map(|e| serde_json::to_value(e).ok()?["body"].as_str().map(str::to_owned)).collect();
    assert!(bodies.contains(&"This is a string".to_owned()) && bodies.contains(&"This is another string".to_owned()), "{bodies:?}");
    Ok(())
}

#[tokio::test]
async fn greenhouse_alerts_follows_its_threshold_vents_and_keeps_readings() -> anyhow::Result<()> {
    let mut az = AzureEnv::start().await?;
    let info = az.hub.create_device("greenhouse")?;
    let port = az.hub.mqtt_addr().port();
    let cs = info.connection_string.replace("HostName=localhost;", &format!("HostName=localhost:{port};"));
    let link = az.t.dir.path().join("ttyGREENHOUSE");
    // The board: readings around 20 °C every 0.2 s, and a vent that says it moved.
    let _board = tether_tests::DeviceSim::start(&["--link", link.to_str().unwrap_or_default(), "--interval", "0.2", "--on", "vent=true"])?;
    az.t.spawn_with_device("gh", "greenhouse", &[("connection_string", &cs)], Some(&link))?;
    az.t.logs.wait_for("gh", "greenhouse connected", WAIT).await?;

    let control = az.hub.control();
    let telemetry = tether_hub_emulator::EventFilter { device_id: Some("greenhouse".into()), kind: Some("telemetry".into()) };
    let alert_of = |e: &tether_hub_emulator::Event| serde_json::to_value(e).ok().and_then(|v| v["properties"]["alert"].as_str().map(str::to_owned));
    let first = control.wait_events(0, &telemetry, WAIT).await;
    assert_eq!(first.first().and_then(alert_of).as_deref(), Some("false"), "20 °C is under the default 30");

    // A lower threshold through the twin: reported back, and readings now alert.
    let (status, _) = az.service("PATCH", "/twins/greenhouse", Some(json!({"properties": {"desired": {"threshold": 5}}}))).await?;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, twin) = az.service("GET", "/twins/greenhouse", None).await?;
        let alerts = control.events(0, &telemetry).iter().filter_map(alert_of).filter(|a| a == "true").count();
        if twin["properties"]["reported"]["threshold"].as_f64() == Some(5.0) && alerts > 0 {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "threshold not applied: {twin}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The vent method, answered by asking the board.
    let (status, body) = az.service("POST", "/twins/greenhouse/methods", Some(json!({"methodName": "vent", "payload": {"open": 40}, "responseTimeoutInSeconds": 10}))).await?;
    assert_eq!((status, &body), (200, &json!({"status": 200, "payload": {"open": 40}})));

    // The last readings, from the agent's store.
    let readings: Vec<f64> = serde_json::from_str(&reqwest::get(az.t.url("gh", "/readings")).await?.text().await?)?;
    assert!(!readings.is_empty() && readings.len() <= 10 && readings.iter().all(|c| (15.0..25.0).contains(c)), "{readings:?}");
    Ok(())
}
