//! Local response normalization (Krizhevsky et al. 2012) across channels, forward and backward.
//!
//! ```text
//! d_c = k + α'·Σ_{j ∈ W(c)} x_j²        (zero padding: j outside [0, C) is skipped)
//! y_c = x_c · d_c^(−β)
//! α' = α/size (alpha_over_size: PyTorch, ONNX, Caffe) or α (AlexNet paper, TensorFlow)
//! W(c) = [c − ⌊n/2⌋, c + ⌊(n−1)/2⌋]   (window "torch")
//!      = [c − ⌊(n−1)/2⌋, c + ⌈(n−1)/2⌉] (window "onnx"; differs only for even n)
//! ∂L/∂x_i = g_i·d_i^(−β) − 2α'β·x_i·Σ_{c: i ∈ W(c)} g_c·x_c·d_c^(−β−1)
//! ```
//! Window sums take O(1) work per element whatever the size, and without the add/subtract
//! running sum that drifts after a large value leaves the window: the channels are cut into
//! blocks of `size`, each block gets prefix and suffix sums, and any window (at most `size`
//! long) is one suffix plus one prefix — van Herk/Gil-Werman for sums. Every window sum adds
//! at most `size` terms and never subtracts, in f64.

use super::common::{bytes_of, check_out};
use super::mixing::{check_finite, check_same_shape, for_tiles, tile_len, TILE_ELEMS};
use crate::channel::{Access, ChannelView};
use crate::error::{NormError, Result};
use crate::pool;
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, Axis, IxDyn};

/// Which channels the window of an even size covers (odd sizes agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrnWindow {
    /// PyTorch: [c − ⌊n/2⌋, c + ⌊(n−1)/2⌋].
    Torch,
    /// ONNX: [c − ⌊(n−1)/2⌋, c + ⌈(n−1)/2⌉].
    Onnx,
}

/// Parameters of [`local_response_norm`].
#[derive(Clone, Copy, Debug)]
pub struct LrnParams {
    pub size: i64,
    pub alpha: f64,
    pub beta: f64,
    pub k: f64,
    pub alpha_over_size: bool,
    pub window: LrnWindow,
    pub axis: isize,
}

impl Default for LrnParams {
    fn default() -> Self {
        Self {
            size: 5,
            alpha: 1e-4,
            beta: 0.75,
            k: 1.0,
            alpha_over_size: true,
            window: LrnWindow::Torch,
            axis: 1,
        }
    }
}

struct Lrn {
    lo: usize,
    hi: usize,
    alpha: f64,
    beta: f64,
    k: f64,
}

impl LrnParams {
    fn check(&self) -> Result<Lrn> {
        if self.size <= 0 {
            return Err(NormError::Param(format!(
                "size must be a positive number of channels, got {}",
                self.size
            )));
        }
        check_finite("alpha", self.alpha)?;
        check_finite("beta", self.beta)?;
        check_finite("k", self.k)?;
        let n = usize::try_from(self.size).map_err(|_| {
            NormError::Param(format!("size={} does not fit in memory indices", self.size))
        })?;
        let (lo, hi) = match self.window {
            LrnWindow::Torch => (n / 2, (n - 1) / 2),
            LrnWindow::Onnx => ((n - 1) / 2, n / 2),
        };
        let alpha = if self.alpha_over_size {
            self.alpha / n as f64
        } else {
            self.alpha
        };
        Ok(Lrn {
            lo,
            hi,
            alpha,
            beta: self.beta,
            k: self.k,
        })
    }
}

/// d ← d^(−β) over a slice, the common exponents by square roots (correctly rounded, so
/// every instruction set gives the same bits) instead of `powf`. Cloned for AVX-512 and AVX2
/// and picked at run time: sqrt, division and multiplication are correctly rounded and Rust
/// never contracts them into FMAs, so every clone gives the baseline build's bits.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx2+fma"
))]
fn pow_neg_rows(d: &mut [f64], beta: f64) {
    if beta == 0.75 {
        for v in d {
            let r = 1.0 / v.sqrt();
            *v = r * r.sqrt();
        }
    } else if beta == 0.5 {
        for v in d {
            *v = 1.0 / v.sqrt();
        }
    } else if beta == 1.0 {
        for v in d {
            *v = 1.0 / *v;
        }
    } else {
        for v in d {
            *v = v.powf(-beta);
        }
    }
}

