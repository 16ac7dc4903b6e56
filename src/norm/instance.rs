//! Instance normalization (Ulyanov et al. 2016): statistics per (n, c) over the spatial axes.
//!
//! ```text
//! y[n,c,…] = (x[n,c,…] − mean[n,c]) / sqrt(var[n,c] + eps) · weight[c] + bias[c]
//! running ← (1 − m)·running + m·mean_n(batch stat)      (var: unbiased per instance)
//! ```
//! With `use_input_stats=False` the running statistics normalize instead, as in PyTorch.

use super::common::{bytes_of, check_eps, check_momentum, check_out, GroupStats};
use super::group::grouped;
use crate::channel::{check_channel_param, ChannelView};
use crate::error::{fmt_shape, NormError, Result};
use crate::pool;
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Parameters of [`instance_norm`]; per-channel arrays are read as f64.
#[derive(Clone, Debug, Default)]
pub struct InstanceNormParams<'a> {
    pub running_mean: Option<&'a [f64]>,
    pub running_var: Option<&'a [f64]>,
    pub weight: Option<&'a [f64]>,
    pub bias: Option<&'a [f64]>,
    pub use_input_stats: bool,
    pub momentum: f64,
    pub eps: f64,
    pub axis: isize,
}

/// What [`instance_norm`] computed besides `y`.
#[derive(Clone, Debug, Default)]
pub struct InstanceNormOutput {
    /// mean and rstd per (n, c), row-major (with running stats in eval: per (n, c) copies).
    pub stats: GroupStats,
    /// New running (mean, var) when they were given and input statistics were used.
    pub running: Option<(Vec<f64>, Vec<f64>)>,
}

