//! The canonical reduction every statistic goes through, and the element-wise apply step.
//!
//! **Canonical sum.** A sequence v₀ … vₙ₋₁ (in the *logical* order of the array, whatever its
//! strides) is summed in f64 into 32 lanes, lane l receiving vᵢ for i ≡ l (mod 32) in
//! increasing i, and the lanes are combined by a fixed pairwise tree (l0+l1, l2+l3, …, then
//! pairs of those, …).
//! Every memory layout path (a contiguous slice, a strided view, rows of a channels-last
//! sample) reproduces exactly this sequence of f64 operations, so a strided input gives bitwise
//! the result of its contiguous copy, and the thread count never changes a bit: work is split
//! by data (whole sums per task), and partial sums are folded in a fixed order by the caller.
//! The 32 lanes are four independent 8-wide f64 accumulators: the compiler vectorizes the loop
//! (no fast-math needed) and the add latency is hidden (4 cycles × 2 adds per cycle).
//!
//! **Steps.** The kernels take the *step* `acc ← step(acc, v)` rather than a map whose result
//! is added, so that a squared deviation enters its lane with one rounding: [`add_sq_dev`] is
//! `fma(v − m, v − m, acc)`. That is one f64 operation fewer per value than `acc + (v − m)²`
//! (the second pass of the statistics is bound by exactly these operations when its data is in
//! cache: 24 % less time measured) and never less accurate. Every path that computes the same
//! statistic uses the same step, so the layout and thread contracts are unchanged.

use crate::scalar::Scalar;
use multiversion::multiversion;
use ndarray::{ArrayView, ArrayViewMut, IxDyn, RawArrayViewMut, Zip};

/// Number of accumulator lanes of the canonical sum.
pub const LANES: usize = 32;

/// The fixed pairwise combination of the lanes.
#[inline(always)]
pub fn tree(a: &[f64; LANES]) -> f64 {
    let mut v = *a;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            v[i] = v[2 * i] + v[2 * i + 1];
        }
    }
    v[0]
}

/// The identity map, for the kernels that add a mapped value (the backward's): use it instead
/// of `|v| v`, see [`add`].
#[inline(always)]
pub fn ident(v: f64) -> f64 {
    v + 0.0
}

/// The step of a canonical sum of the values themselves: `acc + v`.
///
/// Written `acc + (v + 0.0)` ([`ident`]): `v + 0.0` differs from `v` only for v = −0.0, and a
/// sum that starts at +0.0 can never tell the difference (x + (−0.0) = x + 0.0 for every x ≠ −0.0, and no lane is
/// ever −0.0), so results are bitwise those of `acc + v`. It exists for speed: with a bare
/// `acc + v` LLVM's SLP vectorizer turns `sum_slice` into a shuffle-heavy 128-bit loop (measured
/// 2.7× slower on AVX-512); the explicit add makes it see the same shape as every other step.
#[inline(always)]
pub fn add(acc: f64, v: f64) -> f64 {
    acc + ident(v)
}

/// The step of a canonical sum of squared deviations from `m`: `(v − m)² + acc`, fused (one
/// rounding). Every second pass of the statistics family goes through this one formula.
/// `mul_add` is one instruction in the FMA-enabled builds of the kernels (`multiversion`);
/// only the portable fallback pays for a library call.
#[inline(always)]
pub fn add_sq_dev(acc: f64, v: f64, m: f64) -> f64 {
    let d = v - m;
    d.mul_add(d, acc)
}

/// The step of a canonical sum of squares: `v² + acc`, fused like [`add_sq_dev`].
///
/// Squared as `ident(v)²` (the same value: only the sign of a zero differs) for the reason
/// given at [`add`]: `v.mul_add(v, acc)` alone made LLVM shuffle the lanes (1.8× slower).
#[inline(always)]
pub fn add_sq(acc: f64, v: f64) -> f64 {
    let d = ident(v);
    d.mul_add(d, acc)
}

/// The step of the backward's canonical sum Σ g·d: `g·d + acc`, fused (one rounding) like
/// [`add_sq_dev`]. Every path of every backward that sums g·(x − m) uses it.
#[inline(always)]
pub fn add_prod(acc: f64, g: f64, d: f64) -> f64 {
    g.mul_add(d, acc)
}

