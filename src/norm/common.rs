//! Checks and helpers shared by the families.

use crate::error::{fmt_shape, NormError, Result};
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Per-group statistics a forward returns for backward: mean and 1/sqrt(var + eps), in f64.
/// RMS norm has no mean (`mean` is empty).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupStats {
    pub mean: Vec<f64>,
    pub rstd: Vec<f64>,
}

/// eps must be a finite number ≥ 0.
pub fn check_eps(eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(NormError::Param(format!(
            "eps must be a finite number >= 0, got {eps}"
        )));
    }
    Ok(())
}

/// momentum must be in [0, 1].
pub fn check_momentum(m: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&m) {
        return Err(NormError::Param(format!(
            "momentum must be in [0, 1], got {m}"
        )));
    }
    Ok(())
}

/// The output must have the input's shape.
pub fn check_out<T>(x: &ArrayView<'_, T, IxDyn>, y: &ArrayViewMut<'_, T, IxDyn>) -> Result<()> {
    if x.shape() != y.shape() {
        return Err(NormError::Shape(format!(
            "out must have the input's shape {}, got {}",
            fmt_shape(x.shape()),
            fmt_shape(y.shape())
        )));
    }
    Ok(())
}

/// 1/sqrt(var + eps) in f64.
#[inline]
pub fn rstd(var: f64, eps: f64) -> f64 {
    1.0 / (var + eps).sqrt()
}

/// Bytes of an input, for the parallel threshold.
pub fn bytes_of<T: Scalar>(x: &ArrayView<'_, T, IxDyn>) -> usize {
    x.len().saturating_mul(std::mem::size_of::<T>())
}
