//! {name}: a Tether agent answering at its URL (`tether run` prints it).
//! `GET /` greets, `POST /count` counts in the agent's store, which lasts across restarts.

use tether_guest::http::{self, Answer, IncomingRequest};
use tether_guest::server;

fn start() {
    server::log(format!("serving at {}", http::agent_url()));
    http::serve(handle);
}

async fn handle(req: IncomingRequest) -> Answer {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/") => Answer::new(200, "hello from {name}\n"),
        ("POST", "/count") => {
            let count = server::load::<u64>().ok().flatten().unwrap_or(0) + 1;
            match server::save(&count) {
                Ok(()) => Answer::json(200, &serde_json::json!({ "count": count })),
                Err(e) => Answer::new(503, format!("not saved: {e}\n")),
            }
        }
        _ => Answer::new(404, "try GET / or POST /count\n"),
    }
}

tether_guest::agent!(start);
