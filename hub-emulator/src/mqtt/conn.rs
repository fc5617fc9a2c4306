//! One MQTT connection: CONNECT/authentication, then the IoT Hub or DPS session loop.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as MqttError, Protocol, QoS};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::control::Fault;
use crate::dps::RETRY_AFTER_SECS;
use crate::events::EventKind;
use crate::messages::{MAX_D2C_BYTES, PropertyBag};
use crate::state::Shared;
use crate::state::auth::DeviceAuthError;
use crate::state::faults::ActiveFault;
use crate::state::provisioning::EnrollmentMatch;
use crate::state::session::{SessionCmd, Subs};
use crate::util::{b64, iso8601, parse_query};

/// Largest packet read: above the D2C limit so an oversize message can be recognised
/// (and answered by closing) rather than failing as a framing error.
pub(crate) const MAX_PACKET: usize = MAX_D2C_BYTES + 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// IoT Hub's cap on the server-side keep-alive timeout (29.45 minutes).
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(1767);
/// Stand-in for "never" in `sleep_until` (about 30 years).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

enum ReadError {
    Closed,
    Malformed(MqttError),
}

/// Why a session loop ended. `graceful` means the client sent DISCONNECT (no Will).
struct Close {
    reason: String,
    graceful: bool,
}

impl Close {
    fn because(reason: impl Into<String>) -> Self {
        Close {
            reason: reason.into(),
            graceful: false,
        }
    }
}

