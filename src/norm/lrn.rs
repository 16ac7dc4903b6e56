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
use crate::channel::ChannelView;
use crate::error::{NormError, Result};
use crate::pool;
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

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

/// d^(−β), with the common exponents computed by square roots (exactly rounded) instead of
/// `powf`.
#[inline]
fn pow_neg(d: f64, beta: f64) -> f64 {
    if beta == 0.75 {
        let r = 1.0 / d.sqrt();
        r * r.sqrt()
    } else if beta == 0.5 {
        1.0 / d.sqrt()
    } else if beta == 1.0 {
        1.0 / d
    } else {
        d.powf(-beta)
    }
}

/// out[c] = Σ_{j ∈ [c−lo, c+hi] ∩ [0, C)} v[j], each as at most lo+hi+1 additions in f64.
fn window_sums(v: &[f64], lo: usize, hi: usize, pre: &mut [f64], suf: &mut [f64], out: &mut [f64]) {
    let c = v.len();
    let b = lo + hi + 1;
    for start in (0..c).step_by(b) {
        let end = (start + b).min(c);
        let mut acc = 0.0;
        for j in start..end {
            acc += v[j];
            pre[j] = acc;
        }
        acc = 0.0;
        for j in (start..end).rev() {
            acc += v[j];
            suf[j] = acc;
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        let a = i.saturating_sub(lo);
        let e = (i + hi).min(c - 1);
        let (ba, be) = (a / b, e / b);
        *o = if ba != be {
            suf[a] + pre[e]
        } else if a == ba * b {
            pre[e]
        } else if e == ((ba + 1) * b).min(c) - 1 {
            suf[a]
        } else {
            // A window shorter than a block touches channel 0 or C−1, so this arm is not
            // reached; kept exact rather than assumed.
            v[a..=e].iter().sum()
        };
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
    let y = cv.permute_out(y);
    for_tiles(
        &[&cv.x],
        Some(y),
        tile_len(c, TILE_ELEMS),
        4,
        parallel,
        || (),
        |_, ins, out, len| {
            let mut sq = vec![0.0; c];
            let mut pre = vec![0.0; c];
            let mut suf = vec![0.0; c];
            let mut s = vec![0.0; c];
            for j in 0..len {
                let xr = &ins[0][j * c..(j + 1) * c];
                for (q, &v) in sq.iter_mut().zip(xr) {
                    *q = v * v;
                }
                window_sums(&sq, l.lo, l.hi, &mut pre, &mut suf, &mut s);
                for ((o, &v), &w) in out[j * c..(j + 1) * c].iter_mut().zip(xr).zip(&s) {
                    *o = v * pow_neg(l.k + l.alpha * w, l.beta);
                }
            }
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
    for_tiles(
        &[&cv.x, &gv.x],
        Some(dx),
        tile_len(c, TILE_ELEMS / 2),
        4,
        parallel,
        || (),
        |_, ins, out, len| {
            let mut t = vec![0.0; c];
            let mut pw = vec![0.0; c];
            let mut pre = vec![0.0; c];
            let mut suf = vec![0.0; c];
            let mut s = vec![0.0; c];
            for j in 0..len {
                let xr = &ins[0][j * c..(j + 1) * c];
                let gr = &ins[1][j * c..(j + 1) * c];
                for (q, &v) in t.iter_mut().zip(xr) {
                    *q = v * v;
                }
                window_sums(&t, l.lo, l.hi, &mut pre, &mut suf, &mut s);
                for i in 0..c {
                    let d = l.k + l.alpha * s[i];
                    pw[i] = pow_neg(d, l.beta);
                    t[i] = gr[i] * xr[i] * pw[i] / d;
                }
                // The transposed window: channel i feeds d_c for c ∈ [i − hi, i + lo].
                window_sums(&t, l.hi, l.lo, &mut pre, &mut suf, &mut s);
                for i in 0..c {
                    out[j * c + i] = gr[i] * pw[i] - two_ab * xr[i] * s[i];
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::window_sums;

    fn direct(v: &[f64], lo: usize, hi: usize) -> Vec<f64> {
        let c = v.len();
        (0..c)
            .map(|i| v[i.saturating_sub(lo)..=(i + hi).min(c - 1)].iter().sum())
            .collect()
    }

    #[test]
    fn window_sums_match_direct_sums() {
        for c in 1..12 {
            let v: Vec<f64> = (0..c).map(|i| (i * 7 % 5) as f64 + 0.5).collect();
            for lo in 0..6 {
                for hi in 0..6 {
                    let (mut p, mut s, mut o) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
                    window_sums(&v, lo, hi, &mut p, &mut s, &mut o);
                    assert_eq!(o, direct(&v, lo, hi), "c={c} lo={lo} hi={hi}");
                }
            }
        }
    }

    #[test]
    fn no_drift_after_a_huge_value() {
        let mut v = vec![1.0; 40];
        v[3] = 1e300;
        let (mut p, mut s, mut o) = (vec![0.0; 40], vec![0.0; 40], vec![0.0; 40]);
        window_sums(&v, 5, 5, &mut p, &mut s, &mut o);
        assert_eq!(&o[9..35], &[11.0; 26][..]);
    }
}
