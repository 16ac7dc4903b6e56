//! Mean-variance normalization (ONNX `MeanVarianceNormalization`), forward and backward.
//!
//! ```text
//! μ = mean over `axes` of x,   σ = sqrt(mean over `axes` of (x − μ)²)   (biased)
//! y = (x − μ) / (σ + eps)                                  (ONNX: eps = 1e-9, added to σ)
//! ∂x = (g − mean(g)) / (σ + eps) − (x − μ)·Σ g·(x − μ) / (M·σ·(σ + eps)²)   (M values per
//!      group; the second term is 0 when σ = 0)
//! ```
//! ONNX's function body computes σ² as E[x²] − E[x]²; here it is the exact two-pass variance
//! in f64, which agrees with ONNX's reference data and does not cancel.
//!
//! Each group's sums are canonical (`reduce`: lane = logical index mod 32 over the group's
//! reduced values, one tree), read by one of three paths with identical arithmetic: runs
//! (the group's values lie in contiguous runs: NCHW with the default axes, or axes (2, 3),
//! (1, 2, 3)), interleaved (groups contiguous side by side at every reduced index: NHWC with
//! the default axes) and a chunked cursor for any other layout.

use super::common::{check_eps, check_out};
use super::mixing::{
    check_same_shape, read_chunk, row_of, write_chunk, Cursor, Lanes, Rows, CHUNK,
};
use crate::channel::normalize_axis;
use crate::error::{NormError, Result};
use crate::pool;
use crate::reduce::{self, tree, LANES};
use crate::scalar::Scalar;
use crate::stream::{
    as_f32, as_f32_mut, can_stream, prefetch_bytes, stream_f32, stream_fence, worth_streaming,
    StreamOp,
};
use multiversion::multiversion;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Normalizes, sorts and checks the reduced axes.
pub(crate) fn reduced_axes(axes: &[isize], ndim: usize) -> Result<Vec<usize>> {
    if axes.is_empty() {
        return Err(NormError::Param(
            "axes must name at least one axis to normalize over, got ()".into(),
        ));
    }
    let mut v = axes
        .iter()
        .map(|&a| normalize_axis(a, ndim, "axes"))
        .collect::<Result<Vec<_>>>()?;
    v.sort_unstable();
    if v.windows(2).any(|w| w[0] == w[1]) {
        return Err(NormError::Param(format!(
            "axes must not repeat an axis, got {axes:?}"
        )));
    }
    Ok(v)
}

/// Canonical sums of f over a view, read in chunks through a cursor.
fn row_sums<T: Scalar, const K: usize, F: Fn(f64) -> [f64; K]>(
    v: &ArrayView<'_, T, IxDyn>,
    buf: &mut [f64],
    f: F,
) -> [f64; K] {
    let mut cur = Cursor::new(v.shape(), v.strides());
    let mut l = Lanes::<K>::new();
    loop {
        // SAFETY: the cursor describes `v`.
        let n = unsafe { read_chunk(v.as_ptr(), &mut cur, buf) };
        if n == 0 {
            break;
        }
        l.add(n, |i| f(buf[i]));
    }
    l.sums()
}

/// (mean, biased standard deviation) of a row, exact two-pass in f64.
fn stats<T: Scalar>(row: &ArrayView<'_, T, IxDyn>, m: f64, buf: &mut [f64]) -> (f64, f64) {
    let [s] = row_sums(row, buf, |v| [v]);
    let mean = s / m;
    let [q] = row_sums(row, buf, |v| [(v - mean) * (v - mean)]);
    (mean, (q / m).sqrt())
}

fn bytes<T>(x: &ArrayView<'_, T, IxDyn>) -> usize {
    x.len().saturating_mul(std::mem::size_of::<T>())
}

