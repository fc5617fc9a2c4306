//! One instance of an agent: the store data that composes every capability's state with
//! WASI and the sandbox's limits, the linker that projects each interface onto its
//! capability's state, and the delivery of queued events.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::queue::{Envelope, HostEvent, Queue};
use super::sched::CallClock;
use crate::bindings::{self, events::Event};
use crate::capabilities::{agent_info, device, http, log, mqtt, queue, store, timers};
use crate::hosting::config::Limits;
use crate::kit::Handles;
use crate::kit::events::{Events, Sink};
use crate::kit::log::Level;
use crate::kit::metrics::AgentMetrics;

/// What the capabilities and the sandbox of an agent's instances are built from: each
/// capability's policy for the agent, made once when the agent is spawned.
pub(crate) struct AgentParts {
    pub info: Arc<agent_info::AgentInfo>,
    /// Its log, counters and the host's runtime, for every capability.
    pub handles: Handles,
    pub queue: Arc<Queue>,
    /// The device channel, when the agent is bound to a device line.
    pub device: Option<Arc<device::DeviceChannel>>,
    pub http: Arc<http::outbound::Policy>,
    pub mqtt: Arc<mqtt::Policy>,
    pub store: Arc<store::Policy>,
    /// The agent's durable queues (the capability's, not the event queue above).
    pub queues: Arc<dyn queue::Backend>,
    pub limits: Limits,
    /// Set while the agent belongs in the slow lane (see `sched`).
    pub slow: Arc<std::sync::atomic::AtomicBool>,
    /// Requests to the agent's URL not yet delivered, and what they hold.
    pub backlog: Arc<http::inbound::Backlog>,
}

/// Every capability's state in one instance.
pub struct AgentCtx {
    info: agent_info::Info,
    log: log::Log,
    timers: timers::Timers,
    http: http::Http,
    mqtt: mqtt::Clients,
    store: store::Store,
    queues: queue::Queues,
    device: device::Device,
}

impl AgentCtx {
    fn new(agent: &AgentParts, generation: u64) -> AgentCtx {
        let handles = &agent.handles;
        // Each capability gets a handle on the queue for its own event type only.
        fn events<E>(agent: &AgentParts, generation: u64) -> Events<E>
        where
            Queue: Sink<E>,
        {
            Events::new(agent.queue.clone(), generation)
        }
        AgentCtx {
            info: agent_info::Info(agent.info.clone()),
            log: log::Log::new(handles.log.clone()),
            timers: timers::Timers::new(handles.clone(), events(agent, generation), agent.limits.timers),
            http: http::Http {
                outbound: http::outbound::Outbound::new(agent.http.clone(), handles.clone(), events(agent, generation)),
                inbound: http::inbound::Inbound::default(),
            },
            mqtt: mqtt::Clients::new(agent.mqtt.clone(), handles.clone(), events(agent, generation)),
            store: store::Store::new(agent.store.clone(), handles.log.clone(), handles.blocking.clone()),
            queues: queue::Queues::new(agent.queues.clone(), handles.log.clone(), handles.blocking.clone()),
            device: device::Device::new(agent.device.clone(), events(agent, generation), handles.metrics.clone(), handles.timeline.clone()),
        }
    }

    /// The agent's event (or `start`) ended, whether it returned or trapped.
    pub(crate) fn event_done(&self) {
        self.queues.settle();
    }

    /// The WIT event to deliver for a queued envelope, or `None` when it no longer applies:
    /// meant for an earlier instance (generation), or a cancelled timer.
    pub(crate) fn accept(&mut self, envelope: Envelope, generation: u64) -> Option<Event> {
        if envelope.generation.is_some_and(|g| g != generation) {
            return None;
        }
        self.prepare(envelope.event)
    }

    fn prepare(&mut self, event: HostEvent) -> Option<Event> {
        match event {
            HostEvent::Timer(e) => self.timers.prepare(e),
            HostEvent::HttpResponse(e) => self.http.outbound.prepare(e),
            HostEvent::HttpRequest(e) => self.http.inbound.prepare(e),
            HostEvent::Mqtt(e) => self.mqtt.prepare(e),
            HostEvent::Device(e) => self.device.prepare(e),
        }
    }
}

// An interface that only defines types has nothing to implement.
impl bindings::types::Host for AgentCtx {}

/// Most events `events.next` hands out in one call: the host looks at its control queue
/// and at the agent's lane only between calls, so a call should not run on without end.
const EVENTS_PER_CALL: u32 = 64;

/// Where `events.next` finds the agent's further events during a call.
pub(crate) struct Inbox {
    events: flume::Receiver<Envelope>,
    /// Whether the agent has been told something (stop, reload) that goes before its queue.
    /// A closure, so that this file needs nothing of the agent's task (`agent.rs`).
    told: Box<dyn Fn() -> bool + Send + Sync>,
    /// Events handed out in the current call, the first included.
    taken: u32,
}

