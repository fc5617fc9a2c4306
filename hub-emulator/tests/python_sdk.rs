//! Conformance: Microsoft's Python SDKs (azure-iot-device 2.14.0, azure-iot-hub 2.7.0)
//! against the emulator. The scenarios are in tests/python/scenarios.py.
//!
//! azure-iot-device hard-codes MQTT port 8883, so every scenario runs the emulator there:
//! they are serialized within this binary (a mutex) and across processes (a file lock
//! in the target dir, which other crates' tests using 8883 can take too). Each test holds
//! both for as long as its runtime lives (see [`on_port_8883`]).
//!
//! Python comes from `TETHER_PYTHON`, else `target/pyenv/bin/python` (made by
//! `scripts/setup.sh --with-test-deps`). Without it the tests fail, they do not skip.

mod common;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use tether_hub_emulator::{Enrollment, Hub, HubConfig, HubError};

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
    // A test that panicked while holding the mutex poisoned it; the port is free again
    // by the time the next test gets it (see `on_port_8883`), so carry on.
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let path = workspace_root().join("target/hub-emulator-8883.lock");
    // The target dir can be missing (CARGO_TARGET_DIR elsewhere, a fresh clone); not
    // truncating, since another process may hold the lock on this file.
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // The lock (flock) belongs to the open file: it goes when the guard closes it, and the
    // kernel drops it if the process dies, so a crashed run never leaves it taken.
    file.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    PortGuard {
        _file: file,
        _serial: serial,
    }
}

/// Runs one scenario test on its own runtime while holding port 8883.
///
/// The guard is taken before the runtime is built and released after it is dropped, and
/// dropping a runtime stops every task it spawned, the hub's 8883 listener included; so
/// the next test (or process) never finds the port still bound, even after a panic. With
/// `#[tokio::test]` the guard lived in the test's future, which a panic drops *before*
/// the runtime: the lock was free while the listener still ran.
fn on_port_8883(test: impl Future<Output = ()>) {
    let _guard = lock_port_8883();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(test);
}

