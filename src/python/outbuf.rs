//! A bounded pool of reusable output buffers for large results.
//!
//! A fresh multi-megabyte output costs more than the normalization itself: the kernel faults in
//! and the OS zeroes every page (measured here: ~2 ms extra for 32 MiB, against ~1.5 ms for the
//! whole layer norm). onnxruntime's arena avoids this by reusing buffers; so does this pool:
//! an output ≥ `MIN_POOLED_BYTES` is carved from a 2 MiB-aligned, huge-page-advised block that
//! returns here when the NumPy array dies (its base object is a `PooledBuffer`), and the next
//! call of the same size reuses it without touching the OS.
//!
//! Bounds: at most `MAX_PER_SIZE` idle blocks per size and `RSNORM_POOL_MB` (default 256) MiB
//! idle in total; `RSNORM_POOL_MB=0` turns pooling off. When a returning block would exceed
//! a bound, the least recently returned idle blocks are freed first: the sizes a program
//! uses now stay pooled, and sizes it has moved on from go back to the OS (a first version
//! dropped the *returning* block instead, so after a few distinct large sizes the pool was
//! full of stale blocks and every new output paid its page faults again). A fork child starts with an empty pool
//! (its inherited blocks are forgotten, never freed twice). Buffers are handed out
//! uninitialized: every kernel writes every element of its output.

use std::alloc::{alloc, dealloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use numpy::{Element, PyArrayDyn};
use pyo3::prelude::*;

/// Below this, NumPy's allocator is as fast as a pool (no page faults worth avoiding).
const MIN_POOLED_BYTES: usize = 1 << 20;
/// Two per size: `y = f(x)` in a loop keeps the previous `y` alive while the next is made.
const MAX_PER_SIZE: usize = 2;
const ALIGN: usize = 2 << 20;

struct Block {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: a Block is a uniquely owned heap allocation; moving it between threads is fine.
unsafe impl Send for Block {}

impl Block {
    fn new(bytes: usize) -> Option<Block> {
        let layout = Layout::from_size_align(bytes, ALIGN).ok()?;
        // SAFETY: layout has a non-zero size (bytes >= MIN_POOLED_BYTES).
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            return None;
        }
        #[cfg(target_os = "linux")]
        // SAFETY: advising a range we own; failure only means no huge pages.
        unsafe {
            libc::madvise(ptr.cast(), bytes, libc::MADV_HUGEPAGE);
        }
        Some(Block { ptr, layout })
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in Block::new with this layout, freed once.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

struct Pool {
    generation: usize,
    /// Idle blocks, least recently returned first.
    idle: Vec<Block>,
    idle_bytes: usize,
}

impl Pool {
    /// The most recently returned idle block of exactly `bytes`.
    fn take(&mut self, bytes: usize) -> Option<Block> {
        let i = self.idle.iter().rposition(|b| b.layout.size() == bytes)?;
        self.idle_bytes -= bytes;
        Some(self.idle.remove(i))
    }

    /// Keeps `block` idle, freeing the least recently returned blocks the bounds require.
    fn give(&mut self, block: Block, limit: usize) {
        let bytes = block.layout.size();
        if bytes > limit {
            return; // dropped: freed
        }
        let same = self
            .idle
            .iter()
            .filter(|b| b.layout.size() == bytes)
            .count();
        if same >= MAX_PER_SIZE {
            if let Some(i) = self.idle.iter().position(|b| b.layout.size() == bytes) {
                self.idle_bytes -= bytes;
                self.idle.remove(i);
            }
        }
        while self.idle_bytes + bytes > limit && !self.idle.is_empty() {
            let old = self.idle.remove(0);
            self.idle_bytes -= old.layout.size();
        }
        self.idle_bytes += bytes;
        self.idle.push(block);
    }
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
static FORKS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn child_after_fork() {
    FORKS.fetch_add(1, Ordering::SeqCst);
}

fn limit_bytes() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        #[cfg(unix)]
        // SAFETY: the handler only touches an atomic.
        unsafe {
            libc::pthread_atfork(None, None, Some(child_after_fork));
        }
        std::env::var("RSNORM_POOL_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(256)
            .saturating_mul(1 << 20)
    })
}

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    let generation = FORKS.load(Ordering::SeqCst);
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = guard.get_or_insert_with(|| Pool {
        generation,
        idle: Vec::new(),
        idle_bytes: 0,
    });
    if pool.generation != generation {
        // Blocks inherited through fork() belong to the parent's bookkeeping: forget them.
        std::mem::forget(std::mem::take(&mut pool.idle));
        pool.idle_bytes = 0;
        pool.generation = generation;
    }
    f(pool)
}

/// The Python object that owns a pooled block while a NumPy array uses it.
#[pyclass(frozen, module = "rsnorm._rsnorm")]
pub struct PooledBuffer {
    block: Mutex<Option<Block>>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let Some(block) = self.block.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let limit = limit_bytes();
        with_pool(|p| p.give(block, limit));
    }
}

/// A C-order uninitialized array of `shape` from the pool, or `None` when the output is small,
/// pooling is off, or memory is short (the caller then allocates through NumPy).
pub fn pooled_array<'py, T: Element>(
    py: Python<'py>,
    shape: &[usize],
) -> Option<Bound<'py, PyArrayDyn<T>>> {
    let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let bytes = elems.checked_mul(std::mem::size_of::<T>())?;
    if bytes < MIN_POOLED_BYTES || limit_bytes() == 0 {
        return None;
    }
    let block = with_pool(|p| p.take(bytes)).or_else(|| Block::new(bytes))?;
    let ptr = block.ptr.cast::<T>();
    let owner = Bound::new(
        py,
        PooledBuffer {
            block: Mutex::new(Some(block)),
        },
    )
    .ok()?;
    // SAFETY: the block holds `elems` properly aligned T's (2 MiB alignment) and lives as long
    // as `owner`, which becomes the array's base object; it is never reallocated.
    let view =
        unsafe { ndarray::ArrayView::from_shape_ptr(ndarray::IxDyn(shape), ptr.cast_const()) };
    // SAFETY: as above; the returned array is the only user of the block.
    Some(unsafe { PyArrayDyn::<T>::borrow_from_array(&view, owner.into_any()) })
}

/// Idle bytes held by the pool (for tests and `build_info`).
pub fn idle_bytes() -> usize {
    with_pool(|p| p.idle_bytes)
}
