//! Lp normalization along one axis (PyTorch `F.normalize`), forward and backward.
//!
//! ```text
//! ‖x‖_p = (Σ |x_i|^p)^(1/p)   (p = inf: max |x_i|),    y = x / max(‖x‖_p, eps)
//! ∂x_i = (g_i − ⟨g, ŷ⟩·w_i) / ‖x‖_p,   ŷ = x/‖x‖_p,  w_i = sign(x_i)·|ŷ_i|^(p−1)
//!        (p = inf: w_i = sign(x_i)/t on the t entries where |x_i| = max, else 0)
//! ∂x = g / eps where ‖x‖_p < eps (the clamp passes no gradient to the norm, as PyTorch).
//! ```
//! The norm is computed on values divided by the power of two 2^⌊log2 max|x|⌋ (exact), so it
//! neither overflows nor underflows: float64 rows of 1e200 or of subnormals normalize
//! correctly (for f16/f32 input with p = 1 or 2 the scaling is exact at every step, so it is
//! skipped: bitwise the same norms). Every position sums its channels in channel order in
//! f64, whatever the path, so results are layout- and thread-independent. Forward paths:
//! * planes (NCHW, axis 1): blocks of contiguous positions, channel planes walked twice
//!   (norms, then output from cache), vectorized across positions;
//! * rows (channels contiguous: NHWC axis 1, last axis of C order; f16/f32, p = 1, 2);
//! * tiles (anything else): each position's channel vector gathered into a tile (see
//!   `mixing::for_tiles`).

use super::common::{check_eps, check_out};
use super::mixing::{check_same_shape, for_tiles, tile_len};
use crate::channel::normalize_axis;
use crate::error::{NormError, Result};
use crate::pool;
use crate::scalar::Scalar;
#[cfg(target_arch = "x86_64")]
use crate::stream::{as_f32, as_f32_mut, stream_f32, StreamOp};
use crate::stream::{can_stream, prefetch_bytes, stream_fence, worth_streaming};
use multiversion::multiversion;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

fn check_p(p: f64) -> Result<()> {
    // NaN fails `p > 0.0` too.
    if p.is_nan() || p <= 0.0 {
        return Err(NormError::Param(format!(
            "p must be > 0 (a finite number or inf), got {p}"
        )));
    }
    Ok(())
}

/// The largest power of two ≤ m (m finite, > 0).
fn pow2_floor(m: f64) -> f64 {
    let b = m.to_bits();
    let e = b & 0x7ff0_0000_0000_0000;
    if e != 0 {
        f64::from_bits(e)
    } else {
        f64::from_bits(1u64 << (63 - b.leading_zeros()))
    }
}

/// Per position j of a channel-major tile: (‖x‖_p, max |x|, entries at the max). NaN
/// anywhere in a position's channels gives NaN. Channels are summed in order, in f64.
fn norms(x: &[f64], c: usize, len: usize, ld: usize, p: f64) -> (Vec<f64>, Vec<f64>, Vec<usize>) {
    let mut m = vec![0.0f64; len];
    let mut nan = vec![false; len];
    for k in 0..c {
        for ((m, nan), &v) in m.iter_mut().zip(&mut nan).zip(&x[k * ld..k * ld + len]) {
            let a = v.abs();
            *nan |= a.is_nan();
            if a > *m {
                *m = a;
            }
        }
    }
    let mut ties = vec![0usize; len];
    if p == f64::INFINITY {
        for k in 0..c {
            for ((t, &m), &v) in ties.iter_mut().zip(&m).zip(&x[k * ld..k * ld + len]) {
                *t += usize::from(v.abs() == m);
            }
        }
    }
    let scale: Vec<f64> = m
        .iter()
        .map(|&m| {
            if m > 0.0 && m.is_finite() {
                pow2_floor(m)
            } else {
                1.0
            }
        })
        .collect();
    let mut acc = vec![0.0f64; len];
    if p.is_finite() {
        for k in 0..c {
            let row = &x[k * ld..k * ld + len];
            for ((a, &v), &s) in acc.iter_mut().zip(row).zip(&scale) {
                let u = (v / s).abs();
                *a += if p == 2.0 {
                    u * u
                } else if p == 1.0 {
                    u
                } else {
                    u.powf(p)
                };
            }
        }
    }
    let n = (0..len)
        .map(|j| {
            if nan[j] {
                f64::NAN
            } else if m[j] == 0.0 || m[j].is_infinite() || p == f64::INFINITY {
                m[j]
            } else if p == 2.0 {
                acc[j].sqrt() * scale[j]
            } else if p == 1.0 {
                acc[j] * scale[j]
            } else {
                acc[j].powf(1.0 / p) * scale[j]
            }
        })
        .collect();
    (n, m, ties)
}

