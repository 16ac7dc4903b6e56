//! Shared machinery of the channel-mixing family (LRN, GDN, FRN/TLU, MVN, Lp normalize).
//!
//! Three access patterns, each layout-independent by construction (values are read in the
//! array's *logical* order and every output element is computed by the same f64 operations
//! whatever the strides, so a strided input gives bitwise the result of its contiguous copy and
//! the thread count never changes a bit):
//! * **tiles of positions** ([`for_tiles`]): ops that mix the C channels at each (n, spatial)
//!   position (LRN, GDN) gather a tile of L positions × C channels into a position-major f64
//!   buffer through precomputed element offsets, compute, and scatter the result. Tiles and
//!   tasks are cut from the shape alone, so per-task partial sums (GDN's ∂γ) merge in a fixed
//!   order;
//! * **planes** ([`sums2`]): per-(n, c) reductions over the spatial axes (FRN, TLU's ∂τ);
//! * **rows** ([`Rows`]): a reduction over an arbitrary set of axes (MVN, Lp normalize): the
//!   reduced axes are moved last, without copying, and each row is read in logical order.

use crate::reduce::{tree, SharedMut, LANES};
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, Axis, IxDyn};

/// Positions × channels per tile: 8192 f64 = 64 KiB per buffer, so a tile's inputs and output
/// stay in L2 while they are worked on.
pub const TILE_ELEMS: usize = 8192;

/// Element strides and extents of a view seen as positions × channels: the channel axis,
/// and all the other axes ("positions") in their logical order.
#[derive(Clone, Debug)]
pub(crate) struct Geometry {
    pub c: usize,
    pub sc: isize,
    pub positions: usize,
    pdims: Vec<usize>,
    pstr: Vec<isize>,
}

impl Geometry {
    pub fn of(shape: &[usize], strides: &[isize], axis: usize) -> Self {
        let pdims: Vec<usize> = (0..shape.len())
            .filter(|&a| a != axis)
            .map(|a| shape[a])
            .collect();
        let pstr = (0..shape.len())
            .filter(|&a| a != axis)
            .map(|a| strides[a])
            .collect();
        Self {
            c: shape[axis],
            sc: strides[axis],
            positions: pdims.iter().product(),
            pdims,
            pstr,
        }
    }

    /// Element offsets of channel 0 at positions p0..p1 (positions in logical order).
    pub fn offsets(&self, p0: usize, p1: usize, out: &mut Vec<isize>) {
        out.clear();
        if p1 <= p0 || self.positions == 0 {
            return;
        }
        let k = self.pdims.len();
        let mut idx = vec![0usize; k];
        let mut r = p0;
        for i in (0..k).rev() {
            idx[i] = r % self.pdims[i];
            r /= self.pdims[i];
        }
        let mut base: isize = (0..k).map(|i| idx[i] as isize * self.pstr[i]).sum();
        for _ in p0..p1 {
            out.push(base);
            // Odometer step; a full wrap only happens after the last position.
            let mut i = k;
            while i > 0 {
                i -= 1;
                idx[i] += 1;
                base += self.pstr[i];
                if idx[i] < self.pdims[i] {
                    break;
                }
                base -= self.pdims[i] as isize * self.pstr[i];
                idx[i] = 0;
            }
        }
    }
}

#[derive(Clone, Copy)]
struct ConstPtr<T>(*const T);
#[derive(Clone, Copy)]
struct MutPtr<T>(*mut T);
// SAFETY: the pointers come from live views borrowed for the whole call; reads are shared and
// writes go to disjoint positions per tile (see `for_tiles`).
unsafe impl<T: Sync> Send for ConstPtr<T> {}
unsafe impl<T: Sync> Sync for ConstPtr<T> {}
unsafe impl<T: Send> Send for MutPtr<T> {}
unsafe impl<T: Send> Sync for MutPtr<T> {}

