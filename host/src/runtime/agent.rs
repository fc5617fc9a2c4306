//! One agent: its long-lived store, its event queue, and the task that delivers events one
//! at a time and restarts the agent with backoff when it traps.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use wasmtime::Engine;

use super::engine::AgentModule;
use super::instance::{AgentParts, Inbox, arm, new_store};
use super::queue::{Envelope, HostEvent};
use super::sched::CpuLimitExceeded;
use crate::bindings::Agent;
use crate::hosting::config::Limits;
use crate::kit::log::Level;
use crate::kit::metrics::Count;

/// Where an agent is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    /// Instantiating and running `start`.
    Starting,
    /// Taking events.
    Running,
    /// Trapped; restarting after a backoff.
    Restarting { cause: String },
    /// Trapped too often in a row; stays down until restarted by hand.
    Failed { cause: String },
    /// Stopped by hand, or shut down with the host.
    Stopped,
}

/// What the management API asks of an agent; a running agent acts on it between events.
pub(crate) enum Control {
    Stop,
    Run(Resume),
    /// The agent ends here for good: in a cluster it moves to another node.
    Leave,
}

/// Ways to (re)start an agent; each starts a fresh instance over the kept store.
pub(crate) enum Resume {
    /// Start it if it is stopped or failed; nothing if it runs.
    Start,
    Restart,
    /// Swap in a new module version ("Agent restarted: reload").
    Reload(AgentModule),
}

/// What the host keeps of an agent across its instances: what each capability needs of
/// it, built once from its configuration and policy.
pub(crate) struct AgentShared {
    pub id: String,
    pub engine: Engine,
    /// What its instances are built from.
    pub parts: AgentParts,
    pub status: Mutex<AgentStatus>,
    pub restarts: Mutex<u32>,
    pub control: flume::Sender<Control>,
    /// The digest of the module version running (or about to run).
    pub module_digest: Mutex<String>,
}

impl AgentShared {
    fn set_status(&self, status: AgentStatus) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }
}

/// Runs an agent until the host shuts down: instantiate, `start`, deliver events; on a
/// trap, log the cause, wait with exponential backoff and start a fresh instance (the
/// persistent store is on disk and survives). Between events it obeys `control`.
pub(crate) async fn run(
    agent: Arc<AgentShared>,
    mut module: AgentModule,
    rx: flume::Receiver<Envelope>,
    control: flume::Receiver<Control>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = agent.parts.limits.clone();
    let mut generation = 0u64;
    let mut crashes_in_a_row = 0u32;
    loop {
        generation += 1;
        agent.set_status(AgentStatus::Starting);
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = run_instance(&agent, &module, generation, &rx, &control) => outcome,
            _ = shutdown.changed() => Ok(None),
        };
        // The instance is gone, and with it what made the agent heavy: backoff, idling and
        // the next start run in the normal lane.
        agent.parts.slow.store(false, std::sync::atomic::Ordering::Relaxed);
        let next = match outcome {
            Ok(None) => break,
            Ok(Some(control)) => control,
            Err(e) => {
                let cause = crash_cause(&e, &limits);
                agent.parts.handles.log.write(Level::Error, &format!("agent crashed: {cause}"));
                if started.elapsed() >= Duration::from_secs(limits.healthy_after_secs.into()) {
                    crashes_in_a_row = 0;
                }
                crashes_in_a_row += 1;
                if let Ok(mut n) = agent.restarts.lock() {
                    *n += 1;
                }
                if crashes_in_a_row > limits.max_restarts {
                    agent.parts.handles.log.write(Level::Error, &format!("agent failed: {crashes_in_a_row} crashes in a row; not restarting"));
                    agent.set_status(AgentStatus::Failed { cause });
                    match idle(&rx, &control, &mut shutdown, "agent failed: it crashed repeatedly").await {
                        Some(resume) => Control::Run(resume),
                        None => break,
                    }
                } else {
                    let backoff = Duration::from_millis(100u64 << (crashes_in_a_row - 1).min(8)).min(Duration::from_secs(30));
                    agent.set_status(AgentStatus::Restarting { cause });
                    agent.parts.handles.log.write(Level::Info, &format!("restarting in {} ms", backoff.as_millis()));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => continue,
                        Ok(c) = control.recv_async() => c,
                        _ = shutdown.changed() => break,
                    }
                }
            }
        };
        let resume = match next {
            Control::Run(resume) => resume,
            Control::Leave => break,
            Control::Stop => {
                agent.parts.handles.log.write(Level::Info, "Agent stopped");
                agent.set_status(AgentStatus::Stopped);
                match idle(&rx, &control, &mut shutdown, "agent stopped").await {
                    Some(resume) => resume,
                    None => break,
                }
            }
        };
        crashes_in_a_row = 0;
        let note = match resume {
            Resume::Start => "Agent started",
            Resume::Restart => "Agent restarted: restart",
            Resume::Reload(new) => {
                module = new;
                "Agent restarted: reload"
            }
        };
        agent.parts.handles.log.write(Level::Info, note);
    }
    if !matches!(*agent.status.lock().unwrap_or_else(|p| p.into_inner()), AgentStatus::Failed { .. }) {
        agent.set_status(AgentStatus::Stopped);
    }
}