/// max(n, eps), NaN-propagating.
#[inline]
fn clamp(n: f64, eps: f64) -> f64 {
    if n >= eps || n.is_nan() {
        n
    } else {
        eps
    }
}

fn bytes<T>(x: &ArrayView<'_, T, IxDyn>) -> usize {
    x.len().saturating_mul(std::mem::size_of::<T>())
}

fn setup<T: Scalar>(x: &ArrayView<'_, T, IxDyn>, p: f64, eps: f64, axis: isize) -> Result<usize> {
    check_p(p)?;
    check_eps(eps)?;
    if x.ndim() == 0 {
        return Err(NormError::Shape(
            "normalize expects an input with at least 1 dimension, got a 0-d array".into(),
        ));
    }
    normalize_axis(axis, x.ndim(), "axis")
}

/// Positions × channels per tile buffer.
const LP_TILE_ELEMS: usize = 8192;

/// Bytes of input per block of the plane path: a block (C channels × B positions) is read
/// twice, for the norms and for the output, so it should stay in cache in between; longer
/// per-channel runs stream better (measured on (32,64,56,56) f32: whole 12 KiB planes, a
/// 784 KiB block, ~12 % faster than 256–512 KiB blocks).
const LP_BLOCK_BYTES: usize = 1024 * 1024;

/// Fewest contiguous positions per (outer index) for the plane path; shorter planes go
/// through the tile path.
const LP_MIN_PLANE: usize = 16;

/// Channels ahead whose block the norm pass prefetches: each channel's block is a separate
/// short stream (a few KiB), too short for the hardware prefetcher to ramp up on.
const LP_PREFETCH: usize = 4;

/// Per-position work buffers of [`block_den`].
#[derive(Default)]
struct Scratch {
    acc: Vec<f64>,
    m: Vec<f64>,
    nan: Vec<bool>,
    scale: Vec<f64>,
    d: Vec<f64>,
}

impl Scratch {
    fn reset(&mut self, len: usize) {
        for v in [&mut self.acc, &mut self.m, &mut self.scale, &mut self.d] {
            v.clear();
            v.resize(len, 0.0);
        }
        self.nan.clear();
        self.nan.resize(len, false);
    }
}

/// acc[j] += f(row[j]): one channel of a block, vectorized across positions.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn accumulate<U: Scalar, F: Fn(f64) -> f64>(acc: &mut [f64], row: &[U], f: F) {
    for (a, v) in acc.iter_mut().zip(row) {
        *a += f(v.to_f64());
    }
}

/// acc[j] += f(row[j], s[j]).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn accumulate2<U: Scalar, F: Fn(f64, f64) -> f64>(acc: &mut [f64], row: &[U], s: &[f64], f: F) {
    for ((a, v), &s) in acc.iter_mut().zip(row).zip(s) {
        *a += f(v.to_f64(), s);
    }
}

/// out[j] = x[j] / d[j], rounded once to T.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn divide<U: Scalar, T: Scalar>(out: &mut [T], x: &[U], d: &[f64]) {
    for ((o, v), &d) in out.iter_mut().zip(x).zip(d) {
        *o = T::from_f64(v.to_f64() / d);
    }
}