/// The common step between consecutive offsets, if there is one.
fn uniform_step(offs: &[isize]) -> Option<isize> {
    if offs.len() < 2 {
        return Some(1);
    }
    let d = offs[1] - offs[0];
    offs.windows(2).all(|w| w[1] - w[0] == d).then_some(d)
}

/// Channel-major gather: buf[k·ld + j] = x[offs[j] + k·sc]; AVX2 where the CPU has it (exact
/// conversions to f64: the same values either way).
///
/// # Safety
/// Every offset (plus k·sc, k < C) must address an element of the view `ptr` came from.
unsafe fn gather<T: Scalar>(
    ptr: *const T,
    c: usize,
    sc: isize,
    offs: &[isize],
    ld: usize,
    buf: &mut [f64],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected; the rest is forwarded from the caller.
        unsafe { gather_avx2(ptr, c, sc, offs, ld, buf) };
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe { gather_impl(ptr, c, sc, offs, ld, buf) };
}

/// # Safety
/// As [`gather`], and the CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_avx2<T: Scalar>(
    ptr: *const T,
    c: usize,
    sc: isize,
    offs: &[isize],
    ld: usize,
    buf: &mut [f64],
) {
    // SAFETY: forwarded from the caller.
    unsafe { gather_impl(ptr, c, sc, offs, ld, buf) };
}

/// # Safety
/// As [`gather`].
#[inline(always)]
unsafe fn gather_impl<T: Scalar>(
    ptr: *const T,
    c: usize,
    sc: isize,
    offs: &[isize],
    ld: usize,
    buf: &mut [f64],
) {
    let len = offs.len();
    let step = uniform_step(offs);
    if sc.abs() == 1 && step != Some(1) {
        // Channels adjacent in memory (channels-last): read each position's channels in a row.
        for (j, &o) in offs.iter().enumerate() {
            for k in 0..c {
                // SAFETY: forwarded from the caller.
                buf[k * ld + j] = unsafe { *ptr.offset(o + k as isize * sc) }.to_f64();
            }
        }
        return;
    }
    for k in 0..c {
        let row = &mut buf[k * ld..k * ld + len];
        let ck = k as isize * sc;
        match step {
            Some(1) => {
                // SAFETY: `len` consecutive elements of the view start here.
                let src = unsafe { std::slice::from_raw_parts(ptr.offset(offs[0] + ck), len) };
                for (r, v) in row.iter_mut().zip(src) {
                    *r = v.to_f64();
                }
            }
            _ => {
                for (r, &o) in row.iter_mut().zip(offs) {
                    // SAFETY: forwarded from the caller.
                    *r = unsafe { *ptr.offset(o + ck) }.to_f64();
                }
            }
        }
    }
}

/// Channel-major scatter: y[offs[j] + k·sc] = buf[k·ld + j], rounded once to T; AVX2 where
/// the CPU has it (rounding to nearest either way: the same bits).
///
/// # Safety
/// As [`gather`], and no other thread touches these elements.
unsafe fn scatter<T: Scalar>(
    ptr: *mut T,
    c: usize,
    sc: isize,
    offs: &[isize],
    ld: usize,
    buf: &[f64],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected; the rest is forwarded from the caller.
        unsafe { scatter_avx2(ptr, c, sc, offs, ld, buf) };
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe { scatter_impl(ptr, c, sc, offs, ld, buf) };
}

/// # Safety
/// As [`scatter`], and the CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scatter_avx2<T: Scalar>(
    ptr: *mut T,
    c: usize,
    sc: isize,
    offs: &[isize],
    ld: usize,
    buf: &[f64],
) {
    // SAFETY: forwarded from the caller.
    unsafe { scatter_impl(ptr, c, sc, offs, ld, buf) };
}

