//! The private rayon thread pool every kernel runs in.
//!
//! * Size: `set_num_threads(n)` if called, else `RAYON_NUM_THREADS`, else the number of CPUs.
//!   Changing the size builds a new pool; results do not depend on it (see `reduce`).
//! * Fork: rayon's worker threads do not exist in a `fork()` child (rayon issue #708), so a
//!   pool inherited from the parent would wait forever. A `pthread_atfork` child handler bumps a
//!   generation counter; the next call in the child builds a fresh pool and leaks the old one
//!   (dropping it would try to join threads that are gone).
//! * Small problems never touch the pool: waking a worker costs 20-35 µs on this class of VM,
//!   more than the whole work below `PARALLEL_MIN_BYTES`.

use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

/// Below this many bytes of input a kernel runs on the calling thread. About 512 KiB: the
/// point where splitting the work pays for the ~2 × 25 µs wake-up round trip on 2 vCPUs.
pub const PARALLEL_MIN_BYTES: usize = 512 * 1024;

static REQUESTED: AtomicUsize = AtomicUsize::new(0);
static FORK_GENERATION: AtomicUsize = AtomicUsize::new(0);
static POOL: Mutex<Option<PoolSlot>> = Mutex::new(None);
static ATFORK: Once = Once::new();

struct PoolSlot {
    generation: usize,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

extern "C" fn child_after_fork() {
    FORK_GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// Read once: `available_parallelism` parses cgroup files (~60 µs), far too slow per call.
fn default_threads() -> usize {
    static DEFAULT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *DEFAULT.get_or_init(read_default_threads)
}

fn read_default_threads() -> usize {
    if let Ok(v) = std::env::var("RAYON_NUM_THREADS") {
        if let Ok(n) = v.trim().parse::<usize>() {
            if n > 0 {
                return n;
            }
        }
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The number of threads kernels use.
pub fn num_threads() -> usize {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => default_threads(),
        n => n,
    }
}

/// Sets the number of threads; `0` returns to the default (`RAYON_NUM_THREADS` or the CPU count).
pub fn set_num_threads(n: usize) {
    REQUESTED.store(n, Ordering::SeqCst);
}

fn pool() -> Option<Arc<rayon::ThreadPool>> {
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic, which is async-signal-safe.
        #[cfg(unix)]
        unsafe {
            libc::pthread_atfork(None, None, Some(child_after_fork));
        }
    });
    let threads = num_threads();
    let generation = FORK_GENERATION.load(Ordering::SeqCst);
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.as_ref() {
        if s.generation == generation && s.threads == threads {
            return Some(s.pool.clone());
        }
    }
    if let Some(old) = slot.take() {
        if old.generation != generation {
            // The old pool's threads died with the parent: never join them.
            std::mem::forget(old.pool);
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("rsnorm-{i}"))
        .build()
        .ok()?;
    let pool = Arc::new(pool);
    *slot = Some(PoolSlot {
        generation,
        threads,
        pool: pool.clone(),
    });
    Some(pool)
}

/// Runs `f(i)` for every `i in 0..tasks`, in parallel when `parallel` and more than one thread
/// is configured. Tasks must write disjoint memory; the result never depends on the schedule.
pub fn for_each_task<F>(tasks: usize, parallel: bool, f: F)
where
    F: Fn(usize) + Send + Sync,
{
    if parallel && tasks > 1 && num_threads() > 1 {
        if let Some(p) = pool() {
            p.install(|| (0..tasks).into_par_iter().for_each(&f));
            return;
        }
    }
    (0..tasks).for_each(f);
}

/// True when a problem of `bytes` input bytes is worth running on the pool.
pub fn worth_parallel(bytes: usize) -> bool {
    bytes >= PARALLEL_MIN_BYTES && num_threads() > 1
}

/// Like [`for_each_task`], collecting `f(i)` in task order.
pub fn map_tasks<R, F>(tasks: usize, parallel: bool, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize) -> R + Send + Sync,
{
    if parallel && tasks > 1 && num_threads() > 1 {
        if let Some(p) = pool() {
            return p.install(|| (0..tasks).into_par_iter().map(&f).collect());
        }
    }
    (0..tasks).map(f).collect()
}