/// Takes the next complete packet off the front of `buf`: `Ok(None)` until enough bytes
/// arrived; an error means the stream is broken and the connection is closed.
pub(crate) fn next_packet(buf: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
    match Packet::read(buf, MAX_PACKET) {
        Ok(p) => Ok(Some(p)),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

struct Link<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    buf: BytesMut,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite> Link<S> {
    /// The next complete packet already in the buffer, if any.
    fn buffered(&mut self) -> Result<Option<Packet>, ReadError> {
        next_packet(&mut self.buf).map_err(ReadError::Malformed)
    }

    async fn fill(&mut self) -> Result<(), ReadError> {
        match self.reader.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => Err(ReadError::Closed),
            Ok(_) => Ok(()),
        }
    }

    async fn read_packet(&mut self) -> Result<Packet, ReadError> {
        loop {
            if let Some(p) = self.buffered()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), Close> {
        self.out.clear();
        packet
            .write(&mut self.out, usize::MAX)
            .map_err(|e| Close::because(format!("encode: {e}")))?;
        match tokio::time::timeout(WRITE_TIMEOUT, async {
            self.writer.write_all(&self.out).await?;
            self.writer.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            _ => Err(Close::because("write failed")),
        }
    }

    async fn connack(
        &mut self,
        code: ConnectReturnCode,
        session_present: bool,
    ) -> Result<(), Close> {
        self.send(Packet::ConnAck(ConnAck::new(code, session_present)))
            .await
    }

    async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.writer.shutdown()).await;
    }
}

/// Serves one connection from its first byte to close.
/// `client_chain` is the certificate chain (DER, leaf first) the client presented in the
/// TLS handshake, empty if none.
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Send + 'static>(
    io: S,
    shared: Arc<Shared>,
    client_chain: Vec<Vec<u8>>,
) {
    let shutdown = shared.shutdown.clone();
    let (reader, writer) = tokio::io::split(io);
    let mut link = Link {
        reader,
        writer,
        buf: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(4096),
    };
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, link.read_packet()).await {
        Ok(Ok(Packet::Connect(c))) if c.protocol == Protocol::V4 => c,
        // MQTT 3.1 (`MQIsdp`) and MQTT 5 are refused with "unacceptable protocol version".
        Ok(Ok(Packet::Connect(_)))
        | Ok(Err(ReadError::Malformed(
            MqttError::InvalidProtocol | MqttError::InvalidProtocolLevel(_),
        ))) => {
            shared.metrics.refused("protocol_version");
            let _ = link
                .connack(ConnectReturnCode::RefusedProtocolVersion, false)
                .await;
            return link.shutdown().await;
        }
        _ => return link.shutdown().await,
    };
    let (username, password) = connect
        .login
        .as_ref()
        .map(|l| (l.username.as_str(), l.password.as_str()))
        .unwrap_or_default();
    let target = classify(&shared, &connect.client_id, username);
    match target {
        Some(Target::Dps(reg_id)) => match shared.dps_authenticate(&reg_id, password) {
            Ok(enrollment) => {
                if link
                    .connack(ConnectReturnCode::Success, false)
                    .await
                    .is_ok()
                {
                    DpsSession {
                        shared,
                        link: &mut link,
                        registration_id: reg_id,
                        enrollment,
                        subscribed: false,
                    }
                    .run(connect.keep_alive, shutdown)
                    .await;
                }
            }
            // A registration without a token is most likely X.509 attestation, which
            // only Azure's DPS serves: say so where the user looks.
            Err(_) if password.is_empty() => {
                tracing::warn!("dps connect {reg_id} refused: no SAS token; this DPS attests symmetric keys only (no X.509 or TPM attestation)");
                shared.metrics.refused("dps_auth");
                let _ = link.connack(ConnectReturnCode::NotAuthorized, false).await;
            }
            Err(e) => {
                tracing::debug!("dps connect {reg_id} refused: {e}");
                shared.metrics.refused("dps_auth");
                let _ = link.connack(ConnectReturnCode::NotAuthorized, false).await;
            }
        },
        Some(Target::Device(device_id)) => {
            let fault = shared.lock().fault(&device_id);
            match fault {
                Some(ActiveFault::MqttDown) => {
                    shared.metrics.refused("fault_mqtt_down");
                    return link.shutdown().await;
                }
                Some(ActiveFault::RefuseConnect) => {
                    shared.metrics.refused("fault_auth_error");
                    let _ = link.connack(ConnectReturnCode::NotAuthorized, false).await;
                    return link.shutdown().await;
                }
                Some(ActiveFault::Throttled) | None => {}
            }
            match shared.authenticate_device(&device_id, password, &client_chain) {
                Ok(auth) => run_device(shared, &mut link, device_id, connect, auth, shutdown).await,
                Err(e @ (DeviceAuthError::NoCaRegistered | DeviceAuthError::NoCertificate)) => {
                    // Not a credential mistake but a missing emulator feature or setup
                    // (no CA, or X.509 over WebSocket): say so loudly.
                    tracing::warn!("connect {device_id} refused: {e}");
                    shared.metrics.refused("device_auth");
                    let _ = link.connack(ConnectReturnCode::NotAuthorized, false).await;
                }
                Err(e) => {
                    tracing::debug!("connect {device_id} refused: {e}");
                    shared.metrics.refused("device_auth");
                    let _ = link.connack(ConnectReturnCode::NotAuthorized, false).await;
                }
            }
        }
        None => {
            let _ = link.connack(ConnectReturnCode::NotAuthorized, false).await;
        }
    }
    link.shutdown().await;
}

pub(crate) enum Target {
    Device(String),
    Dps(String),
}

/// Tells device and DPS connections apart by username: `{host}/{device}/?{query}` vs
/// `{scope}/registrations/{regId}/api-version=...`. Client id must match the identity.
pub(crate) fn classify(shared: &Shared, client_id: &str, username: &str) -> Option<Target> {
    let (first, rest) = username.split_once('/')?;
    if first.eq_ignore_ascii_case(&shared.scope_id) {
        let (reg, _) = rest.strip_prefix("registrations/")?.split_once('/')?;
        return (reg == client_id && crate::dps::valid_registration_id(reg))
            .then(|| Target::Dps(reg.to_string()));
    }
    let host = first.split_once(':').map_or(first, |(h, _)| h);
    if !shared
        .host_aliases
        .iter()
        .any(|a| a.eq_ignore_ascii_case(host))
    {
        return None;
    }
    let device = match rest.split_once('/') {
        // `{device}/` or `{device}/?query`; anything else is a module identity, which
        // the emulator does not model.
        Some((d, tail)) if tail.is_empty() || tail.starts_with('?') => d,
        Some(_) => return None,
        None => rest,
    };
    (device == client_id && !device.is_empty()).then(|| Target::Device(device.to_string()))
}