/// The clamped norms max(‖x‖_p, eps) of `len` positions into `w.d`, channel k of the block
/// being `row(k)[..len]`. Channels are summed in order, in f64; NaN in a position gives NaN.
///
/// `narrow`: the values came from f16/f32 (finite ones within 2^-149..2^128 in magnitude).
/// For p = 1 and 2 the power-of-two scaling is then exact at every step (no f64 overflow or
/// subnormal), so summing |x| or x² unscaled gives bitwise the scaled result, without the
/// max pass.
fn block_den<'a, U: Scalar + 'a, F: Fn(usize) -> &'a [U]>(
    row: F,
    c: usize,
    len: usize,
    p: f64,
    eps: f64,
    narrow: bool,
    w: &mut Scratch,
) {
    w.reset(len);
    if narrow && (p == 2.0 || p == 1.0) {
        for k in 0..c {
            if k + LP_PREFETCH < c {
                let a = &row(k + LP_PREFETCH)[..len];
                prefetch_bytes(a.as_ptr().cast::<u8>(), std::mem::size_of_val(a));
            }
            let r = &row(k)[..len];
            if p == 2.0 {
                accumulate(&mut w.acc, r, |v| v * v);
            } else {
                accumulate(&mut w.acc, r, f64::abs);
            }
        }
        for (d, &a) in w.d.iter_mut().zip(&w.acc) {
            let n = if a.is_nan() {
                f64::NAN
            } else if p == 2.0 {
                a.sqrt()
            } else {
                a
            };
            *d = clamp(n, eps);
        }
        return;
    }
    for k in 0..c {
        for ((m, nan), v) in w.m.iter_mut().zip(&mut w.nan).zip(&row(k)[..len]) {
            let a = v.to_f64().abs();
            *nan |= a.is_nan();
            if a > *m {
                *m = a;
            }
        }
    }
    for (s, &m) in w.scale.iter_mut().zip(&w.m) {
        *s = if m > 0.0 && m.is_finite() {
            pow2_floor(m)
        } else {
            1.0
        };
    }
    if p.is_finite() {
        // v·(1/s) is v/s exactly when 1/s is representable (both are the rounding of one
        // real); it is for every s ≥ 2^-1022.
        let inv = w.scale.iter().all(|&s| s >= f64::MIN_POSITIVE);
        if inv {
            for s in &mut w.scale {
                *s = 1.0 / *s;
            }
        }
        for k in 0..c {
            let r = &row(k)[..len];
            match (p == 2.0, p == 1.0, inv) {
                (true, _, true) => accumulate2(&mut w.acc, r, &w.scale, |v, s| {
                    let u = v * s;
                    u * u
                }),
                (_, true, true) => accumulate2(&mut w.acc, r, &w.scale, |v, s| (v * s).abs()),
                (true, _, false) => accumulate2(&mut w.acc, r, &w.scale, |v, s| {
                    let u = v / s;
                    u * u
                }),
                (_, true, false) => accumulate2(&mut w.acc, r, &w.scale, |v, s| (v / s).abs()),
                (false, false, true) => {
                    accumulate2(&mut w.acc, r, &w.scale, |v, s| (v * s).abs().powf(p))
                }
                (false, false, false) => {
                    accumulate2(&mut w.acc, r, &w.scale, |v, s| (v / s).abs().powf(p))
                }
            }
        }
        if inv {
            for s in &mut w.scale {
                *s = 1.0 / *s;
            }
        }
    }
    for j in 0..len {
        let (m, s, a) = (w.m[j], w.scale[j], w.acc[j]);
        let n = if w.nan[j] {
            f64::NAN
        } else if m == 0.0 || m.is_infinite() || p == f64::INFINITY {
            m
        } else if p == 2.0 {
            a.sqrt() * s
        } else if p == 1.0 {
            a * s
        } else {
            a.powf(1.0 / p) * s
        };
        w.d[j] = clamp(n, eps);
    }
}

/// Is the block of axes `from..` of a view one contiguous run in logical order?
fn inner_contiguous(shape: &[usize], strides: &[isize], from: usize) -> bool {
    let mut want = 1isize;
    for a in (from..shape.len()).rev() {
        if shape[a] != 1 {
            if strides[a] != want {
                return false;
            }
            want *= shape[a] as isize;
        }
    }
    true
}