/// Canonical sum over a contiguous slice with the step `f(acc, x)` (e.g. [`add`]).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn sum_slice<T: Scalar, F: Fn(f64, f64) -> f64>(s: &[T], f: F) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        // A fixed-size chunk lets the compiler keep the lanes in vector registers.
        let c: &[T; LANES] = c.try_into().expect("chunks_exact yields LANES values");
        for l in 0..LANES {
            acc[l] = f(acc[l], c[l].to_f64());
        }
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        // The tail as one more full chunk whose missing lanes keep their value (a select).
        // Updating lane by lane made the compiler spill the lanes for scalar updates and
        // reload them as vectors for the tree (store-forwarding stalls: a plane of 196 values
        // took 16 % longer than one of 192).
        let mut last = [T::from_f64(0.0); LANES];
        crate::stream::load_tail(&mut last, rem);
        for l in 0..LANES {
            let v = f(acc[l], last[l].to_f64());
            acc[l] = if l < rem.len() { v } else { acc[l] };
        }
    }
    tree(&acc)
}

/// `sum_slice(s, add)`, bitwise, with explicit vectors for f32 and f64 on AVX2/AVX-512.
///
/// Through the generic kernel the plain sum needs [`add`]'s extra `+ 0.0` per value (else
/// LLVM's SLP vectorizer shuffles the lanes); written with intrinsics it is one conversion and
/// one add per value: 53 → 37 ps per f32 value from L1 on AVX-512. The first pass of the
/// statistics mostly waits on memory, so whole ops gain less (layer norm rows 9–15 %, NCHW
/// batch norm 5 %, group/instance norm nothing measurable). Same lanes, order and tree.
pub fn sum_slice_add<T: Scalar>(s: &[T]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if let Some(total) = plain_sum::sum(s) {
        return total;
    }
    sum_slice(s, add)
}

#[cfg(target_arch = "x86_64")]
mod plain_sum {
    use super::LANES;
    use std::arch::x86_64::*;