/// # Safety
/// As [`scatter`].
#[inline(always)]
unsafe fn scatter_impl<T: Scalar>(
    ptr: *mut T,
    c: usize,
    sc: isize,
    offs: &[isize],
    ld: usize,
    buf: &[f64],
) {
    let len = offs.len();
    let step = uniform_step(offs);
    if sc.abs() == 1 && step != Some(1) {
        for (j, &o) in offs.iter().enumerate() {
            for k in 0..c {
                // SAFETY: forwarded from the caller.
                unsafe { *ptr.offset(o + k as isize * sc) = T::from_f64(buf[k * ld + j]) };
            }
        }
        return;
    }
    for k in 0..c {
        let row = &buf[k * ld..k * ld + len];
        let ck = k as isize * sc;
        match step {
            Some(1) => {
                // SAFETY: `len` consecutive elements owned by this task start here.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr.offset(offs[0] + ck), len) };
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = T::from_f64(v);
                }
            }
            _ => {
                for (&v, &o) in row.iter().zip(offs) {
                    // SAFETY: forwarded from the caller.
                    unsafe { *ptr.offset(o + ck) = T::from_f64(v) };
                }
            }
        }
    }
}

/// Positions per tile for C channels and a budget of `elems` values per buffer.
pub fn tile_len(c: usize, elems: usize) -> usize {
    (elems / c.max(1)).max(1)
}

/// out[i] = f(out[i], x[i]) for an element-wise f64 map, compiled for AVX2 where the CPU has
/// it (4 lanes instead of SSE2's 2). Callers pass only correctly rounded operations (add, mul,
/// div, sqrt) and Rust never contracts them into FMAs, so both builds give the same bits.
#[inline]
pub(crate) fn zip_apply<F: Fn(f64, f64) -> f64>(out: &mut [f64], x: &[f64], f: F) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        unsafe { zip_apply_avx2(out, x, f) };
        return;
    }
    zip_apply_base(out, x, f);
}

#[inline(always)]
fn zip_apply_base<F: Fn(f64, f64) -> f64>(out: &mut [f64], x: &[f64], f: F) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f(*o, v);
    }
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn zip_apply_avx2<F: Fn(f64, f64) -> f64>(out: &mut [f64], x: &[f64], f: F) {
    zip_apply_base(out, x, f);
}

/// out[i] = f(out[i], a[i], b[i], c[i]); AVX2 where the CPU has it, as [`zip_apply`].
#[inline]
pub(crate) fn zip3_apply<F: Fn(f64, f64, f64, f64) -> f64>(
    out: &mut [f64],
    a: &[f64],
    b: &[f64],
    c: &[f64],
    f: F,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        unsafe { zip3_apply_avx2(out, a, b, c, f) };
        return;
    }
    zip3_apply_base(out, a, b, c, f);
}

