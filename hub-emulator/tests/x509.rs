//! X.509 device identities: the registry keeps thumbprints (or refuses bad ones) and
//! persists them.

mod common;

use common::*;
use serde_json::{Value, json};
use tether_hub_emulator::{Hub, HubConfig};

const API: &str = "api-version=2021-04-12";
const SHA1: &str = "A1B2C3D4E5F60718293A4B5C6D7E8F9001122334";
const SHA256: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

async fn put(hub: &Hub, id: &str, body: Value) -> reqwest::Response {
    http(hub)
        .put(format!("{}/devices/{id}?{API}", base_url(hub)))
        .header("Authorization", service_auth(hub, "iothubowner"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn get(hub: &Hub, id: &str) -> Value {
    http(hub)
        .get(format!("{}/devices/{id}?{API}", base_url(hub)))
        .header("Authorization", service_auth(hub, "iothubowner"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn registry_keeps_x509_identities_and_refuses_bad_ones() {
    let dir = unique_dir("x509");
    let config = HubConfig {
        mqtt_port: 0,
        https_port: 0,
        state_dir: dir.clone(),
        persist: true,
        ..HubConfig::default()
    };
    let hub = Hub::start(config.clone()).await.unwrap();

    let r = put(
        &hub,
        "self-1",
        json!({"deviceId": "self-1", "authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": SHA1, "secondaryThumbprint": SHA256}}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let auth = &body["authentication"];
    assert_eq!(auth["type"], "selfSigned");
    assert_eq!(auth["x509Thumbprint"]["primaryThumbprint"], SHA1);
    assert_eq!(auth["x509Thumbprint"]["secondaryThumbprint"], SHA256);
    assert_eq!(auth["symmetricKey"]["primaryKey"], Value::Null);
    assert_eq!(auth["symmetricKey"]["secondaryKey"], Value::Null);
    assert!(
        hub.control()
            .device_info("self-1")
            .unwrap()
            .connection_string
            .ends_with(";x509=true")
    );

    let r = put(
        &hub,
        "ca-1",
        json!({"deviceId": "ca-1", "authentication": {"type": "certificateAuthority"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["authentication"]["type"], "certificateAuthority");
    assert_eq!(
        body["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        Value::Null
    );
    assert_eq!(
        body["authentication"]["symmetricKey"]["primaryKey"],
        Value::Null
    );

    for (id, auth) in [
        // Not hex, wrong length, missing primary.
        (
            "bad-1",
            json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "zz".repeat(20)}}),
        ),
        (
            "bad-2",
            json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "ABCD"}}),
        ),
        (
            "bad-3",
            json!({"type": "selfSigned", "x509Thumbprint": {"secondaryThumbprint": SHA1}}),
        ),
        // Credentials that do not belong to the type would otherwise be dropped.
        (
            "bad-4",
            json!({"type": "certificateAuthority", "x509Thumbprint": {"primaryThumbprint": SHA1}}),
        ),
        (
            "bad-5",
            json!({"type": "sas", "x509Thumbprint": {"primaryThumbprint": SHA1}}),
        ),
        (
            "bad-6",
            json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": SHA1},
            "symmetricKey": {"primaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}),
        ),
    ] {
        let r = put(&hub, id, json!({"deviceId": id, "authentication": auth})).await;
        assert_eq!(r.status(), 400, "{id}");
        assert_eq!(r.headers()["iothub-errorcode"], "ArgumentInvalid", "{id}");
        assert_eq!(error_code(&r.json().await.unwrap()), 400004, "{id}");
        assert!(hub.control().device_info(id).is_none(), "{id}");
    }
    hub.shutdown().await;

    let hub = Hub::start(config).await.unwrap();
    let body = get(&hub, "self-1").await;
    assert_eq!(body["authentication"]["type"], "selfSigned");
    assert_eq!(
        body["authentication"]["x509Thumbprint"]["secondaryThumbprint"],
        SHA256
    );
    assert_eq!(
        get(&hub, "ca-1").await["authentication"]["type"],
        "certificateAuthority"
    );
    stop(hub).await;
    let _ = std::fs::remove_dir_all(dir);
}
