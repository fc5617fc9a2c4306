//! Sharing the CPU between agents.
//!
//! Guest code is interrupted at every epoch tick ([`TICK`]); there the host charges the
//! call its run time, ends it when over its CPU budget and otherwise lets other tasks run.
//! An agent in a call that has run across [`LONG_TICKS`] ticks, or that has used more than
//! [`HEAVY_SHARE`] of a core lately, moves to the [`SlowLane`]: threads the kernel runs
//! only when nothing else wants the core (`SCHED_IDLE`). The host's I/O and the light
//! agents' events so go first, whatever a spinning or flooding neighbour does, and the
//! slow lane gets the rest of the machine, its agents taking turns tick by tick.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

use crate::kit::blocking::Blocking;
use crate::kit::lanes::Lanes;

/// One epoch tick: how often running guest code is interrupted.
pub const TICK: Duration = Duration::from_millis(1);

/// Ticks after which a call counts as long and moves to the slow lane. Counted in ticks, not
/// clock time: a short call the kernel preempted sees one tick however long it waited, and
/// only a call that ran on past it sees a second.
const LONG_TICKS: u32 = 2;

/// Share of a core above which an agent counts as heavy, measured over about [`HALF_LIFE`].
const HEAVY_SHARE: f64 = 0.1;

/// Half-life of an agent's recent run time.
const HALF_LIFE: Duration = Duration::from_millis(100);

/// The slow lane: a tokio runtime whose threads run at the lowest OS priority, one fewer
/// than the cores (at least one), so that a core is always left to the host's I/O and the
/// light agents. Agent tasks move here, and back, at their pauses.
pub(crate) struct SlowLane {
    /// `Some` until dropped, unless the lane is off: a runtime cannot be dropped inside
    /// another one, so `drop` takes it out and lets it end in the background.
    runtime: Option<tokio::runtime::Runtime>,
}

impl SlowLane {
    pub fn new() -> std::io::Result<SlowLane> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("tether-slow-lane")
            .on_thread_start(lowest_priority)
            .enable_all()
            .build()?;
        Ok(SlowLane { runtime: Some(runtime) })
    }

    /// No slow lane (`slow_lane = false`): agents stay on the host's runtime.
    pub fn off() -> SlowLane {
        SlowLane { runtime: None }
    }

    /// Where tasks run with `io` as the host's runtime: with this lane, if it is on.
    pub fn lanes(&self, io: &tokio::runtime::Handle) -> Lanes {
        Lanes::new(io.clone(), self.runtime.as_ref().map(|r| r.handle().clone()))
    }
}

impl Drop for SlowLane {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// `SCHED_IDLE` for the calling thread: the kernel preempts it as soon as any normal thread
/// wants its core. Best effort: without it the lane still takes turns, just not behind the
/// host's I/O.
#[cfg(target_os = "linux")]
fn lowest_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 names the calling thread.
    let failed = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0;
    if failed {
        tracing::debug!("slow lane: cannot lower thread priority: {}", std::io::Error::last_os_error());
    }
}

#[cfg(not(target_os = "linux"))]
fn lowest_priority() {}

/// A finished call's times, from one reading of the clock.
pub(crate) struct Finished {
    /// Wall time from its start.
    pub took: Duration,
    /// Its run time (see [`CallClock`]).
    pub ran: Duration,
}

/// Why a call ended the instance.
#[derive(Debug, thiserror::Error)]
#[error("CPU limit exceeded ({} ms in one event)", .0.as_millis())]
pub(crate) struct CpuLimitExceeded(Duration);

/// The run time of one store's current call, against its budget, and whether its agent
/// belongs in the slow lane.
pub(crate) struct CallClock {
    budget: Duration,
    /// Run time of the current call before its current slice.
    ran: Duration,
    /// Ticks seen by the current call.
    ticks: u32,
    /// When the current slice began; written by the pause that ends a yield.
    resumed: Arc<Mutex<Resumed>>,
    /// When the current call began.
    began: Instant,
    /// Run time of recent calls, decaying with [`HALF_LIFE`], as of `recent_at`.
    recent: f64,
    recent_at: Instant,
    /// The agent's flag for [`SlowLane::spawn`].
    slow: Arc<AtomicBool>,
    /// Time host calls spent blocked on I/O, which is not run time.
    blocking: Blocking,
}

impl CallClock {
    pub fn new(budget: Duration, slow: Arc<AtomicBool>, blocking: Blocking) -> CallClock {
        let now = Instant::now();
        let resumed = Arc::new(Mutex::new(Resumed::at(now, &blocking)));
        CallClock { budget, ran: Duration::ZERO, ticks: 0, resumed, began: now, recent: 0.0, recent_at: now, slow, blocking }
    }

    /// A call begins.
    pub fn start(&mut self) {
        let now = Instant::now();
        self.decay(now);
        self.slow.store(self.heavy(), Relaxed);
        self.begin(now);
    }

    fn begin(&mut self, now: Instant) {
        self.ran = Duration::ZERO;
        self.ticks = 0;
        self.began = now;
        *lock(&self.resumed) = Resumed::at(now, &self.blocking);
    }

