//! Load benchmark of the hub emulator (a program, not a timed test), run with
//! `cargo bench -p tether-hub-emulator --bench load [-- --devices N --publishers M --seconds S]`.
//!
//! 1. Starts the emulator in-process on ephemeral loopback ports, registers N devices and
//!    connects them all over MQTT/TLS (SAS auth, CONNACK checked) from a child process (the
//!    client ends need their own open-file budget); they stay connected while the hub's own
//!    connection state is counted. The same N TLS connections go to mosquitto.
//! 2. D2C messages/s from M publishers, QoS 0 and QoS 1 (stop-and-wait, and 20 in flight
//!    like paho's default), against the emulator (MQTT/TLS) and side by side against a
//!    mosquitto started from this program (plain MQTT/TCP, the reference; and MQTT/TLS with
//!    the emulator's certificate, the like-for-like comparison).
//!
//! Prints a Markdown table. Client and servers share the machine's cores.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish};
use tether_hub_emulator::{Hub, HubConfig, generate_sas_token};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// TLS handshakes + CONNECTs in flight at once while connecting the fleet.
const CONNECT_CONCURRENCY: usize = 200;
/// Devices send PINGREQ well within this, so the bench never needs to.
const KEEP_ALIVE_SECS: u16 = 300;
/// QoS 1 in-flight window of the pipelined runs (paho's default `max_inflight`).
const WINDOW: usize = 20;
const QOS0_BATCH: usize = 16;

type Res<T> = Result<T, String>;

struct Args {
    devices: usize,
    publishers: usize,
    seconds: u64,
    payload: usize,
}

