//! Compiling in a child process, so that no module holds the host's cores past a deadline:
//! the host runs `tether compile-worker`, hands it the module on stdin and takes the
//! compiled artefact from a file, or kills it at the deadline. The child also has that
//! many seconds of CPU (`RLIMIT_CPU`), counted over all its threads, and dies with the host
//! (`PR_SET_PDEATHSIG`).
//!
//! A compile cannot be stopped inside the host's own process: cranelift has no
//! cancellation point, and a thread cannot be killed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Config, Engine};

/// How often a waiting host looks at its child.
const POLL: Duration = Duration::from_millis(5);

/// The engine configuration that decides how modules compile: the host's engine and the
/// compile worker's must agree on it (wasmtime checks an artefact's header against it).
pub(crate) fn compile_config(memory_mib: u32) -> Config {
    let memory = u64::from(memory_mib) << 20;
    let mut wasm = Config::new();
    wasm.epoch_interruption(true)
        // Memories never grow past the cap, so reserving more address space per slot
        // only costs page tables; a small guard keeps 10,000 slots within reach.
        .memory_reservation(memory)
        .memory_guard_size(64 << 10)
        .memory_reservation_for_growth(0)
        .async_stack_size(512 << 10)
        .max_wasm_stack(256 << 10);
    wasm
}

/// Why a child compile gave nothing.
#[derive(Debug)]
pub(crate) enum Failed {
    /// Past the deadline (or its CPU limit): stopped.
    Deadline(Duration),
    /// The host is shutting down: stopped.
    Abandoned,
    /// The child could not be run or waited for.
    Run(String),
    /// The module does not compile: the compiler's message.
    Refused(String),
}

/// A finished child compile: the artefact's temporary file, removed when dropped.
pub(crate) struct Artefact(PathBuf);

impl Artefact {
    /// Where it is, in the cache directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Loads it into `engine`.
    pub fn load(&self, engine: &Engine) -> wasmtime::Result<Component> {
        // SAFETY: the file was written just now by this host's own binary, for an engine of
        // the same configuration (wasmtime checks that again from the artefact's header).
        unsafe { Component::deserialize_file(engine, &self.0) }
    }
}

impl Drop for Artefact {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Compiles `bytes` with the `tether` binary `exe` into a file in `dir`, within `deadline`
/// of wall time and as many seconds of CPU.
/// `abandon` set stops it at once (the host is shutting down).
pub(crate) fn compile(exe: &Path, memory_mib: u32, bytes: &[u8], dir: &Path, deadline: Duration, abandon: &AtomicBool) -> Result<Artefact, Failed> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let failed = |what: &str, e: std::io::Error| Failed::Run(format!("{what}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| failed("cannot create the cache directory", e))?;
    let out = Artefact(dir.join(format!(".compiling-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))));
    let cpu_secs = deadline.as_secs().max(1) + 1;
    let mut command = Command::new(exe);
    command
        .args(["compile-worker", "--memory-mib", &memory_mib.to_string(), "--out"])
        .arg(&out.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: cpu_secs, rlim_max: cpu_secs };
            if libc::setrlimit(libc::RLIMIT_CPU, &limit) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| failed(&format!("cannot start {}", exe.display()), e))?;
    // The child reads all of stdin before it compiles: the write cannot block for long.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(bytes);
    }
    let status = loop {
        match child.try_wait().map_err(|e| failed("cannot wait for the compiler", e))? {
            Some(status) => break status,
            None if started.elapsed() > deadline || abandon.load(Ordering::Acquire) => {
                let _ = child.kill();
                let _ = child.wait();
                if abandon.load(Ordering::Acquire) {
                    return Err(Failed::Abandoned);
                }
                return Err(Failed::Deadline(deadline));
            }
            None => std::thread::sleep(POLL),
        }
    };
    if status.success() {
        return Ok(out);
    }
    {
        use std::os::unix::process::ExitStatusExt;
        // RLIMIT_CPU: SIGXCPU at the limit (SIGKILL a second later).
        if matches!(status.signal(), Some(libc::SIGXCPU | libc::SIGKILL)) {
            return Err(Failed::Deadline(deadline));
        }
    }
    let mut message = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut message);
    }
    // `tether` prints its error as "error: ...".
    Err(Failed::Refused(message.trim().trim_start_matches("error: ").to_owned()))
}

/// The child's side (`tether compile-worker`): compiles the module on stdin for an engine of
/// `memory_mib` and writes the artefact to `out`. Its error goes to stderr as one line.
pub fn serve(memory_mib: u32, out: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes)?;
    let engine = Engine::new(&compile_config(memory_mib))?;
    let component = Component::new(&engine, &bytes)?;
    // A scratch file the host reads once: no need to sync it.
    std::fs::write(out, component.serialize()?)?;
    Ok(())
}
