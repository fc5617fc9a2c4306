//! Answers requests to the agent's URL: `/later?secs=N` answers after a timer, `/fetch?url=U`
//! answers with what an outgoing GET of U returned, anything else echoes the request.

use tether_guest::{http, imp, server};

fn start() {
    server::log(format!("serving at {}", http::agent_url()));
    http::on_request(|req, mut res| {
        res.header("content-type", "text/plain");
        match req.path.as_str() {
            "/later" => {
                let secs: f64 = req.query.get("secs").and_then(|s| s.parse().ok()).unwrap_or(0.5);
                // The response is kept in the timer's closure and answered when it fires.
                imp::wakeup(secs, move || {
                    let _ = res.send(200, format!("answered after {secs} s\n"));
                });
            }
            "/fetch" => match req.query.get("url") {
                Some(url) => http::get(url, &[]).send_async(move |r| {
                    let answer = match r.error {
                        None => format!("{} {}", r.statuscode, r.body_text()),
                        Some(e) => format!("error {} {}: {}", r.statuscode, http::error_name(e), r.error_message.unwrap_or_default()),
                    };
                    let _ = res.send(200, answer);
                }),
                None => {
                    let _ = res.send(400, "missing url parameter\n");
                }
            },
            _ => {
                let body = format!("{} {} {:?} {}", req.method, req.path, req.query, req.body_text());
                let _ = res.send(200, body);
            }
        }
    });
}

tether_guest::agent!(start);