/// Contiguous runs of a view: the trailing axes merged as far as they are contiguous with
/// each other; `Some((offsets, len))` when the innermost merged axis has stride 1 (`offsets`:
/// element offset of each run's first value, runs in logical order, each `len` long).
fn contiguous_runs(shape: &[usize], strides: &[isize]) -> Option<(Vec<isize>, usize)> {
    let mut dims = shape.to_vec();
    let mut st = strides.to_vec();
    if dims.is_empty() || dims.contains(&0) {
        return None;
    }
    // Unit axes never move the pointer: drop them so they cannot block a merge.
    let keep: Vec<usize> = (0..dims.len()).filter(|&i| dims[i] != 1).collect();
    if keep.is_empty() {
        return Some((vec![0], 1));
    }
    dims = keep.iter().map(|&i| dims[i]).collect();
    st = keep.iter().map(|&i| st[i]).collect();
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
    let k = dims.len() - 1;
    if st[k] != 1 {
        return None;
    }
    let len = dims[k];
    let outer: usize = dims[..k].iter().product();
    let mut offs = Vec::with_capacity(outer);
    let mut idx = vec![0usize; k];
    let mut base = 0isize;
    for _ in 0..outer {
        offs.push(base);
        let mut i = k;
        while i > 0 {
            i -= 1;
            idx[i] += 1;
            base += st[i];
            if idx[i] < dims[i] {
                break;
            }
            base -= dims[i] as isize * st[i];
            idx[i] = 0;
        }
    }
    Some((offs, len))
}

/// Runs shorter than this go through the chunked cursor path.
const MIN_RUN: usize = 64;

/// Adds `f(s[i])` to lane `(pos + i) mod LANES` of `acc`, i.e. the canonical lanes of a run that
/// starts at logical index `pos` of its row: bitwise the chunked [`Lanes`] sums.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn lanes_run<T: Scalar, F: Fn(f64) -> f64>(acc: &mut [f64; LANES], pos: usize, s: &[T], f: F) {
    let l0 = pos % LANES;
    let head = ((LANES - l0) % LANES).min(s.len());
    for (i, v) in s[..head].iter().enumerate() {
        acc[l0 + i] += f(v.to_f64());
    }
    let mut chunks = s[head..].chunks_exact(LANES);
    for c in &mut chunks {
        let c: &[T; LANES] = c.try_into().expect("chunks_exact yields LANES values");
        for l in 0..LANES {
            acc[l] += f(c[l].to_f64());
        }
    }
    for (l, v) in chunks.remainder().iter().enumerate() {
        acc[l] += f(v.to_f64());
    }
}

/// y = (x − mean)/den over a run, the same formula as the chunked path.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn apply_run<T: Scalar>(xs: &[T], ys: &mut [T], mean: f64, den: f64) {
    for (o, &v) in ys.iter_mut().zip(xs) {
        *o = T::from_f64((v.to_f64() - mean) / den);
    }
}

/// y = (x − mean)/den over a run, streaming f32 output when `stream`.
fn apply_run_any<T: Scalar>(xs: &[T], ys: &mut [T], mean: f64, den: f64, stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if stream {
        if let (Some(xf), Some(yf)) = (as_f32(xs), as_f32_mut(ys)) {
            // SAFETY: `stream` is only set when AVX-512F was detected.
            unsafe { stream_f32(xf, yf, StreamOp::Center { mean, den }) };
            return;
        }
    }
    let _ = stream;
    apply_run(xs, ys, mean, den);
}

/// Values per piece of the first (memory-bound) pass: 1 KiB of f32, a multiple of the lanes.
const PIECE: usize = 256;
/// How far ahead, in values, the first pass prefetches (across run boundaries).
/// 16 KiB of f32: measured best of 1–32 KiB (1.7 ms vs 2.5 ms without, 1 thread).
const AHEAD: usize = 4096;

