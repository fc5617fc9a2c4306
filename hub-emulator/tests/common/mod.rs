//! Helpers for the emulator's Rust integration tests: a hub on ephemeral ports, a raw
//! MQTT-over-TLS client (so tests can send malformed packets), an HTTPS client.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, LastWill, Login, Packet, Publish, Subscribe};
use tether_hub_emulator::{Hub, HubConfig, generate_sas_token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A new, empty directory in the temp dir that no other test (in this process or another)
/// can be using.
///
/// The clock alone does not make a name unique: tests run in parallel threads, and two
/// that start within one tick of the clock got the same directory. Two hubs starting in
/// one state directory race on `hub.json` (both write `hub.json.tmp`, the first rename
/// takes it, the second fails with "hub.json: No such file or directory") and on the TLS
/// files, and the first test's `stop` deletes the other's files. So: a per-process
/// counter for threads, the pid for other processes, and `create_dir` (which fails if the
/// directory exists) for leftovers of an earlier run with the same pid.
pub fn unique_dir(tag: &str) -> std::path::PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "tether-hub-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("creating {}: {e}", dir.display()),
        }
    }
}

pub async fn start_hub() -> Hub {
    let config = HubConfig {
        mqtt_port: 0,
        https_port: 0,
        state_dir: unique_dir("test"),
        ..HubConfig::default()
    };
    Hub::start(config).await.expect("start hub")
}

/// Shuts the hub down and removes its state directory.
pub async fn stop(hub: Hub) {
    let dir = hub
        .ca_cert_path()
        .parent()
        .map(std::path::Path::to_path_buf);
    hub.shutdown().await;
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A device token as the Python SDK makes it.
pub fn device_token(device_id: &str, key: &str, ttl: i64) -> String {
    generate_sas_token(
        &format!("localhost/devices/{device_id}"),
        key,
        None,
        now().saturating_add_signed(ttl),
    )
    .expect("token")
}

/// Raw MQTT client over TLS.
pub struct Client {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

/// How long a test waits for something the hub should do at once (a packet, a close, an
/// event). Generous (it was 5 s) because a loaded 2-core CI machine can stall a test
/// thread for seconds; a wait returns as soon as the thing happens.
pub const WAIT: Duration = Duration::from_secs(10);

impl Client {
    pub async fn open(hub: &Hub) -> Client {
        Client::try_open(hub).await.expect("tls handshake")
    }

    /// A client on an already-open TLS stream (one with a client certificate, say).
    pub fn from_stream(stream: TlsStream<TcpStream>) -> Client {
        Client {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Like [`Client::open`], but `None` when the server refuses the connection.
    pub async fn try_open(hub: &Hub) -> Option<Client> {
        let stream = tls_connect(hub, hub.mqtt_addr()).await?;
        Some(Client {
            stream,
            buf: BytesMut::new(),
        })
    }
}

/// A TLS connection to `addr` trusting the hub's CA, for `localhost`.
pub async fn tls_connect(hub: &Hub, addr: std::net::SocketAddr) -> Option<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(hub.ca_cert_pem().as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("add ca");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()
}

impl Client {
    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).expect("encode");
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        // The server may already have closed the connection; tests then observe the close.
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// Next packet, or `None` if the server closed the connection (or `WAIT` passed).
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT).await
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("server sent a malformed packet: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// Asserts the server closes the connection, skipping packets it sends first.
    pub async fn expect_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            match self
                .recv_within(deadline - tokio::time::Instant::now())
                .await
            {
                None => return,
                Some(Packet::PubAck(_)) => panic!("PUBACK before close"),
                Some(_) => {}
            }
        }
        panic!("connection not closed");
    }

    /// Next PUBLISH, skipping other packets.
    pub async fn recv_publish(&mut self) -> Publish {
        loop {
            match self.recv().await {
                Some(Packet::Publish(p)) => return p,
                Some(_) => {}
                None => panic!("connection closed while waiting for PUBLISH"),
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Packet {
        self.send(Packet::Subscribe(Subscribe::new(filter, qos)))
            .await;
        self.recv().await.expect("SUBACK")
    }
}

pub fn connect_packet(client_id: &str, username: &str, password: &str) -> Connect {
    let mut c = Connect::new(client_id);
    c.keep_alive = 60;
    c.clean_session = false;
    c.login = Some(Login::new(username, password));
    c
}

pub fn device_username(device_id: &str) -> String {
    format!("localhost/{device_id}/?api-version=2021-04-12")
}

/// Connects a device with its primary key; returns the client and its CONNACK.
pub async fn connect_device_with(
    hub: &Hub,
    device_id: &str,
    key: &str,
    clean_session: bool,
    will: Option<LastWill>,
) -> (Client, ConnAck) {
    let mut client = Client::open(hub).await;
    let mut c = connect_packet(
        device_id,
        &device_username(device_id),
        &device_token(device_id, key, 3600),
    );
    c.clean_session = clean_session;
    c.last_will = will;
    client.send(Packet::Connect(c)).await;
    match client.recv().await {
        Some(Packet::ConnAck(ack)) => (client, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A connected device (CONNACK 0 asserted).
pub async fn connected_device(hub: &Hub, device_id: &str) -> Client {
    let info = match hub.create_device(device_id) {
        Ok(info) => info,
        Err(_) => hub.control().device_info(device_id).expect("device"),
    };
    let (client, ack) = connect_device_with(hub, device_id, &info.primary_key, false, None).await;
    assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
    client
}

/// HTTPS client trusting the hub's CA.
pub fn http(hub: &Hub) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(hub.ca_cert_pem().as_bytes()).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .expect("client")
}

pub fn base_url(hub: &Hub) -> String {
    format!("https://localhost:{}", hub.https_addr().port())
}

/// `Authorization` value for a hub policy, scoped to the hub host (like azure-iot-hub).
pub fn service_auth(hub: &Hub, policy: &str) -> String {
    let cs = hub.policy_connection_string(policy).expect("policy");
    let key = cs
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .expect("key");
    let host = format!("localhost:{}", hub.https_addr().port());
    generate_sas_token(&host, key, Some(policy), now() + 3600).expect("token")
}

/// `Authorization` value for the control API (`/emulator/...`).
pub fn control_auth(hub: &Hub) -> String {
    format!("Bearer {}", hub.control_token())
}

/// Decodes IoT Hub's error body: `{"Message": "<json>", "ExceptionMessage": ""}`.
pub fn error_code(body: &serde_json::Value) -> i64 {
    let inner: serde_json::Value =
        serde_json::from_str(body["Message"].as_str().expect("Message string"))
            .expect("inner json");
    inner["errorCode"].as_i64().expect("errorCode")
}
