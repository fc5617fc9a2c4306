//! X.509 device identities: the registry keeps thumbprints (or refuses bad ones) and
//! persists them; self-signed devices connect over MQTT by certificate thumbprint.

mod common;

use std::sync::Arc;

use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tether_hub_emulator::{Hub, HubConfig};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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

/// A self-signed certificate with CN `cn`: its DER and its key.
fn self_signed(cn: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (cert.der().clone(), der)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens MQTT over TLS presenting `cert` (if any), sends CONNECT with `password`.
async fn connect_with_cert(
    hub: &Hub,
    device_id: &str,
    cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    password: &str,
) -> (Client, ConnectReturnCode) {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(hub.ca_cert_pem().as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some((c, k)) => builder.with_client_auth_cert(vec![c], k).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(hub.mqtt_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut client = Client::from_stream(tls);
    let mut c = connect_packet(device_id, &device_username(device_id), password);
    c.clean_session = true;
    client.send(Packet::Connect(c)).await;
    match client.recv().await {
        Some(Packet::ConnAck(ack)) => (client, ack.code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn self_signed_devices_connect_by_certificate_thumbprint() {
    let hub = start_hub().await;
    let (cert_a, key_a) = self_signed("x-self");
    let (cert_b, key_b) = self_signed("x-self");
    let (stranger, stranger_key) = self_signed("x-self");
    // Primary by SHA-256 (uppercase), secondary by SHA-1: either hash, either slot.
    let r = put(
        &hub,
        "x-self",
        json!({"deviceId": "x-self", "authentication": {"type": "selfSigned", "x509Thumbprint": {
            "primaryThumbprint": hex(&Sha256::digest(&cert_a)).to_uppercase(),
            "secondaryThumbprint": hex(&Sha1::digest(&cert_b))}}}),
    )
    .await;
    assert_eq!(r.status(), 200);

    for (cert, key) in [(cert_a, key_a), (cert_b, key_b)] {
        let (mut c, code) = connect_with_cert(&hub, "x-self", Some((cert, key)), "").await;
        assert_eq!(code, ConnectReturnCode::Success);
        let mut p = Publish::new("devices/x-self/messages/events/", QoS::AtLeastOnce, "hi");
        p.pkid = 1;
        c.send(Packet::Publish(p)).await;
        assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    }
    let events: Value = http(&hub)
        .get(format!(
            "{}/emulator/events?since=0&deviceId=x-self&type=telemetry",
            base_url(&hub)
        ))
        .header("Authorization", control_auth(&hub))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let method = events["events"][0]["systemProperties"]["iothub-connection-auth-method"]
        .as_str()
        .unwrap()
        .to_string();
    let method: Value = serde_json::from_str(&method).unwrap();
    assert_eq!(method["type"], "x509Certificate");

    // Another certificate, none, or a SAS-looking password: refused.
    let (_, code) = connect_with_cert(&hub, "x-self", Some((stranger, stranger_key)), "").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (_, code) = connect_with_cert(&hub, "x-self", None, "").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    // A SAS device: its certificate is ignored, its token is what counts.
    let info = hub.create_device("x-sas").unwrap();
    let token = device_token("x-sas", &info.primary_key, 3600);
    let (_, code) = connect_with_cert(&hub, "x-sas", Some(self_signed("x-sas")), &token).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (_, code) = connect_with_cert(&hub, "x-sas", Some(self_signed("x-sas")), "").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    // "Expire token" on a certificate session drops it but, once the device is back on
    // SAS, its tokens still work.
    let (cert, key) = self_signed("x-back");
    let thumbprint = hex(&Sha256::digest(&cert));
    let r = put(
        &hub,
        "x-back",
        json!({"deviceId": "x-back", "authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": thumbprint}}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (_c, code) = connect_with_cert(&hub, "x-back", Some((cert, key)), "").await;
    assert_eq!(code, ConnectReturnCode::Success);
    hub.control().expire_token("x-back").unwrap();
    let sas_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let r = http(&hub)
        .put(format!("{}/devices/x-back?{API}", base_url(&hub)))
        .header("Authorization", service_auth(&hub, "iothubowner"))
        .header("If-Match", "*")
        .json(
            &json!({"deviceId": "x-back", "authentication": {"type": "sas",
            "symmetricKey": {"primaryKey": sas_key, "secondaryKey": sas_key}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = device_token("x-back", sas_key, 3600);
    let (_, code) = connect_with_cert(&hub, "x-back", None, &token).await;
    assert_eq!(code, ConnectReturnCode::Success);
    stop(hub).await;
}

/// A CA (root if `issuer` is `None`) named `cn`: its DER and an issuer to sign with.
fn ca(
    cn: &str,
    issuer: Option<&rcgen::Issuer<'static, rcgen::KeyPair>>,
) -> (
    CertificateDer<'static>,
    rcgen::Issuer<'static, rcgen::KeyPair>,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = match issuer {
        None => params.self_signed(&key).unwrap(),
        Some(i) => params.signed_by(&key, i).unwrap(),
    };
    (cert.der().clone(), rcgen::Issuer::new(params, key))
}

/// A device certificate with CN `cn` signed by `issuer`.
fn leaf(
    cn: &str,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (cert.der().clone(), der)
}

fn pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

async fn add_ca(hub: &Hub, pem: &str, auth: Option<String>) -> reqwest::Response {
    let mut req = http(hub)
        .post(format!("{}/emulator/cas", base_url(hub)))
        .json(&json!({ "certificate": pem }));
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn ca_signed_devices_connect_with_a_chain_to_a_registered_ca() {
    let hub = start_hub().await;
    let r = put(
        &hub,
        "x-ca",
        json!({"deviceId": "x-ca", "authentication": {"type": "certificateAuthority"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (root, root_issuer) = ca("root", None);
    let (inter, inter_issuer) = ca("intermediate", Some(&root_issuer));

    // Until a CA is registered, every certificate is refused.
    let (_, code) = connect_with_cert(&hub, "x-ca", Some(leaf("x-ca", &root_issuer)), "").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    // Registration needs the control token, and a CA certificate.
    assert_eq!(add_ca(&hub, &pem(&root), None).await.status(), 401);
    let (not_ca, _) = leaf("x-ca", &root_issuer);
    let r = add_ca(&hub, &pem(&not_ca), Some(control_auth(&hub))).await;
    assert_eq!(r.status(), 400);
    let r = add_ca(&hub, &pem(&root), Some(control_auth(&hub))).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["thumbprint"],
        hex(&Sha256::digest(&root)).to_uppercase()
    );

    let (_, code) = connect_with_cert(&hub, "x-ca", Some(leaf("x-ca", &root_issuer)), "").await;
    assert_eq!(code, ConnectReturnCode::Success);
    // Through an intermediate the client sends along.
    let (cert, key) = leaf("x-ca", &inter_issuer);
    let chain_client = {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(hub.ca_cert_pem().as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert, inter], key)
        .unwrap()
    };
    let tcp = TcpStream::connect(hub.mqtt_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(Arc::new(chain_client))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut c = Client::from_stream(tls);
    c.send(Packet::Connect(connect_packet(
        "x-ca",
        &device_username("x-ca"),
        "",
    )))
    .await;
    assert!(matches!(
        c.recv().await,
        Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success
    ));

    // A CN other than the device id, or an unregistered issuer: refused.
    let (_, code) = connect_with_cert(&hub, "x-ca", Some(leaf("other", &root_issuer)), "").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (_, stranger) = ca("stranger", None);
    let (_, code) = connect_with_cert(&hub, "x-ca", Some(leaf("x-ca", &stranger)), "").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (_, code) = connect_with_cert(&hub, "x-ca", Some(self_signed("x-ca")), "").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    stop(hub).await;
}