/// How the window sum of one channel is formed from the block prefix/suffix sums.
#[derive(Clone, Copy, Debug)]
enum Win {
    Pre(usize),
    Suf(usize),
    Both(usize, usize),
    Direct(usize, usize),
}

/// Window sums over channels: out[c] = Σ_{j ∈ [c−lo, c+hi] ∩ [0, C)} v[j], each formed by at
/// most lo+hi+1 additions in f64 and no subtraction. Channels are cut into blocks of the
/// window length; a window is one block suffix plus one block prefix (or just one of them).
struct Windows {
    b: usize,
    hi: usize,
    plan: Vec<Win>,
}

impl Windows {
    fn new(c: usize, lo: usize, hi: usize) -> Self {
        let b = lo + hi + 1;
        let plan = (0..c)
            .map(|i| {
                let a = i.saturating_sub(lo);
                let e = (i + hi).min(c - 1);
                let (ba, be) = (a / b, e / b);
                if ba != be {
                    Win::Both(a, e)
                } else if a == ba * b {
                    Win::Pre(e)
                } else if e == ((ba + 1) * b).min(c) - 1 {
                    Win::Suf(a)
                } else {
                    // A window shorter than a block touches channel 0 or C−1, so this arm is
                    // not reached; kept exact rather than assumed.
                    Win::Direct(a, e)
                }
            })
            .collect();
        Self { b, hi, plan }
    }

    /// Row-wise over `len` positions of channel-major buffers (leading dimension `ld`); AVX2
    /// where the CPU has it (additions only: the same bits either way).
    fn sums(
        &self,
        v: &[f64],
        len: usize,
        ld: usize,
        pre: &mut [f64],
        suf: &mut [f64],
        out: &mut [f64],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was just detected.
            unsafe { self.sums_avx2(v, len, ld, pre, suf, out) };
            return;
        }
        self.sums_impl(v, len, ld, pre, suf, out);
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn sums_avx2(
        &self,
        v: &[f64],
        len: usize,
        ld: usize,
        pre: &mut [f64],
        suf: &mut [f64],
        out: &mut [f64],
    ) {
        self.sums_impl(v, len, ld, pre, suf, out);
    }

    #[inline(always)]
    fn sums_impl(
        &self,
        v: &[f64],
        len: usize,
        ld: usize,
        pre: &mut [f64],
        suf: &mut [f64],
        out: &mut [f64],
    ) {
        let c = self.plan.len();
        let row = |k: usize| k * ld..k * ld + len;
        for start in (0..c).step_by(self.b) {
            let end = (start + self.b).min(c);
            pre[row(start)].copy_from_slice(&v[row(start)]);
            for k in start + 1..end {
                let (done, cur) = pre.split_at_mut(k * ld);
                for ((p, &q), &x) in cur[..len].iter_mut().zip(&done[row(k - 1)]).zip(&v[row(k)]) {
                    *p = q + x;
                }
            }
            suf[row(end - 1)].copy_from_slice(&v[row(end - 1)]);
            for k in (start..end - 1).rev() {
                let (cur, done) = suf.split_at_mut((k + 1) * ld);
                for ((p, &q), &x) in cur[k * ld..k * ld + len]
                    .iter_mut()
                    .zip(&done[..len])
                    .zip(&v[row(k)])
                {
                    *p = q + x;
                }
            }
        }
        for (k, w) in self.plan.iter().enumerate() {
            let o = &mut out[row(k)];
            match *w {
                Win::Pre(e) => o.copy_from_slice(&pre[row(e)]),
                Win::Suf(a) => o.copy_from_slice(&suf[row(a)]),
                Win::Both(a, e) => {
                    for ((o, &p), &q) in o.iter_mut().zip(&suf[row(a)]).zip(&pre[row(e)]) {
                        *o = p + q;
                    }
                }
                Win::Direct(a, e) => {
                    o.copy_from_slice(&v[row(a)]);
                    for i in a + 1..=e {
                        for (o, &x) in o.iter_mut().zip(&v[row(i)]) {
                            *o += x;
                        }
                    }
                }
            }
        }
    }
}

