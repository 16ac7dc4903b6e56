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
//!   at once instead of sleeping until the pool is done (`run_shared`), and with helper threads
//!   that stay awake for 200 µs (`RSNORM_SPIN_US`) after each call (`hot`), so back-to-back
//!   calls do not pay a wake-up at either end; larger ones go to the pool (`install`), which
//!   scaled better there.
//!   Either way each task runs exactly once and writes its own memory, so results do not
//!   depend on the schedule.

use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// One parallel call shared by the calling thread and helpers. The caller never waits for a
/// helper that has not started: on this class of 2-vCPU VM a sleeping thread takes 20-35 µs to
/// wake, and with `install` (the caller blocked until the pool had finished) a ~1 MiB call on
/// two threads was slower than on one. Here the caller starts at once and a late helper finds
/// its share done. Helpers come from `hot` (awake between calls) and, when those are busy, from
/// the rayon pool.
///
/// The tasks are split into one contiguous range per participant, each walked from its front by
/// its owner (each thread's memory stream stays sequential, as with rayon's halving); a
/// participant that runs out steals from the back of the others' ranges, so a late helper
/// costs at most its wake-up, shared by both.
struct SharedCall {
    /// Per participant: `lo << 32 | hi`, the tasks `lo..hi` not yet claimed.
    ranges: Vec<Range>,
    /// Set by the caller once no task is left to claim. A helper may touch `body` only after
    /// registering in `running` while the call is open, and the caller returns only once the
    /// call is closed and `running` is 0 (both sequentially consistent: either the helper sees
    /// `closed`, or the caller sees it running).
    closed: AtomicBool,
    running: AtomicUsize,
    /// Where the caller sleeps if the last helper is still busy after the spin.
    idle: (Mutex<()>, Condvar),
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
                // SAFETY: see `closed`: the caller is still inside `run_shared`.
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
        self.running.fetch_add(1, Ordering::SeqCst);
        if !self.closed.load(Ordering::SeqCst) {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.work(me)));
            if let Err(p) = r {
                self.stop();
                *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            }
        }
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Under the lock: the caller checks `running` under it before sleeping.
            let _guard = self.idle.0.lock().unwrap_or_else(|e| e.into_inner());
            self.idle.1.notify_all();
        }
    }

    /// Closes the call and waits until no helper runs: spinning first (the last helper is
    /// finishing a task, usually within microseconds; sleeping would add a 20-35 µs wake-up
    /// to the call), then on the condition variable.
    fn close_and_wait(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let done = || self.running.load(Ordering::SeqCst) == 0;
        if spin_until(done) {
            return;
        }
        let mut guard = self.idle.0.lock().unwrap_or_else(|e| e.into_inner());
        while !done() {
            guard = self.idle.1.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// How long a thread polls before it sleeps: a hot helper for the next call, a caller for the
/// last helper of its call. Long enough to bridge the Python-side gap between consecutive ops
/// (a few µs to tens of µs), short enough that an idle program gives the core back within a
/// fraction of a scheduler tick. OpenMP runtimes and OpenBLAS spin the same way, and longer.
/// `RSNORM_SPIN_US` (read once) sets it; `0` never spins (for machines shared with other
/// busy processes, at the cost of a wake-up at both ends of every mid-size call).
pub const SPIN_US_DEFAULT: u64 = 200;

fn spin() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("RSNORM_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(SPIN_US_DEFAULT);
        std::time::Duration::from_micros(us)
    })
}

/// Polls `cond` for up to [`spin`]; true when it held. Yields the vCPU between rounds of polls, so
/// a thread that shares it (the caller itself, after a migration) runs instead of waiting for
/// the scheduler tick.
fn spin_until(cond: impl Fn() -> bool) -> bool {
    /// Polls between clock reads (a `pause` is ~20-60 cycles).
    const POLLS: u32 = 128;
    let (start, budget) = (std::time::Instant::now(), spin());
    while start.elapsed() < budget {
        for _ in 0..POLLS {
            if cond() {
                return true;
            }
            std::hint::spin_loop();
        }
        std::thread::yield_now();
    }
    cond()
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
        closed: AtomicBool::new(false),
        running: AtomicUsize::new(0),
        idle: (Mutex::new(()), Condvar::new()),
        body,
        panic: Mutex::new(None),
    });
    for me in 1..parts {
        let c = Arc::clone(&call);
        // A hot helper starts within a microsecond; a sleeping rayon worker takes 20-35 µs.
        if let Err(c) = hot::post(me - 1, c, me) {
            pool.spawn(move || c.help(me));
        }
    }
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call.work(0)));
    if mine.is_err() {
        call.stop();
    }
    call.close_and_wait();
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

