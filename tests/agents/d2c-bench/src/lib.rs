//! Benchmark agent for `cargo bench -p tether-tests --bench d2c`. Over HTTP:
//! - `/new?cs=&port=&qos=&max_send=[&async=1]` creates an `azure_iot_hub::Client` (with
//!   `async=1`, a `DeviceClient`, the async layer over it), connects it and answers
//!   `connected <code>`;
//! - `/run?n=&window=` sends `n` telemetry messages (the bench's 100-byte body and the
//!   property `bench=d2c`), keeping `window` sends pending (callbacks; with a
//!   `DeviceClient`, `window` tasks each awaiting `send_message` in a loop), and answers a
//!   JSON summary:
//!   `{"n","errors","first_error","elapsed_us","p50_us","p99_us"}`. Latency is from
//!   `send_message` to its `on_sent` callback (QoS 0: written by the host's MQTT event
//!   loop; QoS 1: PUBACK);
//! - `/mem` answers the size of the agent's linear memory in KiB.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use serde_json::json;
use tether_guest::azure_iot_hub::{Client, ClientOptions, DeviceClient, Message};
use tether_guest::http::{HttpResponse, IncomingRequest};
use tether_guest::{http, task};

mod body;
use body::body;

/// The client of `/new`, in the layer it was asked for.
#[derive(Clone)]
enum Sender {
    Callbacks(Client),
    Async(DeviceClient),
}

thread_local! {
    static CLIENT: RefCell<Option<Sender>> = const { RefCell::new(None) };
    /// The `/new` request waiting for `on_connected`.
    static WAITING: RefCell<Option<HttpResponse>> = const { RefCell::new(None) };
}

/// A run in progress.
struct Run {
    n: usize,
    next: usize,
    done: usize,
    errors: usize,
    first_error: i32,
    started: Instant,
    latencies_us: Vec<u64>,
    res: Option<HttpResponse>,
}

type Shared = Rc<RefCell<Run>>;

/// The number of the next message to send, if any are left.
fn take_next(run: &Shared) -> Option<usize> {
    let mut r = run.borrow_mut();
    (r.next < r.n).then(|| {
        r.next += 1;
        r.next - 1
    })
}

/// Records one completed send; answers the `/run` request after the last.
fn record(run: &Shared, sent_at: Instant, code: i32) {
    let finished = {
        let mut r = run.borrow_mut();
        r.latencies_us.push(sent_at.elapsed().as_micros() as u64);
        r.done += 1;
        if code != 0 {
            r.errors += 1;
            if r.first_error == 0 {
                r.first_error = code;
            }
        }
        r.done == r.n
    };
    if finished {
        report(run);
    }
}

/// Sends message `next` if any are left; its callback sends the following one.
fn send_next(client: &Client, run: &Shared) {
    let Some(i) = take_next(run) else { return };
    let sent_at = Instant::now();
    let (client2, run2) = (client.clone(), run.clone());
    client.send_message(Message::with_properties(body(i), [("bench", "d2c")]), move |code, _| {
        record(&run2, sent_at, code);
        send_next(&client2, &run2);
    });
}

/// One of the async run's tasks: awaits a send, then the next, until none are left.
async fn send_loop(client: DeviceClient, run: Shared) {
    while let Some(i) = take_next(&run) {
        let sent_at = Instant::now();
        let code = client.send_message(Message::with_properties(body(i), [("bench", "d2c")])).await.err().map_or(0, |e| e.code);
        record(&run, sent_at, code);
    }
}

fn report(run: &Shared) {
    let mut r = run.borrow_mut();
    let elapsed = r.started.elapsed().as_micros() as u64;
    r.latencies_us.sort_unstable();
    let pct = |p: f64| r.latencies_us.get(((r.latencies_us.len().saturating_sub(1)) as f64 * p).round() as usize).copied().unwrap_or(0);
    let summary = json!({"n": r.n, "errors": r.errors, "first_error": r.first_error, "elapsed_us": elapsed, "p50_us": pct(0.5), "p99_us": pct(0.99)});
    if let Some(res) = r.res.take() {
        let _ = res.send(200, summary.to_string());
    }
}

fn handle(req: IncomingRequest, res: HttpResponse) {
    let q = |k: &str| req.query.get(k).cloned();
    let num = |k: &str, d: u64| q(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    match req.path.as_str() {
        "/new" => {
            let options = ClientOptions {
                qos: num("qos", 0) as u8,
                max_pending_send_requests: num("max_send", 3) as usize,
                port: num("port", 8883) as u16,
                outbox: q("outbox"),
                ..ClientOptions::default()
            };
            let cs = q("cs").unwrap_or_default();
            if q("async").is_some() {
                let client = DeviceClient::new(&cs, options);
                CLIENT.with_borrow_mut(|c| *c = Some(Sender::Async(client.clone())));
                task::spawn(async move {
                    let code = client.connect().await.err().map_or(0, |e| e.code);
                    let _ = res.send(200, format!("connected {code}"));
                });
                return;
            }
            let on_connected = |code: i32| {
                if let Some(res) = WAITING.with_borrow_mut(Option::take) {
                    let _ = res.send(200, format!("connected {code}"));
                }
            };
            let client = Client::new(&cs, on_connected, |_| (), options);
            WAITING.with_borrow_mut(|w| *w = Some(res));
            client.connect();
            CLIENT.with_borrow_mut(|c| *c = Some(Sender::Callbacks(client)));
        }
        "/run" => {
            let Some(client) = CLIENT.with_borrow(Clone::clone) else {
                let _ = res.send(400, "no client");
                return;
            };
            let n = num("n", 1000) as usize;
            let window = num("window", 1).max(1) as usize;
            let run = Rc::new(RefCell::new(Run {
                n,
                next: 0,
                done: 0,
                errors: 0,
                first_error: 0,
                started: Instant::now(),
                latencies_us: Vec::with_capacity(n),
                res: Some(res),
            }));
            if n == 0 {
                return report(&run);
            }
            for _ in 0..window.min(n) {
                match &client {
                    Sender::Callbacks(client) => send_next(client, &run),
                    Sender::Async(client) => task::spawn(send_loop(client.clone(), run.clone())),
                }
            }
        }
        "/mem" => {
            let _ = res.send(200, linear_memory_kib().to_string());
        }
        _ => {
            let _ = res.send(404, "unknown");
        }
    }
}

/// This instance's linear memory, KiB.
fn linear_memory_kib() -> usize {
    #[cfg(target_arch = "wasm32")]
    return core::arch::wasm32::memory_size(0) * 64;
    #[cfg(not(target_arch = "wasm32"))]
    0
}

fn start() {
    http::on_request(handle);
}

tether_guest::agent!(start);
