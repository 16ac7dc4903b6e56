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
//! * Mid-size calls (below `SHARED_MAX_BYTES`) are shared with the calling thread, which starts
//!   at once instead of sleeping until the pool is done (`run_shared`); larger ones go to the
//!   pool (`install`), which scaled better there. Either way each task runs exactly once and
//!   writes its own memory, so results do not depend on the schedule.

use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};

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
            if shared_call(tasks) {
                run_shared(&p, tasks, &f);
            } else {
                p.install(|| (0..tasks).into_par_iter().for_each(&f));
            }
            return;
        }
    }
    (0..tasks).for_each(f);
}

/// One parallel call shared by the calling thread and helper jobs on the pool. The caller never
/// waits for a helper that has not started: on this class of 2-vCPU VM a sleeping worker takes
/// 20-35 µs to wake, and with `install` (the caller blocked until the pool had finished) a
/// ~1 MiB call on two threads was slower than on one. Here the caller starts at once and a late
/// helper finds its share done.
///
/// The tasks are split into one contiguous range per participant, each walked from its front by
/// its owner (each thread's memory stream stays sequential, as with rayon's halving); a
/// participant that runs out steals from the back of the others' ranges, so a late helper
/// costs at most its wake-up, shared by both.
struct SharedCall {
    /// Per participant: `lo << 32 | hi`, the tasks `lo..hi` not yet claimed.
    ranges: Vec<Range>,
    /// (closed, running helpers): a helper may touch `body` only after registering while the
    /// call is open, and the caller returns only once it is closed and no helper runs.
    state: Mutex<(bool, usize)>,
    idle: Condvar,
    body: *const (dyn Fn(usize) + Sync + 'static),
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// One range per cache line pair: with the ranges side by side, every claim moved the line
/// between the two cores (+15-30 % on calls of 500-2000 small tasks).
#[repr(align(128))]
struct Range(AtomicU64);

// SAFETY: `body` points to a `Sync` closure, dereferenced only under the protocol above (the
// closure outlives every use); every other field is thread-safe.
unsafe impl Send for SharedCall {}
unsafe impl Sync for SharedCall {}

fn pack(lo: usize, hi: usize) -> u64 {
    ((lo as u64) << 32) | hi as u64
}

impl SharedCall {
    /// Claims the front task (`front`) or the back task of range `r`.
    fn claim(&self, r: usize, front: bool) -> Option<usize> {
        let cell = &self.ranges[r].0;
        let mut cur = cell.load(Ordering::Relaxed);
        loop {
            let (lo, hi) = ((cur >> 32) as usize, (cur & 0xffff_ffff) as usize);
            if lo >= hi {
                return None;
            }
            let (next, task) = if front {
                (pack(lo + 1, hi), lo)
            } else {
                (pack(lo, hi - 1), hi - 1)
            };
            match cell.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(task),
                Err(now) => cur = now,
            }
        }
    }

    fn work(&self, me: usize) {
        let n = self.ranges.len();
        for k in 0..n {
            let r = (me + k) % n;
            while let Some(i) = self.claim(r, r == me) {
                // SAFETY: see `state`: the caller is still inside `run_shared`.
                unsafe { (*self.body)(i) };
            }
        }
    }

    fn stop(&self) {
        for r in &self.ranges {
            r.0.store(0, Ordering::Relaxed);
        }
    }

    fn help(&self, me: usize) {
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.0 {
                return;
            }
            st.1 += 1;
        }
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.work(me))) {
            self.stop();
            *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 -= 1;
        if st.1 == 0 {
            self.idle.notify_all();
        }
    }
}

fn run_shared(pool: &rayon::ThreadPool, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let helpers = pool
        .current_num_threads()
        .min(num_threads() - 1)
        .min(tasks - 1);
    let parts = helpers + 1;
    // SAFETY: only the lifetime is erased; `SharedCall` never uses `body` after this function
    // returns (it waits below for every helper that registered before the call closed).
    let body: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
    let call = Arc::new(SharedCall {
        ranges: (0..parts)
            .map(|p| {
                Range(AtomicU64::new(pack(
                    tasks * p / parts,
                    tasks * (p + 1) / parts,
                )))
            })
            .collect(),
        state: Mutex::new((false, 0)),
        idle: Condvar::new(),
        body,
        panic: Mutex::new(None),
    });
    for me in 1..parts {
        let c = Arc::clone(&call);
        pool.spawn(move || c.help(me));
    }
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call.work(0)));
    if mine.is_err() {
        call.stop();
    }
    let mut st = call.state.lock().unwrap_or_else(|e| e.into_inner());
    st.0 = true;
    while st.1 > 0 {
        st = call.idle.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    drop(st);
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    let helper_panic = call.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = helper_panic {
        std::panic::resume_unwind(p);
    }
}

/// True when a problem of `bytes` input bytes is worth running on the pool.
pub fn worth_parallel(bytes: usize) -> bool {
    CALL_BYTES.with(|c| c.set(bytes));
    bytes >= PARALLEL_MIN_BYTES && num_threads() > 1
}

/// Below this many input bytes a parallel call is shared with the calling thread
/// (`run_shared`); above it the pool runs it while the caller sleeps (`install`). Measured on
/// 2 vCPUs, one process per build: sharing took batch norm (256, 1024) from 85 to 70 µs and the
/// eval calls of 1-2 MiB 10-15 % down, but made 12-25 MiB calls (instance norm (32,64,56,56),
/// 2048 tasks) 5-20 % slower, where two pool workers scaled better than caller + one worker.
pub const SHARED_MAX_BYTES: usize = 4 * 1024 * 1024;

thread_local! {
    /// The input size of the op running on this thread, as its `worth_parallel` saw it: the
    /// pool picks the scheduling per call without a parameter on every kernel's task loop.
    /// Threads that never called `worth_parallel` (pool workers running a nested call) get
    /// the pool scheme.
    static CALL_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Whether a call of `tasks` tasks is shared with the caller (the ranges pack two u32 bounds).
fn shared_call(tasks: usize) -> bool {
    CALL_BYTES.with(|c| c.get()) < SHARED_MAX_BYTES && u32::try_from(tasks).is_ok()
}

/// Like [`for_each_task`], collecting `f(i)` in task order.
pub fn map_tasks<R, F>(tasks: usize, parallel: bool, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize) -> R + Send + Sync,
{
    if parallel && tasks > 1 && num_threads() > 1 {
        if let Some(p) = pool() {
            if !shared_call(tasks) {
                return p.install(|| (0..tasks).into_par_iter().map(&f).collect());
            }
            // Each task fills its own slot; the slots are read after every task has finished.
            let slots: Vec<Mutex<Option<R>>> = (0..tasks).map(|_| Mutex::new(None)).collect();
            run_shared(&p, tasks, &|i| {
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(f(i));
            });
            return slots
                .into_iter()
                .map(|m| {
                    m.into_inner()
                        .unwrap_or_else(|e| e.into_inner())
                        .expect("every task ran")
                })
                .collect();
        }
    }
    (0..tasks).map(f).collect()
}