    /// The canonical plain sum of `s`, where a vector kernel exists for its type and this CPU.
    pub fn sum<T: 'static>(s: &[T]) -> Option<f64> {
        let level = crate::stream::simd_level();
        if let Some(v) = crate::stream::as_f32(s) {
            let mut last = [0.0f32; LANES];
            let (full, rem) = v.as_chunks::<LANES>();
            if !rem.is_empty() {
                crate::stream::load_tail(&mut last, rem);
            }
            // SAFETY: the level says which instructions the CPU has.
            let last = (!rem.is_empty()).then_some(&last);
            return match level {
                2 => Some(unsafe { f32_avx512(full, last) }),
                1 => Some(unsafe { f32_avx2(full, last) }),
                _ => None,
            };
        }
        if let Some(v) = crate::stream::as_f64(s) {
            let mut last = [0.0f64; LANES];
            let (full, rem) = v.as_chunks::<LANES>();
            last[..rem.len()].copy_from_slice(rem);
            // SAFETY: as above.
            let last = (!rem.is_empty()).then_some(&last);
            return match level {
                2 => Some(unsafe { f64_avx512(full, last) }),
                1 => Some(unsafe { f64_avx2(full, last) }),
                _ => None,
            };
        }
        None
    }

    // Each kernel: lane l of `acc` gets value l of every 32-value chunk, in order; the tail
    // chunk comes zero-padded, and adding +0.0 leaves a lane unchanged (no lane is ever −0.0,
    // see `add`), exactly as the generic kernel's select.

    #[target_feature(enable = "avx512f")]
    unsafe fn f32_avx512(full: &[[f32; LANES]], last: Option<&[f32; LANES]>) -> f64 {
        let (mut a, mut acc) = ([_mm512_setzero_pd(); 4], [0.0f64; LANES]);
        for c in full.iter().chain(last) {
            for (j, aj) in a.iter_mut().enumerate() {
                // SAFETY: 8 values at 8j of a 32-value chunk.
                let v = unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * j)) };
                *aj = _mm512_add_pd(*aj, _mm512_cvtps_pd(v));
            }
        }
        for (j, aj) in a.iter().enumerate() {
            // SAFETY: lanes 8j..8j+8 of acc.
            unsafe { _mm512_storeu_pd(acc.as_mut_ptr().add(8 * j), *aj) };
        }
        // The tree here, in the kernel's instruction set: from the caller, its reads of the
        // lanes stalled on the wide stores (no store-to-load forwarding: +12 % on a 1024-wide
        // layer norm).
        super::tree(&acc)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn f32_avx2(full: &[[f32; LANES]], last: Option<&[f32; LANES]>) -> f64 {
        let (mut a, mut acc) = ([_mm256_setzero_pd(); 8], [0.0f64; LANES]);
        for c in full.iter().chain(last) {
            for (j, aj) in a.iter_mut().enumerate() {
                // SAFETY: 4 values at 4j of a 32-value chunk.
                let v = unsafe { _mm_loadu_ps(c.as_ptr().add(4 * j)) };
                *aj = _mm256_add_pd(*aj, _mm256_cvtps_pd(v));
            }
        }
        for (j, aj) in a.iter().enumerate() {
            // SAFETY: lanes 4j..4j+4 of acc.
            unsafe { _mm256_storeu_pd(acc.as_mut_ptr().add(4 * j), *aj) };
        }
        super::tree(&acc)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn f64_avx512(full: &[[f64; LANES]], last: Option<&[f64; LANES]>) -> f64 {
        let (mut a, mut acc) = ([_mm512_setzero_pd(); 4], [0.0f64; LANES]);
        for c in full.iter().chain(last) {
            for (j, aj) in a.iter_mut().enumerate() {
                // SAFETY: 8 values at 8j of a 32-value chunk.
                *aj = _mm512_add_pd(*aj, unsafe { _mm512_loadu_pd(c.as_ptr().add(8 * j)) });
            }
        }
        for (j, aj) in a.iter().enumerate() {
            // SAFETY: lanes 8j..8j+8 of acc.
            unsafe { _mm512_storeu_pd(acc.as_mut_ptr().add(8 * j), *aj) };
        }
        // The tree here, in the kernel's instruction set: from the caller, its reads of the
        // lanes stalled on the wide stores (no store-to-load forwarding: +12 % on a 1024-wide
        // layer norm).
        super::tree(&acc)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn f64_avx2(full: &[[f64; LANES]], last: Option<&[f64; LANES]>) -> f64 {
        let (mut a, mut acc) = ([_mm256_setzero_pd(); 8], [0.0f64; LANES]);
        for c in full.iter().chain(last) {
            for (j, aj) in a.iter_mut().enumerate() {
                // SAFETY: 4 values at 4j of a 32-value chunk.
                *aj = _mm256_add_pd(*aj, unsafe { _mm256_loadu_pd(c.as_ptr().add(4 * j)) });
            }
        }
        for (j, aj) in a.iter().enumerate() {
            // SAFETY: lanes 4j..4j+4 of acc.
            unsafe { _mm256_storeu_pd(acc.as_mut_ptr().add(4 * j), *aj) };
        }
        super::tree(&acc)
    }
}

/// Canonical sum over any view, in logical order, with the step `f(acc, x)`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn sum_view<T: Scalar, F: Fn(f64, f64) -> f64>(v: &ArrayView<'_, T, IxDyn>, f: F) -> f64 {
    if let Some(s) = v.as_slice() {
        return sum_slice(s, f);
    }
    let mut acc = [0.0f64; LANES];
    let mut l = 0;
    let (p, st) = (v.as_ptr(), inner_stride(v.strides()));
    for_each_run(v.shape(), [v.strides()], |[o], len| {
        for k in 0..len as isize {
            // SAFETY: `for_each_run` yields offsets of elements of v (k < the run length).
            let x = unsafe { *p.offset(o + k * st) };
            acc[l] = f(acc[l], x.to_f64());
            l = if l + 1 == LANES { 0 } else { l + 1 };
        }
    });
    tree(&acc)
}

