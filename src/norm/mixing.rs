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

/// Element strides and extents of a channel-first (N, C, S…) view.
#[derive(Clone, Debug)]
pub(crate) struct Geometry {
    pub n: usize,
    pub c: usize,
    /// Positions per sample (product of the spatial extents).
    pub s: usize,
    sn: isize,
    pub sc: isize,
    sdims: Vec<usize>,
    sstr: Vec<isize>,
}

impl Geometry {
    pub fn of(shape: &[usize], strides: &[isize]) -> Self {
        Self {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
            sn: strides[0],
            sc: strides[1],
            sdims: shape[2..].to_vec(),
            sstr: strides[2..].to_vec(),
        }
    }

    /// Element offsets of channel 0 at positions p0..p1 (p = n·S + s, s flat in logical order).
    pub fn offsets(&self, p0: usize, p1: usize, out: &mut Vec<isize>) {
        out.clear();
        if p1 <= p0 || self.s == 0 {
            return;
        }
        let mut n = p0 / self.s;
        let mut r = p0 % self.s;
        let k = self.sdims.len();
        let mut idx = vec![0usize; k];
        for i in (0..k).rev() {
            idx[i] = r % self.sdims[i];
            r /= self.sdims[i];
        }
        let mut base: isize = n as isize * self.sn
            + (0..k)
                .map(|i| idx[i] as isize * self.sstr[i])
                .sum::<isize>();
        for _ in p0..p1 {
            out.push(base);
            // Odometer step over the spatial axes; past the last one, the next sample.
            let mut i = k;
            loop {
                if i == 0 {
                    n += 1;
                    base = n as isize * self.sn;
                    break;
                }
                i -= 1;
                idx[i] += 1;
                base += self.sstr[i];
                if idx[i] < self.sdims[i] {
                    break;
                }
                base -= self.sdims[i] as isize * self.sstr[i];
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

/// buf[j·C + c] = x[offs[j] + c·sc].
///
/// # Safety
/// Every offset (plus c·sc, c < C) must address an element of the view `ptr` came from.
unsafe fn gather<T: Scalar>(ptr: *const T, c: usize, sc: isize, offs: &[isize], buf: &mut [f64]) {
    if sc.abs() == 1 || offs.len() == 1 {
        for (j, &o) in offs.iter().enumerate() {
            let row = &mut buf[j * c..(j + 1) * c];
            for (k, v) in row.iter_mut().enumerate() {
                // SAFETY: forwarded from the caller.
                *v = unsafe { *ptr.offset(o + k as isize * sc) }.to_f64();
            }
        }
    } else {
        for k in 0..c {
            let ck = k as isize * sc;
            for (j, &o) in offs.iter().enumerate() {
                // SAFETY: forwarded from the caller.
                buf[j * c + k] = unsafe { *ptr.offset(o + ck) }.to_f64();
            }
        }
    }
}

/// y[offs[j] + c·sc] = buf[j·C + c], rounded once to T.
///
/// # Safety
/// As [`gather`], and no other thread writes these elements.
unsafe fn scatter<T: Scalar>(ptr: *mut T, c: usize, sc: isize, offs: &[isize], buf: &[f64]) {
    if sc.abs() == 1 || offs.len() == 1 {
        for (j, &o) in offs.iter().enumerate() {
            for (k, &v) in buf[j * c..(j + 1) * c].iter().enumerate() {
                // SAFETY: forwarded from the caller.
                unsafe { *ptr.offset(o + k as isize * sc) = T::from_f64(v) };
            }
        }
    } else {
        for k in 0..c {
            let ck = k as isize * sc;
            for (j, &o) in offs.iter().enumerate() {
                // SAFETY: forwarded from the caller.
                unsafe { *ptr.offset(o + ck) = T::from_f64(buf[j * c + k]) };
            }
        }
    }
}

/// Positions per tile for C channels and a budget of `elems` values per buffer.
pub fn tile_len(c: usize, elems: usize) -> usize {
    (elems / c.max(1)).max(1)
}

/// Runs `f(acc, inputs, out, len)` over tiles of `tile` positions of channel-first (N, C, S…)
/// views: `inputs[i][j·C + c]` is input i at the tile's j-th position and channel c (f64),
/// `out` (same layout, zero-initialized) is written back to `y` after `f` returns. Tiles are
/// grouped `per_task` to a task; each task starts from `init()` and the accumulators come back
/// in task order. The grouping depends only on the shape, never on the thread count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn for_tiles<T, A, I, F>(
    ins: &[&ArrayView<'_, T, IxDyn>],
    y: Option<ArrayViewMut<'_, T, IxDyn>>,
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
    F: Fn(&mut A, &[Vec<f64>], &mut [f64], usize) + Sync,
{
    let g0 = Geometry::of(ins[0].shape(), ins[0].strides());
    let c = g0.c;
    let positions = g0.n * g0.s;
    if positions == 0 || c == 0 {
        return Vec::new();
    }
    let geos: Vec<(Geometry, ConstPtr<T>)> = ins
        .iter()
        .map(|v| (Geometry::of(v.shape(), v.strides()), ConstPtr(v.as_ptr())))
        .collect();
    let mut y = y;
    let yg = y
        .as_mut()
        .map(|v| (Geometry::of(v.shape(), v.strides()), MutPtr(v.as_mut_ptr())));
    let tile = tile.max(1);
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
                // SAFETY: offsets of positions < N·S and channels < C lie inside the view.
                unsafe { gather(p.0, c, g.sc, &offs, &mut b[..len * c]) };
            }
            out[..len * c].fill(0.0);
            f(&mut acc, &bufs, &mut out[..len * c], len);
            if let Some((g, p)) = &yg {
                g.offsets(p0, p1, &mut offs);
                // SAFETY: in the view; tiles cover disjoint positions and `y` (an
                // ArrayViewMut) does not overlap itself, so no element is written twice.
                unsafe { scatter(p.0, c, g.sc, &offs, &out[..len * c]) };
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
    for k in 0..K {
        out[k] = tree(&acc[k]);
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
    fn offsets_match_logical_order() {
        let a = Array::from_shape_vec((2, 3, 2, 2).f(), (0..24).map(|v| v as f64).collect())
            .unwrap()
            .into_dyn();
        let v = a.view();
        let g = Geometry::of(v.shape(), v.strides());
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
