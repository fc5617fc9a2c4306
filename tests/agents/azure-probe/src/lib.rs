//! Test agent for the AzureIoTHub library. Each `/path?query` request runs one library
//! call and is answered with what its callback got; unsolicited callbacks (connect,
//! disconnect, C2D, desired properties, direct methods) are logged.

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::{Map, Value, json};
use tether_guest::azure_iot_hub::{self as az, Client, ClientOptions, Device, DirectMethodResponse, Dps, Message, Registry};
use tether_guest::http::{HttpResponse, IncomingRequest};
use tether_guest::{http, imp, server};

thread_local! {
    static CLIENT: RefCell<Option<Client>> = const { RefCell::new(None) };
    /// Requests waiting for the next on_connected / on_disconnected.
    static WAITING: RefCell<Vec<HttpResponse>> = const { RefCell::new(Vec::new()) };
    /// How direct methods are answered: delay (s) and status.
    static METHOD_REPLY: RefCell<(f64, i32)> = const { RefCell::new((0.0, 200)) };
    /// When the client last connected: its token refresh timer starts then.
    static CONNECTED_AT: RefCell<Option<std::time::Instant>> = const { RefCell::new(None) };
}

/// An answer slot shared by callbacks: the first answer wins.
#[derive(Clone)]
struct Slot(Rc<RefCell<Option<HttpResponse>>>);

impl Slot {
    fn answer(&self, text: impl Into<String>) {
        if let Some(res) = self.0.borrow_mut().take() {
            let _ = res.send(200, text.into());
        }
    }
}

fn client() -> Option<Client> {
    CLIENT.with_borrow(Clone::clone)
}

fn wake_waiters(text: String) {
    if text == "connected 0" {
        CONNECTED_AT.with_borrow_mut(|t| *t = Some(std::time::Instant::now()));
    }
    server::log(&text);
    for res in WAITING.with_borrow_mut(std::mem::take) {
        let _ = res.send(200, text.clone());
    }
}

