//! Iterative normalization (Huang, Zhou, Zhu, Liu & Shao, CVPR 2019, "Iterative Normalization:
//! Beyond Standardization towards Efficient Whitening"): whitening of channel groups without an
//! eigendecomposition, Σ^-½ approximated by T Newton iterations. Conventions follow the
//! authors' reference (github.com/huangleiBuaa/IterNorm, `iterative_normalization_py`):
//!
//! ```text
//! per group g of C/G contiguous channels, over the m = N·S positions:
//! μ = mean(x),  Σ = (1/m) (x − μ)(x − μ)ᵀ + eps·I         (biased covariance, eps inside the trace)
//! Σ_N = Σ / tr(Σ),  P₀ = I,  P_{k+1} = ½(3 P_k − P_k³ Σ_N),  W = P_T / sqrt(tr(Σ))
//! y = W (x − μ)
//! training with running stats: rμ ← (1−momentum)·rμ + momentum·μ,  rW ← (1−momentum)·rW + momentum·W
//! eval: y = rW (x − rμ)
//! ```
//! Running stats have the reference's buffer shapes, (G, C/G, 1) and (G, C/G, C/G); any shape
//! with C and G·(C/G)² values is accepted (read in logical order).

use super::common::{check_eps, check_momentum, check_out};
use super::whiten::{group_apply, group_covariance, newton_inv_sqrt};
use crate::error::{NormError, Result};
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Arguments of [`iter_norm`] besides x and y.
#[derive(Clone, Copy, Debug)]
pub struct IterNormParams<'a> {
    pub running_mean: Option<&'a [f64]>,
    pub running_wm: Option<&'a [f64]>,
    pub num_groups: i64,
    pub t: i64,
    pub eps: f64,
    pub training: bool,
    pub momentum: f64,
    pub axis: isize,
}

/// What a forward computed: the statistics backward needs and the new running stats.
#[derive(Clone, Debug, PartialEq)]
pub struct IterNormOutput {
    /// Per-channel mean used (batch mean in training, running mean in eval), length C.
    pub mean: Vec<f64>,
    /// Σ + eps·I per group (G·(C/G)², row-major); empty in eval.
    pub sigma: Vec<f64>,
    /// The whitening matrix used per group (G·(C/G)², row-major).
    pub wm: Vec<f64>,
    /// Updated (running_mean, running_wm), when training with running stats.
    pub running: Option<(Vec<f64>, Vec<f64>)>,
}

/// Newton's iteration for Σ^-½ converges quadratically, and past a few dozen steps on an
/// ill-conditioned Σ it only amplifies rounding (see the module notes); a bound also keeps an
/// absurd T (2⁴⁰) from hanging the call.
pub const MAX_T: usize = 1000;

/// Iterative normalization of `x` into `y`.
///
/// # Errors
/// Bad axis, num_groups ≤ 0 or not dividing C, T < 0, bad eps or momentum, running stats of
/// the wrong size or only one of them, eval without running stats, training on an input with
/// no positions (N·S = 0) and C > 0.
pub fn iter_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    p: &IterNormParams<'_>,
) -> Result<IterNormOutput> {
    check_out(&x, &y)?;
    check_eps(p.eps)?;
    check_momentum(p.momentum)?;
    let t = match usize::try_from(p.t) {
        Ok(t) if t <= MAX_T => t,
        _ => {
            return Err(NormError::Param(format!(
                "T (the number of Newton iterations) must be in [0, {MAX_T}], got {}",
                p.t
            )))
        }
    };
    // group_covariance validates rank, axis and groups; do the same checks cheaply first so
    // an eval call fails the same way.
    let shape = x.shape().to_vec();
    if shape.len() < 2 {
        return Err(NormError::Shape(format!(
            "iter_norm expects an input with at least 2 dimensions (N, C, ...), got shape {}",
            crate::error::fmt_shape(&shape)
        )));
    }
    let ax = crate::channel::normalize_axis(p.axis, shape.len(), "axis")?;
    let c = shape[ax];
    let g = match usize::try_from(p.num_groups) {
        Ok(g) if g > 0 && c.is_multiple_of(g) => g,
        _ => {
            return Err(NormError::Param(format!(
                "num_groups must be positive and divide the number of channels, got C={c}, \
                 num_groups={}",
                p.num_groups
            )))
        }
    };
    let cg = c / g;
    if let Some(rm) = p.running_mean {
        if rm.len() != c {
            return Err(NormError::Shape(format!(
                "running_mean must have {c} values, shape ({g}, {cg}, 1), got {} values",
                rm.len()
            )));
        }
    }
    if let Some(rw) = p.running_wm {
        if rw.len() != g * cg * cg {
            return Err(NormError::Shape(format!(
                "running_wm must have shape ({g}, {cg}, {cg}), got {} values",
                rw.len()
            )));
        }
    }
    if p.running_mean.is_some() != p.running_wm.is_some() {
        return Err(NormError::Param(
            "running_mean and running_wm must be given together".into(),
        ));
    }
    if !p.training {
        let (Some(rm), Some(rw)) = (p.running_mean, p.running_wm) else {
            return Err(NormError::Param(
                "iter_norm in eval mode (training=False) needs running_mean and running_wm".into(),
            ));
        };
        group_apply(x, y, rw, rm, None, p.num_groups, p.axis)?;
        return Ok(IterNormOutput {
            mean: rm.to_vec(),
            sigma: Vec::new(),
            wm: rw.to_vec(),
            running: None,
        });
    }
    let cov = group_covariance(x.view(), p.num_groups, p.axis)?;
    if cov.count == 0 && c > 0 {
        return Err(NormError::TooFewValues(format!(
            "iter_norm in training needs at least one value per channel, got input shape {}",
            crate::error::fmt_shape(&shape)
        )));
    }
    let m = cov.count as f64;
    let mut sigma = cov.comoment;
    for blk in sigma.chunks_exact_mut((cg * cg).max(1)) {
        for v in blk.iter_mut() {
            *v /= m;
        }
        for i in 0..cg {
            blk[i * cg + i] += p.eps;
        }
    }
    let wm = newton_inv_sqrt(&sigma, cg, t);
    group_apply(x, y, &wm, &cov.mean, None, p.num_groups, p.axis)?;
    let running = match (p.running_mean, p.running_wm) {
        (Some(rm), Some(rw)) => {
            let mo = p.momentum;
            let nm = rm
                .iter()
                .zip(&cov.mean)
                .map(|(&o, &b)| (1.0 - mo) * o + mo * b)
                .collect();
            let nw = rw
                .iter()
                .zip(&wm)
                .map(|(&o, &b)| (1.0 - mo) * o + mo * b)
                .collect();
            Some((nm, nw))
        }
        _ => None,
    };
    Ok(IterNormOutput {
        mean: cov.mean,
        sigma,
        wm,
        running,
    })
}
