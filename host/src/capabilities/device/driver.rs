//! The driver task of one device channel: owns the line and the link state machine,
//! reopens the line when it disappears, and turns link events into agent events.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use device_link::{Config, DisconnectReason, Link, MsgId, NackReason, OwnedEvent, SendError as LinkError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::line::Line;
use super::{Command, DeviceEvent, INBOUND_LIMIT, MAX_MESSAGE, Outgoing, Reply, State};
use crate::bindings::device::{Answer, DeviceInfo, Failure};
use crate::bindings::events::Event;
use crate::kit::events::Events;
use crate::kit::log::{Level, Logger};

/// Wait between attempts to open a port that is not there (unplugged, device rebooting).
const REOPEN_INTERVAL: Duration = Duration::from_millis(500);
/// How often a paused reader (agent busy, see `INBOUND_LIMIT`) looks again.
const PAUSE_RECHECK: Duration = Duration::from_millis(10);
/// At most one log line about line errors per this interval.
const LINE_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// The largest frame the host accepts: a full-size message under the longest name.
const MAX_FRAME: usize = MAX_MESSAGE + device_link::frame::MSG_OVERHEAD;

/// Drives one agent's device channel until the host shuts down.
pub(crate) struct Driver<L> {
    line: L,
    /// Sent as this end's id in HELLO (at most 32 bytes).
    host_id: String,
    state: Arc<State>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: Events<DeviceEvent>,
    log: Logger,
    /// Messages not yet handed to the link, in order.
    outbox: VecDeque<Outgoing>,
    /// Answers to device messages the link had no transmit room for yet.
    answers: VecDeque<(MsgId, Reply)>,
    /// Messages awaiting the device's answer: host id and sending instance.
    pending: HashMap<MsgId, (u64, Events<DeviceEvent>)>,
    /// Counts sessions, so an answer to a message of an ended session is not sent into the next.
    session: u32,
}

impl<L: Line> Driver<L> {
    pub(super) fn new(
        line: L,
        agent_id: &str,
        state: Arc<State>,
        commands: mpsc::UnboundedReceiver<Command>,
        events: Events<DeviceEvent>,
        log: Logger,
    ) -> Driver<L> {
        let mut host_id = agent_id.to_owned();
        while host_id.len() > 32 {
            host_id.pop();
        }
        Driver {
            line,
            host_id,
            state,
            commands,
            events,
            log,
            outbox: VecDeque::new(),
            answers: VecDeque::new(),
            pending: HashMap::new(),
            session: 0,
        }
    }

