//! Test agent. `/ping` answers, `/count` bumps a counter in the persistent store,
//! `/save?bytes=N` saves N bytes, `/spin` loops forever, `/hog` allocates without end,
//! `/panic` panics, `/print` writes to stdout and stderr, `/host-calls?n=N` makes N host calls. `/mqtt/...` drives one MQTT
//! client and answers with the result codes of its callbacks. For the hosting tests:
//! `/fetch?url=U` answers with what a GET of U returned, `/later?ms=N` answers after a
//! timer, `/flood-logs?n=N` logs N lines, `/flood-http?n=N&url=U` sends N GETs at once and
//! answers with how they ended, `/noise?kind=logs|http|calls&n=N&url=U` answers at once and
//! then, from a zero-delay timer, forever logs N lines, sends N GETs of U or makes N host
//! calls. `/hold-http?n=N&url=U&bytes=B&timeout_s=T` sends N POSTs and answers with the
//! refusals; `/save-many?n=N` saves N times and counts the rate refusals. `/queue/...?name=Q`
//! drives the agent's durable queue Q (see `queue_request`).

use std::cell::RefCell;
use std::rc::Rc;

use tether_guest::http::{HttpResponse, IncomingRequest};
use tether_guest::mqtt::{self, ClientCertificate, ConnectOptions, MessageOptions};
use tether_guest::queue::{self, Queue, QueueError};
use tether_guest::{config, http, server};

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct State {
    count: u64,
}

thread_local! {
    static HOARD: RefCell<Vec<Vec<u8>>> = RefCell::default();
    /// Clients opened by `/mqtt/hoard`, kept open.
    static CLIENTS: RefCell<Vec<mqtt::Client>> = RefCell::default();
    /// Milliseconds each MQTT message keeps the agent busy (`/mqtt/slow?ms=N`).
    static SLOW_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static CLIENT: mqtt::Client = {
        let client = mqtt::create_client();
        client.on_message(|m| {
            server::log(format!("mqtt message {} {} qos={}", m.topic, String::from_utf8_lossy(&m.message), m.qos));
            let busy = std::time::Duration::from_millis(SLOW_MS.get());
            let t = std::time::Instant::now();
            while t.elapsed() < busy {
                std::hint::spin_loop();
            }
        });
        client.on_connection_lost(|code| server::log(format!("mqtt lost {code}")));
        client
    };
}

/// Runs one MQTT operation; the HTTP answer is the code its callback got, or the
/// error that refused it at once.
fn mqtt_request(req: IncomingRequest, res: HttpResponse) {
    let q = |k: &str| req.query.get(k).cloned().unwrap_or_default();
    let client = CLIENT.with(Clone::clone);
    let qos = q("qos").parse().unwrap_or(0);
    let slot = Rc::new(RefCell::new(Some(res)));
    let answer = {
        let slot = slot.clone();
        move |text: String| {
            if let Some(res) = slot.borrow_mut().take() {
                let _ = res.send(200, text);
            }
        }
    };
    let started = match req.path.as_str() {
        "/mqtt/connect" => {
            let client_certificate = (q("cert") == "1").then(|| ClientCertificate { cert_pem: config("client_cert").unwrap_or_default(), key_pem: config("client_key").unwrap_or_default() });
            let options = ConnectOptions { ca_pem: config("ca_pem").filter(|_| q("ca") == "1"), client_certificate, ..ConnectOptions::default() };
            client.on_connect(move |code| answer(format!("connect {code}")));
            client.connect(&q("url"), "probe", &options)
        }
        "/mqtt/sub" => client.subscribe(&[&q("topic")], qos, move |code, granted| answer(format!("sub {code} {granted:?}"))),
        "/mqtt/unsub" => client.unsubscribe(&[&q("topic")], move |code| answer(format!("unsub {code}"))),
        "/mqtt/pub" => client
            .create_message(&q("topic"), q("msg"), MessageOptions { qos, retain: false })
            .send_async(move |code| answer(format!("pub {code}"))),
        "/mqtt/disconnect" => client.disconnect(move || answer("disconnected".into())),
        "/mqtt/flood" => {
            // `n` publishes of `bytes` at once: how many were taken, and the first refusal.
            let payload = vec![b'x'; q("bytes").parse().unwrap_or(0)];
            let (mut taken, mut refusal) = (0, String::new());
            for _ in 0..q("n").parse::<u32>().unwrap_or(0) {
                match client.create_message(&q("topic"), payload.clone(), MessageOptions { qos, retain: false }).send_async(|_| {}) {
                    Ok(()) => taken += 1,
                    Err(e) => {
                        refusal = format!(" refused {e:?}");
                        break;
                    }
                }
            }
            answer(format!("taken {taken}{refusal}"));
            Ok(())
        }
        "/mqtt/hoard" => {
            // `n` more clients connecting to `url`: `opened K` and the first refusal.
            let mut opened = 0;
            let mut refusal = String::new();
            for _ in 0..q("n").parse::<u32>().unwrap_or(0) {
                let extra = mqtt::create_client();
                match extra.connect(&q("url"), &format!("hoard-{opened}"), &ConnectOptions::default()) {
                    Ok(()) => {
                        opened += 1;
                        CLIENTS.with_borrow_mut(|c| c.push(extra));
                    }
                    Err(e) => {
                        refusal = format!(" refused {e:?}");
                        break;
                    }
                }
            }
            answer(format!("opened {opened}{refusal}"));
            Ok(())
        }
        "/mqtt/slow" => {
            SLOW_MS.set(q("ms").parse().unwrap_or(0));
            answer(format!("slow {} ms", SLOW_MS.get()));
            Ok(())
        }
        "/mqtt/connected" => {
            answer(format!("{}", client.is_connected()));
            Ok(())
        }
        other => {
            answer(format!("unknown {other}"));
            Ok(())
        }
    };
    if let Err(e) = started
        && let Some(res) = slot.borrow_mut().take()
    {
        let _ = res.send(200, format!("refused {e:?} {}", e.code()));
    }
}

