//! Bridges the device (a sensor board with an LED, e.g. `device-sim`) to the agent URL:
//! logs its temperature readings and connection changes; `GET /led` asks the device for
//! the LED state, `POST /led` with `on`/`off` switches it.

use std::cell::RefCell;
use std::rc::Rc;

use tether_guest::device::{self, Failure};
use tether_guest::http::{self, HttpResponse};
use tether_guest::server;

/// A pending HTTP answer shared by a request's callbacks; whichever runs first answers.
#[derive(Clone)]
struct Answer(Rc<RefCell<Option<HttpResponse>>>);

impl Answer {
    fn new(res: HttpResponse) -> Answer {
        Answer(Rc::new(RefCell::new(Some(res))))
    }

    fn send(&self, status: u16, body: impl Into<Vec<u8>>) {
        if let Some(res) = self.0.borrow_mut().take() {
            // The client may have given up; nothing else to do then.
            let _ = res.send(status, body);
        }
    }

    fn fail(&self, failure: Failure) {
        let status = if failure == Failure::TimedOut { 504 } else { 502 };
        self.send(status, format!("device: {failure}\n"));
    }
}

fn start() {
    device::on_connect(|info| server::log(format!("device connected: {} (firmware {})", info.id, info.firmware)));
    device::on_disconnect(|reason| server::log(format!("device disconnected: {reason}")));
    device::on("temperature", |celsius: f64| server::log(format!("temperature {celsius:.2} °C")));
    http::on_request(|req, mut res| {
        res.header("content-type", "text/plain");
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/led") => {
                let answer = Answer::new(res);
                let (on_reply, on_fail) = (answer.clone(), answer.clone());
                let sent = device::request("get-led", &())
                    .on_reply(move |on: bool| on_reply.send(200, if on { "on\n" } else { "off\n" }))
                    .on_fail(move |f| on_fail.fail(f))
                    .timeout(5.0)
                    .send();
                if let Err(e) = sent {
                    answer.send(503, format!("device: {e}\n"));
                }
            }
            ("POST", "/led") => {
                let on = match req.body_text().trim() {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    other => {
                        let _ = res.send(400, format!("expected on or off, not {other:?}\n"));
                        return;
                    }
                };
                let answer = Answer::new(res);
                let (on_ack, on_fail) = (answer.clone(), answer.clone());
                let sent = device::request("led", &on)
                    .on_ack(move || on_ack.send(200, if on { "on\n" } else { "off\n" }))
                    .on_fail(move |f| on_fail.fail(f))
                    .timeout(5.0)
                    .send();
                if let Err(e) = sent {
                    answer.send(503, format!("device: {e}\n"));
                }
            }
            _ => {
                let _ = res.send(404, "try GET /led or POST /led with on or off\n");
            }
        }
    });
}

tether_guest::agent!(start);
