//! A device on a gateway box, far from its agent: `tether gateway` owns the serial port and
//! carries its bytes over NATS; the agent's node opens a [`GatewayLine`] instead of a port.
//!
//! Only bytes cross NATS, so the device link (docs/device-link.md) runs end to end between
//! the agent's driver and the device, exactly as over a local line: the same handshake,
//! acknowledgements, timeouts, PINGs and credits. Credits bound what either end may have
//! in flight, so neither the gateway nor the agent's node buffers without bound; NATS
//! subscriptions are bounded too, and what overflows them is lost like line noise, which
//! the link recovers from. Subjects, for agent `A`:
//! - `tether.device.A.up`: bytes from the device;
//! - `tether.device.A.down`: bytes to the device;
//! - `tether.device.A.state`: `open` or `closed`, from the gateway every second and at
//!   each change;
//! - `tether.device.A.open`: asked by the agent's node before it uses the line; answered
//!   `open`, or why not.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::line::Line;
use super::serial::SerialLine;

/// How often the gateway says whether its port is open.
const STATE_EVERY: Duration = Duration::from_secs(1);

/// Silence from the gateway after which the agent's node takes the line as closed.
const GATEWAY_SILENCE: Duration = Duration::from_secs(3);

/// How long the agent's node waits for the gateway's answer when opening.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes the line holds between the driver and NATS: a few frames; the link's credits
/// keep it from filling in normal use.
const LINE_BUFFER: usize = 64 * 1024;

/// What the port is read in, and the most one NATS message carries.
const CHUNK: usize = 16 * 1024;

const OPEN: &[u8] = b"open";
const CLOSED: &[u8] = b"closed";

fn subject(agent: &str, what: &str) -> String {
    format!("tether.device.{agent}.{what}")
}

/// The agent's end: its device's line through the gateway serving agent `agent`.
pub(crate) struct GatewayLine {
    /// `None` outside cluster mode: there is no NATS to reach a gateway through.
    client: Option<async_nats::Client>,
    agent: String,
}

impl GatewayLine {
    /// Agent `agent`'s line through `client` (`None` outside cluster mode: opening fails
    /// with a reason).
    pub fn new(client: Option<async_nats::Client>, agent: &str) -> GatewayLine {
        GatewayLine { client, agent: agent.to_owned() }
    }
}

impl Line for GatewayLine {
    type Port = DuplexStream;

    async fn open(&mut self) -> std::io::Result<DuplexStream> {
        let Some(client) = self.client.clone() else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "a device on a gateway needs cluster mode (tether serve --cluster)"));
        };
        let nats = |e: &dyn std::fmt::Display| std::io::Error::other(format!("NATS: {e}"));
        // Subscribed before asking, so nothing the device sends after the answer is missed.
        let up = client.subscribe(subject(&self.agent, "up")).await.map_err(|e| nats(&e))?;
        let state = client.subscribe(subject(&self.agent, "state")).await.map_err(|e| nats(&e))?;
        let answer = tokio::time::timeout(OPEN_TIMEOUT, client.request(subject(&self.agent, "open"), bytes::Bytes::new())).await;
        match answer {
            Ok(Ok(reply)) if reply.payload.as_ref() == OPEN => {}
            Ok(Ok(reply)) => return Err(std::io::Error::other(format!("the gateway's port is not open: {}", String::from_utf8_lossy(&reply.payload)))),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "no gateway for this agent is connected to NATS"));
            }
            Ok(Err(e)) => return Err(nats(&e)),
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the gateway did not answer")),
        }
        let (ours, theirs) = tokio::io::duplex(LINE_BUFFER);
        tokio::spawn(carry(ours, up, state, client, subject(&self.agent, "down")));
        Ok(theirs)
    }

    fn name(&self) -> String {
        format!("gateway line of {}", self.agent)
    }

    fn describe(&self) -> String {
        format!("the gateway line of {} over NATS", self.agent)
    }
}

/// Moves bytes between the driver's end of the line and NATS until either side ends, the
/// gateway says its port closed, or it has been silent for [`GATEWAY_SILENCE`]; then the
/// driver reads end-of-file and opens the line again.
async fn carry(port: DuplexStream, mut up: async_nats::Subscriber, mut state: async_nats::Subscriber, client: async_nats::Client, down: String) {
    let (mut rd, mut wr) = tokio::io::split(port);
    let mut buf = vec![0u8; CHUNK];
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            read = rd.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if client.publish(down.clone(), bytes::Bytes::copy_from_slice(&buf[..n])).await.is_err() { break },
            },
            message = up.next() => match message {
                Some(m) => {
                    heard = Instant::now();
                    if wr.write_all(&m.payload).await.is_err() { break }
                }
                None => break,
            },
            message = state.next() => match message {
                Some(m) if m.payload.as_ref() == OPEN => heard = Instant::now(),
                _ => break,
            },
            _ = tokio::time::sleep_until((heard + GATEWAY_SILENCE).into()) => break,
        }
    }
}