/// One queue operation on queue `name`; the answer is its outcome, or `error <QueueError>`:
/// - `append?payload=P`: the new id; `&n=N` appends `P0`..`P<N-1>` and answers their ids,
///   comma-separated; `&bytes=B` appends one entry of B bytes instead;
/// - `remove?id=I`: `true` or `false`;
/// - `entries?after=A&max=M`: one line per entry, `<id> <payload>`;
/// - `stats`: `entries=E bytes=B quota=Q`.
fn queue_request(req: &IncomingRequest) -> String {
    let q = |k: &str| req.query.get(k).cloned().unwrap_or_default();
    let number = |k: &str| q(k).parse::<u64>().unwrap_or(0);
    let queue = Queue::open(&q("name"));
    let answer: Result<String, QueueError> = match req.path.as_str() {
        "/queue/append" if req.query.contains_key("bytes") => queue.append(&vec![b'x'; number("bytes") as usize]).map(|id| id.to_string()),
        "/queue/append" if req.query.contains_key("n") => (0..number("n"))
            .map(|i| queue.append(format!("{}{i}", q("payload")).as_bytes()).map(|id| id.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map(|ids| ids.join(",")),
        "/queue/append" => queue.append(q("payload").as_bytes()).map(|id| id.to_string()),
        "/queue/remove" => queue.remove(number("id")).map(|removed| removed.to_string()),
        "/queue/entries" => queue.entries(number("after"), number("max") as u32).map(|entries| {
            entries.iter().map(|e| format!("{} {}", e.id, String::from_utf8_lossy(&e.payload))).collect::<Vec<_>>().join("\n")
        }),
        "/queue/stats" => queue::stats().map(|s| format!("entries={} bytes={} quota={}", s.entries, s.bytes, s.quota)),
        other => Ok(format!("unknown {other}")),
    };
    answer.unwrap_or_else(|e| format!("error {e:?}"))
}

fn start() {
    server::log("probe started");
    http::on_request(|req, res| {
        if req.path.starts_with("/mqtt/") {
            return mqtt_request(req, res);
        }
        if req.path.starts_with("/queue/") {
            let _ = res.send(200, queue_request(&req));
            return;
        }
        let number = |k: &str| req.query.get(k).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        let url = req.query.get("url").cloned().unwrap_or_default();
        match req.path.as_str() {
            "/log" => {
                // `text` as given, or `bytes` of 'x'.
                let text = req.query.get("text").cloned().unwrap_or_else(|| "x".repeat(number("bytes") as usize));
                server::log(text);
                let _ = res.send(200, "logged");
                return;
            }
            "/fetch" => {
                return http::get(&url, &[]).send_async(move |r| {
                    let answer = match r.error {
                        None => format!("{} {}", r.statuscode, r.body_text()),
                        Some(e) => format!("error {} {}: {}", r.statuscode, http::error_name(e), r.error_message.unwrap_or_default()),
                    };
                    let _ = res.send(200, answer);
                });
            }
            "/later" => {
                let ms = number("ms");
                tether_guest::imp::wakeup(ms as f64 / 1000.0, move || {
                    let _ = res.send(200, format!("after {ms} ms"));
                });
                return;
            }
            "/burst" => {
                // `n` timers due at once, each running `ms` of CPU; the last one answers.
                // They wait together, so the SDK takes them in one call (`events.next`),
                // and each must still get a CPU budget of its own.
                let (n, ms) = (number("n"), number("ms"));
                let res = Rc::new(RefCell::new(Some(res)));
                for i in 1..=n {
                    let res = res.clone();
                    tether_guest::imp::wakeup(0.0, move || {
                        let began = std::time::Instant::now();
                        while began.elapsed() < std::time::Duration::from_millis(ms) {
                            std::hint::spin_loop();
                        }
                        if i == n
                            && let Some(res) = res.borrow_mut().take()
                        {
                            let _ = res.send(200, format!("burst {n}"));
                        }
                    });
                }
                return;
            }
            "/hold-http" => {
                // Sends N POSTs of `bytes` each with a timeout of `timeout_s` and answers
                // with the refusals by kind (they come from zero-delay timers, so before
                // this 50 ms one); how the others end goes to the log.
                let tally = Rc::new(RefCell::new((std::collections::BTreeMap::<String, u64>::new(), false)));
                let timeout = number("timeout_s") as f64;
                for _ in 0..number("n") {
                    let tally = tally.clone();
                    let body = vec![b'x'; number("bytes") as usize];
                    http::post(&url, &[], body).timeout(timeout).send_async(move |r| {
                        let (refused, answered) = &mut *tally.borrow_mut();
                        match r.error {
                            Some(e) if !*answered => *refused.entry(http::error_name(e).to_owned()).or_default() += 1,
                            e => server::log(format!("held request ended: {}", e.map_or("answered", http::error_name))),
                        }
                    });
                }
                tether_guest::imp::wakeup(0.05, move || {
                    let (refused, answered) = &mut *tally.borrow_mut();
                    *answered = true;
                    let _ = res.send(200, format!("{refused:?}"));
                });
                return;
            }
            "/flood-http" => {
                let n = number("n");
                // (ok, rate-limited, other), answered when the last request ends.
                let tally = Rc::new(RefCell::new(((0u64, 0u64, 0u64), Some(res))));
                for _ in 0..n {
                    let tally = tally.clone();
                    http::get(&url, &[]).send_async(move |r| {
                        let mut t = tally.borrow_mut();
                        match r.statuscode {
                            2 => t.0.1 += 1,
                            200 => t.0.0 += 1,
                            _ => t.0.2 += 1,
                        }
                        let (ok, limited, other) = t.0;
                        if ok + limited + other == n
                            && let Some(res) = t.1.take()
                        {
                            let _ = res.send(200, format!("ok={ok} limited={limited} other={other}"));
                        }
                    });
                }
                return;
            }
            _ => {}
        }
        let answer = match req.path.as_str() {
            "/ping" => "pong".to_owned(),
            "/timers" => {
                // `n` timers a day away: `scheduled K` and the first refusal.
                let mut scheduled = 0;
                let mut refusal = String::new();
                for _ in 0..number("n") {
                    match tether_guest::imp::try_wakeup(86_400.0, || {}) {
                        Ok(_) => scheduled += 1,
                        Err(e) => {
                            refusal = format!(" refused {e:?}");
                            break;
                        }
                    }
                }
                format!("scheduled {scheduled}{refusal}")
            }
            // N cheap host calls in one event, for the guest->host call benchmark.
            "/host-calls" => {
                let n = number("n");
                host_calls(n);
                format!("{n} calls")
            }
            "/noise" => {
                // From the next event on: the answer goes out first, however long a batch
                // of noise takes.
                let (kind, n) = (req.query.get("kind").cloned().unwrap_or_default(), number("n"));
                tether_guest::imp::wakeup(0.0, move || noise(kind, n, url));
                "noise started".to_owned()
            }
            "/count" => {
                let mut state: State = server::load().ok().flatten().unwrap_or_default();
                state.count += 1;
                match server::save(&state) {
                    Ok(()) => state.count.to_string(),
                    Err(e) => format!("save failed: {e}"),
                }
            }
            "/save-many" => {
                let (mut saved, mut limited) = (0, 0);
                for _ in 0..number("n") {
                    match server::save(&"x") {
                        Ok(()) => saved += 1,
                        Err(server::StoreError::RateLimited) => limited += 1,
                        Err(e) => return drop(res.send(500, format!("save failed: {e}"))),
                    }
                }
                format!("saved={saved} limited={limited}")
            }
            "/save" => {
                let n: usize = req.query.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
                match server::save(&"x".repeat(n)) {
                    Ok(()) => "saved".to_owned(),
                    Err(e) => format!("save failed: {e}"),
                }
            }
            "/spin" => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "/hog" => loop {
                HOARD.with_borrow_mut(|h| h.push(vec![1u8; 1 << 20]));
            },
            "/panic" => panic!("asked to panic"),
            "/flood-logs" => {
                let n = number("n");
                flood_logs(n);
                format!("logged {n}")
            }
            "/print" => {
                println!("to stdout");
                eprintln!("to stderr");
                "printed".to_owned()
            }
            other => format!("unknown {other}"),
        };
        let _ = res.send(200, answer);
    });
}

fn host_calls(n: u64) {
    let timer = tether_guest::imp::wakeup(1e6, || {});
    for _ in 0..n {
        tether_guest::imp::cancel_wakeup(timer);
    }
}

fn flood_logs(n: u64) {
    for i in 0..n {
        server::log(format!("flood {i}"));
    }
}

/// One round of `kind` noise, then the next from a zero-delay timer: the agent stays busy
/// without anybody asking it.
fn noise(kind: String, n: u64, url: String) {
    match kind.as_str() {
        "logs" => flood_logs(n),
        "calls" => host_calls(n),
        "http" => {
            for _ in 0..n {
                http::get(&url, &[]).send_async(|_| {});
            }
        }
        _ => return,
    }
    tether_guest::imp::wakeup(0.0, move || noise(kind, n, url));
}

tether_guest::agent!(start);