#[inline(always)]
fn zip3_apply_base<F: Fn(f64, f64, f64, f64) -> f64>(
    out: &mut [f64],
    a: &[f64],
    b: &[f64],
    c: &[f64],
    f: F,
) {
    let n = out.len().min(a.len()).min(b.len()).min(c.len());
    let (out, a, b, c) = (&mut out[..n], &a[..n], &b[..n], &c[..n]);
    for i in 0..n {
        out[i] = f(out[i], a[i], b[i], c[i]);
    }
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn zip3_apply_avx2<F: Fn(f64, f64, f64, f64) -> f64>(
    out: &mut [f64],
    a: &[f64],
    b: &[f64],
    c: &[f64],
    f: F,
) {
    zip3_apply_base(out, a, b, c, f);
}

/// Runs `f(acc, inputs, out, len, ld)` over tiles of `tile` positions of views that share
/// one shape, seen as positions × channels along `axis`: `inputs[i][k·ld + j]` is input i at
/// channel k and the tile's j-th position (f64, channel-major, ld = `tile`); `f` must write
/// every `out[k·ld + j]`, j < len, which is then rounded and written to `y`. Tiles are grouped
/// `per_task` to a task; each task starts from `init()` and the accumulators come back in task
/// order. The grouping depends only on the shape, never on the thread count or the layout.
#[allow(clippy::too_many_arguments)]
pub(crate) fn for_tiles<T, A, I, F>(
    ins: &[&ArrayView<'_, T, IxDyn>],
    y: Option<ArrayViewMut<'_, T, IxDyn>>,
    axis: usize,
    tile: usize,
    per_task: usize,
    parallel: bool,
    init: I,
    f: F,
) -> Vec<A>
where
    T: Scalar,
    A: Send,
    I: Fn() -> A + Sync,
    F: Fn(&mut A, &[Vec<f64>], &mut [f64], usize, usize) + Sync,
{
    let g0 = Geometry::of(ins[0].shape(), ins[0].strides(), axis);
    let c = g0.c;
    let positions = g0.positions;
    if positions == 0 || c == 0 {
        return Vec::new();
    }
    let geos: Vec<(Geometry, ConstPtr<T>)> = ins
        .iter()
        .map(|v| {
            (
                Geometry::of(v.shape(), v.strides(), axis),
                ConstPtr(v.as_ptr()),
            )
        })
        .collect();
    let mut y = y;
    let yg = y.as_mut().map(|v| {
        (
            Geometry::of(v.shape(), v.strides(), axis),
            MutPtr(v.as_mut_ptr()),
        )
    });
    let tile = tile.clamp(1, positions);
    let tiles = positions.div_ceil(tile);
    let per_task = per_task.max(1);
    let tasks = tiles.div_ceil(per_task);
    crate::pool::map_tasks(tasks, parallel, |t| {
        let mut acc = init();
        let mut bufs: Vec<Vec<f64>> = vec![vec![0.0; tile * c]; geos.len()];
        let mut out = vec![0.0f64; tile * c];
        let mut offs = Vec::with_capacity(tile);
        for ti in t * per_task..((t + 1) * per_task).min(tiles) {
            let p0 = ti * tile;
            let p1 = (p0 + tile).min(positions);
            let len = p1 - p0;
            for ((g, p), b) in geos.iter().zip(&mut bufs) {
                g.offsets(p0, p1, &mut offs);
                // SAFETY: offsets of positions < P and channels < C lie inside the view.
                unsafe { gather(p.0, c, g.sc, &offs, tile, b) };
            }
            f(&mut acc, &bufs, &mut out, len, tile);
            if let Some((g, p)) = &yg {
                g.offsets(p0, p1, &mut offs);
                // SAFETY: in the view; tiles cover disjoint positions and `y` (an
                // ArrayViewMut) does not overlap itself, so no element is written twice.
                unsafe { scatter(p.0, c, g.sc, &offs, tile, &out) };
            }
        }
        acc
    })
}

/// Canonical 8-lane sums (lane = logical index mod 8, lanes folded by `reduce::tree`) of the K
/// quantities `f(a_i, b_i)` over two views of one shape, in logical order.
pub(crate) fn sums2<T: Scalar, const K: usize, F: Fn(f64, f64) -> [f64; K]>(
    a: &ArrayView<'_, T, IxDyn>,
    b: &ArrayView<'_, T, IxDyn>,
    f: F,
) -> [f64; K] {
    let mut acc = [[0.0f64; LANES]; K];
    let mut add = |i: usize, v: [f64; K]| {
        for (k, x) in v.into_iter().enumerate() {
            acc[k][i % LANES] += x;
        }
    };
    match (a.as_slice(), b.as_slice()) {
        (Some(sa), Some(sb)) => {
            for (i, (x, y)) in sa.iter().zip(sb).enumerate() {
                add(i, f(x.to_f64(), y.to_f64()));
            }
        }
        _ => {
            for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                add(i, f(x.to_f64(), y.to_f64()));
            }
        }
    }
    let mut out = [0.0; K];
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = tree(a);
    }
    out
}

/// The input seen as rows over a set of reduced axes (moved last, in increasing order), the
/// kept axes leading, in their order; no copy.
pub(crate) struct Rows<'a, T> {
    x: ArrayView<'a, T, IxDyn>,
    lead: Vec<usize>,
    pub rows: usize,
    pub features: usize,
    perm: Vec<usize>,
}