fn setup<'a, T: Scalar>(
    x: &ArrayView<'a, T, IxDyn>,
    p: &LrnParams,
) -> Result<(Lrn, ChannelView<'a, T>)> {
    let l = p.check()?;
    let cv = ChannelView::new(x.clone(), p.axis, "local_response_norm", 3)?;
    Ok((l, cv))
}

/// Positions per strip of the fused forward kernel: the ring of prefix/suffix rows (at most
/// 4·size rows of 8·`STRIP` bytes) and the strip's x and y rows stay in L1/L2.
const STRIP: usize = 512;

/// A raw pointer that tasks may share; each task touches only its own strips.
#[derive(Clone, Copy)]
struct Ptr<P>(P);
// SAFETY: the pointers come from views borrowed for the whole call; tasks read shared input and
// write disjoint positions of the output.
unsafe impl<P> Send for Ptr<P> {}
unsafe impl<P> Sync for Ptr<P> {}

/// y ← x·(k + α·s)^(−β) for one channel row, s = `a` or `a + b` (the window sum, formed as
/// in [`Windows::sums`]), the power by the formulas of [`pow_neg_rows`].
#[inline(always)]
fn finish_row<U: Scalar>(a: &[f64], b: Option<&[f64]>, x: &[U], y: &mut [U], l: &Lrn) {
    let (k, alpha) = (l.k, l.alpha);
    let n = a.len().min(x.len()).min(y.len());
    let (a, x, y) = (&a[..n], &x[..n], &mut y[..n]);
    macro_rules! go {
        ($p:expr) => {
            match b {
                Some(b) => {
                    let b = &b[..n];
                    for j in 0..n {
                        let d = k + alpha * (a[j] + b[j]);
                        let p: f64 = $p(d);
                        y[j] = U::from_f64(p * x[j].to_f64());
                    }
                }
                None => {
                    for j in 0..n {
                        let d = k + alpha * a[j];
                        let p: f64 = $p(d);
                        y[j] = U::from_f64(p * x[j].to_f64());
                    }
                }
            }
        };
    }
    if l.beta == 0.75 {
        go!(|d: f64| {
            let r = 1.0 / d.sqrt();
            r * r.sqrt()
        });
    } else if l.beta == 0.5 {
        go!(|d: f64| 1.0 / d.sqrt());
    } else if l.beta == 1.0 {
        go!(|d: f64| 1.0 / d);
    } else {
        let beta = l.beta;
        go!(|d: f64| d.powf(-beta));
    }
}

