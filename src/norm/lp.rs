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
//! correctly. Each position gathers its channel vector into a tile (see `mixing::for_tiles`)
//! and sums it in channel order in f64: layout- and thread-independent.

use super::common::{check_eps, check_out};
use super::mixing::{check_same_shape, for_tiles, tile_len};
use crate::channel::normalize_axis;
use crate::error::{NormError, Result};
use crate::pool;
use crate::scalar::Scalar;
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
    for_tiles(
        &[&x],
        Some(y),
        ax,
        tile_len(c, LP_TILE_ELEMS),
        4,
        parallel,
        || (),
        |_, ins, out, len, ld| {
            let x = &ins[0];
            let (n, _, _) = norms(x, c, len, ld, p);
            let d: Vec<f64> = n.iter().map(|&n| clamp(n, eps)).collect();
            for k in 0..c {
                let r = k * ld..k * ld + len;
                for ((o, &v), &d) in out[r.clone()].iter_mut().zip(&x[r]).zip(&d) {
                    *o = v / d;
                }
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
