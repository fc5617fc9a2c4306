//! The fault table of "nothing lost": the scenarios of `tests/faults.rs`, one after the
//! other, printed as a table. An agent in a real `tether run` sends numbered telemetry
//! through the AzureIoTHub client's durable outbox with reconnect on, at 20 messages/s,
//! while each fault happens; the hub emulator counts what arrived.
//!
//! `cargo bench -p tether-tests --bench faults` (about 2 minutes).

use std::time::{Duration, Instant};

use tether_hub_emulator::Fault;
use tether_tests::faults::{self, Report};

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let runtime = tokio::runtime::Runtime::new()?;
    let reports: Vec<Report> = runtime.block_on(async {
        let mut reports = Vec::new();
        for fault in [(Fault::KillTcp, 0), (Fault::ShutDownMqtt, 10), (Fault::InvokeThrottling, 10)] {
            eprintln!("faults: {:?} {} s ...", fault.0, fault.1);
            reports.push(faults::hub_fault(fault.0, Duration::from_secs(fault.1)).await?);
        }
        eprintln!("faults: hub kill -9, token expiry, agent crash, kill -9 of tether ...");
        reports.push(faults::hub_kill_9().await?);
        reports.push(faults::token_expiry().await?);
        reports.push(faults::agent_crash().await?);
        reports.push(faults::kill_9(true, 60).await?);
        reports.push(faults::kill_9(false, 50).await?);
        eprintln!("faults: serial line unplugged ...");
        reports.push(faults::serial_replug(Duration::from_secs(5)).await?);
        anyhow::Ok(reports)
    })?;
    println!("Numbered telemetry at 20 messages/s through ClientOptions::resilient() (outbox + reconnect), real tether run, hub emulator on loopback\n");
    println!("| fault | sent | arrived | lost | duplicated | recovery | outbox depth |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &reports {
        let t = &r.tally;
        let recovery = r.recovery.map_or("—".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
        let depth = r.depth.map_or("—".to_owned(), |d| d.to_string());
        println!("| {} | {} | {} | {} | {} | {recovery} | {depth} |", r.fault, t.sent, t.arrived, t.lost.len(), t.duplicated);
    }
    println!(
        "\nrecovery: from the fault's end (hub faults, agent crash), the hub's drop (token expiry) or the restart (kill -9 of the hub or of tether) to the first new message at the hub.\n\
         outbox depth: messages waiting when the fault ended; after kill -9, what the new instance found left.\n(bench took {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    let lost: usize = reports.iter().map(|r| r.tally.lost.len()).sum();
    anyhow::ensure!(lost == 0, "{lost} accepted messages lost");
    Ok(())
}
