//! MQTT against a real mosquitto broker: plain and TLS with a custom CA.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tether_tests::{Mosquitto, TestHost, TlsFiles};

const WAIT: Duration = Duration::from_secs(20);

async fn get(url: &str) -> String {
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("request failed: {e}"),
    }
}

/// A test-side client subscribed to `topic`; returns it and a receiver of its messages.
async fn observer(port: u16, topic: &str) -> anyhow::Result<(AsyncClient, tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, u8)>)> {
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new("observer", "127.0.0.1", port), 100);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
    let mut sub_tx = Some(sub_tx);
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(s) = sub_tx.take() {
                        let _ = s.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send((p.topic, p.payload.to_vec(), p.qos as u8));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, sub_rx).await??;
    Ok((client, rx))
}

#[tokio::test]
async fn example_agent_echoes_qos0_and_qos1_and_reconnects_after_broker_restart() -> anyhow::Result<()> {
    let mut broker = Mosquitto::start(None).await?;
    let port = broker.port;
    let mut t = TestHost::start(|_| {}).await?;
    let url = format!("tcp://127.0.0.1:{port}");
    t.spawn("pubsub", "mqtt-pubsub", &[("broker", &url)])?;
    t.logs.wait_for("pubsub", "subscribed to tether/in: code 0, granted [1]", WAIT).await?;

    let (client, mut received) = observer(port, "tether/out").await?;
    client.publish("tether/in", QoS::AtMostOnce, false, "first at qos 0").await?;
    client.publish("tether/in", QoS::AtLeastOnce, false, "second at qos 1").await?;
    for expected in ["first at qos 0", "second at qos 1"] {
        let (topic, payload, qos) = tokio::time::timeout(WAIT, received.recv()).await?.ok_or_else(|| anyhow::anyhow!("observer ended"))?;
        assert_eq!((topic.as_str(), payload.as_slice(), qos), ("tether/out", expected.as_bytes(), 1));
    }
    t.logs.wait_for_count("pubsub", "republished", 2, WAIT).await?;

    broker.stop();
    t.logs.wait_for("pubsub", "connection lost: -1", WAIT).await?;
    let mut broker = Mosquitto::start_on(port, None).await?;
    t.logs.wait_for_count("pubsub", "subscribed to tether/in: code 0", 2, WAIT).await?;
    broker.stop();
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn client_operations_report_imp_codes() -> anyhow::Result<()> {
    let broker = Mosquitto::start(None).await?;
    let mut t = TestHost::start(|_| {}).await?;
    t.spawn("probe", "probe", &[])?;
    let base = t.url("probe", "");
    let u = |path: &str| format!("{base}{path}");

    // Refused at once while not connected, as imp throws.
    assert_eq!(get(&u("/mqtt/pub?topic=a&msg=x")).await, "refused NotConnected -3");
    assert_eq!(get(&u("/mqtt/connect?url=http://nope")).await, "refused InvalidArgument -1");
    // Held until the connect is refused: no other test's server can be listening there.
    let closed = tether_tests::ClosedPort::new()?;
    assert_eq!(get(&u(&format!("/mqtt/connect?url=tcp://127.0.0.1:{}", closed.port))).await, "connect -1");

    assert_eq!(get(&u(&format!("/mqtt/connect?url=tcp://127.0.0.1:{}", broker.port))).await, "connect 0");
    assert_eq!(get(&u("/mqtt/connected")).await, "true");
    assert_eq!(get(&u("/mqtt/sub?topic=t/%23&qos=1")).await, "sub 0 [1]");
    assert_eq!(get(&u("/mqtt/pub?topic=t/a&qos=0&msg=zero")).await, "pub 0");
    assert_eq!(get(&u("/mqtt/pub?topic=t/b&qos=1&msg=one")).await, "pub 0");
    t.logs.wait_for("probe", "mqtt message t/a zero qos=0", WAIT).await?;
    t.logs.wait_for("probe", "mqtt message t/b one qos=1", WAIT).await?;
    assert_eq!(get(&u("/mqtt/pub?topic=t/%23&msg=x")).await, "refused InvalidArgument -1");
    assert_eq!(get(&u("/mqtt/unsub?topic=t/%23")).await, "unsub 0");
    assert_eq!(get(&u("/mqtt/pub?topic=t/c&qos=1&msg=unseen")).await, "pub 0");
    assert_eq!(get(&u("/mqtt/disconnect")).await, "disconnected");
    assert_eq!(get(&u("/mqtt/connected")).await, "false");
    t.logs.drain();
    assert!(!t.logs.texts("probe").iter().any(|l| l.contains("unseen")), "{:?}", t.logs.texts("probe"));
    // Reconnecting after a disconnect works.
    assert_eq!(get(&u(&format!("/mqtt/connect?url=tcp://127.0.0.1:{}", broker.port))).await, "connect 0");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_message_flood_pauses_reading_and_loses_nothing() -> anyhow::Result<()> {
    const N: u64 = 3000;
    let broker = Mosquitto::start(None).await?;
    let t = TestHost::start(|_| {}).await?;
    t.spawn("probe", "probe", &[])?;
    let base = t.url("probe", "");
    let u = |path: &str| format!("{base}{path}");
    assert_eq!(get(&u(&format!("/mqtt/connect?url=tcp://127.0.0.1:{}", broker.port))).await, "connect 0");
    assert_eq!(get(&u("/mqtt/sub?topic=flood&qos=1")).await, "sub 0 [1]");
    // Each message keeps the agent busy for 1 ms: it falls far behind the flood.
    assert_eq!(get(&u("/mqtt/slow?ms=1")).await, "slow 1 ms");

    let (flooder, mut eventloop) = AsyncClient::new(MqttOptions::new("flooder", "127.0.0.1", broker.port), 100);
    let acked = tokio::spawn(async move {
        let mut acked = 0;
        while acked < N {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("flooder: {e}")),
            }
        }
        Ok(acked)
    });
    for i in 0..N {
        flooder.publish("flood", QoS::AtLeastOnce, false, i.to_string()).await?;
    }
    assert_eq!(tokio::time::timeout(WAIT, acked).await???, N);

    let metrics = || t.host.agent("probe").map(|r| r.metrics).unwrap_or_default();
    let deadline = std::time::Instant::now() + WAIT * 3;
    while metrics().mqtt_messages < N {
        anyhow::ensure!(std::time::Instant::now() < deadline, "{} of {N} messages reached the agent", metrics().mqtt_messages);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The host stopped reading while 1024 waited (the broker kept the rest), and every
    // message arrived once.
    assert!(metrics().mqtt_pauses > 0, "{:?}", metrics());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metrics().mqtt_messages, N);
    assert_eq!(get(&u("/mqtt/connected")).await, "true");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn tls_with_a_custom_ca_from_host_config_or_connect_options() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let files = make_ca_and_server_cert(dir.path())?;
    let broker = Mosquitto::start(Some(&files)).await?;
    let url = format!("/mqtt/connect?url=ssl://localhost:{}", broker.port);
    let ca_pem = std::fs::read_to_string(&files.ca)?;

    // Trusted through the host's configuration.
    let ca = files.ca.clone();
    let t = TestHost::start(move |c| c.trusted_ca_files = vec![ca]).await?;
    t.spawn("probe", "probe", &[])?;
    assert_eq!(get(&t.url("probe", &url)).await, "connect 0");
    assert_eq!(get(&t.url("probe", "/mqtt/pub?topic=x&qos=1&msg=y")).await, "pub 0");
    t.stop().await;

    // Not trusted: the handshake fails with imp's socket error code.
    let t = TestHost::start(|_| {}).await?;
    t.spawn("probe", "probe", &[("ca_pem", &ca_pem)])?;
    assert_eq!(get(&t.url("probe", &url)).await, "connect -1");
    // Trusted for this connection only, through the connect options.
    assert_eq!(get(&t.url("probe", &format!("{url}&ca=1"))).await, "connect 0");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_broker_that_requires_client_certificates_gets_the_agents() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let files = TlsFiles { require_client_certificate: true, ..make_ca_and_server_cert(dir.path())? };
    let broker = Mosquitto::start(Some(&files)).await?;
    let url = format!("/mqtt/connect?url=ssl://localhost:{}", broker.port);
    let cert = std::fs::read_to_string(dir.path().join("client.pem"))?;
    let key = std::fs::read_to_string(dir.path().join("client.key"))?;
    let ca = files.ca.clone();
    let t = TestHost::start(move |c| c.trusted_ca_files = vec![ca]).await?;
    t.spawn("probe", "probe", &[("client_cert", &cert), ("client_key", &key)])?;
    // Without a certificate the broker ends the handshake: imp's socket error.
    assert_eq!(get(&t.url("probe", &url)).await, "connect -1");
    assert_eq!(get(&t.url("probe", &format!("{url}&cert=1"))).await, "connect 0");
    assert_eq!(get(&t.url("probe", "/mqtt/pub?topic=x&qos=1&msg=y")).await, "pub 0");
    t.stop().await;

    // A key that is not the certificate's is refused before connecting, with the reason.
    let mut t = TestHost::start(|_| {}).await?;
    let other_key = rcgen::KeyPair::generate()?.serialize_pem();
    t.spawn("probe", "probe", &[("client_cert", &cert), ("client_key", &other_key)])?;
    assert_eq!(get(&t.url("probe", &format!("{url}&cert=1"))).await, "refused InvalidArgument -1");
    t.logs.wait_for("probe", "the key does not fit the certificate", WAIT).await?;
    // A client certificate needs TLS.
    assert_eq!(get(&t.url("probe", &format!("/mqtt/connect?url=tcp://localhost:{}&cert=1", broker.port))).await, "refused InvalidArgument -1");
    t.logs.wait_for("probe", "a client certificate needs an ssl:// URL", WAIT).await?;
    t.stop().await;
    Ok(())
}

fn make_ca_and_server_cert(dir: &std::path::Path) -> anyhow::Result<TlsFiles> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tether test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let server_key = KeyPair::generate()?;
    let server = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&server_key, &ca)?;
    let files = TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key"), require_client_certificate: false };
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.cert, server.pem())?;
    std::fs::write(&files.key, server_key.serialize_pem())?;
    // A client certificate from the same CA, for brokers that require one.
    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client.distinguished_name.push(rcgen::DnType::CommonName, "probe");
    std::fs::write(dir.join("client.pem"), client.signed_by(&client_key, &ca)?.pem())?;
    std::fs::write(dir.join("client.key"), client_key.serialize_pem())?;
    Ok(files)
}