/// Deadline after which a silent client is dropped: 1.5 × keep-alive, capped.
fn keep_alive_deadline(last_rx: Instant, keep_alive: u16) -> Instant {
    if keep_alive == 0 {
        return last_rx + FAR_FUTURE;
    }
    last_rx + Duration::from_millis(u64::from(keep_alive) * 1500).min(MAX_KEEP_ALIVE)
}

/// IoT Hub and DPS grant at most QoS 1 (a QoS 2 subscription gets 1).
fn granted(requested: QoS) -> SubscribeReasonCode {
    SubscribeReasonCode::Success(if requested == QoS::AtMostOnce {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    })
}

/// The decoded value of `key` in a topic's query part (`...?$rid=1&operationId=..`).
fn query_param(query: &str, key: &str) -> Option<String> {
    parse_query(query)?
        .into_iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v)
}

async fn run_device<S: AsyncRead + AsyncWrite>(
    shared: Arc<Shared>,
    link: &mut Link<S>,
    device_id: String,
    connect: Connect,
    auth: crate::state::auth::DeviceAuth,
    shutdown: watch::Receiver<bool>,
) {
    let delay = shared.test_faults.lock().ok().and_then(|f| f.connack_delay.get(&device_id).copied());
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let conn_id = shared.new_conn_id();
    let (tx, rx) = mpsc::unbounded_channel();
    let (session_present, subs) =
        shared.open_session(&device_id, conn_id, auth.expiry, tx, connect.clean_session);
    let mut session = DeviceSession {
        shared: shared.clone(),
        link,
        device_id: device_id.clone(),
        conn_id,
        subs,
        next_pkid: 0,
        auth_method: json!({ "scope": auth.scope, "type": auth.kind, "issuer": auth.issuer })
            .to_string(),
        generation_id: auth.generation_id,
    };
    let close = session
        .run(
            connect.keep_alive,
            auth.expiry,
            session_present,
            rx,
            shutdown,
        )
        .await;
    if !close.graceful
        && let Some(will) = connect.last_will
    {
        session.will(will);
    }
    tracing::debug!("device {device_id} disconnected: {}", close.reason);
    shared.close_session(&device_id, conn_id, &close.reason);
}

struct DeviceSession<'a, S> {
    shared: Arc<Shared>,
    link: &'a mut Link<S>,
    device_id: String,
    conn_id: u64,
    subs: Subs,
    next_pkid: u16,
    auth_method: String,
    generation_id: String,
}