    /// An epoch tick in the call: an error past the budget, else a pause that lets others
    /// run (and where a long call moves to the slow lane).
    pub fn tick(&mut self) -> wasmtime::Result<UpdateDeadline> {
        self.ran += lock(&self.resumed).ran(Instant::now(), &self.blocking);
        if self.ran > self.budget {
            return Err(CpuLimitExceeded(self.budget).into());
        }
        self.ticks += 1;
        if self.ticks >= LONG_TICKS {
            self.slow.store(true, Relaxed);
        }
        let (resumed, blocking) = (self.resumed.clone(), self.blocking.clone());
        // `yield_now` rather than wasmtime's plain `Yield`: that one wakes the task from
        // inside its own poll, which tokio answers by polling it again at once (its LIFO
        // slot), so a busy agent would never let its neighbours run.
        let pause = async move {
            tokio::task::yield_now().await;
            *lock(&resumed) = Resumed::with_thread_time(&blocking);
        };
        Ok(UpdateDeadline::YieldCustom(1, Box::pin(pause)))
    }

    /// The call ended: its run time. The agent stays in the slow lane while heavy.
    pub fn finish(&mut self) -> Finished {
        self.finish_at(Instant::now())
    }

    /// The call's event ended and the next one begins in the same call (`events.next`):
    /// the ended one's times, and a fresh budget, from one reading of the clock.
    pub fn next_event(&mut self) -> Finished {
        let now = Instant::now();
        let finished = self.finish_at(now);
        self.begin(now);
        finished
    }

    fn finish_at(&mut self, now: Instant) -> Finished {
        let ran = self.ran + lock(&self.resumed).ran(now, &self.blocking);
        self.decay(now);
        self.recent += ran.as_secs_f64();
        self.slow.store(self.heavy(), Relaxed);
        Finished { took: now.duration_since(self.began), ran }
    }

    /// Brings the recent run time to `now`.
    fn decay(&mut self, now: Instant) {
        self.recent *= 0.5f64.powf(now.duration_since(self.recent_at).as_secs_f64() / HALF_LIFE.as_secs_f64());
        self.recent_at = now;
    }

    /// Whether the agent's recent run time is over [`HEAVY_SHARE`] of a core.
    fn heavy(&self) -> bool {
        // At a steady share s of a core, `recent` settles at s × HALF_LIFE / ln 2.
        self.recent > HEAVY_SHARE * HALF_LIFE.as_secs_f64() / std::f64::consts::LN_2
    }
}

fn lock(resumed: &Mutex<Resumed>) -> std::sync::MutexGuard<'_, Resumed> {
    resumed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The start of a slice of guest code. A call's first slice is timed by the clock (cheap,
/// and short on a thread of normal priority), less the time host calls spent blocked on
/// I/O; later ones by their thread's CPU time, so that time the kernel gives others while
/// a slow-lane thread waits is not charged.
struct Resumed {
    at: Instant,
    /// The agent's blocked time when the slice began.
    blocked: Duration,
    thread: Option<(std::thread::ThreadId, Duration)>,
}

impl Resumed {
    fn at(at: Instant, blocking: &Blocking) -> Resumed {
        Resumed { at, blocked: blocking.total(), thread: None }
    }

    fn with_thread_time(blocking: &Blocking) -> Resumed {
        Resumed { at: Instant::now(), blocked: blocking.total(), thread: thread_time().map(|t| (std::thread::current().id(), t)) }
    }

    /// How long the slice ran until `now`: in CPU time if it is still on the thread it
    /// began on (a call can also move at an async host call).
    fn ran(&self, now: Instant, blocking: &Blocking) -> Duration {
        let by_clock = || now.duration_since(self.at).saturating_sub(blocking.total().saturating_sub(self.blocked));
        match self.thread {
            Some((thread, start)) if thread == std::thread::current().id() => thread_time().map_or_else(by_clock, |t| t.saturating_sub(start)),
            _ => by_clock(),
        }
    }
}

/// The calling thread's CPU time.
fn thread_time() -> Option<Duration> {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec to write to.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
    ok.then(|| Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_is_heavy_past_a_tenth_of_a_core_and_light_again_when_idle() {
        let slow = Arc::new(AtomicBool::new(false));
        let mut clock = CallClock::new(Duration::from_secs(1), slow.clone(), Blocking::default());
        let t0 = Instant::now();
        // 5 ms of every 10 ms: half a core, for 300 ms.
        for i in 0..30u32 {
            clock.decay(t0 + i * Duration::from_millis(10));
            clock.recent += 0.005;
        }
        assert!(clock.heavy());
        // A twentieth of a core settles below the line.
        let mut light = CallClock::new(Duration::from_secs(1), slow, Blocking::default());
        for i in 0..100u32 {
            light.decay(t0 + i * Duration::from_millis(20));
            light.recent += 0.001;
        }
        assert!(!light.heavy());
        // Idle for a second, the heavy one is light again.
        clock.decay(t0 + Duration::from_millis(1300));
        assert!(!clock.heavy());
    }
    #[test]
    fn time_blocked_on_io_is_not_charged_as_cpu() {
        let blocking = Blocking::default();
        let mut clock = CallClock::new(Duration::from_millis(50), Arc::default(), blocking.clone());
        clock.start();
        blocking.run(|| std::thread::sleep(Duration::from_millis(100)));
        assert!(clock.tick().is_ok(), "an fsync on a slow disk is not the agent's CPU");
        clock.start();
        std::thread::sleep(Duration::from_millis(100));
        assert!(clock.tick().is_err(), "time not spent blocked in a host call is");
    }
}