/// Helper threads for shared calls that stay awake for a while after each call.
///
/// A rayon worker goes to sleep within microseconds of running out of work, and waking it on
/// this class of 2-vCPU VM takes 20-35 µs (the idle vCPU has halted): in a ~70 µs call such as
/// batch norm (256, 1024) it arrived after the caller had done most of the work, so two
/// threads ran no faster than one. PyTorch's OpenMP workers, like OpenBLAS's, spin for a while
/// after each region and join the next one at once. These helpers do the same for a bounded
/// time ([`spin`]), yielding the vCPU between polls, then park until a call is posted. Measured
/// with the caller's spin at the end of a call (`close_and_wait`), one process per build, 2
/// threads, medians of 400 calls: layer norm (1024, 1024) 44-51 → 25.5 µs; batch norm eval
/// (8, 256, 14, 14) 22-50 (bimodal) → 21-24 µs; batch norm train (256, 1024) with `out=`
/// 43-59 → 43-44 µs.
///
/// Each helper has one slot. A caller claims a free slot (compare-and-swap), puts its call in
/// and wakes the helper; a slot that is busy (another thread's call, or a nested call from
/// inside a task) is not waited for: the caller gives that share to the rayon pool instead.
mod hot {
    use super::{spin_until, SharedCall, FORK_GENERATION};
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Arc, Mutex};

    const FREE: u8 = 0;
    const CLAIMED: u8 = 1;
    const POSTED: u8 = 2;
    const BUSY: u8 = 3;

    struct Slot {
        /// FREE → CLAIMED (a caller) → POSTED (the caller) → BUSY (the helper) → FREE.
        state: AtomicU8,
        job: Mutex<Option<(Arc<SharedCall>, usize)>>,
    }

    struct Helpers {
        generation: usize,
        slots: Vec<(Arc<Slot>, std::thread::Thread)>,
    }

    static HELPERS: Mutex<Option<Helpers>> = Mutex::new(None);

    /// Hands `call` (participant `me`) to hot helper `index`, started on first use. Gives the
    /// call back when that helper is busy or cannot be started.
    pub(super) fn post(
        index: usize,
        call: Arc<SharedCall>,
        me: usize,
    ) -> Result<(), Arc<SharedCall>> {
        let Some((slot, thread)) = helper(index) else {
            return Err(call);
        };
        if slot
            .state
            .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(call);
        }
        *slot.job.lock().unwrap_or_else(|e| e.into_inner()) = Some((call, me));
        slot.state.store(POSTED, Ordering::Release);
        // A single atomic swap unless the helper is parked (then one futex wake).
        thread.unpark();
        Ok(())
    }

    fn helper(index: usize) -> Option<(Arc<Slot>, std::thread::Thread)> {
        let generation = FORK_GENERATION.load(Ordering::SeqCst);
        let mut guard = HELPERS.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|h| h.generation != generation) {
            // After a fork the old helpers do not exist in this process; their slots leak.
            *guard = Some(Helpers {
                generation,
                slots: Vec::new(),
            });
        }
        let helpers = guard.as_mut().expect("set above");
        while helpers.slots.len() <= index {
            let slot = Arc::new(Slot {
                state: AtomicU8::new(FREE),
                job: Mutex::new(None),
            });
            let mine = Arc::clone(&slot);
            let handle = std::thread::Builder::new()
                .name(format!("rsnorm-hot-{}", helpers.slots.len()))
                .spawn(move || serve(&mine))
                .ok()?;
            helpers.slots.push((slot, handle.thread().clone()));
        }
        let (slot, thread) = &helpers.slots[index];
        Some((Arc::clone(slot), thread.clone()))
    }

    fn serve(slot: &Slot) {
        loop {
            wait_posted(slot);
            slot.state.store(BUSY, Ordering::Relaxed);
            let job = slot.job.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((call, me)) = job {
                // `help` catches panics of the tasks and hands them to the caller.
                call.help(me);
            }
            slot.state.store(FREE, Ordering::Release);
        }
    }

    fn wait_posted(slot: &Slot) {
        let posted = || slot.state.load(Ordering::Acquire) == POSTED;
        if spin_until(posted) {
            return;
        }
        while !posted() {
            // `unpark` before `park` leaves a token, so a post is never missed.
            std::thread::park();
        }
    }
}
