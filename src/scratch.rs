//! Reusable float64 scratch for per-block partial results.
//!
//! Deterministic reductions keep one partial result per fixed block until all blocks are done
//! and fold them in block order (see `reduce`). For the row ops' parameter gradients that is
//! `blocks × features` values, about 1 MiB per gradient for a (8192, 1024) layer-norm backward.
//! Allocated afresh on each call, glibc handed those pages back to the kernel after every call
//! (heap trimming) and took them again on the next one: about 250 page faults per call, 1.5 ms
//! of a 4 ms backward. A few freed buffers are kept here and reused instead.
//!
//! The free list is taken with `try_lock` only: a contended (or, in a `fork()` child,
//! orphaned) lock means a plain allocation, never a wait.

use std::sync::Mutex;

/// At most this many buffers, and this many bytes in all, are kept for reuse.
const KEEP_BUFFERS: usize = 8;
const KEEP_BYTES: usize = 64 << 20;

static FREE: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());

/// A float64 buffer of a requested length whose contents are unspecified (but initialized:
/// the values of an earlier use); it returns to the free list when dropped.
pub struct Scratch {
    buf: Vec<f64>,
}

impl Scratch {
    /// `len` values, each either 0.0 or left over from an earlier use: callers overwrite the
    /// parts they read.
    pub fn take(len: usize) -> Self {
        let mut buf = FREE
            .try_lock()
            .ok()
            .and_then(|mut free| {
                // The smallest kept buffer that is large enough.
                let i = (0..free.len())
                    .filter(|&i| free[i].capacity() >= len)
                    .min_by_key(|&i| free[i].capacity())?;
                Some(free.swap_remove(i))
            })
            .unwrap_or_default();
        buf.resize(len, 0.0);
        buf.truncate(len);
        Self { buf }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f64];
    fn deref(&self) -> &[f64] {
        &self.buf
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f64] {
        &mut self.buf
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let bytes = buf.capacity() * size_of::<f64>();
        if bytes == 0 || bytes > KEEP_BYTES {
            return;
        }
        if let Ok(mut free) = FREE.try_lock() {
            let kept: usize = free.iter().map(|b| b.capacity() * size_of::<f64>()).sum();
            if free.len() < KEEP_BUFFERS && kept + bytes <= KEEP_BYTES {
                free.push(buf);
            }
        }
    }
}

/// Per-task rows of `f` values of one buffer, handed to parallel tasks (task t owns row t).
pub struct Parts<'a> {
    ptr: *mut f64,
    rows: usize,
    f: usize,
    _life: std::marker::PhantomData<&'a mut [f64]>,
}

// SAFETY: each task takes only its own row (see `part`); f64 is Send.
unsafe impl Send for Parts<'_> {}
unsafe impl Sync for Parts<'_> {}

impl<'a> Parts<'a> {
    /// `buf` as rows of `f` values (its length a multiple of f; f = 0 gives empty rows).
    pub fn new(buf: &'a mut [f64], f: usize) -> Self {
        let rows = buf.len().checked_div(f).unwrap_or(0);
        Self {
            ptr: buf.as_mut_ptr(),
            rows,
            f,
            _life: std::marker::PhantomData,
        }
    }

    /// Row t, set to zeros (empty when there is no row t).
    ///
    /// # Safety
    /// At most one live slice per row: each task takes its own row once.
    pub unsafe fn zeroed(&self, t: usize) -> &'a mut [f64] {
        if t >= self.rows {
            return &mut [];
        }
        // SAFETY: row t lies inside the buffer (t < rows) and the caller owns it exclusively.
        let row = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(t * self.f), self.f) };
        row.fill(0.0);
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_zeroed_disjoint_rows() {
        let mut s = Scratch::take(12);
        s.fill(7.0);
        let p = Parts::new(&mut s, 4);
        // SAFETY: each row taken once.
        let (a, b) = unsafe { (p.zeroed(0), p.zeroed(2)) };
        a[3] = 1.0;
        b[0] = 2.0;
        // SAFETY: no row 3 exists: empty.
        assert!(unsafe { p.zeroed(3) }.is_empty());
        assert_eq!(
            &s[..],
            &[0.0, 0.0, 0.0, 1.0, 7.0, 7.0, 7.0, 7.0, 2.0, 0.0, 0.0, 0.0]
        );
        let mut e: [f64; 0] = [];
        // SAFETY: f = 0 has no rows.
        assert!(unsafe { Parts::new(&mut e, 0).zeroed(0) }.is_empty());
    }

    #[test]
    fn buffers_have_the_requested_length_when_reused() {
        for len in [1000, 10, 5000, 0, 1000] {
            let s = Scratch::take(len);
            assert_eq!(s.len(), len);
        }
    }
}
