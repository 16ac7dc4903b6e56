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
//! correctly. Sums are canonical f64 sums in logical order: layout- and thread-independent.

use super::common::{check_eps, check_out};
use super::mixing::{check_same_shape, row_of, sums2, Rows};
use crate::channel::normalize_axis;
use crate::error::{NormError, Result};
use crate::pool;
use crate::reduce;
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn, Zip};

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

/// (‖x‖_p, max |x|, number of entries at the max) over one row. NaN anywhere gives NaN.
fn norm<T: Scalar>(row: &ArrayView<'_, T, IxDyn>, p: f64) -> (f64, f64, usize) {
    let mut m = 0.0f64;
    let mut nan = false;
    for v in row.iter() {
        let a = v.to_f64().abs();
        nan |= a.is_nan();
        if a > m {
            m = a;
        }
    }
    if nan {
        return (f64::NAN, f64::NAN, 0);
    }
    if m == 0.0 {
        return (0.0, 0.0, 0);
    }
    if m.is_infinite() {
        return (
            f64::INFINITY,
            m,
            row.iter().filter(|v| v.to_f64().abs() == m).count(),
        );
    }
    if p == f64::INFINITY {
        let ties = row.iter().filter(|v| v.to_f64().abs() == m).count();
        return (m, m, ties);
    }
    let s = pow2_floor(m);
    let n = if p == 2.0 {
        reduce::sum_view(row, |v| (v / s) * (v / s)).sqrt()
    } else if p == 1.0 {
        reduce::sum_view(row, |v| (v / s).abs())
    } else {
        reduce::sum_view(row, |v| (v / s).abs().powf(p)).powf(1.0 / p)
    };
    (n * s, m, 0)
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

fn setup<'a, T: Scalar>(
    x: ArrayView<'a, T, IxDyn>,
    p: f64,
    eps: f64,
    axis: isize,
) -> Result<Rows<'a, T>> {
    check_p(p)?;
    check_eps(eps)?;
    if x.ndim() == 0 {
        return Err(NormError::Shape(
            "normalize expects an input with at least 1 dimension, got a 0-d array".into(),
        ));
    }
    let ax = normalize_axis(axis, x.ndim(), "axis")?;
    Ok(Rows::new(x, &[ax]))
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
    let rows = setup(x, p, eps, axis)?;
    let yp = rows.out(y);
    let per = rows.per_task();
    pool::for_each_task(rows.rows.div_ceil(per), parallel, |t| {
        for r in t * per..((t + 1) * per).min(rows.rows) {
            let xr = rows.row(r);
            let d = clamp(norm(&xr, p).0, eps);
            // SAFETY: task t owns rows t·per.. of the output.
            let mut yr = unsafe { yp.sub(&rows.index(r)) };
            Zip::from(&mut yr)
                .and(&xr)
                .for_each(|o, &v| *o = T::from_f64(v.to_f64() / d));
        }
    });
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
    let rows = setup(x, p, eps, axis)?;
    let gp = rows.same(grad_y);
    let dp = rows.out(dx);
    let per = rows.per_task();
    pool::for_each_task(rows.rows.div_ceil(per), parallel, |t| {
        for r in t * per..((t + 1) * per).min(rows.rows) {
            let idx = rows.index(r);
            let xr = rows.row(r);
            let gr = row_of(&gp, &idx);
            let (n, m, ties) = norm(&xr, p);
            // SAFETY: task t owns rows t·per.. of dx.
            let mut dr = unsafe { dp.sub(&idx) };
            if n < eps {
                Zip::from(&mut dr)
                    .and(&gr)
                    .for_each(|o, &g| *o = T::from_f64(g.to_f64() / eps));
                continue;
            }
            let w = |v: f64| -> f64 {
                if p == 2.0 {
                    v / n
                } else if p == 1.0 {
                    sign(v)
                } else if p == f64::INFINITY {
                    if v.abs() == m {
                        sign(v) / ties as f64
                    } else {
                        0.0
                    }
                } else {
                    sign(v) * (v.abs() / n).powf(p - 1.0)
                }
            };
            let [s] = sums2(&xr, &gr, |v, g| [g * (v / n)]);
            Zip::from(&mut dr)
                .and(&xr)
                .and(&gr)
                .for_each(|o, &v, &g| *o = T::from_f64((g.to_f64() - s * w(v.to_f64())) / n));
        }
    });
    Ok(())
}