impl<S: AsyncRead + AsyncWrite> DeviceSession<'_, S> {
    async fn run(
        &mut self,
        keep_alive: u16,
        token_expiry: u64,
        session_present: bool,
        mut rx: mpsc::UnboundedReceiver<SessionCmd>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Close {
        if let Err(c) = self
            .link
            .connack(ConnectReturnCode::Success, session_present)
            .await
        {
            return c;
        }
        // Queued C2D messages of a resumed session flow without a new SUBSCRIBE.
        if let Err(c) = self.deliver_c2d().await {
            return c;
        }
        let mut last_rx = Instant::now();
        loop {
            let packet = match self.link.buffered() {
                Ok(p) => p,
                Err(ReadError::Malformed(e)) => {
                    return Close::because(format!("malformed packet: {e}"));
                }
                Err(ReadError::Closed) => return Close::because("connection closed"),
            };
            if let Some(packet) = packet {
                last_rx = Instant::now();
                if let Err(c) = self.handle(packet).await {
                    return c;
                }
                continue;
            }
            let expiry = token_expiry.saturating_add(self.shared.token_grace.as_secs());
            let remaining =
                Duration::from_secs(expiry.saturating_sub(self.shared.now_secs())).min(FAR_FUTURE);
            let lock = self.shared.next_c2d_lock_expiry(&self.device_id).unwrap_or(FAR_FUTURE);
            tokio::select! {
                _ = tokio::time::sleep(lock) => {
                    if let Err(c) = self.deliver_c2d().await {
                        return c;
                    }
                }
                r = self.link.fill() => if r.is_err() {
                    return Close::because("connection closed");
                },
                cmd = rx.recv() => {
                    let result = match cmd {
                        Some(SessionCmd::Publish(p)) => self.link.send(Packet::Publish(p)).await,
                        Some(SessionCmd::C2dWake) => self.deliver_c2d().await,
                        Some(SessionCmd::Close(reason)) => Err(Close::because(reason)),
                        None => Err(Close::because("session replaced")),
                    };
                    if let Err(c) = result {
                        return c;
                    }
                }
                _ = tokio::time::sleep_until(keep_alive_deadline(last_rx, keep_alive)) => return Close::because("keep-alive timeout"),
                _ = tokio::time::sleep(remaining) => return Close::because("SAS token expired"),
                _ = shutdown.changed() => return Close::because("hub shutting down"),
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), Close> {
        match packet {
            Packet::Publish(p) => self.publish(p).await,
            Packet::PubAck(ack) => {
                self.shared.complete_c2d(&self.device_id, ack.pkid);
                Ok(())
            }
            Packet::Subscribe(sub) => {
                let mut codes = Vec::with_capacity(sub.filters.len());
                let had_c2d = self.subs.c2d;
                for f in &sub.filters {
                    *self.sub_flag(&f.path).ok_or_else(|| {
                        Close::because(format!("subscription to {} not allowed", f.path))
                    })? = true;
                    codes.push(granted(f.qos));
                }
                self.shared
                    .set_subs(&self.device_id, self.conn_id, self.subs);
                self.link
                    .send(Packet::SubAck(SubAck::new(sub.pkid, codes)))
                    .await?;
                if self.subs.c2d && !had_c2d {
                    self.deliver_c2d().await?;
                }
                Ok(())
            }
            Packet::Unsubscribe(unsub) => {
                for t in &unsub.topics {
                    if let Some(flag) = self.sub_flag(t) {
                        *flag = false;
                    }
                }
                self.shared
                    .set_subs(&self.device_id, self.conn_id, self.subs);
                self.link
                    .send(Packet::UnsubAck(UnsubAck::new(unsub.pkid)))
                    .await
            }
            Packet::PingReq => self.link.send(Packet::PingResp).await,
            Packet::Disconnect => Err(Close {
                reason: "client disconnected".into(),
                graceful: true,
            }),
            other => Err(Close::because(format!("unexpected packet {other:?}"))),
        }
    }

    /// The session flag a subscription filter sets; `None` for filters IoT Hub refuses.
    fn sub_flag(&mut self, filter: &str) -> Option<&mut bool> {
        match filter {
            "$iothub/twin/res/#" => Some(&mut self.subs.twin_res),
            "$iothub/twin/PATCH/properties/desired/#" => Some(&mut self.subs.desired),
            "$iothub/methods/POST/#" => Some(&mut self.subs.methods),
            f if f
                .strip_prefix("devices/")
                .and_then(|r| r.strip_prefix(self.device_id.as_str()))
                == Some("/messages/devicebound/#") =>
            {
                Some(&mut self.subs.c2d)
            }
            _ => None,
        }
    }

    async fn publish(&mut self, p: Publish) -> Result<(), Close> {
        if p.qos == QoS::ExactlyOnce {
            return Err(Close::because("QoS 2 is not supported"));
        }
        self.shared.touch_activity(&self.device_id);
        let events_prefix = format!("devices/{}/messages/events", self.device_id);
        let mut withhold_ack = false;
        if let Some(rest) = p.topic.strip_prefix(&events_prefix) {
            let bag = match rest {
                "" | "/" => "",
                r => r
                    .strip_prefix('/')
                    .ok_or_else(|| Close::because(format!("topic {} not allowed", p.topic)))?,
            };
            withhold_ack = self.telemetry(bag, &p.payload, p.retain, false)?;
        } else if let Some(query) = p.topic.strip_prefix("$iothub/twin/GET/?") {
            let rid = query_param(query, "$rid")
                .ok_or_else(|| Close::because("twin GET without $rid"))?;
            let body = self
                .shared
                .twin_device_view(&self.device_id)
                .unwrap_or(Value::Null);
            self.twin_response(&format!("200/?$rid={rid}"), body.to_string())
                .await?;
        } else if let Some(query) = p
            .topic
            .strip_prefix("$iothub/twin/PATCH/properties/reported/?")
        {
            let rid = query_param(query, "$rid")
                .ok_or_else(|| Close::because("twin PATCH without $rid"))?;
            let result = serde_json::from_slice::<Value>(&p.payload)
                .map_err(|e| format!("malformed JSON: {e}"))
                .and_then(|patch| {
                    self.shared
                        .patch_reported(&self.device_id, &patch)
                        .map_err(|e| e.to_string())
                });
            match result {
                Ok(version) => {
                    self.twin_response(
                        &format!("204/?$rid={rid}&$version={version}"),
                        String::new(),
                    )
                    .await?
                }
                Err(message) => {
                    let body = json!({ "errorCode": 400004, "message": message }).to_string();
                    self.twin_response(&format!("400/?$rid={rid}"), body)
                        .await?
                }
            }
        } else if let Some(rest) = p.topic.strip_prefix("$iothub/methods/res/") {
            let (status, query) = rest
                .split_once("/?")
                .ok_or_else(|| Close::because("malformed method response topic"))?;
            let status: i64 = status
                .parse()
                .map_err(|_| Close::because("method response status is not an integer"))?;
            let rid = query_param(query, "$rid")
                .ok_or_else(|| Close::because("method response without $rid"))?;
            self.shared
                .method_response(&self.device_id, &rid, status, &p.payload);
        } else {
            return Err(Close::because(format!(
                "publish to {} not allowed",
                p.topic
            )));
        }
        if p.qos == QoS::AtLeastOnce && !withhold_ack {
            self.link.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
        }
        Ok(())
    }

    /// Twin responses reach the device only if it subscribed to `$iothub/twin/res/#`.
    async fn twin_response(&mut self, suffix: &str, body: String) -> Result<(), Close> {
        if !self.subs.twin_res || self.shared.test_faults.lock().is_ok_and(|f| f.withhold_twin.contains(&self.device_id)) {
            return Ok(());
        }
        let p = Publish::new(format!("$iothub/twin/res/{suffix}"), QoS::AtMostOnce, body);
        self.link.send(Packet::Publish(p)).await
    }

    /// Records a D2C message. Returns true when a fault-injection message asks for the
    /// PUBACK to be withheld (the connection is about to be killed).
    fn telemetry(
        &self,
        bag: &str,
        payload: &[u8],
        retain: bool,
        is_will: bool,
    ) -> Result<bool, Close> {
        if self.shared.lock().fault(&self.device_id) == Some(ActiveFault::Throttled) {
            self.shared.metrics.throttled();
            return Err(Close::because("throttled (429001 ThrottlingException)"));
        }
        let mut props =
            PropertyBag::parse(bag).ok_or_else(|| Close::because("malformed property bag"))?;
        if payload.len() + props.counted_size() > MAX_D2C_BYTES {
            return Err(Close::because("message too large"));
        }
        if retain {
            props.app.insert("mqtt-retain".into(), Some("true".into()));
        }
        if is_will {
            props
                .app
                .insert("iothub-MessageType".into(), Some("Will".into()));
        }
        let fault = props
            .app
            .get("AzIoTHub_FaultOperationType")
            .cloned()
            .flatten();
        let stamps = [
            ("iothub-connection-device-id", self.device_id.clone()),
            (
                "iothub-connection-auth-generation-id",
                self.generation_id.clone(),
            ),
            ("iothub-connection-auth-method", self.auth_method.clone()),
            ("iothub-enqueuedtime", iso8601(SystemTime::now())),
        ];
        props.system.extend(stamps.map(|(k, v)| (k.to_string(), v)));
        let app = props.app;
        let secs = |k: &str| {
            app.get(k)
                .cloned()
                .flatten()
                .and_then(|v| v.parse::<u64>().ok())
        };
        let (delay, duration) = (
            secs("AzIoTHub_FaultOperationDelayInSecs").unwrap_or(0),
            secs("AzIoTHub_FaultOperationDurationInSecs").unwrap_or(5),
        );
        self.shared.events.record(
            &self.device_id,
            EventKind::Telemetry {
                body: std::str::from_utf8(payload).ok().map(str::to_string),
                body_base64: b64(payload),
                properties: app,
                system_properties: props.system,
            },
        );
        let Some(fault) = fault.as_deref().and_then(Fault::from_operation_type) else {
            return Ok(false);
        };
        let shared = self.shared.clone();
        let device_id = self.device_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(delay).min(crate::control::MAX_FAULT_TIME))
                .await;
            shared.apply_fault(Some(&device_id), fault, Duration::from_secs(duration));
        });
        // Every MQTT fault ends the connection, so its trigger message gets no PUBACK.
        Ok(true)
    }

    /// The Will of an ungracefully closed connection becomes telemetry with
    /// `iothub-MessageType=Will`, if it names this device's telemetry topic.
    fn will(&self, will: LastWill) {
        let prefix = format!("devices/{}/messages/events/", self.device_id);
        if let Some(bag) = will.topic.strip_prefix(&prefix) {
            let _ = self.telemetry(bag, &will.message, will.retain, true);
        }
    }

    async fn deliver_c2d(&mut self) -> Result<(), Close> {
        let next = &mut self.next_pkid;
        let publishes = self.shared.take_c2d(&self.device_id, self.conn_id, || {
            *next = next.checked_add(1).unwrap_or(1);
            *next
        });
        for p in publishes {
            self.link.send(Packet::Publish(p)).await?;
        }
        Ok(())
    }
}