/// (mean, sd) of a row read as contiguous runs: the same sums as [`stats`]. The first pass
/// streams from memory with a software prefetch a few KiB ahead in logical order (runs of one
/// row may be far apart, which the hardware prefetcher only learns after some misses); the
/// second re-reads the row from cache.
/// `next`: the first value of the row processed after this one (same run structure), which
/// the prefetch runs into when this row is shorter than the prefetch distance.
fn stats_runs<T: Scalar>(
    p: *const T,
    next: Option<*const T>,
    offs: &[isize],
    len: usize,
    m: f64,
) -> (f64, f64) {
    let run = |i: usize| {
        // SAFETY: the caller's offsets address runs of `len` values inside the row.
        unsafe { std::slice::from_raw_parts(p.offset(offs[i]), len) }
    };
    let total = offs.len() * len;
    let mut acc = [0.0f64; LANES];
    for i in 0..offs.len() {
        for (c, piece) in run(i).chunks(PIECE).enumerate() {
            let pos = i * len + c * PIECE;
            let q = pos + AHEAD;
            let target = if q < total {
                Some((p, q))
            } else {
                next.filter(|_| q - total < total).map(|n| (n, q - total))
            };
            if let Some((base, q)) = target {
                let (r, o) = (q / len, q % len);
                let n = PIECE.min(len - o);
                prefetch_bytes(
                    base.wrapping_offset(offs[r] + o as isize).cast::<u8>(),
                    n * std::mem::size_of::<T>(),
                );
            }
            lanes_run(&mut acc, pos, piece, reduce::ident);
        }
    }
    let mean = tree(&acc) / m;
    let mut acc = [0.0f64; LANES];
    for i in 0..offs.len() {
        lanes_run(&mut acc, i * len, run(i), |v| (v - mean) * (v - mean));
    }
    (mean, (tree(&acc) / m).sqrt())
}

/// (length, stride) of the dims merged into one uniformly strided axis in logical order
/// (unit dims dropped), or None when they do not merge.
fn merged(shape: &[usize], strides: &[isize]) -> Option<(usize, isize)> {
    let mut it = shape.iter().zip(strides).filter(|&(&d, _)| d != 1).rev();
    let Some((&d0, &s0)) = it.next() else {
        return Some((1, 1));
    };
    let (mut len, stride) = (d0, s0);
    for (&d, &st) in it {
        if st != len as isize * stride {
            return None;
        }
        len *= d;
    }
    Some((len, stride))
}

/// Kept values per task of the interleaved path: 16 f32 are one cache line, so tasks read
/// (and write) disjoint lines of every row.
const INTERLEAVED_GROUP: usize = 16;

/// acc[(i mod LANES)·g + j] += f(x[i·r + j], j) for rows i in 0..f: the canonical lanes of `g`
/// interleaved groups at once (the reduced index i is each group's logical index).
///
/// # Safety
/// Rows i·r .. i·r + g (i < f) must lie inside one live view.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
unsafe fn lanes_rows<T: Scalar, F: Fn(f64, usize) -> f64>(
    acc: &mut [f64],
    g: usize,
    p: *const T,
    f: usize,
    r: isize,
    func: F,
) {
    for i in 0..f {
        // SAFETY: forwarded from the caller.
        let row = unsafe { std::slice::from_raw_parts(p.offset(i as isize * r), g) };
        let l = i % LANES;
        for (j, (a, v)) in acc[l * g..(l + 1) * g].iter_mut().zip(row).enumerate() {
            *a += func(v.to_f64(), j);
        }
    }
}

/// [`lanes_rows`] with g = `INTERLEAVED_GROUP` known at compile time (whole vectors, no
/// bounds checks in the row loop), else the general form. Same operations either way.
///
/// # Safety
/// As [`lanes_rows`].
unsafe fn lanes_rows_any<T: Scalar, F: Fn(f64, usize) -> f64>(
    acc: &mut [f64],
    g: usize,
    p: *const T,
    f: usize,
    r: isize,
    func: F,
) {
    if g == INTERLEAVED_GROUP && acc.len() == LANES * INTERLEAVED_GROUP {
        let acc: &mut [[f64; INTERLEAVED_GROUP]] = acc.as_chunks_mut().0;
        // SAFETY: forwarded from the caller.
        unsafe { lanes_rows_fixed(acc, p, f, r, func) };
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { lanes_rows(acc, g, p, f, r, func) };
    }
}

/// [`lanes_rows`] for g = `INTERLEAVED_GROUP`.
///
/// # Safety
/// As [`lanes_rows`].
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
unsafe fn lanes_rows_fixed<T: Scalar, F: Fn(f64, usize) -> f64>(
    acc: &mut [[f64; INTERLEAVED_GROUP]],
    p: *const T,
    f: usize,
    r: isize,
    func: F,
) {
    let acc: &mut [[f64; INTERLEAVED_GROUP]; LANES] =
        acc.try_into().expect("LANES groups of accumulators");
    for i in 0..f {
        // SAFETY: forwarded from the caller.
        let row = unsafe { &*p.offset(i as isize * r).cast::<[T; INTERLEAVED_GROUP]>() };
        let a = &mut acc[i % LANES];
        for j in 0..INTERLEAVED_GROUP {
            a[j] += func(row[j].to_f64(), j);
        }
    }
}