/// The stride of the last axis (1 for a 0-d view, whose one run has one element).
#[inline]
pub fn inner_stride(strides: &[isize]) -> isize {
    strides.last().copied().unwrap_or(1)
}

/// Walks arrays of one `shape` in logical (row-major) order, one run along the last axis at a
/// time: `f(offsets, len)` gets each array's element offset of the run's first element
/// (`strides[k]` are array k's strides; the run then steps by its last stride).
///
/// ndarray's element iterators over `IxDyn` views update a dynamic multi-index per element;
/// strided inputs (a Fortran-order or transposed array) went through them 50–200× slower than
/// contiguous ones. Here the multi-index moves once per run and the run is a plain stride loop,
/// and the order, hence every canonical sum, is unchanged.
pub fn for_each_run<const K: usize>(
    shape: &[usize],
    strides: [&[isize]; K],
    mut f: impl FnMut([isize; K], usize),
) {
    assert!(
        strides.iter().all(|st| st.len() == shape.len()),
        "for_each_run: every array needs the shape's rank"
    );
    if shape.contains(&0) {
        return;
    }
    let Some((&len, outer)) = shape.split_last() else {
        f([0; K], 1);
        return;
    };
    let mut idx = vec![0usize; outer.len()];
    let mut off = [0isize; K];
    loop {
        f(off, len);
        // Next multi-index of the outer axes (an odometer), offsets kept in step.
        let mut ax = outer.len();
        loop {
            if ax == 0 {
                return;
            }
            ax -= 1;
            idx[ax] += 1;
            if idx[ax] < outer[ax] {
                for (o, st) in off.iter_mut().zip(&strides) {
                    *o += st[ax];
                }
                break;
            }
            for (o, st) in off.iter_mut().zip(&strides) {
                *o -= st[ax] * (outer[ax] as isize - 1);
            }
            idx[ax] = 0;
        }
    }
}

/// Canonical sums for the channels `cs` of a channels-last block: rows of `row_len`
/// contiguous values (`s[r*row_len + k]`), with the step `f(acc, x, k)` for channel k, the lane
/// of row r being r mod LANES. Identical, bit for bit, to `sum_slice` over each column.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn sum_rows<T: Scalar, F: Fn(f64, f64, usize) -> f64>(
    s: &[T],
    row_len: usize,
    cs: std::ops::Range<usize>,
    f: F,
    acc: &mut Vec<f64>,
    out: &mut [f64],
) {
    let c = cs.len();
    acc.clear();
    acc.resize(LANES * c, 0.0);
    if c == 0 || row_len == 0 {
        return;
    }
    for (r, row) in s.chunks_exact(row_len).enumerate() {
        let lane = &mut acc[(r % LANES) * c..(r % LANES + 1) * c];
        for (j, (a, x)) in lane.iter_mut().zip(&row[cs.clone()]).enumerate() {
            *a = f(*a, x.to_f64(), cs.start + j);
        }
    }
    fold_lane_rows(acc, c, out);
}

/// `out[k]` = the tree of the lanes `acc[l·c + k]`, l = 0..LANES (the tail of [`sum_rows`]).
#[inline(always)]
fn fold_lane_rows(acc: &[f64], c: usize, out: &mut [f64]) {
    for (k, o) in out.iter_mut().enumerate().take(c) {
        let mut lanes = [0.0f64; LANES];
        for (l, v) in lanes.iter_mut().enumerate() {
            *v = acc[l * c + k];
        }
        *o = tree(&lanes);
    }
}

/// [`sum_rows`] with [`add_sq_dev`] and the per-channel `m` (indexed from `cs.start`) zipped in
/// rather than looked up through a closure: with the lookup, LLVM kept the loop scalar
/// (measured: most of a channels-last batch norm's second pass). Same f64 operations.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn sum_rows_sq_dev<T: Scalar>(
    s: &[T],
    row_len: usize,
    cs: std::ops::Range<usize>,
    m: &[f64],
    acc: &mut Vec<f64>,
    out: &mut [f64],
) {
    let c = cs.len();
    acc.clear();
    acc.resize(LANES * c, 0.0);
    if c == 0 || row_len == 0 {
        return;
    }
    let m = &m[..c];
    for (r, row) in s.chunks_exact(row_len).enumerate() {
        let lane = &mut acc[(r % LANES) * c..(r % LANES + 1) * c];
        for ((a, x), &mk) in lane.iter_mut().zip(&row[cs.clone()]).zip(m) {
            *a = add_sq_dev(*a, x.to_f64(), mk);
        }
    }
    fold_lane_rows(acc, c, out);
}