impl<'a, T: Scalar> Rows<'a, T> {
    /// `reduced` must be sorted, distinct and in range.
    pub fn new(x: ArrayView<'a, T, IxDyn>, reduced: &[usize]) -> Self {
        let nd = x.ndim();
        let mut perm: Vec<usize> = (0..nd).filter(|a| !reduced.contains(a)).collect();
        let k = perm.len();
        perm.extend_from_slice(reduced);
        let x = x.permuted_axes(IxDyn(&perm));
        let lead = x.shape()[..k].to_vec();
        let rows = lead.iter().product();
        let features = x.shape()[k..].iter().product();
        Self {
            x,
            lead,
            rows,
            features,
            perm,
        }
    }

    pub fn index(&self, mut r: usize) -> Vec<usize> {
        let mut idx = vec![0; self.lead.len()];
        for (i, &d) in self.lead.iter().enumerate().rev() {
            idx[i] = r % d;
            r /= d;
        }
        idx
    }

    /// Row r as a view over the reduced axes.
    pub fn row(&self, r: usize) -> ArrayView<'a, T, IxDyn> {
        let mut v = self.x.clone();
        for i in self.index(r) {
            v = v.index_axis_move(Axis(0), i);
        }
        v
    }

    /// Another array of the same shape seen through the same permutation.
    pub fn same<'b, U>(&self, v: ArrayView<'b, U, IxDyn>) -> ArrayView<'b, U, IxDyn> {
        v.permuted_axes(IxDyn(&self.perm))
    }

    /// The output seen through the same permutation, for tasks to carve rows from.
    pub fn out<'b, U>(&self, y: ArrayViewMut<'b, U, IxDyn>) -> SharedMut<'b, U> {
        SharedMut::new(y.permuted_axes(IxDyn(&self.perm)))
    }

    /// Rows per task: about 64 KiB of input, so small rows are batched.
    pub fn per_task(&self) -> usize {
        (8192 / self.features.max(1)).max(1)
    }
}

/// Row `idx` of a permuted view (as from [`Rows::same`]).
pub(crate) fn row_of<'b, U>(v: &ArrayView<'b, U, IxDyn>, idx: &[usize]) -> ArrayView<'b, U, IxDyn> {
    let mut v = v.clone();
    for &i in idx {
        v = v.index_axis_move(Axis(0), i);
    }
    v
}

/// Walks a view's elements in logical order as runs along its last axis (trailing axes that
/// are contiguous with each other are merged into one run), for chunked reading and writing
/// without ndarray's per-element index arithmetic.
pub(crate) struct Cursor {
    dims: Vec<usize>,
    strides: Vec<isize>,
    idx: Vec<usize>,
    base: isize,
    at: usize,
    done: bool,
}

impl Cursor {
    pub fn new(shape: &[usize], strides: &[isize]) -> Self {
        let mut dims = shape.to_vec();
        let mut st = strides.to_vec();
        if dims.is_empty() {
            dims.push(1);
            st.push(1);
        }
        while dims.len() >= 2 {
            let n = dims.len();
            if st[n - 2] != dims[n - 1] as isize * st[n - 1] {
                break;
            }
            dims[n - 2] *= dims[n - 1];
            st[n - 2] = st[n - 1];
            dims.pop();
            st.pop();
        }
        let done = dims.contains(&0);
        let k = dims.len() - 1;
        Self {
            dims,
            strides: st,
            idx: vec![0; k],
            base: 0,
            at: 0,
            done,
        }
    }

    /// The next piece of at most `max` elements: (offset of its first element, length, step).
    fn next_run(&mut self, max: usize) -> Option<(isize, usize, isize)> {
        if self.done || max == 0 {
            return None;
        }
        let k = self.idx.len();
        let (run, step) = (self.dims[k], self.strides[k]);
        let take = (run - self.at).min(max);
        let piece = (self.base + self.at as isize * step, take, step);
        self.at += take;
        if self.at == run {
            self.at = 0;
            let mut i = k;
            loop {
                if i == 0 {
                    self.done = true;
                    break;
                }
                i -= 1;
                self.idx[i] += 1;
                self.base += self.strides[i];
                if self.idx[i] < self.dims[i] {
                    break;
                }
                self.base -= self.dims[i] as isize * self.strides[i];
                self.idx[i] = 0;
            }
        }
        Some(piece)
    }
}

