//! Bridges the device (a sensor board with an LED, e.g. `device-sim`) to the agent URL:
//! logs its temperature readings and connection changes; `GET /led` asks the device for
//! the LED state, `POST /led` with `on`/`off` switches it. Written with the async layer:
//! the request handler awaits the device and returns its answer.

use tether_guest::device::{self, DeviceError, Failure};
use tether_guest::http::{self, Answer, IncomingRequest};
use tether_guest::server;

fn start() {
    device::on_connect(|info| server::log(format!("device connected: {} (firmware {})", info.id, info.firmware)));
    device::on_disconnect(|reason| server::log(format!("device disconnected: {reason}")));
    device::on("temperature", |celsius: f64| server::log(format!("temperature {celsius:.2} °C")));
    http::serve(|req| async move { led(req).await.header("content-type", "text/plain") });
}

async fn led(req: IncomingRequest) -> Answer {
    let on = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/led") => device::request("get-led", &()).timeout(5.0).await.and_then(|reply| reply.decode::<bool>()),
        ("POST", "/led") => {
            let on = match req.body_text().trim() {
                "on" | "true" | "1" => true,
                "off" | "false" | "0" => false,
                other => return Answer::new(400, format!("expected on or off, not {other:?}\n")),
            };
            device::request("led", &on).timeout(5.0).await.map(|_| on)
        }
        _ => return Answer::new(404, "try GET /led or POST /led with on or off\n"),
    };
    match on {
        Ok(on) => Answer::new(200, if on { "on\n" } else { "off\n" }),
        Err(e @ DeviceError::Failed(Failure::TimedOut)) => Answer::new(504, format!("device: {e}\n")),
        Err(e @ DeviceError::NotSent(_)) => Answer::new(503, format!("device: {e}\n")),
        Err(e) => Answer::new(502, format!("device: {e}\n")),
    }
}

tether_guest::agent!(start);
