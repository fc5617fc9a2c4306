//! Test agent. `/ping` answers, `/count` bumps a counter in the persistent store,
//! `/save?bytes=N` saves N bytes, `/spin` loops forever, `/hog` allocates without end,
//! `/panic` panics, `/print` writes to stdout and stderr.

use std::cell::RefCell;

use tether_guest::{http, server};

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct State {
    count: u64,
}

thread_local! {
    static HOARD: RefCell<Vec<Vec<u8>>> = RefCell::default();
}

fn start() {
    server::log("probe started");
    http::on_request(|req, res| {
        let answer = match req.path.as_str() {
            "/ping" => "pong".to_owned(),
            "/count" => {
                let mut state: State = server::load().ok().flatten().unwrap_or_default();
                state.count += 1;
                match server::save(&state) {
                    Ok(()) => state.count.to_string(),
                    Err(e) => format!("save failed: {e}"),
                }
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

tether_guest::agent!(start);
