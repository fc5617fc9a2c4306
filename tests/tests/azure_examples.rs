//! The documentation's examples, ported as agents, run against the hub emulator. (The
//! greenhouse has tests of its own, on tether-testkit: examples/greenhouse/tests.)

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