/// A DPS registration session (`$dps/registrations/...`).
struct DpsSession<'a, S> {
    shared: Arc<Shared>,
    link: &'a mut Link<S>,
    registration_id: String,
    enrollment: EnrollmentMatch,
    subscribed: bool,
}

impl<S: AsyncRead + AsyncWrite> DpsSession<'_, S> {
    async fn run(mut self, keep_alive: u16, mut shutdown: watch::Receiver<bool>) {
        let mut last_rx = Instant::now();
        loop {
            let packet = match self.link.buffered() {
                Ok(Some(p)) => p,
                Ok(None) => {
                    tokio::select! {
                        r = self.link.fill() => if r.is_err() { return },
                        _ = tokio::time::sleep_until(keep_alive_deadline(last_rx, keep_alive)) => return,
                        _ = shutdown.changed() => return,
                    }
                    continue;
                }
                Err(_) => return,
            };
            last_rx = Instant::now();
            let result = match packet {
                Packet::Subscribe(sub)
                    if sub
                        .filters
                        .iter()
                        .all(|f| f.path == "$dps/registrations/res/#") =>
                {
                    self.subscribed = true;
                    let codes = sub.filters.iter().map(|f| granted(f.qos)).collect();
                    self.link
                        .send(Packet::SubAck(SubAck::new(sub.pkid, codes)))
                        .await
                }
                Packet::Unsubscribe(unsub) => {
                    self.subscribed = false;
                    self.link
                        .send(Packet::UnsubAck(UnsubAck::new(unsub.pkid)))
                        .await
                }
                Packet::Publish(p) if p.qos != QoS::ExactlyOnce => self.publish(p).await,
                Packet::PingReq => self.link.send(Packet::PingResp).await,
                _ => return,
            };
            if result.is_err() {
                return;
            }
        }
    }

    async fn publish(&mut self, p: Publish) -> Result<(), Close> {
        let (status, query, body) = if let Some(query) = p
            .topic
            .strip_prefix("$dps/registrations/PUT/iotdps-register/?")
        {
            match self.shared.dps_register(
                &self.registration_id,
                self.enrollment.clone(),
                &p.payload,
            ) {
                Ok(body) => (202, query, body),
                Err(e) => (e.status_and_code().0, query, dps_error_body(&e)),
            }
        } else if let Some(query) = p
            .topic
            .strip_prefix("$dps/registrations/GET/iotdps-get-operationstatus/?")
        {
            let op = query_param(query, "operationId").unwrap_or_default();
            match self.shared.dps_poll(&self.registration_id, &op) {
                Ok(body) => (200, query, body),
                Err(e) => (e.status_and_code().0, query, dps_error_body(&e)),
            }
        } else {
            return Err(Close::because("topic not allowed"));
        };
        let rid = query_param(query, "$rid").ok_or_else(|| Close::because("missing $rid"))?;
        if p.qos == QoS::AtLeastOnce {
            self.link.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
        }
        if !self.subscribed {
            return Ok(());
        }
        // The Python SDK splits on `$` and expects `$rid=` first, then `&retry-after=`.
        let mut topic = format!("$dps/registrations/res/{status}/?$rid={rid}");
        if status == 202 {
            topic.push_str(&format!("&retry-after={RETRY_AFTER_SECS}"));
        }
        self.link
            .send(Packet::Publish(Publish::new(
                topic,
                QoS::AtMostOnce,
                body.to_string(),
            )))
            .await
    }
}

