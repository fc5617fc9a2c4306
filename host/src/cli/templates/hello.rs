//! {name}: a Tether agent. `tether run` in this directory builds and runs it; its log
//! lines appear on the terminal.

use tether_guest::{imp, server, task};

fn start() {
    server::log("hello from {name}");
    task::spawn(async {
        for n in 1.. {
            if let Err(e) = imp::sleep(5.0).await {
                return server::error(format!("no timer: {e}"));
            }
            server::log(format!("still here after {} s", n * 5));
        }
    });
}

tether_guest::agent!(start);