impl Inbox {
    pub(crate) fn new(events: flume::Receiver<Envelope>, told: Box<dyn Fn() -> bool + Send + Sync>) -> Inbox {
        Inbox { events, told, taken: 0 }
    }
}

impl bindings::events::Host for AgentState {
    fn next(&mut self) -> Option<Event> {
        let inbox = self.inbox.as_mut()?;
        if inbox.taken >= EVENTS_PER_CALL || (inbox.told)() {
            return None;
        }
        loop {
            let envelope = inbox.events.try_recv().ok()?;
            let Some(event) = self.ctx.accept(envelope, self.generation) else { continue };
            // The event in hand is done: it is accounted as if its call had returned, and
            // this one starts with a budget of its own.
            inbox.taken += 1;
            self.ctx.event_done();
            let times = self.clock.next_event();
            self.limits.metrics.event(times.took, times.ran);
            return Some(event);
        }
    }
}

/// The store data: the capabilities' state plus WASI and limits.
pub struct AgentState {
    pub(crate) ctx: AgentCtx,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MeteredLimits,
    pub(crate) clock: CallClock,
    /// The agent's queue, for `events.next`; `None` outside the agent's task (benches).
    pub(crate) inbox: Option<Inbox>,
    /// Which instance of the agent this is: events queued for an earlier one are dropped.
    generation: u64,
}

impl WasiView for AgentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The memory cap, recording the size granted for the metrics.
struct MeteredLimits {
    limits: StoreLimits,
    metrics: Arc<AgentMetrics>,
}

impl ResourceLimiter for MeteredLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let granted = self.limits.memory_growing(current, desired, maximum)?;
        if granted {
            self.metrics.set_memory(desired);
        }
        Ok(granted)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
}

/// Links WASI (granting nothing) and every capability, each reaching only its own state.
pub(crate) fn link(linker: &mut Linker<AgentState>) -> wasmtime::Result<()> {
    // WASI is linked because Rust's std imports it, but grants nothing: no preopened
    // directories, no environment, no sockets (see `new_store`).
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    bindings::types::add_to_linker::<_, HasSelf<AgentCtx>>(linker, |s| &mut s.ctx)?;
    bindings::events::add_to_linker::<_, HasSelf<AgentState>>(linker, |s| s)?;
    agent_info::add_to_linker(linker, |s| &mut s.ctx.info)?;
    log::add_to_linker(linker, |s| &mut s.ctx.log)?;
    timers::add_to_linker(linker, |s| &mut s.ctx.timers)?;
    http::add_to_linker(linker, |s| &mut s.ctx.http)?;
    mqtt::add_to_linker(linker, |s| &mut s.ctx.mqtt)?;
    store::add_to_linker(linker, |s| &mut s.ctx.store)?;
    queue::add_to_linker(linker, |s| &mut s.ctx.queues)?;
    device::add_to_linker(linker, |s| &mut s.ctx.device)
}

/// A fresh store for instance `generation` of `agent`, taking further events from `inbox`.
pub(crate) fn new_store(engine: &Engine, agent: &AgentParts, generation: u64, inbox: Option<Inbox>) -> Store<AgentState> {
    let limits = &agent.limits;
    // Nothing is granted: no preopens, no environment, sockets denied (the default
    // address check refuses every address), stdio into the agent's log.
    let wasi = WasiCtx::builder()
        .stdout(log::LogStream::new(agent.handles.log.clone(), Level::Info))
        .stderr(log::LogStream::new(agent.handles.log.clone(), Level::Error))
        .allow_tcp(false)
        .allow_udp(false)
        .build();
    let state = AgentState {
        ctx: AgentCtx::new(agent, generation),
        wasi,
        table: ResourceTable::new(),
        limits: MeteredLimits {
            limits: StoreLimitsBuilder::new()
                .memory_size((limits.memory_mib as usize) << 20)
                .trap_on_grow_failure(true)
                .build(),
            metrics: agent.handles.metrics.clone(),
        },
        clock: CallClock::new(Duration::from_millis(limits.cpu_ms_per_event.into()), agent.slow.clone(), agent.handles.blocking.clone()),
        inbox,
        generation,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    // Each tick charges the running call and lets other agents run (see `sched`).
    store.epoch_deadline_callback(|mut ctx| ctx.data_mut().clock.tick());
    store
}

/// Gives the next call a fresh CPU budget.
pub(crate) fn arm(store: &mut Store<AgentState>) {
    let state = store.data_mut();
    state.clock.start();
    if let Some(inbox) = &mut state.inbox {
        inbox.taken = 1;
    }
    store.set_epoch_deadline(1);
}