fn dps_error_body(e: &crate::dps::DpsError) -> Value {
    json!({ "errorCode": e.status_and_code().1, "trackingId": crate::util::new_uuid(), "message": e.to_string(), "timestampUtc": iso8601(SystemTime::now()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random bytes framed as MQTT must only ever produce packets or errors.
    #[test]
    fn garbage_packets_never_panic() {
        let alphabet: Vec<u8> = (0..=255).collect();
        for input in crate::util::garbage(3, 50_000, 64, &alphabet) {
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(_packet) = Packet::read(&mut buf, MAX_PACKET) {}
        }
        // Structured garbage: valid fixed headers with random bodies, per packet type.
        for (i, body) in crate::util::garbage(5, 50_000, 40, &alphabet).enumerate() {
            let mut frame = vec![((i % 16) as u8) << 4 | (i as u8 & 0x0f), body.len() as u8];
            frame.extend(body);
            let mut buf = BytesMut::from(&frame[..]);
            let _ = Packet::read(&mut buf, MAX_PACKET);
        }
    }

    #[test]
    fn usernames_are_classified() {
        let settings = crate::state::HubSettings {
            hostname: "localhost".into(),
            host_aliases: vec!["localhost".into(), "hub".into()],
            scope_id: "0ne0000AAAA".into(),
            token_grace: Duration::ZERO,
            persist_path: None,
        };
        let shared = crate::state::Shared::new(
            settings,
            Vec::new(),
            Default::default(),
            watch::channel(false).1,
        );
        let device =
            |c: &str, u: &str| matches!(classify(&shared, c, u), Some(Target::Device(d)) if d == c);
        let dps =
            |c: &str, u: &str| matches!(classify(&shared, c, u), Some(Target::Dps(r)) if r == c);
        assert!(device(
            "d1",
            "localhost/d1/?api-version=2019-10-01&DeviceClientType=x%2F1"
        ));
        assert!(device("d1", "HUB:8883/d1/"));
        assert!(device("d1", "localhost/d1"));
        assert!(dps(
            "r1",
            "0ne0000AAAA/registrations/r1/api-version=2019-03-31&ClientVersion=x"
        ));
        for (c, u) in [
            ("d1", "other/d1/"),
            ("d2", "localhost/d1/"),
            ("d1", "localhost/d1/m1/?x"),
            ("", "localhost//"),
            ("r1", "0ne0000AAAA/registrations/r1"),
            ("d1", ""),
        ] {
            assert!(classify(&shared, c, u).is_none(), "{c} {u}");
        }
        for input in crate::util::garbage(9, 20_000, 40, b"/?localhost0ne0000AAAAregistrations:d1")
        {
            let s = String::from_utf8_lossy(&input);
            let _ = classify(&shared, "d1", &s);
        }
    }
}