/// y = (x − m)·a + b in f64 — the product and the sum fused (one rounding) — rounded once to T.
/// The one normalization formula of the crate; the streaming kernels of `crate::stream` compute
/// exactly this (`vfmadd`). Fusing saves one of the five f64 operations per value of an apply
/// that runs from cache (19 % of its arithmetic).
#[inline(always)]
pub fn affine<T: Scalar>(x: T, m: f64, a: f64, b: f64) -> T {
    T::from_f64((x.to_f64() - m).mul_add(a, b))
}

/// acc[k] = f(acc[k], row[k], k) for every k: one row of a channels-last block.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn accumulate_row<T: Scalar, F: Fn(f64, f64, usize) -> f64>(acc: &mut [f64], row: &[T], f: F) {
    for (k, (a, x)) in acc.iter_mut().zip(row).enumerate() {
        *a = f(*a, x.to_f64(), k);
    }
}

/// acc[k] = add_sq_dev(acc[k], row[k], m[k]): [`accumulate_row`] with the means zipped in (a
/// closure lookup left part of the loop scalar). Same f64 operations.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn accumulate_row_sq_dev<T: Scalar>(acc: &mut [f64], row: &[T], m: &[f64]) {
    for ((a, x), &mk) in acc.iter_mut().zip(row).zip(m) {
        *a = add_sq_dev(*a, x.to_f64(), mk);
    }
}

/// Rows per call of the blocked row kernels below.
pub const ROW_BLOCK: usize = 4;

/// `acc[k] = add(acc[k], rows[0][k]); acc[k] = add(acc[k], rows[1][k]); …` — [`accumulate_row`]
/// with [`add`] over `ROW_BLOCK` rows in order, each accumulator loaded and stored once per block
/// instead of once per row (small (N, C) batch norms were bound by those loads and stores).
/// Same f64 operations in the same order per channel.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn accumulate_rows_add<T: Scalar>(acc: &mut [f64], rows: [&[T]; ROW_BLOCK]) {
    let n = acc.len();
    let rows = rows.map(|r| &r[..n]);
    for (k, a) in acc.iter_mut().enumerate() {
        let mut v = *a;
        for r in &rows {
            v = add(v, r[k].to_f64());
        }
        *a = v;
    }
}

/// [`accumulate_row_sq_dev`] over `ROW_BLOCK` rows in order (see [`accumulate_rows_add`]).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn accumulate_rows_sq_dev<T: Scalar>(acc: &mut [f64], rows: [&[T]; ROW_BLOCK], m: &[f64]) {
    let n = acc.len();
    let (rows, m) = (rows.map(|r| &r[..n]), &m[..n]);
    for (k, (a, &mk)) in acc.iter_mut().zip(m).enumerate() {
        let mut v = *a;
        for r in &rows {
            v = add_sq_dev(v, r[k].to_f64(), mk);
        }
        *a = v;
    }
}

/// y = (x − m_k)·a_k + b_k over `ROW_BLOCK` rows of the same channels, each coefficient loaded
/// once per block of rows ([`affine`]: bitwise the one-row kernels).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn apply_rows_block<T: Scalar>(
    xs: [&[T]; ROW_BLOCK],
    ys: [&mut [T]; ROW_BLOCK],
    m: &[f64],
    a: &[f64],
    b: &[f64],
) {
    let n = m.len().min(a.len()).min(b.len());
    let xs = xs.map(|r| &r[..n]);
    let mut ys = ys.map(|r| &mut r[..n]);
    for k in 0..n {
        let (mk, ak, bk) = (m[k], a[k], b[k]);
        for (y, x) in ys.iter_mut().zip(&xs) {
            y[k] = affine(x[k], mk, ak, bk);
        }
    }
}

