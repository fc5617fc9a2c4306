//! Measuring helpers shared by the benchmark programs in `tests/benches/`.

use std::time::Duration;

/// This process's resident set size, KiB (0 where /proc is unavailable).
pub fn rss_kib() -> u64 {
    proc_kib("/proc/self/status", "VmRSS:")
}

/// This process's proportional set size, KiB: resident pages with each shared page split
/// among the mappings that share it (0 where /proc is unavailable). Every agent maps its
/// module's initial memory image from one shared file, which RSS counts once per agent
/// and PSS once in all.
pub fn pss_kib() -> u64 {
    proc_kib("/proc/self/smaps_rollup", "Pss:")
}

/// The KiB figure of the line starting with `key` in a /proc file (0 if absent).
fn proc_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// CPU time this thread has used: with wall time, it tells a cost from time spent
/// preempted on a busy machine.
pub fn thread_cpu() -> Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time the whole process has used (every thread).
pub fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock(clock: libc::clockid_t) -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given.
    if unsafe { libc::clock_gettime(clock, &mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Bytes the process's malloc has handed out and not yet taken back, KiB: the host's own
/// heap, apart from guest memories, stacks and the allocator's free pages.
pub fn heap_kib() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    // Large blocks (over 128 KiB: a big map's table, say) are mmapped and counted apart.
    ((info.uordblks + info.hblkhd) / 1024) as u64
}

/// Gives the allocator's free pages back to the kernel, so that an RSS read next counts
/// what is in use rather than what was freed a moment ago (glibc keeps freed heap).
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns free pages; it changes nothing in use.
    unsafe { libc::malloc_trim(0) };
}

/// The number of memory mappings of this process (0 where /proc is unavailable).
pub fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").map(|s| s.lines().count()).unwrap_or(0)
}

/// The `p` quantile (0..=1) of sorted samples; zero for no samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
}