/// The forward on one strip of positions: `x[k]`/`y[k]` are channel k's rows (one length).
/// Blocks of `win.b` channels get their prefix and suffix sums of x² in a ring of rows, and a
/// channel is finished as soon as the block holding the end of its window is done, so each
/// value is read from memory once. Every output is formed by exactly the operations of
/// [`Windows::sums`] followed by the power and the product: the bits do not depend on the
/// strip, the layout or the instruction set.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx2+fma"
))]
fn lrn_strip<U: Scalar>(
    win: &Windows,
    l: &Lrn,
    x: &[&[U]],
    y: &mut [&mut [U]],
    pre: &mut [f64],
    suf: &mut [f64],
    tmp: &mut [f64],
) {
    let c = x.len();
    if c == 0 {
        return;
    }
    let len = x[0].len();
    let b = win.b;
    let m = b.saturating_mul(2).min(c);
    let row = |k: usize| (k % m) * len..(k % m) * len + len;
    let tmp = &mut tmp[..len];
    let mut next = 0;
    let hi = win.hi;
    for start in (0..c).step_by(b) {
        let end = (start + b).min(c);
        for kk in start..end {
            let xr = &x[kk][..len];
            if kk == start {
                for (p, &v) in pre[row(kk)].iter_mut().zip(xr) {
                    let v = v.to_f64();
                    *p = v * v;
                }
            } else {
                let (ra, rb) = (row(kk - 1), row(kk));
                for j in 0..len {
                    let v = xr[j].to_f64();
                    pre[rb.start + j] = pre[ra.start + j] + v * v;
                }
            }
        }
        for kk in (start..end).rev() {
            let xr = &x[kk][..len];
            if kk == end - 1 {
                for (p, &v) in suf[row(kk)].iter_mut().zip(xr) {
                    let v = v.to_f64();
                    *p = v * v;
                }
            } else {
                let (ra, rb) = (row(kk + 1), row(kk));
                for j in 0..len {
                    let v = xr[j].to_f64();
                    suf[rb.start + j] = suf[ra.start + j] + v * v;
                }
            }
        }
        while next < c && (next + hi).min(c - 1) < end {
            let i = next;
            next += 1;
            let (s, s2): (&[f64], Option<&[f64]>) = match win.plan[i] {
                Win::Pre(e) => (&pre[row(e)], None),
                Win::Suf(a) => (&suf[row(a)], None),
                // suf + pre, the order of `Windows::sums`.
                Win::Both(a, e) => (&suf[row(a)], Some(&pre[row(e)])),
                Win::Direct(a, e) => {
                    for (t, &v) in tmp.iter_mut().zip(&x[a][..len]) {
                        let v = v.to_f64();
                        *t = v * v;
                    }
                    for xr in &x[a + 1..=e] {
                        for (t, &v) in tmp.iter_mut().zip(&xr[..len]) {
                            let v = v.to_f64();
                            *t += v * v;
                        }
                    }
                    (&*tmp, None)
                }
            };
            finish_row(s, s2, x[i], y[i], l);
        }
    }
}

/// Scratch of [`lrn_strip`] for strips of up to `len` positions.
fn strip_scratch(win: &Windows, c: usize, len: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let m = win.b.saturating_mul(2).min(c);
    (vec![0.0; m * len], vec![0.0; m * len], vec![0.0; len])
}

/// Local response normalization of `x` into `y` (same shape, any layouts).
///
/// # Errors
/// size ≤ 0, non-finite α/β/k, input of fewer than 3 dimensions, bad axis, `y` of another
/// shape.
pub fn local_response_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    p: &LrnParams,
) -> Result<()> {
    check_out(&x, &y)?;
    let (l, cv) = setup(&x, p)?;
    let parallel = pool::worth_parallel(bytes_of(&x));
    let c = cv.c;
    let mut y = cv.permute_out(y);
    let win = Windows::new(c, l.lo, l.hi);
    if cv.x.is_empty() {
        return Ok(());
    }
    let y_planes = y
        .view()
        .index_axis_move(Axis(0), 0)
        .index_axis_move(Axis(0), 0)
        .as_slice()
        .is_some();
    if cv.access == Access::Planes && y_planes {
        // Channel planes contiguous in x and y (NCHW): strips of a plane are read and written
        // in place, no gather or scatter.
        let s = cv.s;
        let strips = s.div_ceil(STRIP);
        let (xst, yst) = (cv.x.strides().to_vec(), y.strides().to_vec());
        let (xp, yp) = (Ptr(cv.x.as_ptr()), Ptr(y.as_mut_ptr()));
        pool::for_each_task(cv.n * strips, parallel, |t| {
            let (n, st) = (t / strips, t % strips);
            let s0 = st * STRIP;
            let len = STRIP.min(s - s0);
            let (mut pre, mut suf, mut tmp) = strip_scratch(&win, c, len);
            let (xp, yp) = (xp, yp);
            let xo = |k: usize| n as isize * xst[0] + k as isize * xst[1] + s0 as isize;
            let yo = |k: usize| n as isize * yst[0] + k as isize * yst[1] + s0 as isize;
            // SAFETY: with Access::Planes (and the check on y) every (n, k) plane is a
            // contiguous block of s elements at that offset; positions s0..s0+len are this
            // task's alone in y, and y does not overlap x (an ArrayViewMut is unique).
            let xs: Vec<&[T]> = (0..c)
                .map(|k| unsafe { std::slice::from_raw_parts(xp.0.offset(xo(k)), len) })
                .collect();
            let mut ys: Vec<&mut [T]> = (0..c)
                .map(|k| unsafe { std::slice::from_raw_parts_mut(yp.0.offset(yo(k)), len) })
                .collect();
            lrn_strip(&win, &l, &xs, &mut ys, &mut pre, &mut suf, &mut tmp);
        });
        return Ok(());
    }
    let tile = tile_len(c, TILE_ELEMS);
    for_tiles(
        &[&cv.x],
        Some(y),
        1,
        tile,
        4,
        parallel,
        || strip_scratch(&win, c, tile),
        |(pre, suf, tmp), ins, out, len, ld| {
            let xs: Vec<&[f64]> = ins[0].chunks(ld).map(|r| &r[..len]).collect();
            let mut ys: Vec<&mut [f64]> = out.chunks_mut(ld).map(|r| &mut r[..len]).collect();
            lrn_strip(&win, &l, &xs, &mut ys, pre, suf, tmp);
        },
    );
    Ok(())
}

