//! Drives the device channel for the tests (device-sim on the other end):
//! - `/send?name=N&data=JSON[&queued]` → `sent <id>` or `refused <error>`
//! - `/request?name=N&data=JSON` → `reply <json>`, `ack`, `fail <reason>` or `refused <error>`
//! - `/seq?count=N&size=S` → sends N acked `seq` {n, pad} messages, 32 in flight; answers
//!   `acked A failed F` when all are answered
//! - `/burst?count=N&size=S` → asks the device for N `seq` messages; the log gets
//!   `device seq: received R out-of-order O` and `burst done: ...` when they are in
//!
//! Logs connection changes and temperature readings.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tether_guest::device::{self, Value};
use tether_guest::http::{self, HttpResponse};
use tether_guest::server;

thread_local! {
    static SEQ_NEXT: Cell<i64> = const { Cell::new(0) };
    static SEQ_RECEIVED: Cell<i64> = const { Cell::new(0) };
    static SEQ_ERRORS: Cell<i64> = const { Cell::new(0) };
}

type Shared = Rc<RefCell<Option<HttpResponse>>>;

fn answer(res: &Shared, text: String) {
    if let Some(r) = res.borrow_mut().take() {
        let _ = r.send(200, text);
    }
}

fn data(req: &http::IncomingRequest) -> serde_json::Value {
    req.query.get("data").and_then(|d| serde_json::from_str(d).ok()).unwrap_or(serde_json::Value::Null)
}

fn num(req: &http::IncomingRequest, key: &str) -> usize {
    req.query.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

struct Seq {
    count: usize,
    pad: Vec<u8>,
    sent: usize,
    acked: usize,
    failed: usize,
    res: Shared,
}

/// Sends the next `seq` message; its answer sends the one after, keeping the window full.
fn seq_next(state: &Rc<RefCell<Seq>>) {
    let mut s = state.borrow_mut();
    if s.sent == s.count {
        return;
    }
    let n = s.sent as i64;
    let message = Value::Map([("n".to_owned(), Value::Int(n)), ("pad".to_owned(), Value::Bytes(s.pad.clone()))].into());
    let (a, f) = (state.clone(), state.clone());
    let sent = device::request("seq", &message)
        .on_ack(move || seq_done(&a, true))
        .on_fail(move |e| {
            server::error(format!("seq {n} failed: {e}"));
            seq_done(&f, false)
        })
        .send();
    match sent {
        Ok(_) => s.sent += 1,
        Err(e) => {
            server::error(format!("seq {n} refused: {e}"));
            s.sent += 1;
            s.failed += 1;
        }
    }
}

fn seq_done(state: &Rc<RefCell<Seq>>, ok: bool) {
    {
        let mut s = state.borrow_mut();
        if ok { s.acked += 1 } else { s.failed += 1 }
        if s.acked + s.failed == s.count {
            answer(&s.res, format!("acked {} failed {}", s.acked, s.failed));
            return;
        }
    }
    seq_next(state);
}

fn start() {
    device::on_connect(|info| server::log(format!("device connected: {} max {}", info.id, info.max_message)));
    device::on_disconnect(|reason| server::log(format!("device disconnected: {reason}")));
    device::on("temperature", |celsius: f64| server::log(format!("temperature {celsius}")));
    device::on("seq", |v: Value| {
        let n = v.get("n").and_then(Value::as_i64).unwrap_or(-1);
        if n == 0 {
            SEQ_NEXT.set(0);
            SEQ_RECEIVED.set(0);
            SEQ_ERRORS.set(0);
        }
        if n != SEQ_NEXT.get() {
            SEQ_ERRORS.set(SEQ_ERRORS.get() + 1);
        }
        SEQ_NEXT.set(n + 1);
        SEQ_RECEIVED.set(SEQ_RECEIVED.get() + 1);
    });
    device::on("burst-done", |v: Value| {
        server::log(format!("device seq: received {} out-of-order {}", SEQ_RECEIVED.get(), SEQ_ERRORS.get()));
        server::log(format!("burst done: {v:?}"));
    });
    http::on_request(|req, res| {
        let res: Shared = Rc::new(RefCell::new(Some(res)));
        let name = req.query.get("name").cloned().unwrap_or_default();
        match req.path.as_str() {
            "/connected" => answer(&res, device::is_connected().to_string()),
            "/send" => {
                let sent = if req.query.contains_key("queued") { device::send_queued(&name, &data(&req)) } else { device::send(&name, &data(&req)) };
                answer(&res, match sent {
                    Ok(id) => format!("sent {id}"),
                    Err(e) => format!("refused {e:?}"),
                });
            }
            "/request" => {
                let (r1, r2, r3) = (res.clone(), res.clone(), res.clone());
                let timeout = req.query.get("timeout").and_then(|t| t.parse().ok()).unwrap_or(5.0);
                let mut request = device::request(&name, &data(&req))
                    .on_reply(move |v: serde_json::Value| answer(&r1, format!("reply {v}")))
                    .on_ack(move || answer(&r2, "ack".into()))
                    .on_fail(move |f| answer(&r3, format!("fail {f}")))
                    .timeout(timeout);
                if req.query.contains_key("queued") {
                    request = request.queued();
                }
                let sent = request.send();
                if let Err(e) = sent {
                    answer(&res, format!("refused {e:?}"));
                }
            }
            "/seq" => {
                let count = num(&req, "count");
                let state = Rc::new(RefCell::new(Seq { count, pad: vec![0x5A; num(&req, "size")], sent: 0, acked: 0, failed: 0, res }));
                for _ in 0..32 {
                    seq_next(&state);
                }
            }
            "/burst" => {
                let body = Value::Map(
                    [("count".to_owned(), Value::Int(num(&req, "count") as i64)), ("size".to_owned(), Value::Int(num(&req, "size") as i64))].into(),
                );
                answer(&res, match device::send("burst", &body) {
                    Ok(id) => format!("sent {id}"),
                    Err(e) => format!("refused {e:?}"),
                });
            }
            _ => answer(&res, "unknown".into()),
        }
    });
}

tether_guest::agent!(start);