/// y = (x − m)·a + b over slices; `w`, `bias` (if given) make a and b per element:
/// a_j = a·w_j, b_j = bias_j. One loop per combination, so each vectorizes.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn apply_slice<T: Scalar>(
    xs: &[T],
    ys: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    w: Option<&[f64]>,
    bias: Option<&[f64]>,
) {
    match (w, bias) {
        (None, None) => {
            for (o, &v) in ys.iter_mut().zip(xs) {
                *o = affine(v, m, a, b);
            }
        }
        (Some(w), None) => {
            for ((o, &v), &wj) in ys.iter_mut().zip(xs).zip(w) {
                *o = affine(v, m, a * wj, b);
            }
        }
        (None, Some(bias)) => {
            for ((o, &v), &bj) in ys.iter_mut().zip(xs).zip(bias) {
                *o = affine(v, m, a, bj);
            }
        }
        (Some(w), Some(bias)) => {
            for (((o, &v), &wj), &bj) in ys.iter_mut().zip(xs).zip(w).zip(bias) {
                *o = affine(v, m, a * wj, bj);
            }
        }
    }
}

/// [`apply_slice`], written with streaming stores when `stream` (see `crate::stream`); a task
/// that passes `stream` ends with `crate::stream::stream_fence`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn apply_slice_to<T: Scalar>(
    xs: &[T],
    ys: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    w: Option<&[f64]>,
    bias: Option<&[f64]>,
    stream: bool,
) {
    if !(stream && crate::stream::apply_slice(xs, ys, m, a, b, w, bias)) {
        apply_slice(xs, ys, m, a, b, w, bias);
    }
}

/// [`apply_rows`], written with streaming stores when `stream` (see `crate::stream`); a task
/// that passes `stream` ends with `crate::stream::stream_fence`.
#[inline]
pub fn apply_rows_to<T: Scalar>(
    xs: &[T],
    ys: &mut [T],
    c: usize,
    m: &[f64],
    a: &[f64],
    b: &[f64],
    stream: bool,
) {
    if !(stream && crate::stream::apply_rows(xs, ys, c, m, a, b)) {
        apply_rows(xs, ys, c, m, a, b);
    }
}

/// Rows of `c` channels: y[r, k] = (x[r, k] − m_k)·a_k + b_k.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn apply_rows<T: Scalar>(xs: &[T], ys: &mut [T], c: usize, m: &[f64], a: &[f64], b: &[f64]) {
    if c == 0 {
        return;
    }
    let (m, a, b) = (&m[..c], &a[..c], &b[..c]);
    for (yrow, xrow) in ys.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
        for ((((o, &v), &mk), &ak), &bk) in yrow.iter_mut().zip(xrow).zip(m).zip(a).zip(b) {
            *o = affine(v, mk, ak, bk);
        }
    }
}

/// Applies `affine` with one (m, a, b) to a whole view.
pub fn apply_view<T: Scalar>(
    x: &ArrayView<'_, T, IxDyn>,
    y: &mut ArrayViewMut<'_, T, IxDyn>,
    m: f64,
    a: f64,
    b: f64,
) {
    if let (Some(xs), Some(ys)) = (x.as_slice(), y.as_slice_mut()) {
        apply_slice(xs, ys, m, a, b, None, None);
        return;
    }
    apply_view_strided(x, y, m, a, b);
}

/// [`apply_view`] of strided views (compiled with FMA, like every caller of [`affine`]).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn apply_view_strided<T: Scalar>(
    x: &ArrayView<'_, T, IxDyn>,
    y: &mut ArrayViewMut<'_, T, IxDyn>,
    m: f64,
    a: f64,
    b: f64,
) {
    Zip::from(y)
        .and(x)
        .for_each(|o, &v| *o = affine(v, m, a, b));
}