fn new_client(q: &dyn Fn(&str) -> Option<String>) {
    let num = |k: &str, d: u64| q(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let options = ClientOptions {
        qos: num("qos", 0) as u8,
        token_ttl: num("ttl", 86400),
        token_auto_refresh: q("refresh").as_deref() != Some("0"),
        twins_timeout: num("twins_timeout", 10) as u32,
        d_methods_timeout: num("dm_timeout", 30) as u32,
        max_pending_send_requests: num("max_send", 3) as usize,
        max_pending_twin_requests: num("max_twin", 3) as usize,
        port: num("port", 8883) as u16,
        client_certificate: q("cert").map(|cert_pem| az::ClientCertificate { cert_pem, key_pem: q("key").unwrap_or_default() }),
        ..ClientOptions::default()
    };
    let client = Client::new(&q("cs").unwrap_or_default(), |e| wake_waiters(format!("connected {e}")), |e| wake_waiters(format!("disconnected {e}")), options);
    client.set_debug(true);
    CLIENT.with_borrow_mut(|c| *c = Some(client));
}

fn handle(req: IncomingRequest, res: HttpResponse) {
    let q = |k: &str| req.query.get(k).cloned();
    let slot = Slot(Rc::new(RefCell::new(Some(res))));
    let s = slot.clone();
    let c = client();
    match (req.path.as_str(), c) {
        ("/new", _) => {
            new_client(&q);
            slot.answer("ok");
        }
        ("/connect", Some(c)) => {
            if let Some(res) = slot.0.borrow_mut().take() {
                WAITING.with_borrow_mut(|w| w.push(res));
            }
            c.connect();
            // A second connect while the first is under way (same event, so deterministic).
            if q("twice").is_some() {
                c.connect();
            }
            if q("probe").is_some() {
                probe_calls(&c, "while connecting");
            }
        }
        ("/disconnect", Some(c)) => {
            if let Some(res) = slot.0.borrow_mut().take() {
                WAITING.with_borrow_mut(|w| w.push(res));
            }
            c.disconnect();
            // Calls while the disconnect is under way.
            if q("probe").is_some() {
                probe_calls(&c, "while disconnecting");
                c.disconnect();
            }
        }
        ("/connected", Some(c)) => slot.answer(c.is_connected().to_string()),
        // Calls `after` seconds after the client connected, e.g. just after the token
        // refresh (armed at that moment) started.
        ("/probe-later", Some(c)) => {
            let after: f64 = q("after").and_then(|a| a.parse().ok()).unwrap_or(0.0);
            let elapsed = CONNECTED_AT.with_borrow(|t| t.map_or(0.0, |t| t.elapsed().as_secs_f64()));
            imp::wakeup((after - elapsed).max(0.0), move || probe_calls(&c, "later"));
            slot.answer("scheduled");
        }
        ("/send", Some(c)) => {
            let n: usize = q("n").and_then(|n| n.parse().ok()).unwrap_or(1);
            let props: Vec<(String, String)> = q("props").unwrap_or_default().split(',').filter_map(|p| p.split_once(':')).map(|(k, v)| (k.into(), v.into())).collect();
            let codes = Rc::new(RefCell::new(Vec::new()));
            for i in 0..n {
                // `size`: a body of that many bytes, too long for a query.
                let sized = q("size").and_then(|n| n.parse().ok()).map(|n: usize| "x".repeat(n));
                let body = sized.or_else(|| q("body")).unwrap_or_else(|| format!("message {i}"));
                let (codes, s) = (codes.clone(), s.clone());
                c.send_message(Message::with_properties(body, props.clone()), move |code, _| {
                    codes.borrow_mut().push(code);
                    if codes.borrow().len() == n {
                        s.answer(format!("sent {:?}", codes.borrow()));
                    }
                });
            }
        }
        ("/enable", Some(c)) => {
            let done = move |code| s.answer(format!("done {code}"));
            match (q("f").as_deref(), q("on").as_deref() != Some("0")) {
                (Some("messages"), true) => c.enable_incoming_messages(|m| server::log(format!("c2d {} {:?}", m.body_text(), m.properties())), done),
                (Some("messages"), false) => c.disable_incoming_messages(done),
                (Some("twin"), true) => c.enable_twin(|p| server::log(format!("desired {}", Value::Object(p))), done),
                (Some("twin"), false) => c.disable_twin(done),
                (Some("methods"), true) => c.enable_direct_methods(on_method, done),
                (Some("methods"), false) => c.disable_direct_methods(done),
                _ => slot.answer("unknown feature"),
            }
        }
        ("/retrieve", Some(c)) => {
            let n: usize = q("n").and_then(|n| n.parse().ok()).unwrap_or(1);
            let answers = Rc::new(RefCell::new(Vec::new()));
            for _ in 0..n {
                let (answers, s) = (answers.clone(), s.clone());
                c.retrieve_twin_properties(move |code, reported, desired| {
                    answers.borrow_mut().push(format!("{code} {} {}", reported.unwrap_or(Value::Null), desired.unwrap_or(Value::Null)));
                    if answers.borrow().len() == n {
                        s.answer(answers.borrow().join(" | "));
                    }
                });
            }
        }
        ("/update", Some(c)) => {
            let n: usize = q("n").and_then(|n| n.parse().ok()).unwrap_or(1);
            let props: Map<String, Value> = q("json").and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
            let codes = Rc::new(RefCell::new(Vec::new()));
            for _ in 0..n {
                let (codes, s) = (codes.clone(), s.clone());
                c.update_twin_properties(props.clone(), move |code, _| {
                    codes.borrow_mut().push(code);
                    if codes.borrow().len() == n {
                        s.answer(format!("updated {:?}", codes.borrow()));
                    }
                });
            }
        }
        ("/method-reply", _) => {
            let delay = q("delay").and_then(|d| d.parse().ok()).unwrap_or(0.0);
            let status = q("status").and_then(|d| d.parse().ok()).unwrap_or(200);
            METHOD_REPLY.with_borrow_mut(|m| *m = (delay, status));
            slot.answer("ok");
        }
        (path, _) if path.starts_with("/registry/") => registry(path, &q, slot),
        (path, _) if path.starts_with("/dps/") => dps(path, &q, slot),
        ("/sas", _) => {
            let sas = az::SharedAccessSignature::new(&q("sr").unwrap_or_default(), q("skn").as_deref(), &q("key").unwrap_or_default(), q("se").and_then(|s| s.parse().ok()).unwrap_or(0));
            slot.answer(match sas {
                Ok(sas) => sas.to_string(),
                Err(e) => format!("error {e}"),
            });
        }
        (_, None) => slot.answer("no client"),
        (other, _) => slot.answer(format!("unknown {other}")),
    }
}

/// One call of each kind, logging `<op> <when> <code>`.
fn probe_calls(c: &Client, when: &'static str) {
    c.send_message(Message::new("probe"), move |code, _| server::log(format!("send {when} {code}")));
    c.enable_incoming_messages(|_| (), move |code| server::log(format!("enable {when} {code}")));
    c.retrieve_twin_properties(move |code, _, _| server::log(format!("retrieve {when} {code}")));
    // A json! object, where 5.1.0 takes a table.
    c.update_twin_properties(json!({ "probe": when }), move |code, _| server::log(format!("update {when} {code}")));
}

fn on_method(name: String, params: Option<Value>, reply: az::MethodReply) {
    server::log(format!("method {name} {}", params.clone().unwrap_or(Value::Null)));
    let (delay, status) = METHOD_REPLY.with_borrow(|m| *m);
    imp::wakeup(delay, move || {
        reply.send(DirectMethodResponse::new(status, Some(json!({"method": name, "params": params}))), |code, _| server::log(format!("reply sent {code}")));
    });
}

fn registry(path: &str, q: &dyn Fn(&str) -> Option<String>, slot: Slot) {
    let registry = Registry::new(&q("cs").unwrap_or_default());
    let id = q("id").unwrap_or_default();
    let on_device = {
        let slot = slot.clone();
        move |r: Result<Device, az::RegistryError>| match r {
            Ok(d) => slot.answer(format!("ok {}", Value::Object(d.body().clone()))),
            Err(e) => slot.answer(format!("err {} {}", e.response.map_or(0, |r| r.statuscode), e.message)),
        }
    };
    match path {
        "/registry/create" => {
            let device = if id.is_empty() { None } else { Some(Device::new(Some(json!({"deviceId": id})))) };
            registry.create(device, on_device)
        }
        "/registry/get" => registry.get(&id, on_device),
        "/registry/update" => {
            let mut body = json!({"deviceId": id, "status": q("status").unwrap_or_else(|| "Enabled".into())});
            if let Some(etag) = q("etag") {
                body["etag"] = Value::String(etag);
            }
            registry.update(Device::new(Some(body)), on_device)
        }
        "/registry/remove" => registry.remove(&id, move |r| match r {
            Ok(()) => slot.answer("ok"),
            Err(e) => slot.answer(format!("err {} {}", e.response.map_or(0, |r| r.statuscode), e.message)),
        }),
        "/registry/list" => registry.list(move |r| match r {
            Ok(devices) => slot.answer(format!("ok {}", devices.iter().map(|d| d.device_id().to_owned()).collect::<Vec<_>>().join(","))),
            Err(e) => slot.answer(format!("err {}", e.message)),
        }),
        "/registry/connection-string" => {
            let host = az::ConnectionString::parse(&q("cs").unwrap_or_default()).host_name.unwrap_or_default();
            registry.get(&id, move |r| match r {
                Ok(d) => slot.answer(d.connection_string(host.split(':').next().unwrap_or_default())),
                Err(e) => slot.answer(format!("err {}", e.message)),
            })
        }
        other => slot.answer(format!("unknown {other}")),
    }
}

fn dps(path: &str, q: &dyn Fn(&str) -> Option<String>, slot: Slot) {
    let mut key = q("key").unwrap_or_default();
    if let Some(group_key) = q("group_key") {
        key = az::derive_device_key(&group_key, &q("reg").unwrap_or_default()).unwrap_or_default();
    }
    let dps = Dps::new(&q("scope").unwrap_or_default(), &q("reg").unwrap_or_default(), &key).with_endpoint(&q("endpoint").unwrap_or_default());
    let done = move |code: i32, _body: Option<Value>, cs: Option<String>| slot.answer(format!("{code} {}", cs.unwrap_or_default()));
    match path {
        "/dps/register" => dps.register(done),
        "/dps/get" => dps.get_connection_string(done),
        _ => done(-1, None, None),
    }
}

fn start() {
    http::on_request(handle);
}

tether_guest::agent!(start);