/// `--devices N --publishers M --seconds S --payload B`; other arguments (cargo bench adds
/// `--bench`) are ignored.
fn parse_args() -> Args {
    let mut a = Args {
        devices: 10_000,
        publishers: 20,
        seconds: 5,
        payload: 128,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.windows(2) {
        let Ok(v) = pair[1].parse::<usize>() else {
            continue;
        };
        match pair[0].as_str() {
            "--devices" => a.devices = v,
            "--publishers" => a.publishers = v.max(1),
            "--seconds" => a.seconds = v.max(1) as u64,
            "--payload" => a.payload = v,
            _ => {}
        }
    }
    a.devices = a.devices.max(a.publishers);
    a
}

/// Raises the open-file limit to `want` (the hard limit too, when allowed); returns the
/// soft limit then in effect.
fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// Resident memory of a process in KiB (`/proc/{pid}/status`).
fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A minimal MQTT 3.1.1 client over any byte stream.
struct Mqtt<S> {
    io: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Mqtt<S> {
    /// Sends CONNECT and waits for a successful CONNACK.
    async fn connect(io: S, client_id: &str, login: Option<(String, String)>) -> Res<Self> {
        let mut c = Mqtt {
            io,
            buf: BytesMut::new(),
        };
        let mut connect = Connect::new(client_id);
        connect.keep_alive = KEEP_ALIVE_SECS;
        connect.login = login.map(|(u, p)| Login::new(u, p));
        c.write(&encode(&Packet::Connect(connect))?).await?;
        match c.recv().await? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(c),
            other => Err(format!("CONNECT refused: {other:?}")),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Res<()> {
        self.io.write_all(bytes).await.map_err(|e| e.to_string())?;
        self.io.flush().await.map_err(|e| e.to_string())
    }

    /// A packet already received in full, if any.
    fn buffered(&mut self) -> Res<Option<Packet>> {
        match Packet::read(&mut self.buf, 1 << 20) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("malformed packet from server: {e}")),
        }
    }

    async fn recv(&mut self) -> Res<Packet> {
        loop {
            if let Some(p) = self.buffered()? {
                return Ok(p);
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(n) if n > 0 => {}
                Ok(_) => return Err("connection closed by server".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn disconnect(mut self) {
        if let Ok(bytes) = encode(&Packet::Disconnect) {
            let _ = self.write(&bytes).await;
        }
        let _ = self.io.shutdown().await;
    }
}

fn encode(p: &Packet) -> Res<Vec<u8>> {
    let mut out = BytesMut::new();
    p.write(&mut out, usize::MAX).map_err(|e| e.to_string())?;
    Ok(out.to_vec())
}

/// TLS client trusting only `ca_pem`, without session resumption: every device is a
/// separate machine, so each connection pays a full handshake.
fn tls_connector(ca_pem: &str) -> Res<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn tls_open(addr: SocketAddr, tls: &TlsConnector) -> Res<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    tls.connect(name, tcp).await.map_err(|e| e.to_string())
}

async fn tcp_open(addr: SocketAddr) -> Res<TcpStream> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Client id and optional (username, password) of one device.
type Credentials = (String, Option<(String, String)>);

/// Emulator credentials of `dev-{i}`: IoT Hub username and a SAS token.
fn hub_credentials(i: usize, key: &str) -> Res<Credentials> {
    let id = format!("dev-{i}");
    let token = generate_sas_token(
        &format!("localhost/devices/{id}"),
        key,
        None,
        now_secs() + 3600,
    )
    .ok_or("cannot sign SAS token")?;
    let user = format!("localhost/{id}/?api-version=2021-04-12");
    Ok((id, Some((user, token))))
}

/// Connects every device over TLS, `CONNECT_CONCURRENCY` at a time. Returns the open
/// connections, the number of failures, the first few errors and the time taken.
async fn connect_fleet(
    addr: SocketAddr,
    tls: &TlsConnector,
    fleet: Vec<Credentials>,
) -> (
    Vec<Mqtt<TlsStream<TcpStream>>>,
    usize,
    Vec<String>,
    Duration,
) {
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for (id, login) in fleet {
        let (permits, tls) = (permits.clone(), tls.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            let io = tls_open(addr, &tls).await?;
            Mqtt::connect(io, &id, login).await
        });
    }
    let (mut open, mut failed, mut errors) = (Vec::new(), 0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(c) => open.push(c),
            Err(e) => {
                failed += 1;
                if errors.len() < 3 {
                    errors.push(e);
                }
            }
        }
    }
    (open, failed, errors, started.elapsed())
}

fn write_credentials(path: &Path, creds: &[Credentials]) -> Res<()> {
    let lines: Vec<String> = creds
        .iter()
        .map(|(id, login)| match login {
            Some((u, p)) => format!("{id}\t{u}\t{p}"),
            None => id.clone(),
        })
        .collect();
    std::fs::write(path, lines.join("\n")).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_credentials(path: &str) -> Res<Vec<Credentials>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let id = f.next()?.to_string();
            let login = match (f.next(), f.next()) {
                (Some(u), Some(p)) => Some((u.to_string(), p.to_string())),
                _ => None,
            };
            Some((id, login))
        })
        .collect())
}