/// y = (x − mean_j)/den_j over rows of `g` interleaved groups.
///
/// # Safety
/// As [`lanes_rows`], for x and for y; the y values are the caller's alone.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
unsafe fn apply_rows<T: Scalar>(
    px: *const T,
    rx: isize,
    py: *mut T,
    ry: isize,
    f: usize,
    mean: &[f64],
    den: &[f64],
) {
    let g = mean.len().min(den.len());
    for i in 0..f {
        // SAFETY: forwarded from the caller.
        let (xs, ys) = unsafe {
            (
                std::slice::from_raw_parts(px.offset(i as isize * rx), g),
                std::slice::from_raw_parts_mut(py.offset(i as isize * ry), g),
            )
        };
        for (((o, v), &m), &d) in ys.iter_mut().zip(xs).zip(mean).zip(den) {
            *o = T::from_f64((v.to_f64() - m) / d);
        }
    }
}

/// The interleaved path: every row's values are `f` steps of a common stride with the kept
/// values of one step contiguous (channels-last input reduced over N and the spatial axes).
/// A task takes `INTERLEAVED_GROUP` rows and walks all steps, each row summed in its own
/// canonical lanes: bitwise the chunked path.
#[allow(clippy::too_many_arguments)]
fn mvn_interleaved<T: Scalar>(
    px: *const T,
    rx: isize,
    py: *mut T,
    ry: isize,
    k: usize,
    f: usize,
    eps: f64,
    parallel: bool,
) {
    let ptrs = RowPtrs(px, py);
    let m = f as f64;
    pool::for_each_task(k.div_ceil(INTERLEAVED_GROUP), parallel, |t| {
        let (px, py) = ptrs.get();
        let k0 = t * INTERLEAVED_GROUP;
        let g = INTERLEAVED_GROUP.min(k - k0);
        let (px, py) = (px.wrapping_add(k0), py.wrapping_add(k0));
        let mut acc = vec![0.0f64; LANES * g];
        let fold = |acc: &[f64]| -> Vec<f64> {
            (0..g)
                .map(|j| {
                    let mut lanes = [0.0f64; LANES];
                    for (l, v) in lanes.iter_mut().enumerate() {
                        *v = acc[l * g + j];
                    }
                    tree(&lanes)
                })
                .collect()
        };
        // SAFETY: rows i·rx + k0 .. + g, i < f, are inside x (checked geometry).
        unsafe { lanes_rows_any(&mut acc, g, px, f, rx, |v, _| reduce::ident(v)) };
        let mean: Vec<f64> = fold(&acc).iter().map(|&s| s / m).collect();
        // A fixed-size copy, so the inner loop indexes it without bounds checks.
        let mut mp = [0.0f64; INTERLEAVED_GROUP];
        mp[..g].copy_from_slice(&mean);
        acc.fill(0.0);
        // SAFETY: as above.
        unsafe { lanes_rows_any(&mut acc, g, px, f, rx, |v, j| (v - mp[j]) * (v - mp[j])) };
        let den: Vec<f64> = fold(&acc).iter().map(|&q| (q / m).sqrt() + eps).collect();
        // SAFETY: as above, for x and y; columns k0.. of y are this task's.
        unsafe { apply_rows(px, rx, py, ry, f, &mean, &den) };
    });
}

/// The first elements of x and y, shareable by tasks.
#[derive(Clone, Copy)]
struct RowPtrs<T>(*const T, *mut T);
// SAFETY: the pointers come from views borrowed for the whole call; tasks read x and write
// disjoint rows of y.
unsafe impl<T: Sync> Send for RowPtrs<T> {}
unsafe impl<T: Sync> Sync for RowPtrs<T> {}
impl<T> RowPtrs<T> {
    // A method, so closures capture the whole (Send + Sync) struct, not its fields.
    fn get(self) -> (*const T, *mut T) {
        (self.0, self.1)
    }
}