/// One instance: returns `Ok(None)` when the queue closes, `Ok(Some(_))` when told to
/// stop or restart, `Err` when it traps.
async fn run_instance(
    agent: &Arc<AgentShared>,
    module: &AgentModule,
    generation: u64,
    rx: &flume::Receiver<Envelope>,
    control: &flume::Receiver<Control>,
) -> anyhow::Result<Option<Control>> {
    if let Ok(mut digest) = agent.module_digest.lock() {
        digest.clone_from(&module.digest);
    }
    let told = control.clone();
    let inbox = Inbox::new(rx.clone(), Box::new(move || !told.is_empty()));
    let mut store = new_store(&agent.engine, &agent.parts, generation, Some(inbox));
    let instance: Agent = module.pre.instantiate_async(&mut store).await?;
    arm(&mut store);
    let started = instance.call_start(&mut store).await;
    agent.parts.handles.metrics.add(Count::Call);
    store.data().ctx.event_done();
    started?;
    let times = store.data_mut().clock.finish();
    agent.parts.handles.metrics.event(times.took, times.ran);
    agent.set_status(AgentStatus::Running);
    loop {
        let envelope = tokio::select! {
            // Control first: a deploy does not wait behind a long queue.
            biased;
            Ok(c) = control.recv_async() => match c {
                Control::Run(Resume::Start) => continue,
                c => return Ok(Some(c)),
            },
            envelope = rx.recv_async() => match envelope {
                Ok(envelope) => envelope,
                Err(_) => return Ok(None),
            },
        };
        let Some(event) = store.data_mut().ctx.accept(envelope, generation) else { continue };
        arm(&mut store);
        let handled = instance.call_on_event(&mut store, &event).await;
        agent.parts.handles.metrics.add(Count::Call);
        store.data().ctx.event_done();
        handled?;
        let times = store.data_mut().clock.finish();
        agent.parts.handles.metrics.event(times.took, times.ran);
    }
}

/// While stopped or failed, incoming requests are answered at once rather than left
/// hanging, other events dropped, until a control message starts the agent again (`None`:
/// the host shuts down).
async fn idle(
    rx: &flume::Receiver<Envelope>,
    control: &flume::Receiver<Control>,
    shutdown: &mut watch::Receiver<bool>,
    why: &str,
) -> Option<Resume> {
    loop {
        tokio::select! {
            envelope = rx.recv_async() => match envelope {
                Ok(Envelope { event: HostEvent::HttpRequest(pending), .. }) => pending.reject(503, why),
                Ok(_) => {}
                Err(_) => return None,
            },
            Ok(c) = control.recv_async() => match c {
                Control::Run(resume) => return Some(resume),
                Control::Leave => return None,
                Control::Stop => {}
            },
            _ = shutdown.changed() => return None,
        }
    }
}

fn crash_cause(e: &anyhow::Error, limits: &Limits) -> String {
    if let Some(cpu) = e.downcast_ref::<CpuLimitExceeded>() {
        return cpu.to_string();
    }
    let text = super::engine::one_line(e);
    if text.contains("forcing trap when growing memory") {
        return format!("memory limit exceeded ({} MiB)", limits.memory_mib);
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => format!("trap: {trap} ({text})"),
        None => text,
    }
}
