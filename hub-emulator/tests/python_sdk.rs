//! Conformance: Microsoft's Python SDKs (azure-iot-device 2.14.0, azure-iot-hub 2.7.0)
//! against the emulator. The scenarios are in tests/python/scenarios.py.
//!
//! azure-iot-device hard-codes MQTT port 8883, so every scenario runs the emulator there:
//! they are serialized within this binary (a mutex) and across processes (a file lock
//! in the target dir, which other crates' tests using 8883 can take too).
//!
//! Python comes from `TETHER_PYTHON`, else `target/pyenv/bin/python` (made by
//! `scripts/setup.sh --with-test-deps`). Without it the tests fail, they do not skip.

mod common;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use tether_hub_emulator::{Enrollment, Hub, HubConfig};

static SERIAL: Mutex<()> = Mutex::new(());

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    let candidate = std::env::var_os("TETHER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/pyenv/bin/python"));
    assert!(
        candidate.exists(),
        "Python with azure-iot-device 2.14.0 / azure-iot-hub 2.7.0 not found at {} — run scripts/setup.sh --with-test-deps or set TETHER_PYTHON",
        candidate.display()
    );
    candidate
}

/// Holds the in-process mutex and the cross-process file lock for port 8883.
struct PortGuard {
    _file: File,
    _serial: std::sync::MutexGuard<'static, ()>,
}

fn lock_port_8883() -> PortGuard {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let path = workspace_root().join("target/hub-emulator-8883.lock");
    let file = File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    PortGuard {
        _file: file,
        _serial: serial,
    }
}

async fn start_hub() -> Hub {
    let config = HubConfig {
        mqtt_port: 8883,
        https_port: 0,
        state_dir: common::unique_dir("py"),
        ..HubConfig::default()
    };
    Hub::start(config)
        .await
        .expect("start emulator on port 8883 (is another process using it?)")
}

/// Runs one Python scenario with `extra` merged into its configuration.
async fn run_scenario(hub: &Hub, name: &str, extra: Value) {
    let mut config = json!({
        "ca_path": hub.ca_cert_path(),
        "https_port": hub.https_addr().port(),
        "service_cs": hub.service_connection_string(),
        "scope_id": hub.dps_scope_id(),
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/scenarios.py");
    let child = tokio::process::Command::new(python())
        .arg(&script)
        .arg(name)
        .env("HUB_TEST_CONFIG", config.to_string())
        // azure-iot-hub uses requests, which trusts this bundle.
        .env("REQUESTS_CA_BUNDLE", hub.ca_cert_path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .unwrap_or_else(|_| panic!("scenario {name} timed out"))
        .expect("run python");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains(&format!("PASS {name}")),
        "scenario {name} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// Starts a hub on 8883 with one device and runs a device scenario against it.
async fn device_scenario(name: &str) {
    let _guard = lock_port_8883();
    let hub = start_hub().await;
    let device = hub.create_device("py-dev-1").expect("create device");
    run_scenario(
        &hub,
        name,
        json!({ "device_id": device.device_id, "device_cs": device.connection_string }),
    )
    .await;
    common::stop(hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_device_connects_with_sas() {
    device_scenario("connect").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_telemetry_with_properties() {
    device_scenario("telemetry").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_twin_get_reported_and_desired() {
    device_scenario("twin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_direct_method_via_service_rest() {
    device_scenario("method").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_c2d_via_control_api() {
    device_scenario("c2d").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_sas_renewal_with_short_ttl() {
    device_scenario("sas_renewal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_mqtt_over_websocket() {
    device_scenario("websocket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_registry_crud() {
    let _guard = lock_port_8883();
    let hub = start_hub().await;
    run_scenario(&hub, "registry", json!({})).await;
    common::stop(hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_dps_individual_enrollment() {
    let _guard = lock_port_8883();
    let hub = start_hub().await;
    let enrollment = Enrollment::Individual {
        registration_id: "py-reg-1".into(),
        device_id: Some("py-provisioned-1".into()),
        primary_key: None,
        secondary_key: None,
    };
    let info = hub.add_enrollment(enrollment).expect("add enrollment");
    run_scenario(&hub, "dps_individual", json!({ "registration_id": "py-reg-1", "enrollment_key": info.primary_key, "expected_device_id": "py-provisioned-1" })).await;
    common::stop(hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_dps_group_enrollment() {
    let _guard = lock_port_8883();
    let hub = start_hub().await;
    let info = hub
        .add_enrollment(Enrollment::Group {
            group_id: "py-group".into(),
            primary_key: None,
            secondary_key: None,
        })
        .expect("add group");
    run_scenario(
        &hub,
        "dps_group",
        json!({ "registration_id": "py-group-member-7", "group_key": info.primary_key }),
    )
    .await;
    common::stop(hub).await;
}