/// Child mode `--fleet ADDR CA_PEM CREDENTIALS`: connects the fleet over TLS, prints
/// `{connected} {failed} {millis} {first errors}` and holds the connections until stdin
/// closes.
async fn fleet_child(args: &[String]) -> Res<()> {
    let [addr, ca, creds] = args else {
        return Err("usage: --fleet ADDR CA_PEM CREDENTIALS".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let ca = std::fs::read_to_string(ca).map_err(|e| format!("{ca}: {e}"))?;
    let fleet = read_credentials(creds)?;
    raise_fd_limit(fleet.len() as u64 + 1024);
    let (open, failed, errors, took) = connect_fleet(addr, &tls_connector(&ca)?, fleet).await;
    println!(
        "{} {failed} {} {}",
        open.len(),
        took.as_millis(),
        errors.join("; ")
    );
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}

/// Child mode `--publish tls|tcp ADDR CA_PEM CREDENTIALS LOAD SECONDS PAYLOAD`: connects
/// one publisher per credential, runs the load and prints `{messages} {messages per s}`.
async fn publish_child(args: &[String]) -> Res<()> {
    let [transport, addr, ca, creds, load, seconds, payload] = args else {
        return Err("usage: --publish tls|tcp ADDR CA CREDENTIALS LOAD SECONDS PAYLOAD".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let load = Load::parse(load).ok_or_else(|| format!("bad load {load}"))?;
    let seconds: u64 = seconds.parse().map_err(|_| "bad seconds")?;
    let payload: Vec<u8> = (0..payload.parse::<usize>().map_err(|_| "bad payload")?)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let topic = |id: &str| format!("devices/{id}/messages/events/");
    let (total, rate) = if transport == "tls" {
        let tls = tls_connector(&std::fs::read_to_string(ca).map_err(|e| format!("{ca}: {e}"))?)?;
        let mut pubs = Vec::new();
        for (id, login) in read_credentials(creds)? {
            let io = tls_open(addr, &tls).await?;
            pubs.push((Mqtt::connect(io, &id, login).await?, topic(&id)));
        }
        run_load(pubs, &payload, load, seconds).await?
    } else {
        let mut pubs = Vec::new();
        for (id, login) in read_credentials(creds)? {
            let io = tcp_open(addr).await?;
            pubs.push((Mqtt::connect(io, &id, login).await?, topic(&id)));
        }
        run_load(pubs, &payload, load, seconds).await?
    };
    println!("{total} {rate}");
    Ok(())
}

/// This program running in a child mode: its own process, so client ends have their own
/// open-file budget and cross process boundaries to every server alike.
struct Child {
    child: tokio::process::Child,
    /// The first line the child printed: its result.
    line: String,
}

impl Child {
    async fn run(args: &[String]) -> Res<Child> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if line.is_empty() {
            return Err(format!("child {args:?} failed"));
        }
        Ok(Child { child, line })
    }

    /// The i-th space-separated number of the result line.
    fn number(&self, i: usize) -> Res<f64> {
        self.line
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("child said {:?}", self.line))
    }

    fn pid(&self) -> String {
        self.child.id().map(|p| p.to_string()).unwrap_or_default()
    }

    /// Lets the child end (it exits when stdin closes).
    async fn close(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// Runs one load from a publisher child; (messages, messages/s).
async fn publish_in_child(
    transport: &str,
    addr: SocketAddr,
    ca: &Path,
    creds: &Path,
    load: Load,
    args: &Args,
) -> Res<(u64, f64)> {
    let argv: Vec<String> = [
        "--publish".to_string(),
        transport.into(),
        addr.to_string(),
        ca.display().to_string(),
        creds.display().to_string(),
        load.arg(),
        args.seconds.to_string(),
        args.payload.to_string(),
    ]
    .into();
    let child = Child::run(&argv).await?;
    let result = (child.number(0)? as u64, child.number(1)?);
    child.close().await;
    Ok(result)
}

#[derive(Clone, Copy)]
enum Load {
    Qos0,
    /// QoS 1 with this many PUBLISHes awaiting PUBACK.
    Qos1(usize),
}

impl Load {
    /// `0` or `1:{window}` on a child's command line.
    fn arg(self) -> String {
        match self {
            Load::Qos0 => "0".into(),
            Load::Qos1(w) => format!("1:{w}"),
        }
    }

    fn parse(s: &str) -> Option<Load> {
        match s.split_once(':') {
            None if s == "0" => Some(Load::Qos0),
            Some(("1", w)) => w.parse().ok().filter(|w| *w > 0).map(Load::Qos1),
            _ => None,
        }
    }

    fn label(self) -> String {
        match self {
            Load::Qos0 => "QoS 0".into(),
            Load::Qos1(1) => "QoS 1, 1 in flight".into(),
            Load::Qos1(w) => format!("QoS 1, {w} in flight"),
        }
    }
}

/// Publishes on `topic` until `until`, then makes sure the server processed everything
/// (QoS 1: all PUBACKs; QoS 0: a PINGRESP, which comes after every earlier PUBLISH was
/// handled). Returns the messages the server took and when that was confirmed.
async fn publish_until<S: AsyncRead + AsyncWrite + Unpin>(
    mut c: Mqtt<S>,
    topic: &str,
    payload: &[u8],
    load: Load,
    until: Instant,
) -> Res<(u64, Instant)> {
    let mut count = 0u64;
    match load {
        Load::Qos0 => {
            let one = encode(&Packet::Publish(Publish::new(
                topic,
                QoS::AtMostOnce,
                payload.to_vec(),
            )))?;
            let batch = one.repeat(QOS0_BATCH);
            while Instant::now() < until {
                c.write(&batch).await?;
                count += QOS0_BATCH as u64;
            }
            c.write(&encode(&Packet::PingReq)?).await?;
            match c.recv().await? {
                Packet::PingResp => {}
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        Load::Qos1(window) => {
            // One encoded PUBLISH whose packet id (the two bytes before the payload) is
            // patched per message.
            let mut template = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
            template.pkid = 1;
            let template = encode(&Packet::Publish(template))?;
            let pkid_at = template.len() - payload.len() - 2;
            let (mut next_pkid, mut in_flight) = (0u16, 0usize);
            let mut out = Vec::with_capacity(template.len() * window);
            loop {
                if Instant::now() < until {
                    out.clear();
                    while in_flight < window {
                        next_pkid = next_pkid % u16::MAX + 1;
                        let at = out.len() + pkid_at;
                        out.extend_from_slice(&template);
                        out[at..at + 2].copy_from_slice(&next_pkid.to_be_bytes());
                        in_flight += 1;
                    }
                    if !out.is_empty() {
                        c.write(&out).await?;
                    }
                }
                if in_flight == 0 {
                    break;
                }
                let mut packet = Some(c.recv().await?);
                while let Some(p) = packet {
                    match p {
                        Packet::PubAck(_) => {
                            in_flight -= 1;
                            count += 1;
                        }
                        other => return Err(format!("unexpected {other:?}")),
                    }
                    packet = c.buffered()?;
                }
            }
        }
    }
    let done = Instant::now();
    c.disconnect().await;
    Ok((count, done))
}

/// Runs one load from already connected publishers; messages/s over the whole run.
async fn run_load<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    publishers: Vec<(Mqtt<S>, String)>,
    payload: &[u8],
    load: Load,
    seconds: u64,
) -> Res<(u64, f64)> {
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let mut tasks = JoinSet::new();
    for (c, topic) in publishers {
        let payload = payload.to_vec();
        tasks.spawn(async move { publish_until(c, &topic, &payload, load, until).await });
    }
    let (mut total, mut end) = (0, start);
    while let Some(r) = tasks.join_next().await {
        let (n, done) = r.map_err(|e| e.to_string())??;
        total += n;
        end = end.max(done);
    }
    Ok((total, total as f64 / (end - start).as_secs_f64()))
}

/// A mosquitto broker on free loopback ports: plain TCP and TLS (emulator's certificate).
struct Mosquitto {
    child: tokio::process::Child,
    tcp: SocketAddr,
    tls: SocketAddr,
    version: String,
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl Mosquitto {
    async fn start(dir: &Path, certs: &Path) -> Res<Mosquitto> {
        let (tcp_port, tls_port) = (free_port()?, free_port()?);
        let config = format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\n\
             log_dest none\nuser root\n\
             listener {tcp_port} 127.0.0.1\n\
             listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display(),
        );
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let version = std::process::Command::new(MOSQUITTO)
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim_start_matches("mosquitto version ").to_string())
            })
            .unwrap_or_default();
        let child = tokio::process::Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{MOSQUITTO}: {e}"))?;
        let m = Mosquitto {
            child,
            tcp: SocketAddr::from((Ipv4Addr::LOCALHOST, tcp_port)),
            tls: SocketAddr::from((Ipv4Addr::LOCALHOST, tls_port)),
            version,
        };
        for _ in 0..100 {
            if TcpStream::connect(m.tls).await.is_ok() && TcpStream::connect(m.tcp).await.is_ok() {
                return Ok(m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("mosquitto did not start listening".into())
    }

    fn pid(&self) -> String {
        self.child.id().map(|p| p.to_string()).unwrap_or_default()
    }
}

/// One row of the results table.
struct Row {
    what: String,
    hub: String,
    mosq_tcp: String,
    mosq_tls: String,
    ratio: String,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((mode, rest)) if mode == "--fleet" => fleet_child(rest).await,
        Some((mode, rest)) if mode == "--publish" => publish_child(rest).await,
        _ => run(parse_args()).await,
    };
    if let Err(e) = result {
        eprintln!("load bench failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Res<()> {
    // The server ends of the fleet live here; the client ends in a child process.
    let want = args.devices as u64 + 4096;
    let fd_limit = raise_fd_limit(want);
    if fd_limit < want {
        eprintln!(
            "warning: open-file limit {fd_limit} < {want} needed; run with a higher `ulimit -n`"
        );
    }
    let dir = std::env::temp_dir().join(format!("tether-hub-load-{}", std::process::id()));
    let result = bench(&args, &dir, fd_limit).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(args: &Args, dir: &Path, fd_limit: u64) -> Res<()> {
    let state_dir: PathBuf = dir.join("hub");
    let hub = Hub::start(HubConfig {
        mqtt_port: 0,
        https_port: 0,
        state_dir: state_dir.clone(),
        ..HubConfig::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let mosquitto = Mosquitto::start(dir, &state_dir).await?;
    let control = hub.control();
    let ca = hub.ca_cert_path().to_path_buf();
    let mut fleet = Vec::with_capacity(args.devices);
    for i in 0..args.devices {
        let info = hub
            .create_device(&format!("dev-{i}"))
            .map_err(|e| e.to_string())?;
        fleet.push(hub_credentials(i, &info.primary_key)?);
    }
    eprintln!(
        "emulator mqtts://{} (fd limit {fd_limit}), mosquitto {} tcp {} tls {}",
        hub.mqtt_addr(),
        mosquitto.version,
        mosquitto.tcp,
        mosquitto.tls
    );
    let connected_now = |ids: &[Credentials]| {
        ids.iter()
            .filter(|(id, _)| control.is_connected(id))
            .count()
    };
    let mut rows = Vec::new();

    // 1. The whole fleet connected at once.
    let hub_fleet = dir.join("fleet-hub.txt");
    write_credentials(&hub_fleet, &fleet)?;
    let rss_before = rss_kib("self");
    let child = Child::run(&[
        "--fleet".into(),
        hub.mqtt_addr().to_string(),
        ca.display().to_string(),
        hub_fleet.display().to_string(),
    ])
    .await?;
    // Let the hub finish registering the last sessions, then count what it reports.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = connected_now(&fleet);
    let hub_mem = rss_kib("self").saturating_sub(rss_before);
    let client_mem = rss_kib(&child.pid());
    let took = Duration::from_millis(child.number(2)? as u64);
    eprintln!(
        "emulator: {connected}/{} connected; client: {}",
        args.devices,
        child.line.trim_end()
    );
    child.close().await;

    let mosq_creds: Vec<Credentials> = fleet.iter().map(|(id, _)| (id.clone(), None)).collect();
    let mosq_fleet = dir.join("fleet-mosquitto.txt");
    write_credentials(&mosq_fleet, &mosq_creds)?;
    let mosq_rss_before = rss_kib(&mosquitto.pid());
    let child = Child::run(&[
        "--fleet".into(),
        mosquitto.tls.to_string(),
        ca.display().to_string(),
        mosq_fleet.display().to_string(),
    ])
    .await?;
    let mosq_mem = rss_kib(&mosquitto.pid()).saturating_sub(mosq_rss_before);
    let (mosq_connected, mtook) = (
        child.number(0)? as usize,
        Duration::from_millis(child.number(2)? as u64),
    );
    eprintln!("mosquitto: client: {}", child.line.trim_end());
    child.close().await;

    let n = args.devices as f64;
    rows.push(Row {
        what: format!("concurrent connected devices (of {})", args.devices),
        hub: connected.to_string(),
        mosq_tcp: "—".into(),
        mosq_tls: mosq_connected.to_string(),
        ratio: format!("— ({})", ratio(connected as f64, mosq_connected as f64)),
    });
    let (rate, mrate) = (n / took.as_secs_f64(), n / mtook.as_secs_f64());
    rows.push(Row {
        what: format!("connects/s ({CONNECT_CONCURRENCY} at a time, full TLS handshake)"),
        hub: format!("{rate:.0}"),
        mosq_tcp: "—".into(),
        mosq_tls: format!("{mrate:.0}"),
        ratio: format!("— ({})", ratio(rate, mrate)),
    });
    rows.push(Row {
        what: "server resident memory per connection".into(),
        hub: format!("{:.1} KiB", hub_mem as f64 / n),
        mosq_tcp: "—".into(),
        mosq_tls: format!("{:.1} KiB", mosq_mem as f64 / n),
        ratio: "—".into(),
    });
    eprintln!(
        "client side: {:.1} KiB per connection",
        client_mem as f64 / n
    );

    // Wait until the hub has noticed every close, so the fleet does not skew throughput.
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected_now(&fleet) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 2. D2C throughput, same load on each broker, publishers in a child process.
    let publishers = &fleet[..args.publishers];
    let hub_pubs = dir.join("publishers-hub.txt");
    write_credentials(&hub_pubs, publishers)?;
    let mosq_pubs = dir.join("publishers-mosquitto.txt");
    write_credentials(&mosq_pubs, &mosq_creds[..args.publishers])?;
    for load in [Load::Qos0, Load::Qos1(1), Load::Qos1(WINDOW)] {
        let seq = control.last_event_seq();
        let (sent, hub_rate) =
            publish_in_child("tls", hub.mqtt_addr(), &ca, &hub_pubs, load, args).await?;
        // Every message taken must be recorded as telemetry: exactly one connected and
        // one disconnected event per publisher besides.
        let deadline = Instant::now() + Duration::from_secs(5);
        while connected_now(publishers) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let recorded = control.last_event_seq() - seq;
        let expected = sent + 2 * args.publishers as u64;
        if recorded != expected {
            return Err(format!(
                "{}: emulator took {sent} messages, recorded {recorded} events (expected {expected})",
                load.label()
            ));
        }
        let (_, tcp_rate) =
            publish_in_child("tcp", mosquitto.tcp, &ca, &mosq_pubs, load, args).await?;
        let (_, tls_rate) =
            publish_in_child("tls", mosquitto.tls, &ca, &mosq_pubs, load, args).await?;
        eprintln!(
            "{}: emulator {hub_rate:.0}/s, mosquitto tcp {tcp_rate:.0}/s, tls {tls_rate:.0}/s",
            load.label()
        );
        rows.push(Row {
            what: format!(
                "D2C msg/s, {}, {} publishers, {} B",
                load.label(),
                args.publishers,
                args.payload
            ),
            hub: format!("{hub_rate:.0}"),
            mosq_tcp: format!("{tcp_rate:.0}"),
            mosq_tls: format!("{tls_rate:.0}"),
            ratio: format!(
                "{} ({})",
                ratio(hub_rate, tcp_rate),
                ratio(hub_rate, tls_rate)
            ),
        });
    }
    hub.shutdown().await;
    let version = mosquitto.version.clone();
    drop(mosquitto);

    println!(
        "\n| measurement | emulator (MQTT/TLS) | mosquitto {version} (MQTT/TCP) | mosquitto {version} (MQTT/TLS) | emulator / mosquitto TCP (TLS) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.hub, r.mosq_tcp, r.mosq_tls, r.ratio
        );
    }
    Ok(())
}
