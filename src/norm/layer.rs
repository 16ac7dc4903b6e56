//! Layer normalization (Ba et al. 2016): per row over the trailing `normalized_shape` dims.
//!
//! ```text
//! y = (x − mean) / sqrt(var + eps) · weight + bias     (var biased; weight, bias of normalized_shape)
//! ```

use super::common::{bytes_of, check_eps, check_out, rstd, GroupStats};
use crate::error::Result;
use crate::pool;
use crate::rows::{check_normalized_shape, check_row_param, rows_per_task, shared_out, RowView};
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Layer norm of `x` into `y`; weight/bias flattened in logical order with their shapes.
/// Returns mean and rstd per row.
///
/// # Errors
/// normalized_shape not matching x's trailing dims, parameter shapes, bad eps.
pub fn layer_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    normalized_shape: &[usize],
    weight: Option<(&[f64], &[usize])>,
    bias: Option<(&[f64], &[usize])>,
    eps: f64,
) -> Result<GroupStats> {
    check_out(&x, &y)?;
    check_eps(eps)?;
    check_normalized_shape(x.shape(), normalized_shape)?;
    check_row_param("weight", weight.map(|w| w.1), normalized_shape)?;
    check_row_param("bias", bias.map(|w| w.1), normalized_shape)?;
    let parallel = pool::worth_parallel(bytes_of(&x));
    let rv = RowView::new(x, normalized_shape.len());
    let (w, b) = (weight.map(|w| w.0), bias.map(|b| b.0));
    let yp = shared_out(y);
    let per = rows_per_task(rv.features, std::mem::size_of::<T>());
    let f = rv.features as f64;
    let parts = pool::map_tasks(rv.rows.div_ceil(per), parallel, |t| {
        let rows = t * per..((t + 1) * per).min(rv.rows);
        let mut st = Vec::with_capacity(rows.len());
        for r in rows {
            let m = rv.row_sum(r, |v| v) / f;
            let var = rv.row_sum(r, |v| (v - m) * (v - m)) / f;
            let rs = rstd(var, eps);
            // SAFETY: row r belongs to this task only.
            unsafe { rv.apply_row(r, &yp, m, rs, w, b) };
            st.push((m, rs));
        }
        st
    });
    let (mean, rstd) = parts.into_iter().flatten().unzip();
    Ok(GroupStats { mean, rstd })
}
