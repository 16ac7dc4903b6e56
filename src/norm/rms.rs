//! RMS normalization (Zhang & Sennrich 2019): per row over the trailing dims, no centering.
//!
//! ```text
//! y = x / sqrt(mean(x²) + eps) · weight      eps=None → finfo(float32).eps (f16/f32), finfo(float64).eps
//! ```
//! Σx² is accumulated in f64, so f32 rows of 1e20…3e38 are exact (f32 accumulation overflows).

use super::common::{bytes_of, check_eps, check_out, rstd, GroupStats};
use crate::error::Result;
use crate::pool;
use crate::rows::{check_normalized_shape, check_row_param, rows_per_task, shared_out, RowView};
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// RMS norm of `x` into `y`. Returns rstd per row (mean is empty).
///
/// # Errors
/// normalized_shape not matching x's trailing dims, weight shape, bad eps.
pub fn rms_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    normalized_shape: &[usize],
    weight: Option<(&[f64], &[usize])>,
    eps: Option<f64>,
) -> Result<GroupStats> {
    let eps = eps.unwrap_or_else(T::stat_eps);
    check_out(&x, &y)?;
    check_eps(eps)?;
    check_normalized_shape(x.shape(), normalized_shape)?;
    check_row_param("weight", weight.map(|w| w.1), normalized_shape)?;
    let parallel = pool::worth_parallel(bytes_of(&x));
    let rv = RowView::new(x, normalized_shape.len());
    let w = weight.map(|w| w.0);
    let yp = shared_out(y);
    let f = rv.features as f64;
    if let Some(ts) = rv.transposed() {
        let kind = super::layer::RowKind::Rms(eps);
        let st = super::layer::transposed_forward(ts, &rv, &yp, kind, w, None, parallel);
        return Ok(GroupStats {
            mean: Vec::new(),
            rstd: st.into_iter().map(|(_, rs)| rs).collect(),
        });
    }
    let per = rows_per_task(rv.features, std::mem::size_of::<T>());
    let parts = pool::map_tasks(rv.rows.div_ceil(per), parallel, |t| {
        let rows = t * per..((t + 1) * per).min(rv.rows);
        let mut st = Vec::with_capacity(rows.len());
        let end = rows.end;
        for r in rows {
            rv.prefetch_ahead(r, end);
            let rs = rstd(rv.row_sum(r, crate::reduce::add_sq) / f, eps);
            // SAFETY: row r belongs to this task only.
            unsafe { rv.apply_row(r, &yp, 0.0, rs, w, None) };
            st.push(rs);
        }
        crate::stream::stream_fence(yp.stream);
        st
    });
    Ok(GroupStats {
        mean: Vec::new(),
        rstd: parts.into_iter().flatten().collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Gradients of [`rms_norm`]: writes dx into `dx`, returns dweight (flattened
/// `normalized_shape`) when weight was given.
///
/// ```text
/// per row of F values, g = w·dy:
///   dx      = rstd · (g − x·rstd²·Σg·x/F)
///   dweight = Σ_rows dy·x·rstd
/// ```
/// Σg·x and rstd are f64, so rows of 1e20…3e38 (f32) stay finite and exact.
///
/// # Errors
/// As the forward; grad_y not of x's shape; stats.rstd not of shape x.shape[:-k].
pub fn rms_norm_backward<T: Scalar>(
    dy: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    normalized_shape: &[usize],
    weight: Option<(&[f64], &[usize])>,
    eps: Option<f64>,
    stats: Option<super::grad::StatsIn<'_>>,
) -> Result<super::grad::ParamGrads> {
    let eps = eps.unwrap_or_else(T::stat_eps);
    super::grad::check_grad_shapes(&dy, &x, &dx)?;
    check_eps(eps)?;
    check_normalized_shape(x.shape(), normalized_shape)?;
    check_row_param("weight", weight.map(|w| w.1), normalized_shape)?;
    let k = normalized_shape.len();
    let lead = &x.shape()[..x.ndim() - k];
    super::grad::check_stats(stats, lead.iter().product(), lead, false)?;
    Ok(super::layer::row_backward(
        dy,
        x,
        dx,
        k,
        weight.map(|w| w.0),
        false,
        super::layer::RowKind::Rms(eps),
        stats,
    ))
}