/// A mutable view that parallel tasks carve disjoint sub-views from.
///
/// rayon tasks need to write disjoint parts of one output whose layout is arbitrary (`out=`
/// may be any writable array). ndarray can split a mutable view only along one axis at a time;
/// this wrapper lets each task take the sub-view it owns (a plane, a row, a channel).
pub struct SharedMut<'a, T> {
    raw: RawArrayViewMut<T, IxDyn>,
    /// Large enough to be written with streaming stores (`crate::stream`).
    pub stream: bool,
    _life: std::marker::PhantomData<&'a mut T>,
}

// SAFETY: the wrapper is only used to hand out sub-views that tasks write disjointly (each
// caller documents why its index sets are disjoint); T itself is Send.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    pub fn new(mut v: ArrayViewMut<'a, T, IxDyn>) -> Self {
        let stream = crate::stream::worth_streaming(v.len().saturating_mul(size_of::<T>()));
        Self {
            raw: v.raw_view_mut(),
            stream,
            _life: std::marker::PhantomData,
        }
    }

    /// The sub-view at `index` along the leading axes (`index.len()` axes removed).
    ///
    /// # Safety
    /// No two live sub-views handed out may overlap, and the array must not self-overlap
    /// (checked by the bindings: no zero stride on an axis longer than 1).
    pub unsafe fn sub(&self, index: &[usize]) -> ArrayViewMut<'a, T, IxDyn> {
        let mut r = self.raw.clone();
        for &i in index {
            r = r.index_axis_move(ndarray::Axis(0), i);
        }
        // SAFETY: the pointer is valid for 'a (it came from a live ArrayViewMut<'a>) and the
        // caller guarantees exclusivity of this sub-view.
        unsafe { r.deref_into_view_mut() }
    }

    /// The sub-view at `index` along `axis` (that axis removed).
    ///
    /// # Safety
    /// As [`SharedMut::sub`].
    pub unsafe fn sub_axis(&self, axis: usize, index: usize) -> ArrayViewMut<'a, T, IxDyn> {
        let r = self.raw.clone().index_axis_move(ndarray::Axis(axis), index);
        // SAFETY: as in `sub`.
        unsafe { r.deref_into_view_mut() }
    }

    pub fn shape(&self) -> &[usize] {
        self.raw.shape()
    }

    /// Whether the whole array is one C-contiguous block (then `block_mut` may take any run).
    pub fn is_standard_layout(&self) -> bool {
        self.raw.is_standard_layout()
    }

    pub fn strides(&self) -> &[isize] {
        self.raw.strides()
    }

    /// The first element; with `strides()` it addresses any element.
    pub fn as_mut_ptr(&self) -> *mut T {
        self.raw.as_ptr().cast_mut()
    }

    /// The contiguous block of `len` elements starting `offset` elements from the first one.
    ///
    /// # Safety
    /// The block must lie inside the array, be contiguous in it, and be owned by the caller
    /// exclusively while the slice lives.
    pub unsafe fn block_mut(&self, offset: isize, len: usize) -> &'a mut [T] {
        // SAFETY: forwarded from the caller.
        unsafe { std::slice::from_raw_parts_mut(self.raw.as_ptr().cast_mut().offset(offset), len) }
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;

    /// `for_each_run` visits every element in logical order, for any strides.
    #[test]
    fn runs_follow_logical_order() {
        let base: Vec<f64> = (0..120).map(f64::from).collect();
        let a = ndarray::ArrayView::from_shape((4, 5, 6), &base)
            .unwrap()
            .into_dyn();
        let views = [
            a.clone(),
            a.slice(ndarray::s![.., ..;2, ..;-3]).into_dyn(),
            a.clone().reversed_axes(),
            a.slice(ndarray::s![..;-1, 1.., ..]).into_dyn(),
            a.slice(ndarray::s![2, .., 3]).into_dyn(),
        ];
        for v in views {
            let c = v.as_standard_layout();
            let mut got = vec![];
            let (p, st) = (v.as_ptr(), inner_stride(v.strides()));
            for_each_run(v.shape(), [v.strides(), c.strides()], |[o, oc], len| {
                for k in 0..len as isize {
                    // SAFETY: offsets of v's elements.
                    got.push(unsafe { *p.offset(o + k * st) });
                    assert_eq!(c.as_slice().unwrap()[(oc + k) as usize], got[got.len() - 1]);
                }
            });
            assert_eq!(got, v.iter().copied().collect::<Vec<_>>());
        }
    }

    /// The canonical sums with the fused steps, written out plainly: lane i mod 32 gets
    /// fma(xᵢ − m, xᵢ − m, lane) in order, then the pairwise tree. Every kernel must match it
    /// bit for bit (contiguous with a tail, strided, and the channels-last row kernels).
    #[test]
    fn fused_steps_match_the_plain_definition() {
        let plain = |v: &[f32], m: f64| {
            let mut lanes = [0.0f64; LANES];
            for (i, &x) in v.iter().enumerate() {
                let d = f64::from(x) - m;
                lanes[i % LANES] = d.mul_add(d, lanes[i % LANES]);
            }
            tree(&lanes)
        };
        let mut differs = false;
        for n in [1usize, 31, 32, 33, 100, 197, 4099] {
            // Values with full 24-bit mantissas around 1e3, so that the products round.
            let v: Vec<f32> = (0..n)
                .map(|i| 1000.0 + ((i * 7919) % 1013) as f32 / 1013.0 * std::f32::consts::PI)
                .collect();
            let m = 1_001.123_456_789_f64;
            let want = plain(&v, m);
            assert_eq!(
                sum_slice(&v, |a, x| add_sq_dev(a, x, m)).to_bits(),
                want.to_bits()
            );
            assert_eq!(sum_slice(&v, add_sq).to_bits(), plain(&v, 0.0).to_bits());
            // The same values as a strided column, and as one channel of channels-last rows.
            let wide: Vec<f32> = v.iter().flat_map(|&x| [x, -1.0, 2.0]).collect();
            let col = ndarray::ArrayView::from_shape((n, 3), &wide)
                .unwrap()
                .into_dyn();
            let col = col.slice(ndarray::s![.., 0]).into_dyn();
            assert_eq!(
                sum_view(&col, |a, x| add_sq_dev(a, x, m)).to_bits(),
                want.to_bits()
            );
            let (mut acc, mut out) = (Vec::new(), [0.0f64; 1]);
            sum_rows_sq_dev(&wide, 3, 0..1, &[m], &mut acc, &mut out);
            assert_eq!(out[0].to_bits(), want.to_bits());
            let (mut fused, mut unfused) = ([0.0f64; LANES], [0.0f64; LANES]);
            for (i, &x) in v.iter().enumerate() {
                let d = f64::from(x) - m;
                fused[i % LANES] = d.mul_add(d, fused[i % LANES]);
                unfused[i % LANES] += d * d;
            }
            differs |= fused != unfused;
        }
        // The unfused lanes differ somewhere: the data tells the two steps apart.
        assert!(differs, "fused and unfused sums agree everywhere");
    }

    /// The vector plain sum is bitwise the generic kernel's, for every tail length, with
    /// signed zeros, subnormals and values whose order of addition matters.
    #[test]
    fn plain_sum_kernel_matches_generic() {
        for n in 0usize..=97 {
            let v64: Vec<f64> = (0..n)
                .map(|i| match i % 7 {
                    0 => -0.0,
                    1 => 1e16,
                    2 => -1e16 + 3.0,
                    3 => f64::MIN_POSITIVE / 8.0,
                    _ => (i as f64 * 0.37).sin(),
                })
                .collect();
            assert_eq!(
                sum_slice_add(&v64).to_bits(),
                sum_slice(&v64, add).to_bits(),
                "f64 n={n}"
            );
            #[allow(clippy::cast_possible_truncation)]
            let v32: Vec<f32> = v64.iter().map(|&x| x as f32).collect();
            assert_eq!(
                sum_slice_add(&v32).to_bits(),
                sum_slice(&v32, add).to_bits(),
                "f32 n={n}"
            );
            let neg: Vec<f32> = vec![-0.0; n];
            assert_eq!(sum_slice_add(&neg).to_bits(), 0.0f64.to_bits());
        }
        let special = [f32::INFINITY, 1.0, f32::NEG_INFINITY];
        assert!(sum_slice_add(&special).is_nan());
    }
}