/// Element offsets of the first element of each index of the axes `..to`, in logical order.
fn outer_offsets(shape: &[usize], strides: &[isize], to: usize) -> Vec<isize> {
    let (dims, st) = (&shape[..to], &strides[..to]);
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut idx = vec![0usize; to];
    let mut base = 0isize;
    for _ in 0..count {
        out.push(base);
        let mut i = to;
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
    out
}

#[derive(Clone, Copy)]
struct Ptr<T>(*const T);
#[derive(Clone, Copy)]
struct PtrMut<T>(*mut T);
// SAFETY: the pointers come from views borrowed for the whole call; tasks read x and write
// disjoint blocks of y.
unsafe impl<T: Sync> Send for Ptr<T> {}
unsafe impl<T: Sync> Sync for Ptr<T> {}
unsafe impl<T: Send> Send for PtrMut<T> {}
unsafe impl<T: Send> Sync for PtrMut<T> {}
impl<T> Ptr<T> {
    // Methods, so closures capture the whole (Send + Sync) wrapper, not its field.
    fn get(self) -> *const T {
        self.0
    }
}
impl<T> PtrMut<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// The plane path: the axes after `ax` are one contiguous run of `s` positions in x and in y
/// (NCHW with axis 1). Each task takes a block of positions of one outer index and walks its
/// channel planes: once for the norms, once (from cache) for the output.
#[allow(clippy::too_many_arguments)]
fn normalize_planes<T: Scalar>(
    x: &ArrayView<'_, T, IxDyn>,
    y: &mut ArrayViewMut<'_, T, IxDyn>,
    ax: usize,
    s: usize,
    p: f64,
    eps: f64,
    parallel: bool,
) {
    let c = x.shape()[ax];
    let (sx, sy) = (x.strides()[ax], y.strides()[ax]);
    let xo = outer_offsets(x.shape(), x.strides(), ax);
    let yo = outer_offsets(y.shape(), y.strides(), ax);
    let bmax = (LP_BLOCK_BYTES / (c * std::mem::size_of::<T>()).max(1)).max(64);
    let nb = s.div_ceil(bmax);
    let b = s.div_ceil(nb).next_multiple_of(16).min(s);
    let nb = s.div_ceil(b);
    let (px, py) = (Ptr(x.as_ptr()), PtrMut(y.as_mut_ptr()));
    let narrow = std::mem::size_of::<T>() < 8;
    let stream = worth_streaming(x.len() * std::mem::size_of::<T>()) && can_stream();
    pool::for_each_task(xo.len() * nb, parallel, |t| {
        let (o, bi) = (t / nb, t % nb);
        let j0 = bi * b;
        let len = b.min(s - j0);
        let (px, py) = (px, py);
        let xbase = xo[o] + j0 as isize;
        let ybase = yo[o] + j0 as isize;
        let xrow = |k: usize| -> &[T] {
            // SAFETY: positions j0..j0+len of channel k at outer index o: inside x, contiguous.
            unsafe { std::slice::from_raw_parts(px.0.offset(xbase + k as isize * sx), len) }
        };
        let mut w = Scratch::default();
        block_den(xrow, c, len, p, eps, narrow, &mut w);
        for k in 0..c {
            // SAFETY: as for x; blocks of distinct tasks are disjoint positions of y, and y
            // does not overlap itself.
            let out = unsafe {
                std::slice::from_raw_parts_mut(py.0.offset(ybase + k as isize * sy), len)
            };
            let xs = xrow(k);
            #[cfg(target_arch = "x86_64")]
            if stream {
                if let (Some(xf), Some(yf)) = (as_f32(xs), as_f32_mut(out)) {
                    // SAFETY: `stream` is only set when AVX-512F was detected.
                    unsafe { stream_f32(xf, yf, StreamOp::Divide(&w.d)) };
                    continue;
                }
            }
            divide(out, xs, &w.d);
        }
        stream_fence(stream);
    });
}

/// (length, stride) of the axes other than `ax`, merged into one uniformly strided axis in
/// logical order (unit axes dropped), or None.
fn merged_positions(shape: &[usize], strides: &[isize], ax: usize) -> Option<(usize, isize)> {
    let mut it = (0..shape.len())
        .filter(|&a| a != ax && shape[a] != 1)
        .rev()
        .map(|a| (shape[a], strides[a]));
    let Some((d0, s0)) = it.next() else {
        return Some((1, 1));
    };
    let mut len = d0;
    for (d, st) in it {
        if st != len as isize * s0 {
            return None;
        }
        len *= d;
    }
    Some((len, s0))
}

/// Positions whose norms one pass of [`rows_den`] computes side by side.
const ROW_GROUP: usize = 8;

/// Positions per task of the rows path (~64 KiB of f32 for C = 64).
const ROW_TASK_ELEMS: usize = 16384;

/// The clamped norms of `d.len()` positions at `p + j·r`, each `c` contiguous channels
/// (channels-last), f16/f32 values, p = 2 (`sq`) or 1: the narrow formula of [`block_den`],
/// each position's channels summed in order, `ROW_GROUP` positions interleaved to hide the
/// add latency. Deliberately not multiversioned: with AVX2/AVX-512 LLVM turns the strided
/// channel reads into gathers, which are microcoded and ~3× slower on AMD Zen 4 than the
/// baseline build's 8 independent scalar chains.
///
/// # Safety
/// Positions j < d.len() and channels < c must lie inside one live view.
unsafe fn rows_den<T: Scalar>(p: *const T, r: isize, c: usize, sq: bool, eps: f64, d: &mut [f64]) {
    let fin = |a: f64| {
        let n = if a.is_nan() {
            f64::NAN
        } else if sq {
            a.sqrt()
        } else {
            a
        };
        clamp(n, eps)
    };
    let n = d.len();
    let mut j = 0;
    while j + ROW_GROUP <= n {
        let mut acc = [0.0f64; ROW_GROUP];
        let base = p.wrapping_offset(j as isize * r);
        for k in 0..c {
            for (g, a) in acc.iter_mut().enumerate() {
                // SAFETY: position j + g, channel k: inside the view (caller's contract).
                let v = unsafe { *base.offset(g as isize * r + k as isize) }.to_f64();
                *a += if sq { v * v } else { v.abs() };
            }
        }
        for (o, &a) in d[j..j + ROW_GROUP].iter_mut().zip(&acc) {
            *o = fin(a);
        }
        j += ROW_GROUP;
    }
    for (jj, o) in d.iter_mut().enumerate().skip(j) {
        let mut a = 0.0f64;
        for k in 0..c {
            // SAFETY: as above.
            let v = unsafe { *p.offset(jj as isize * r + k as isize) }.to_f64();
            a += if sq { v * v } else { v.abs() };
        }
        *o = fin(a);
    }
}

/// y = x/d_j over the contiguous channels of each position.
///
/// # Safety
/// As [`rows_den`], for x and for y; the y positions are the caller's alone.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
unsafe fn rows_divide<T: Scalar>(
    px: *const T,
    rx: isize,
    py: *mut T,
    ry: isize,
    c: usize,
    d: &[f64],
) {
    for (j, &dj) in d.iter().enumerate() {
        // SAFETY: forwarded from the caller.
        let (xs, ys) = unsafe {
            (
                std::slice::from_raw_parts(px.offset(j as isize * rx), c),
                std::slice::from_raw_parts_mut(py.offset(j as isize * ry), c),
            )
        };
        for (o, v) in ys.iter_mut().zip(xs) {
            *o = T::from_f64(v.to_f64() / dj);
        }
    }
}

/// The rows path: channels contiguous at every position and the positions one strided axis
/// (channels-last input, or the last axis of a C-contiguous one), f16/f32 with p = 1 or 2.
#[allow(clippy::too_many_arguments)]
fn normalize_rows<T: Scalar>(
    px: *const T,
    rx: isize,
    py: *mut T,
    ry: isize,
    c: usize,
    npos: usize,
    sq: bool,
    eps: f64,
    parallel: bool,
) {
    let per = (ROW_TASK_ELEMS / c.max(1)).max(ROW_GROUP);
    let ptrs = (Ptr(px), PtrMut(py));
    pool::for_each_task(npos.div_ceil(per), parallel, |t| {
        let (px, py) = (ptrs.0.get(), ptrs.1.get());
        let j0 = t * per;
        let n = per.min(npos - j0);
        let mut d = vec![0.0f64; n];
        let (px, py) = (
            px.wrapping_offset(j0 as isize * rx),
            py.wrapping_offset(j0 as isize * ry),
        );
        // SAFETY: positions j0..j0+n of the checked geometry; this task's positions of y.
        unsafe {
            rows_den(px, rx, c, sq, eps, &mut d);
            rows_divide(px, rx, py, ry, c, &d);
        }
    });
}

/// `x / max(‖x‖_p, eps)` along `axis`, into `y`.
///
/// # Errors
/// p ≤ 0 or NaN, bad eps, 0-d input, axis out of range, `y` of another shape.
pub fn normalize<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    p: f64,
    axis: isize,
    eps: f64,
) -> Result<()> {
    check_out(&x, &y)?;
    let parallel = pool::worth_parallel(bytes(&x));
    let ax = setup(&x, p, eps, axis)?;
    let c = x.shape()[ax];
    let s: usize = x.shape()[ax + 1..].iter().product();
    let mut y = y;
    if !x.is_empty()
        && s >= LP_MIN_PLANE
        && inner_contiguous(x.shape(), x.strides(), ax + 1)
        && inner_contiguous(y.shape(), y.strides(), ax + 1)
    {
        normalize_planes(&x, &mut y, ax, s, p, eps, parallel);
        return Ok(());
    }
    let narrow = std::mem::size_of::<T>() < 8;
    if !x.is_empty()
        && narrow
        && (p == 2.0 || p == 1.0)
        && x.strides()[ax] == 1
        && y.strides()[ax] == 1
    {
        if let (Some((npos, rx)), Some((_, ry))) = (
            merged_positions(x.shape(), x.strides(), ax),
            merged_positions(y.shape(), y.strides(), ax),
        ) {
            normalize_rows(
                x.as_ptr(),
                rx,
                y.as_mut_ptr(),
                ry,
                c,
                npos,
                p == 2.0,
                eps,
                parallel,
            );
            return Ok(());
        }
    }
    for_tiles(
        &[&x],
        Some(y),
        ax,
        tile_len(c, LP_TILE_ELEMS),
        4,
        parallel,
        Scratch::default,
        |w, ins, out, len, ld| {
            let x = &ins[0];
            block_den(|k| &x[k * ld..k * ld + len], c, len, p, eps, narrow, w);
            for k in 0..c {
                let r = k * ld..k * ld + len;
                divide(&mut out[r.clone()], &x[r], &w.d);
            }
        },
    );
    Ok(())
}