/// Instance norm of `x` into `y`.
///
/// # Errors
/// Bad eps/momentum/axis, parameter shapes, one spatial element with input statistics,
/// `use_input_stats=False` without running statistics.
pub fn instance_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    p: &InstanceNormParams<'_>,
) -> Result<InstanceNormOutput> {
    check_out(&x, &y)?;
    check_eps(p.eps)?;
    check_momentum(p.momentum)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(bytes_of(&x));
    let cv = ChannelView::new(x, p.axis, "instance_norm", 2)?;
    for (name, v) in [
        ("running_mean", p.running_mean),
        ("running_var", p.running_var),
        ("weight", p.weight),
        ("bias", p.bias),
    ] {
        check_channel_param(name, v.map(|v| v.len()), cv.c, &shape)?;
    }
    let running = match (p.running_mean, p.running_var) {
        (Some(m), Some(v)) => Some((m, v)),
        (None, None) => None,
        _ => {
            return Err(NormError::Param(
                "running_mean and running_var must both be given or both be None".into(),
            ))
        }
    };
    if !p.use_input_stats {
        let (rm, rv) = running.ok_or_else(|| {
            NormError::Param("use_input_stats=False needs running_mean and running_var".into())
        })?;
        let (stats, _) = grouped(
            &cv,
            y,
            cv.c,
            p.weight,
            p.bias,
            p.eps,
            parallel,
            Some((rm, rv)),
        );
        return Ok(InstanceNormOutput {
            stats,
            running: None,
        });
    }
    if cv.s == 1 && cv.n * cv.c > 0 {
        return Err(NormError::TooFewValues(format!(
            "Expected more than 1 spatial element when training, got input size {}",
            fmt_shape(&shape)
        )));
    }
    let (stats, var) = grouped(&cv, y, cv.c, p.weight, p.bias, p.eps, parallel, None);
    let mut out = InstanceNormOutput {
        stats,
        running: None,
    };
    if let Some((rm, rv)) = running {
        if cv.n > 0 && cv.s > 1 {
            let (c, n, s) = (cv.c, cv.n as f64, cv.s as f64);
            let mut mean_sum = vec![0.0f64; c];
            let mut var_sum = vec![0.0f64; c];
            // Averaged over the batch in batch order, as PyTorch updates one copy per instance.
            for (i, (&m, &v)) in out.stats.mean.iter().zip(&var).enumerate() {
                mean_sum[i % c] += m;
                var_sum[i % c] += v * s / (s - 1.0);
            }
            let f = p.momentum;
            out.running = Some((
                (0..c)
                    .map(|k| (1.0 - f) * rm[k] + f * mean_sum[k] / n)
                    .collect(),
                (0..c)
                    .map(|k| (1.0 - f) * rv[k] + f * var_sum[k] / n)
                    .collect(),
            ));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Parameters of [`instance_norm_backward`]: the forward's, plus its statistics.
#[derive(Clone, Debug, Default)]
pub struct InstanceNormBackwardParams<'a> {
    pub running_mean: Option<&'a [f64]>,
    pub running_var: Option<&'a [f64]>,
    pub weight: Option<&'a [f64]>,
    /// Only whether it was given matters (dbias is returned for it).
    pub bias: Option<&'a [f64]>,
    pub use_input_stats: bool,
    /// Checked as in the forward, otherwise unused.
    pub momentum: f64,
    pub eps: f64,
    pub axis: isize,
    /// (mean, rstd) per (n, c), from `return_stats=True`.
    pub stats: Option<super::grad::StatsIn<'a>>,
}

/// Gradients of [`instance_norm`]: writes dx into `dx`, returns dweight/dbias for the
/// parameters that were given.
///
/// ```text
/// use_input_stats, per (n, c) over its S spatial values, d = x − mean[n,c]:
///   dx = w_c·rstd[n,c] · (dy − Σdy/S − d·rstd[n,c]²·Σdy·d/S)
/// running statistics (use_input_stats=False): dx = w_c·rstd_c·dy (an affine map)
/// dweight_c = Σ_n rstd·Σ dy·d       dbias_c = Σ_n Σ dy
/// ```
///
/// # Errors
/// As the forward; grad_y not of x's shape; stats not of shape (N, C).
pub fn instance_norm_backward<T: Scalar>(
    dy: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    p: &InstanceNormBackwardParams<'_>,
) -> Result<super::grad::ParamGrads> {
    use super::group::{grouped_backward, GroupedBackward};
    super::grad::check_grad_shapes(&dy, &x, &dx)?;
    check_eps(p.eps)?;
    check_momentum(p.momentum)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(bytes_of(&x).saturating_mul(2));
    let cv = ChannelView::new(x, p.axis, "instance_norm", 2)?;
    for (name, v) in [
        ("running_mean", p.running_mean),
        ("running_var", p.running_var),
        ("weight", p.weight),
        ("bias", p.bias),
    ] {
        check_channel_param(name, v.map(|v| v.len()), cv.c, &shape)?;
    }
    let running = match (p.running_mean, p.running_var) {
        (Some(m), Some(v)) => Some((m, v)),
        (None, None) => None,
        _ => {
            return Err(NormError::Param(
                "running_mean and running_var must both be given or both be None".into(),
            ))
        }
    };
    super::grad::check_stats(p.stats, cv.n * cv.c, &[cv.n, cv.c], true)?;
    let base = GroupedBackward {
        groups: cv.c,
        weight: p.weight,
        want_bias: p.bias.is_some(),
        eps: p.eps,
        axis: p.axis,
        parallel,
        stats: p.stats,
        fixed: None,
    };
    if !p.use_input_stats {
        let (rm, rv) = running.ok_or_else(|| {
            NormError::Param("use_input_stats=False needs running_mean and running_var".into())
        })?;
        let rs: Vec<f64> = rv.iter().map(|&v| super::common::rstd(v, p.eps)).collect();
        // Given stats are per-(n, c) copies of the running ones; the running arrays are the
        // same values without the copies.
        return grouped_backward(
            &cv,
            dy,
            dx,
            GroupedBackward {
                fixed: Some((rm, &rs)),
                ..base
            },
        );
    }
    if cv.s == 1 && cv.n * cv.c > 0 {
        return Err(NormError::TooFewValues(format!(
            "Expected more than 1 spatial element when training, got input size {}",
            fmt_shape(&shape)
        )));
    }
    grouped_backward(&cv, dy, dx, base)
}