/// Reads the next `buf.len()` (or fewer, at the end) elements in logical order as f64.
///
/// # Safety
/// `ptr` and `cur` must describe one live view.
pub(crate) unsafe fn read_chunk<T: Scalar>(
    ptr: *const T,
    cur: &mut Cursor,
    buf: &mut [f64],
) -> usize {
    let mut n = 0;
    while let Some((o, len, step)) = cur.next_run(buf.len() - n) {
        let dst = &mut buf[n..n + len];
        if step == 1 {
            // SAFETY: a run of `len` consecutive elements of the view.
            let src = unsafe { std::slice::from_raw_parts(ptr.offset(o), len) };
            for (d, v) in dst.iter_mut().zip(src) {
                *d = v.to_f64();
            }
        } else {
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: inside the view.
                *d = unsafe { *ptr.offset(o + i as isize * step) }.to_f64();
            }
        }
        n += len;
    }
    n
}

/// Writes `buf` (rounded to T) to the next `buf.len()` elements in logical order.
///
/// # Safety
/// `ptr` and `cur` must describe one live view the caller may write exclusively.
pub(crate) unsafe fn write_chunk<T: Scalar>(ptr: *mut T, cur: &mut Cursor, buf: &[f64]) {
    let mut n = 0;
    while let Some((o, len, step)) = cur.next_run(buf.len() - n) {
        let src = &buf[n..n + len];
        if step == 1 {
            // SAFETY: a run of `len` consecutive elements the caller owns.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr.offset(o), len) };
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = T::from_f64(v);
            }
        } else {
            for (i, &v) in src.iter().enumerate() {
                // SAFETY: inside the view, owned by the caller.
                unsafe { *ptr.offset(o + i as isize * step) = T::from_f64(v) };
            }
        }
        n += len;
    }
}

/// Values per chunk of the cursor readers: a multiple of the 8 lanes, so the canonical lane of
/// an element (its logical index mod 8) is its index in the chunk mod 8.
pub const CHUNK: usize = 4096;

/// Canonical 8-lane sums (see `reduce`) of K quantities, fed chunk by chunk.
pub(crate) struct Lanes<const K: usize> {
    acc: [[f64; LANES]; K],
}

impl<const K: usize> Lanes<K> {
    pub fn new() -> Self {
        Self {
            acc: [[0.0; LANES]; K],
        }
    }

    /// Adds `f(i)` for i in 0..n, element i of a chunk that starts at a multiple of 8.
    #[inline]
    pub fn add<F: Fn(usize) -> [f64; K]>(&mut self, n: usize, f: F) {
        for i in 0..n {
            for (a, v) in self.acc.iter_mut().zip(f(i)) {
                a[i % LANES] += v;
            }
        }
    }

    pub fn sums(&self) -> [f64; K] {
        let mut out = [0.0; K];
        for (o, a) in out.iter_mut().zip(&self.acc) {
            *o = tree(a);
        }
        out
    }
}

/// Checks that a scalar parameter is finite.
pub(crate) fn check_finite(name: &str, v: f64) -> crate::error::Result<()> {
    if !v.is_finite() {
        return Err(crate::error::NormError::Param(format!(
            "{name} must be a finite number, got {v}"
        )));
    }
    Ok(())
}

