//! Group normalization (Wu & He 2018): channels split into G groups, statistics per (n, g)
//! over the group's channels and all spatial positions, per-channel affine.
//!
//! ```text
//! y[n,c,…] = (x[n,c,…] − mean[n,g]) / sqrt(var[n,g] + eps) · weight[c] + bias[c],  g = c / (C/G)
//! ```
//! G = 1 is layer norm over (C, …); G = C is instance norm.

use super::common::{bytes_of, check_eps, check_out, rstd, GroupStats};
use crate::channel::{check_channel_param, Access, ChannelView};
use crate::error::{NormError, Result};
use crate::pool;
use crate::reduce;
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Group norm of `x` into `y`. Returns mean and rstd per (n, g), row-major.
///
/// # Errors
/// num_groups ≤ 0 or not dividing C, bad eps, weight/bias not of shape (C,), bad axis.
pub fn group_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    num_groups: i64,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
    eps: f64,
    axis: isize,
) -> Result<GroupStats> {
    check_out(&x, &y)?;
    check_eps(eps)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(bytes_of(&x));
    let cv = ChannelView::new(x, axis, "group_norm", 2)?;
    if num_groups <= 0 {
        return Err(NormError::Param(format!(
            "num_groups must be positive, got {num_groups}"
        )));
    }
    let g = usize::try_from(num_groups).unwrap_or(usize::MAX);
    if cv.c % g != 0 {
        return Err(NormError::Param(format!(
            "num_groups must divide the number of channels: C={} is not divisible by num_groups={g}",
            cv.c
        )));
    }
    check_channel_param("weight", weight.map(|w| w.len()), cv.c, &shape)?;
    check_channel_param("bias", bias.map(|w| w.len()), cv.c, &shape)?;
    Ok(grouped(&cv, y, g, weight, bias, eps, parallel, None).0)
}

/// Normalizes each sample in one visit (statistics, then apply while the sample is in cache).
/// `fixed`: per-channel (mean, var) to use instead of the sample's statistics (instance norm
/// in eval mode). Shared by group and instance norm. Returns the stats and the biased
/// variance per (n, g).
#[allow(clippy::too_many_arguments)]
pub(crate) fn grouped<T: Scalar>(
    cv: &ChannelView<'_, T>,
    y: ArrayViewMut<'_, T, IxDyn>,
    groups: usize,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
    eps: f64,
    parallel: bool,
    fixed: Option<(&[f64], &[f64])>,
) -> (GroupStats, Vec<f64>) {
    let c = cv.c;
    let cpg = c.checked_div(groups).unwrap_or(0);
    let count = (cpg * cv.s) as f64;
    let yo = cv.output(y);
    if fixed.is_none() && cv.access == Access::Planes && cpg > 0 {
        // NCHW: a group is cpg contiguous planes. One task per (n, g) computes the group's
        // statistics and normalizes it while it is in L1/L2: one read of x from memory.
        // Same sums, folded in the same channel order, as the sample-wide path below.
        let per_group = pool::map_tasks(cv.n * groups, parallel, |t| {
            let (n, g) = (t / groups, t % groups);
            let cs = g * cpg..(g + 1) * cpg;
            let total = cs.clone().fold(0.0, |acc, k| {
                acc + reduce::sum_slice(cv.plane_slice(n, k), |v| v)
            });
            let m = total / count;
            let m2 = cs.clone().fold(0.0, |acc, k| {
                acc + reduce::sum_slice(cv.plane_slice(n, k), |v| (v - m) * (v - m))
            });
            let var = m2 / count;
            let rs = rstd(var, eps);
            for k in cs {
                let a = rs * weight.map_or(1.0, |w| w[k]);
                // Planes of group (n, g) belong to this task only.
                cv.apply_plane(n, k, &yo, m, a, bias.map_or(0.0, |b| b[k]));
            }
            (m, rs, var)
        });
        let mut stats = GroupStats::default();
        let mut var = Vec::with_capacity(per_group.len());
        for (m, r, v) in per_group {
            stats.mean.push(m);
            stats.rstd.push(r);
            var.push(v);
        }
        return (stats, var);
    }
    let per_sample = pool::map_tasks(cv.n, parallel, |n| {
        let mut scratch = Vec::new();
        let (gmean, gvar): (Vec<f64>, Vec<f64>) = match fixed {
            Some((fm, fv)) => (fm.to_vec(), fv.to_vec()),
            None => {
                let mut sums = vec![0.0f64; c];
                cv.sample_sums(n, 0..c, |v, _| v, &mut scratch, &mut sums);
                let gmean: Vec<f64> = fold_groups(&sums, cpg, groups)
                    .iter()
                    .map(|&s| s / count)
                    .collect();
                cv.sample_sums(
                    n,
                    0..c,
                    |v, k| {
                        let d = v - gmean[k / cpg];
                        d * d
                    },
                    &mut scratch,
                    &mut sums,
                );
                let gvar = fold_groups(&sums, cpg, groups)
                    .iter()
                    .map(|&s| s / count)
                    .collect();
                (gmean, gvar)
            }
        };
        let grstd: Vec<f64> = gvar.iter().map(|&v| rstd(v, eps)).collect();
        let per_c = |k: usize| if fixed.is_some() { k } else { k / cpg };
        let m: Vec<f64> = (0..c).map(|k| gmean[per_c(k)]).collect();
        let a: Vec<f64> = (0..c)
            .map(|k| grstd[per_c(k)] * weight.map_or(1.0, |w| w[k]))
            .collect();
        let b: Vec<f64> = (0..c).map(|k| bias.map_or(0.0, |b| b[k])).collect();
        // Task n owns sample n of y.
        cv.apply_sample(n, &yo, &m, &a, &b);
        (gmean, grstd, gvar)
    });
    let mut stats = GroupStats::default();
    let mut var = Vec::new();
    for (m, r, v) in per_sample {
        stats.mean.extend(m);
        stats.rstd.extend(r);
        var.extend(v);
    }
    (stats, var)
}

/// Sums consecutive runs of `cpg` channel sums, in channel order.
fn fold_groups(sums: &[f64], cpg: usize, groups: usize) -> Vec<f64> {
    if cpg == 0 {
        // No channels: every group is empty and its statistics are 0/0 = NaN.
        return vec![0.0; groups];
    }
    sums.chunks(cpg)
        .map(|ch| ch.iter().fold(0.0, |a, &v| a + v))
        .collect()
}