async fn start_hub() -> Hub {
    // The lock keeps this checkout's tests and benches apart, not a test run in another
    // checkout (another target dir) or a `tether demo`: wait a while for them to let go of
    // the port instead of failing at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let state_dir = common::unique_dir("py");
    let mut said = false;
    loop {
        let config = HubConfig {
            mqtt_port: 8883,
            https_port: 0,
            state_dir: state_dir.clone(),
            ..HubConfig::default()
        };
        match Hub::start(config).await {
            Ok(hub) => return hub,
            Err(HubError::Bind { addr, source })
                if addr.port() == 8883
                    && source.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                if !said {
                    eprintln!("port 8883 is in use by another process; waiting up to 60 s");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("start emulator on port 8883 (is another process using it?): {e}"),
        }
    }
}

/// Runs one Python scenario with `extra` merged into its configuration.
async fn run_scenario(hub: &Hub, name: &str, extra: Value) {
    let mut config = json!({
        "ca_path": hub.ca_cert_path(),
        "https_port": hub.https_addr().port(),
        "service_cs": hub.service_connection_string(),
        "scope_id": hub.dps_scope_id(),
        "control_token": hub.control_token(),
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
fn device_scenario(name: &str) {
    on_port_8883(async {
        let hub = start_hub().await;
        let device = hub.create_device("py-dev-1").expect("create device");
        run_scenario(
            &hub,
            name,
            json!({ "device_id": device.device_id, "device_cs": device.connection_string }),
        )
        .await;
        common::stop(hub).await;
    });
}

#[test]
fn sdk_device_connects_with_sas() {
    device_scenario("connect");
}

#[test]
fn sdk_telemetry_with_properties() {
    device_scenario("telemetry");
}

#[test]
fn sdk_twin_get_reported_and_desired() {
    device_scenario("twin");
}

#[test]
fn sdk_twin_depth_ten_accepted_eleven_refused() {
    device_scenario("twin_depth");
}

#[test]
fn sdk_direct_method_via_service_rest() {
    device_scenario("method");
}

#[test]
fn sdk_direct_method_payload_over_128_kb_refused() {
    device_scenario("method_payload_limit");
}

#[test]
fn sdk_direct_method_payload_shapes_and_status_299() {
    device_scenario("method_payload_shapes");
}

#[test]
fn sdk_desired_set_while_offline_reaches_the_device() {
    device_scenario("desired_while_offline");
}

#[test]
fn sdk_disabled_device_refused_at_connect() {
    on_port_8883(async {
        let hub = start_hub().await;
        run_scenario(&hub, "disabled_device", json!({})).await;
        common::stop(hub).await;
    });
}

#[test]
fn sdk_dps_unknown_registration_refused() {
    on_port_8883(async {
        let hub = start_hub().await;
        run_scenario(&hub, "dps_unknown_registration", json!({})).await;
        common::stop(hub).await;
    });
}

#[test]
fn sdk_c2d_via_control_api() {
    device_scenario("c2d");
}

#[test]
fn sdk_c2d_feedback_receive_abandon_complete() {
    device_scenario("c2d_feedback");
}

#[test]
fn sdk_sas_renewal_with_short_ttl() {
    device_scenario("sas_renewal");
}

#[test]
fn sdk_mqtt_over_websocket() {
    device_scenario("websocket");
}

#[test]
fn sdk_registry_crud() {
    on_port_8883(async {
        let hub = start_hub().await;
        run_scenario(&hub, "registry", json!({})).await;
        common::stop(hub).await;
    });
}

#[test]
fn sdk_registry_x509_self_signed_and_ca_devices() {
    on_port_8883(async {
        let hub = start_hub().await;
        run_scenario(&hub, "registry_x509", json!({})).await;
        common::stop(hub).await;
    });
}

/// Writes a new self-signed certificate and key for `cn` into `dir`; returns their paths
/// and the certificate's SHA-256 thumbprint.
fn write_self_signed(dir: &std::path::Path, name: &str, cn: &str) -> (PathBuf, PathBuf, String) {
    use sha2::{Digest, Sha256};
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).expect("cert");
    let (cert_file, key_file) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_file, cert.pem()).expect("write cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    let thumbprint = Sha256::digest(cert.der())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    (cert_file, key_file, thumbprint)
}

#[test]
fn sdk_x509_self_signed_device_sends_telemetry_wrong_cert_refused() {
    on_port_8883(async {
        let hub = start_hub().await;
        let dir = common::unique_dir("py-x509");
        let (cert, key, thumbprint) = write_self_signed(&dir, "device", "py-x509-dev");
        let (wrong_cert, wrong_key, _) = write_self_signed(&dir, "wrong", "py-x509-dev");
        run_scenario(
            &hub,
            "x509_self_signed",
            json!({ "cert_file": cert, "key_file": key, "thumbprint": thumbprint,
                    "wrong_cert_file": wrong_cert, "wrong_key_file": wrong_key }),
        )
        .await;
        common::stop(hub).await;
        let _ = std::fs::remove_dir_all(dir);
    });
}

#[test]
fn sdk_x509_ca_signed_device_sends_telemetry() {
    on_port_8883(async {
        let hub = start_hub().await;
        let dir = common::unique_dir("py-x509-ca");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "py root");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "py-x509-ca-dev");
        let cert = params.signed_by(&key, &issuer).expect("leaf");
        let files = [
            ("ca.pem", ca_cert.pem()),
            ("device.pem", cert.pem()),
            ("device.key", key.serialize_pem()),
        ]
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write");
            path
        });
        run_scenario(
            &hub,
            "x509_ca",
            json!({ "device_id": "py-x509-ca-dev", "ca_cert_file": files[0],
                    "cert_file": files[1], "key_file": files[2] }),
        )
        .await;
        common::stop(hub).await;
        let _ = std::fs::remove_dir_all(dir);
    });
}

#[test]
fn sdk_twin_query_by_tag_and_reported_with_paging() {
    on_port_8883(async {
        let hub = start_hub().await;
        run_scenario(&hub, "query", json!({})).await;
        common::stop(hub).await;
    });
}

#[test]
fn sdk_dps_individual_enrollment() {
    on_port_8883(async {
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
    });
}

#[test]
fn sdk_dps_group_enrollment() {
    on_port_8883(async {
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
    });
}
