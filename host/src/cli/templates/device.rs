//! {name}: a Tether agent for a board on a serial line (set [agent.device] in tether.toml;
//! `device-sim --link /tmp/tty{name}` simulates one). It logs the board's `temperature`
//! readings and answers `GET /led` and `POST /led` (on/off) by asking the board.

use tether_guest::device::{self, DeviceError};
use tether_guest::http::{self, Answer, IncomingRequest};
use tether_guest::{server, task};

fn start() {
    device::on_connect(|info| server::log(format!("board {} connected", info.id)));
    device::on_disconnect(|reason| server::log(format!("board disconnected: {reason}")));
    task::spawn(async {
        let mut readings = device::messages::<f64>("temperature");
        while let Some(celsius) = readings.next().await {
            server::log(format!("temperature {celsius:.1} °C"));
        }
    });
    http::serve(led);
}

async fn led(req: IncomingRequest) -> Answer {
    let asked: Result<bool, DeviceError> = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/led") => device::request("get-led", &()).timeout(5.0).await.and_then(|reply| reply.decode()),
        ("POST", "/led") => {
            let on = req.body_text().trim() == "on";
            device::request("led", &on).timeout(5.0).await.map(|_| on)
        }
        _ => return Answer::new(404, "try GET /led or POST /led with on or off\n"),
    };
    match asked {
        Ok(on) => Answer::new(200, if on { "on\n" } else { "off\n" }),
        Err(e) => Answer::new(502, format!("{e}\n")),
    }
}

tether_guest::agent!(start);