    /// Runs until `shutdown` (or the agent is gone).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tokio::select! {
            _ = self.serve() => {}
            _ = shutdown.changed() => {}
        }
    }

    async fn serve(&mut self) {
        let path = self.line.name();
        let mut reported = false;
        loop {
            match self.line.open().await {
                Ok(port) => {
                    self.log.write(Level::Info, &format!("device: opened {}", self.line.describe()));
                    reported = false;
                    let Some(cause) = self.drive(port).await else { return };
                    self.state.reopens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.log.write(Level::Info, &format!("device: {path} closed ({cause}); reopening"));
                }
                Err(e) if !reported => {
                    self.log.write(Level::Error, &format!("device: cannot open {path}: {e}; retrying every {} ms", REOPEN_INTERVAL.as_millis()));
                    reported = true;
                }
                Err(_) => {}
            }
            let retry = tokio::time::sleep(REOPEN_INTERVAL);
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    _ = &mut retry => break,
                    command = self.commands.recv() => match command {
                        Some(c) => self.accept(c),
                        None => return,
                    },
                }
            }
        }
    }

    /// Speaks the protocol over an open port until it fails; returns why, or `None` when
    /// the agent is gone.
    async fn drive(&mut self, port: L::Port) -> Option<String> {
        let config = Config::new(&self.host_id, concat!("tether/", env!("CARGO_PKG_VERSION")));
        let mut link = match Link::with_capacity(&config, MAX_FRAME) {
            Ok(link) => link,
            Err(e) => return Some(format!("link configuration: {e}")),
        };
        let (mut rd, mut wr) = tokio::io::split(port);
        let start = Instant::now();
        let now = || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut input = vec![0u8; 16 * 1024];
        // The link's counters as last added to the channel's totals.
        let mut counted = device_link::Stats::default();
        let mut last_report: Option<Instant> = None;
        // Bytes taken from the link and not yet written; the link's own transmit buffer
        // refills meanwhile, and when both are full sends wait (back-pressure).
        let mut output = Vec::new();
        let cause = loop {
            link.tick(now());
            self.take_events(&mut link);
            self.pump(&mut link);
            if output.is_empty() {
                let bytes = link.poll_transmit();
                output.extend_from_slice(bytes);
                let n = bytes.len();
                link.transmitted(n);
            }
            // A deadline beyond what Instant can hold means "nothing to do": wake in an hour.
            let wake = start.checked_add(Duration::from_millis(link.next_deadline())).unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let paused = self.state.inbound.load(Ordering::Acquire) >= INBOUND_LIMIT;
            tokio::select! {
                read = rd.read(&mut input), if !paused => match read {
                    Ok(0) => break "end of file".to_owned(),
                    Ok(n) => {
                        self.receive(&mut link, &input[..n], now());
                        self.count_line(link.stats(), &mut counted, &mut last_report);
                    }
                    Err(e) => break e.to_string(),
                },
                written = wr.write(&output), if !output.is_empty() => match written {
                    Ok(n) => drop(output.drain(..n)),
                    Err(e) => break e.to_string(),
                },
                command = self.commands.recv() => match command {
                    Some(c) => self.accept(c),
                    None => return None,
                },
                _ = tokio::time::sleep_until(wake) => {}
                _ = tokio::time::sleep(PAUSE_RECHECK), if paused => {}
            }
        };
        if link.is_connected() {
            self.ended(&format!("port closed: {cause}"));
        }
        Some(cause)
    }

    /// Adds what the link counted since `counted` to the channel's totals, and says in the
    /// agent's log when corrupted frames were dropped (rate-limited), so a noisy line is
    /// visible without hiding a single frame's loss.
    fn count_line(&self, now: device_link::Stats, counted: &mut device_link::Stats, last_report: &mut Option<Instant>) {
        let errors = |s: &device_link::Stats| u64::from(s.crc_errors) + u64::from(s.cobs_errors) + u64::from(s.oversize) + u64::from(s.malformed) + u64::from(s.unknown_type) + u64::from(s.version_errors);
        let new_errors = errors(&now).saturating_sub(errors(counted));
        let totals = {
            let mut line = self.state.line.lock().unwrap_or_else(|p| p.into_inner());
            let add = |total: &mut u32, now: u32, before: u32| *total = total.saturating_add(now.saturating_sub(before));
            add(&mut line.frames_rx, now.frames_rx, counted.frames_rx);
            add(&mut line.frames_tx, now.frames_tx, counted.frames_tx);
            add(&mut line.crc_errors, now.crc_errors, counted.crc_errors);
            add(&mut line.cobs_errors, now.cobs_errors, counted.cobs_errors);
            add(&mut line.oversize, now.oversize, counted.oversize);
            add(&mut line.malformed, now.malformed, counted.malformed);
            add(&mut line.unknown_type, now.unknown_type, counted.unknown_type);
            add(&mut line.version_errors, now.version_errors, counted.version_errors);
            add(&mut line.not_connected, now.not_connected, counted.not_connected);
            add(&mut line.unexpected, now.unexpected, counted.unexpected);
            line.rtt_ms = now.rtt_ms;
            *line
        };
        *counted = now;
        if new_errors > 0 && last_report.is_none_or(|t| t.elapsed() >= LINE_ERROR_LOG_INTERVAL) {
            *last_report = Some(Instant::now());
            self.log.write(
                Level::Error,
                &format!(
                    "device line errors so far: {} bad CRC, {} truncated, {} oversize, {} malformed, {} unknown type (corrupted frames are dropped, never delivered)",
                    totals.crc_errors, totals.cobs_errors, totals.oversize, totals.malformed, totals.unknown_type
                ),
            );
        }
    }

    fn receive<B: AsRef<[u8]> + AsMut<[u8]>>(&mut self, link: &mut Link<B>, mut bytes: &[u8], now: u64) {
        while !bytes.is_empty() {
            let n = link.receive(now, bytes);
            bytes = &bytes[n..];
            self.take_events(link);
        }
    }

    fn take_events<B: AsRef<[u8]> + AsMut<[u8]>>(&mut self, link: &mut Link<B>) {
        while let Some(event) = link.poll_event().map(|e| e.to_owned()) {
            self.on_link_event(link, event);
        }
    }

    fn on_link_event<B: AsRef<[u8]> + AsMut<[u8]>>(&mut self, link: &Link<B>, event: OwnedEvent) {
        match event {
            OwnedEvent::Connected(peer) => {
                self.session = self.session.wrapping_add(1);
                let max_message = link.max_payload_len("").min(MAX_MESSAGE);
                self.state.max_message.store(max_message, Ordering::Release);
                self.state.connected.store(true, Ordering::Release);
                let info = DeviceInfo {
                    id: peer.device_id().to_owned(),
                    firmware: peer.firmware_version().to_owned(),
                    max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
                };
                self.events.post(DeviceEvent(Event::DeviceConnected(info)));
            }
            OwnedEvent::Disconnected(reason) => self.ended(match reason {
                DisconnectReason::Timeout => "device stopped answering",
                DisconnectReason::PeerRestarted => "device restarted",
            }),
            OwnedEvent::Message { id, wants_ack, name, payload } => {
                let id = wants_ack.then(|| u64::from(self.session) << 32 | u64::from(id.0));
                if let Some(id) = id {
                    self.state.awaiting.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
                }
                self.state.inbound.fetch_add(1, Ordering::AcqRel);
                self.events.post(DeviceEvent(Event::DeviceMessage((name, payload, id))));
            }
            OwnedEvent::Acked(id) => self.answered(id, Event::DeviceAck),
            OwnedEvent::Reply(id, payload) => self.answered(id, |hid| Event::DeviceReply((hid, payload))),
            OwnedEvent::Nacked(id, reason) => self.answered(id, |hid| Event::DeviceFailed((hid, failure(reason)))),
            OwnedEvent::TimedOut(id) => self.answered(id, |hid| Event::DeviceFailed((hid, Failure::TimedOut))),
            OwnedEvent::VersionMismatch { peer_min, peer_max } => self.log.write(
                Level::Error,
                &format!(
                    "device: speaks protocol versions {peer_min}..={peer_max}, this host {}..={}",
                    device_link::link::MIN_PROTOCOL_VERSION,
                    device_link::PROTOCOL_VERSION
                ),
            ),
        }
    }

    fn answered(&mut self, id: MsgId, event: impl FnOnce(u64) -> Event) {
        if let Some((hid, sender)) = self.pending.remove(&id) {
            sender.post(DeviceEvent(event(hid)));
        }
    }

    /// The session is over: every message in flight, or waiting without `queued`, fails.
    fn ended(&mut self, reason: &str) {
        self.state.connected.store(false, Ordering::Release);
        self.state.max_message.store(0, Ordering::Release);
        self.answers.clear();
        self.state.awaiting.lock().unwrap_or_else(|p| p.into_inner()).clear();
        for (_, (hid, sender)) in self.pending.drain() {
            sender.post(DeviceEvent(Event::DeviceFailed((hid, Failure::Disconnected))));
        }
        self.fail_unqueued();
        self.events.post(DeviceEvent(Event::DeviceDisconnected(reason.to_owned())));
    }

    fn fail_unqueued(&mut self) {
        let state = &self.state;
        self.outbox.retain(|m| {
            if !m.queued {
                state.release(m.size());
                m.events.post(DeviceEvent(Event::DeviceFailed((m.id, Failure::Disconnected))));
            }
            m.queued
        });
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Send(message) => {
                self.outbox.push_back(message);
                if !self.state.connected.load(Ordering::Acquire) {
                    self.fail_unqueued();
                }
            }
            Command::Respond(id, answer) => {
                // An answer for an ended session is moot: the device failed the message.
                if id >> 32 == u64::from(self.session) && self.state.connected.load(Ordering::Acquire) {
                    self.answers.push_back((MsgId(id as u32), answer));
                }
            }
        }
    }

    /// Hands answers and messages to the link as far as its window and buffers allow.
    fn pump<B: AsRef<[u8]> + AsMut<[u8]>>(&mut self, link: &mut Link<B>) {
        if !link.is_connected() {
            return;
        }
        while let Some((id, answer)) = self.answers.front() {
            let result = match answer {
                Reply::Answer(Answer::Ack) => link.ack(*id),
                Reply::Answer(Answer::Reply(payload)) => match link.reply(*id, payload) {
                    Err(LinkError::TooLarge) => link.nack(*id, NackReason::TooLarge),
                    other => other,
                },
                Reply::Answer(Answer::NoHandler) => link.nack(*id, NackReason::NoHandler),
                Reply::Answer(Answer::BadPayload) => link.nack(*id, NackReason::BadPayload),
                Reply::TooLarge => link.nack(*id, NackReason::TooLarge),
            };
            if result == Err(LinkError::TxFull) {
                break;
            }
            self.answers.pop_front();
        }
        while let Some(m) = self.outbox.front() {
            let result = link.send(&m.name, &m.payload, m.ack);
            if matches!(result, Err(LinkError::WindowFull | LinkError::TooManyPending | LinkError::TxFull | LinkError::NotConnected)) {
                break;
            }
            let Some(m) = self.outbox.pop_front() else { break };
            self.state.release(m.size());
            match result {
                Ok(id) if m.ack => drop(self.pending.insert(id, (m.id, m.events))),
                Ok(_) => {}
                // A queued message found a device smaller than the host cap.
                Err(_) => m.events.post(DeviceEvent(Event::DeviceFailed((m.id, Failure::TooLarge)))),
            }
        }
    }
}

fn failure(reason: NackReason) -> Failure {
    match reason {
        NackReason::NoHandler => Failure::NoHandler,
        NackReason::TooLarge => Failure::TooLarge,
        NackReason::Busy => Failure::Busy,
        NackReason::BadPayload => Failure::BadPayload,
        NackReason::Other(_) => Failure::Refused,
    }
}