/// MVN of `x` over `axes` into `y`.
///
/// Every row (one group of reduced values) is summed in the canonical order of `reduce` over
/// its logical index; rows whose values (in x and y) lie in contiguous runs, as the default
/// axes (0, 2, 3) of NCHW input do, are read run by run without a staging buffer, the second
/// pass and the output step re-reading the row from cache. Both paths do the same arithmetic.
///
/// # Errors
/// Empty, repeated or out-of-range axes, bad eps, `y` of another shape.
pub fn mean_variance_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    axes: &[isize],
    eps: f64,
) -> Result<()> {
    check_out(&x, &y)?;
    check_eps(eps)?;
    let red = reduced_axes(axes, x.ndim())?;
    let parallel = pool::worth_parallel(bytes(&x));
    let nd = x.ndim();
    let perm: Vec<usize> = (0..nd)
        .filter(|a| !red.contains(a))
        .chain(red.iter().copied())
        .collect();
    // The same permutation Rows applies (kept axes first), for the interleaved path.
    let xperm = x.clone().permuted_axes(IxDyn(&perm));
    let mut y = y;
    let py_first = y.as_mut_ptr();
    let rows = Rows::new(x, &red);
    let yp = rows.out(y);
    let m = rows.features as f64;
    let per = rows.per_task();
    if rows.rows == 0 || rows.features == 0 {
        return Ok(());
    }
    // Rows share shape and strides, so the run structure of row 0 is that of every row.
    let x0 = rows.row(0);
    let nred = x0.ndim();
    let ystr = yp.strides()[yp.strides().len() - nred..].to_vec();
    let runs = match (
        contiguous_runs(x0.shape(), x0.strides()),
        contiguous_runs(x0.shape(), &ystr),
    ) {
        (Some((xo, len)), Some((yo, ylen))) if len == ylen && len >= MIN_RUN => Some((xo, yo, len)),
        _ => None,
    };
    if runs.is_none() {
        // Channels-last style: kept values contiguous, reduced ones one strided axis.
        let k = nd - nred;
        let yfull = (yp.shape().to_vec(), yp.strides().to_vec());
        let geo = (
            merged(&xperm.shape()[..k], &xperm.strides()[..k]),
            merged(x0.shape(), x0.strides()),
            merged(&yfull.0[..k], &yfull.1[..k]),
            merged(x0.shape(), &ystr),
        );
        if let (Some((kl, 1)), Some((f, rx)), Some((_, 1)), Some((_, ry))) = geo {
            if kl >= 2 && f >= 2 {
                mvn_interleaved(xperm.as_ptr(), rx, py_first, ry, kl, f, eps, parallel);
                return Ok(());
            }
        }
    }
    if let Some((xo, yo, len)) = runs {
        let stream = worth_streaming(bytes(&x0) * rows.rows) && can_stream();
        // Row bases from the kept axes' strides: no per-row views (their IxDyn allocations
        // cost 20 % on rows of a few KiB).
        let k = nd - nred;
        let (xs0, xst) = (xperm.shape()[..k].to_vec(), xperm.strides()[..k].to_vec());
        let yst = yp.strides()[..k].to_vec();
        let base = |mut r: usize, st: &[isize]| -> isize {
            let mut o = 0isize;
            for (i, &d) in xs0.iter().enumerate().rev() {
                o += (r % d) as isize * st[i];
                r /= d;
            }
            o
        };
        let ptrs = RowPtrs(xperm.as_ptr(), py_first);
        pool::for_each_task(rows.rows.div_ceil(per), parallel, |t| {
            let (x_first, y_first) = ptrs.get();
            for r in t * per..((t + 1) * per).min(rows.rows) {
                let px = x_first.wrapping_offset(base(r, &xst));
                let next = (r + 1 < rows.rows).then(|| x_first.wrapping_offset(base(r + 1, &xst)));
                let (mean, sd) = stats_runs(px, next, &xo, len, m);
                let den = sd + eps;
                // Task t owns rows t·per.. of the output.
                let py = y_first.wrapping_offset(base(r, &yst));
                for (&ox, &oy) in xo.iter().zip(&yo) {
                    // SAFETY: runs of `len` values inside this row of x and of y (same run
                    // structure, checked above); the y row is this task's alone.
                    let (xs, ys) = unsafe {
                        (
                            std::slice::from_raw_parts(px.offset(ox), len),
                            std::slice::from_raw_parts_mut(py.offset(oy), len),
                        )
                    };
                    apply_run_any(xs, ys, mean, den, stream);
                }
            }
            stream_fence(stream);
        });
        return Ok(());
    }
    pool::for_each_task(rows.rows.div_ceil(per), parallel, |t| {
        let mut buf = vec![0.0f64; CHUNK];
        for r in t * per..((t + 1) * per).min(rows.rows) {
            let xr = rows.row(r);
            let (mean, sd) = stats(&xr, m, &mut buf);
            let den = sd + eps;
            // SAFETY: task t owns rows t·per.. of the output.
            let mut yr = unsafe { yp.sub(&rows.index(r)) };
            let (mut cx, mut cy) = (
                Cursor::new(xr.shape(), xr.strides()),
                Cursor::new(yr.shape(), yr.strides()),
            );
            let py = yr.as_mut_ptr();
            loop {
                // SAFETY: each cursor describes its view; the output row is this task's.
                let n = unsafe { read_chunk(xr.as_ptr(), &mut cx, &mut buf) };
                if n == 0 {
                    break;
                }
                for v in &mut buf[..n] {
                    *v = (*v - mean) / den;
                }
                // SAFETY: as above.
                unsafe { write_chunk(py, &mut cy, &buf[..n]) };
            }
        }
    });
    Ok(())
}