/// Gradient of [`local_response_norm`] with respect to x, written into `dx`.
///
/// # Errors
/// As the forward, and `grad_y`/`dx` of another shape than `x`.
pub fn local_response_norm_backward<T: Scalar>(
    grad_y: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    p: &LrnParams,
) -> Result<()> {
    check_same_shape("grad_y", grad_y.shape(), x.shape())?;
    check_out(&x, &dx)?;
    let (l, cv) = setup(&x, p)?;
    let gv = ChannelView::new(grad_y.clone(), p.axis, "local_response_norm", 3)?;
    let parallel = pool::worth_parallel(2 * bytes_of(&x));
    let c = cv.c;
    let dx = cv.permute_out(dx);
    let two_ab = 2.0 * l.alpha * l.beta;
    let win = Windows::new(c, l.lo, l.hi);
    // The transposed window: channel i feeds d_c for c ∈ [i − hi, i + lo].
    let back = Windows::new(c, l.hi, l.lo);
    for_tiles(
        &[&cv.x, &gv.x],
        Some(dx),
        1,
        tile_len(c, TILE_ELEMS / 2),
        4,
        parallel,
        || (),
        |_, ins, out, len, ld| {
            let (x, g) = (&ins[0], &ins[1]);
            let mut t = vec![0.0; c * ld];
            let mut pw = vec![0.0; c * ld];
            let mut pre = vec![0.0; c * ld];
            let mut suf = vec![0.0; c * ld];
            let mut s = vec![0.0; c * ld];
            for (q, &v) in t.iter_mut().zip(x.iter()) {
                *q = v * v;
            }
            win.sums(&t, len, ld, &mut pre, &mut suf, &mut s);
            for (d, &s) in pw.iter_mut().zip(&s) {
                *d = l.k + l.alpha * s;
            }
            // t = g·x·d^(−β)/d needs d after pw overwrites it: keep it in t first.
            t.copy_from_slice(&pw);
            pow_neg_rows(&mut pw, l.beta);
            for i in 0..c * ld {
                t[i] = g[i] * x[i] * pw[i] / t[i];
            }
            back.sums(&t, len, ld, &mut pre, &mut suf, &mut s);
            for k in 0..c {
                let r = k * ld..k * ld + len;
                for (((o, &g), &p), (&v, &s)) in out[r.clone()]
                    .iter_mut()
                    .zip(&g[r.clone()])
                    .zip(&pw[r.clone()])
                    .zip(x[r.clone()].iter().zip(&s[r]))
                {
                    *o = g * p - two_ab * v * s;
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Windows;

    fn direct(v: &[f64], lo: usize, hi: usize) -> Vec<f64> {
        let c = v.len();
        (0..c)
            .map(|i| v[i.saturating_sub(lo)..=(i + hi).min(c - 1)].iter().sum())
            .collect()
    }

    fn sums(v: &[f64], lo: usize, hi: usize) -> Vec<f64> {
        let c = v.len();
        let (mut p, mut s, mut o) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
        Windows::new(c, lo, hi).sums(v, 1, 1, &mut p, &mut s, &mut o);
        o
    }

    #[test]
    fn window_sums_match_direct_sums() {
        for c in 1..12 {
            let v: Vec<f64> = (0..c).map(|i| (i * 7 % 5) as f64 + 0.5).collect();
            for lo in 0..6 {
                for hi in 0..6 {
                    assert_eq!(
                        sums(&v, lo, hi),
                        direct(&v, lo, hi),
                        "c={c} lo={lo} hi={hi}"
                    );
                }
            }
        }
    }

    #[test]
    fn dispatched_powers_are_bitwise_the_scalar_formula() {
        // The runtime-selected clone (AVX-512 / AVX2 here) against the same formula written
        // as plain scalar code: correctly rounded operations, so the bits must agree.
        let v: Vec<f64> = (1..2000).map(|i| 1.0 + (i as f64) * 0.37).collect();
        for beta in [0.75, 0.5, 1.0, 0.3] {
            let want: Vec<f64> = v
                .iter()
                .map(|&d| match beta {
                    0.75 => {
                        let r = 1.0 / d.sqrt();
                        r * r.sqrt()
                    }
                    0.5 => 1.0 / d.sqrt(),
                    1.0 => 1.0 / d,
                    _ => d.powf(-beta),
                })
                .collect();
            let mut got = v.clone();
            super::pow_neg_rows(&mut got, beta);
            assert!(want
                .iter()
                .zip(&got)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn strip_kernel_is_bitwise_the_window_sums_and_powers() {
        // The fused forward against the unfused formula: window sums, k + α·s, d^(−β), ·x.
        let len = 13;
        for c in 1..12 {
            let x: Vec<f32> = (0..c * len)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
                .collect();
            let v: Vec<f64> = x.iter().map(|&t| f64::from(t) * f64::from(t)).collect();
            for lo in 0..6 {
                for hi in 0..6 {
                    for beta in [0.75, 0.5, 1.0, 0.3] {
                        let l = super::Lrn {
                            lo,
                            hi,
                            alpha: 0.7,
                            beta,
                            k: 1.3,
                        };
                        let win = Windows::new(c, lo, hi);
                        let (mut p, mut s) = (vec![0.0; c * len], vec![0.0; c * len]);
                        let mut d = vec![0.0; c * len];
                        win.sums(&v, len, len, &mut p, &mut s, &mut d);
                        for q in d.iter_mut() {
                            *q = l.k + l.alpha * *q;
                        }
                        super::pow_neg_rows(&mut d, beta);
                        let want: Vec<f32> = d
                            .iter()
                            .zip(&x)
                            .map(|(&p, &t)| {
                                <f32 as crate::scalar::Scalar>::from_f64(p * f64::from(t))
                            })
                            .collect();
                        let mut y = vec![0.0f32; c * len];
                        let xs: Vec<&[f32]> = x.chunks(len).collect();
                        let mut ys: Vec<&mut [f32]> = y.chunks_mut(len).collect();
                        let (mut pre, mut suf, mut tmp) = super::strip_scratch(&win, c, len);
                        super::lrn_strip(&win, &l, &xs, &mut ys, &mut pre, &mut suf, &mut tmp);
                        assert!(
                            want.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "c={c} lo={lo} hi={hi} beta={beta}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn no_drift_after_a_huge_value() {
        let mut v = vec![1.0; 40];
        v[3] = 1e300;
        assert_eq!(&sums(&v, 5, 5)[9..35], &[11.0; 26][..]);
    }
}