#[inline]
fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Backward of [`normalize`]: writes ∂L/∂x into `dx`.
///
/// # Errors
/// As the forward; `grad_y`/`dx` of another shape than `x`.
pub fn normalize_backward<T: Scalar>(
    grad_y: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    p: f64,
    axis: isize,
    eps: f64,
) -> Result<()> {
    check_same_shape("grad_y", grad_y.shape(), x.shape())?;
    check_out(&x, &dx)?;
    let parallel = pool::worth_parallel(2 * bytes(&x));
    let ax = setup(&x, p, eps, axis)?;
    let c = x.shape()[ax];
    for_tiles(
        &[&x, &grad_y],
        Some(dx),
        ax,
        tile_len(c, LP_TILE_ELEMS / 2),
        4,
        parallel,
        || (),
        |_, ins, out, len, ld| {
            let (x, g) = (&ins[0], &ins[1]);
            let (n, m, ties) = norms(x, c, len, ld, p);
            // ⟨g, ŷ⟩ per position, channels in order.
            let mut dot = vec![0.0f64; len];
            for k in 0..c {
                let r = k * ld..k * ld + len;
                for (((s, &v), &g), &n) in dot.iter_mut().zip(&x[r.clone()]).zip(&g[r]).zip(&n) {
                    *s += g * (v / n);
                }
            }
            let w = |v: f64, n: f64, m: f64, t: usize| -> f64 {
                if p == 2.0 {
                    v / n
                } else if p == 1.0 {
                    sign(v)
                } else if p == f64::INFINITY {
                    if v.abs() == m {
                        sign(v) / t as f64
                    } else {
                        0.0
                    }
                } else {
                    sign(v) * (v.abs() / n).powf(p - 1.0)
                }
            };
            for k in 0..c {
                let r = k * ld..k * ld + len;
                let (xr, gr) = (&x[r.clone()], &g[r.clone()]);
                for (j, o) in out[r].iter_mut().enumerate() {
                    let (v, g, nj) = (xr[j], gr[j], n[j]);
                    *o = if nj < eps {
                        // The clamp max(n, eps) passes no gradient to n, as PyTorch's clamp_min.
                        g / eps
                    } else {
                        (g - dot[j] * w(v, nj, m[j], ties[j])) / nj
                    };
                }
            }
        },
    );
    Ok(())
}