/// Backward of [`mean_variance_norm`]: writes ∂L/∂x into `dx`.
///
/// # Errors
/// As the forward; `grad_y`/`dx` of another shape than `x`.
pub fn mean_variance_norm_backward<T: Scalar>(
    grad_y: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    axes: &[isize],
    eps: f64,
) -> Result<()> {
    check_same_shape("grad_y", grad_y.shape(), x.shape())?;
    check_out(&x, &dx)?;
    check_eps(eps)?;
    let red = reduced_axes(axes, x.ndim())?;
    let parallel = pool::worth_parallel(2 * bytes(&x));
    let rows = Rows::new(x, &red);
    let gp = rows.same(grad_y);
    let dp = rows.out(dx);
    let m = rows.features as f64;
    let per = rows.per_task();
    pool::for_each_task(rows.rows.div_ceil(per), parallel, |t| {
        let mut bx = vec![0.0f64; CHUNK];
        let mut bg = vec![0.0f64; CHUNK];
        for r in t * per..((t + 1) * per).min(rows.rows) {
            let idx = rows.index(r);
            let xr = rows.row(r);
            let gr = row_of(&gp, &idx);
            let (mean, sd) = stats(&xr, m, &mut bx);
            let den = sd + eps;
            let chunks = |bx: &mut [f64], bg: &mut [f64], f: &mut dyn FnMut(&mut [f64], &[f64])| {
                let (mut cx, mut cg) = (
                    Cursor::new(xr.shape(), xr.strides()),
                    Cursor::new(gr.shape(), gr.strides()),
                );
                loop {
                    // SAFETY: each cursor describes its view.
                    let n = unsafe { read_chunk(xr.as_ptr(), &mut cx, bx) };
                    if n == 0 {
                        break;
                    }
                    // SAFETY: as above; g has x's shape, so the counts agree.
                    unsafe { read_chunk(gr.as_ptr(), &mut cg, &mut bg[..n]) };
                    f(&mut bx[..n], &bg[..n]);
                }
            };
            let mut l = Lanes::<2>::new();
            chunks(&mut bx, &mut bg, &mut |x, g| {
                l.add(x.len(), |i| [g[i], g[i] * (x[i] - mean)])
            });
            let [sg, sgd] = l.sums();
            let gm = sg / m;
            let k = if sd > 0.0 {
                sgd / (m * sd * den * den)
            } else {
                0.0
            };
            // SAFETY: task t owns rows t·per.. of dx.
            let mut dr = unsafe { dp.sub(&idx) };
            let mut cd = Cursor::new(dr.shape(), dr.strides());
            let pd = dr.as_mut_ptr();
            chunks(&mut bx, &mut bg, &mut |x, g| {
                for (v, &g) in x.iter_mut().zip(g) {
                    *v = (g - gm) / den - (*v - mean) * k;
                }
                // SAFETY: this task's row of dx, in logical order.
                unsafe { write_chunk(pd, &mut cd, x) };
            });
        }
    });
    Ok(())
}
