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

use super::common::{check_eps, check_out};
use super::mixing::{check_same_shape, row_of, sums2, Rows};
use crate::channel::normalize_axis;
use crate::error::{NormError, Result};
use crate::pool;
use crate::reduce;
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn, Zip};

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

fn stats<T: Scalar>(row: &ArrayView<'_, T, IxDyn>, m: f64) -> (f64, f64) {
    let mean = reduce::sum_view(row, |v| v) / m;
    let var = reduce::sum_view(row, |v| (v - mean) * (v - mean)) / m;
    (mean, var.sqrt())
}

fn bytes<T>(x: &ArrayView<'_, T, IxDyn>) -> usize {
    x.len().saturating_mul(std::mem::size_of::<T>())
}

/// MVN of `x` over `axes` into `y`.
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
    let rows = Rows::new(x, &red);
    let yp = rows.out(y);
    let m = rows.features as f64;
    let per = rows.per_task();
    pool::for_each_task(rows.rows.div_ceil(per), parallel, |t| {
        for r in t * per..((t + 1) * per).min(rows.rows) {
            let xr = rows.row(r);
            let (mean, sd) = stats(&xr, m);
            let den = sd + eps;
            // SAFETY: task t owns rows t·per.. of the output.
            let mut yr = unsafe { yp.sub(&rows.index(r)) };
            Zip::from(&mut yr)
                .and(&xr)
                .for_each(|o, &v| *o = T::from_f64((v.to_f64() - mean) / den));
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
        for r in t * per..((t + 1) * per).min(rows.rows) {
            let idx = rows.index(r);
            let xr = rows.row(r);
            let gr = row_of(&gp, &idx);
            let (mean, sd) = stats(&xr, m);
            let den = sd + eps;
            let [sg, sgd] = sums2(&xr, &gr, |v, g| [g, g * (v - mean)]);
            let gm = sg / m;
            let k = if sd > 0.0 {
                sgd / (m * sd * den * den)
            } else {
                0.0
            };
            // SAFETY: task t owns rows t·per.. of dx.
            let mut dr = unsafe { dp.sub(&idx) };
            Zip::from(&mut dr).and(&xr).and(&gr).for_each(|o, &v, &g| {
                *o = T::from_f64((g.to_f64() - gm) / den - (v.to_f64() - mean) * k)
            });
        }
    });
    Ok(())
}