/// `tether gateway`'s settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The NATS server(s) of the cluster.
    pub url: String,
    /// The serial port of the device.
    pub device: PathBuf,
    pub baud: u32,
    /// The agent the device belongs to, wherever it runs.
    pub agent: String,
}

/// Runs a gateway until `stop` resolves: opens the port (again whenever it goes away) and
/// carries its bytes to and from agent `config.agent`'s node over NATS.
pub async fn run_gateway(config: GatewayConfig, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    use anyhow::Context;
    crate::hosting::config::check_agent_id(&config.agent)?;
    let client = async_nats::ConnectOptions::new()
        .name(format!("tether gateway {}", config.agent))
        .retry_on_initial_connect()
        // A slow NATS side loses bytes (which the link recovers) rather than holding memory.
        .subscription_capacity(1024)
        .connect(config.url.as_str())
        .await
        .with_context(|| format!("cannot reach NATS at {}", config.url))?;
    let open = std::sync::Arc::new(tokio::sync::watch::channel(None::<String>).0);
    let answers = tokio::spawn(answer_opens(client.clone(), config.agent.clone(), open.clone()));
    let states = tokio::spawn(say_state(client.clone(), config.agent.clone(), open.subscribe()));
    let mut down = client.subscribe(subject(&config.agent, "down")).await.context("cannot subscribe on NATS")?;
    let mut line = SerialLine::new(config.device.clone(), config.baud);
    let serve = async {
        let mut reported = false;
        loop {
            match line.open().await {
                Ok(port) => {
                    tracing::info!("gateway: opened {} for agent {}", line.describe(), config.agent);
                    reported = false;
                    open.send_replace(Some(line.describe()));
                    let cause = bridge(port, &mut down, &client, &subject(&config.agent, "up")).await;
                    open.send_replace(None);
                    tracing::info!("gateway: {} closed ({cause}); reopening", line.name());
                }
                Err(e) if !reported => {
                    tracing::warn!("gateway: cannot open {}: {e}; retrying every 500 ms", line.name());
                    reported = true;
                }
                Err(_) => {}
            }
            // Bytes for a closed port have nowhere to go.
            while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, down.next()).await {}
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = stop => {}
    }
    open.send_replace(None);
    states.abort();
    answers.abort();
    // The agent's node hears the port closed now rather than after the silence.
    let _ = client.publish(subject(&config.agent, "state"), bytes::Bytes::from_static(CLOSED)).await;
    let _ = client.flush().await;
    Ok(())
}

/// Carries bytes between the open port and NATS until the port fails; why it ended.
async fn bridge(port: tokio_serial::SerialStream, down: &mut async_nats::Subscriber, client: &async_nats::Client, up: &str) -> String {
    let (mut rd, mut wr) = tokio::io::split(port);
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            read = rd.read(&mut buf) => match read {
                Ok(0) => return "end of file".to_owned(),
                Ok(n) => if let Err(e) = client.publish(up.to_owned(), bytes::Bytes::copy_from_slice(&buf[..n])).await { return format!("NATS: {e}") },
                Err(e) => return e.to_string(),
            },
            message = down.next() => match message {
                Some(m) => if let Err(e) = wr.write_all(&m.payload).await { return e.to_string() },
                None => return "the NATS subscription ended".to_owned(),
            },
        }
    }
}

/// Answers the agent's node's `open` questions with whether the port is open.
async fn answer_opens(client: async_nats::Client, agent: String, open: std::sync::Arc<tokio::sync::watch::Sender<Option<String>>>) {
    let Ok(mut asks) = client.subscribe(subject(&agent, "open")).await else { return };
    while let Some(ask) = asks.next().await {
        let Some(reply) = ask.reply else { continue };
        let answer = match &*open.borrow() {
            Some(_) => bytes::Bytes::from_static(OPEN),
            None => bytes::Bytes::from_static(b"the gateway's serial port is not open"),
        };
        let _ = client.publish(reply, answer).await;
    }
}

/// Says every second, and at each change, whether the port is open.
async fn say_state(client: async_nats::Client, agent: String, mut open: tokio::sync::watch::Receiver<Option<String>>) {
    let subject = subject(&agent, "state");
    loop {
        let state = if open.borrow_and_update().is_some() { OPEN } else { CLOSED };
        let _ = client.publish(subject.clone(), bytes::Bytes::from_static(state)).await;
        let _ = tokio::time::timeout(STATE_EVERY, open.changed()).await;
    }
}