/// Checks that a second array (grad_y) has x's shape.
pub(crate) fn check_same_shape(name: &str, a: &[usize], x: &[usize]) -> crate::error::Result<()> {
    if a != x {
        return Err(crate::error::NormError::Shape(format!(
            "{name} must have the input's shape {}, got {}",
            crate::error::fmt_shape(x),
            crate::error::fmt_shape(a)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, ShapeBuilder};

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_maps_are_bitwise_the_baseline() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let x: Vec<f64> = (0..1001).map(|i| (i as f64 * 0.731).sin() * 3.0).collect();
        let d: Vec<f64> = (0..1001).map(|i| 1.0 + i as f64 * 0.013).collect();
        let f = |d: f64, v: f64| v / d.sqrt() + v * v;
        let (mut a, mut b) = (d.clone(), d.clone());
        zip_apply_base(&mut a, &x, f);
        // SAFETY: AVX2 was just detected.
        unsafe { zip_apply_avx2(&mut b, &x, f) };
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        let f3 = |s: f64, v: f64, g: f64, d: f64| g / d.sqrt() + 2.0 * v * s - g * v / (d * d);
        zip3_apply_base(&mut a, &x, &d, &d, f3);
        // SAFETY: AVX2 was just detected.
        unsafe { zip3_apply_avx2(&mut b, &x, &d, &d, f3) };
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_gather_scatter_are_bitwise_the_baseline() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let vals: Vec<half::f16> = (0..240)
            .map(|i| half::f16::from_f64((i as f64 * 0.37).sin() * 100.0))
            .collect();
        let (c, ld) = (6, 40);
        for (sc, offs) in [
            (1isize, (0..40).map(|j| j * 6).collect::<Vec<isize>>()),
            (40, (0..40).collect()),
        ] {
            let (mut a, mut b) = (vec![0.0; c * ld], vec![0.0; c * ld]);
            // SAFETY: every offset + k·sc < 240; AVX2 was detected.
            unsafe {
                gather_impl(vals.as_ptr(), c, sc, &offs, ld, &mut a);
                gather_avx2(vals.as_ptr(), c, sc, &offs, ld, &mut b);
            }
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
            let src: Vec<f64> = a.iter().map(|v| v * 1.000_123_4).collect();
            let (mut ya, mut yb) = (vec![half::f16::ZERO; 240], vec![half::f16::ZERO; 240]);
            let (mut fa, mut fb) = (vec![0.0f32; 240], vec![0.0f32; 240]);
            // SAFETY: as above, on output buffers of the same size.
            unsafe {
                scatter_impl(ya.as_mut_ptr(), c, sc, &offs, ld, &src);
                scatter_avx2(yb.as_mut_ptr(), c, sc, &offs, ld, &src);
                scatter_impl(fa.as_mut_ptr(), c, sc, &offs, ld, &src);
                scatter_avx2(fb.as_mut_ptr(), c, sc, &offs, ld, &src);
            }
            assert!(ya.iter().zip(&yb).all(|(p, q)| p.to_bits() == q.to_bits()));
            assert!(fa.iter().zip(&fb).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }

    #[test]
    fn cursor_walks_logical_order() {
        let a = Array::from_shape_vec((3, 4, 5).f(), (0..60).map(|v| v as f64).collect())
            .unwrap()
            .into_dyn();
        let v = a.view();
        let v = v.slice(ndarray::s![.., 1..3, ..;2]).into_dyn();
        let want: Vec<f64> = v.iter().copied().collect();
        let mut cur = Cursor::new(v.shape(), v.strides());
        let mut got = Vec::new();
        let mut buf = [0.0f64; 5];
        loop {
            // SAFETY: the cursor describes `v`.
            let n = unsafe { read_chunk(v.as_ptr(), &mut cur, &mut buf) };
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn offsets_match_logical_order() {
        let a = Array::from_shape_vec((2, 3, 2, 2).f(), (0..24).map(|v| v as f64).collect())
            .unwrap()
            .into_dyn();
        let v = a.view();
        let g = Geometry::of(v.shape(), v.strides(), 1);
        let mut offs = Vec::new();
        g.offsets(1, 7, &mut offs);
        let base = v.as_ptr();
        for (j, p) in (1..7).enumerate() {
            let (n, s) = (p / 4, p % 4);
            let want = v[[n, 0, s / 2, s % 2]];
            // SAFETY: offsets address elements of `v`.
            assert_eq!(unsafe { *base.offset(offs[j]) }, want);
        }
    }
}
