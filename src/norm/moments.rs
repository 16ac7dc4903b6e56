//! Per-channel partial statistics (count, mean, M2) — the unit that merges exactly across
//! chunks, processes and machines (Chan, Golub & LeVeque 1979):
//!
//! ```text
//! n = n_a + n_b,  δ = mean_b − mean_a,  mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n
//! ```

use super::batch::channel_moments;
use super::common::bytes_of;
use crate::channel::{normalize_axis, ChannelView};
use crate::error::Result;
use crate::pool;
use crate::scalar::Scalar;
use ndarray::{ArrayView, Axis, IxDyn};

/// Statistics of one part: `count` values per channel, their mean and Σ(x − mean)².
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub count: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Moments {
    /// Merges parts in the given order (the order fixes the rounding). Empty parts are skipped.
    pub fn merge(parts: &[Moments]) -> Option<Moments> {
        let mut it = parts.iter().filter(|p| p.count > 0);
        let mut acc = it.next()?.clone();
        for p in it {
            if p.mean.len() != acc.mean.len() {
                return None;
            }
            let (na, nb) = (acc.count as f64, p.count as f64);
            let n = na + nb;
            for k in 0..acc.mean.len() {
                let d = p.mean[k] - acc.mean[k];
                acc.mean[k] += d * nb / n;
                acc.m2[k] += p.m2[k] + d * d * na * nb / n;
            }
            acc.count += p.count;
        }
        Some(acc)
    }
}

/// Per-channel moments of `x` over every axis but `axis` (any axis, any rank ≥ 1).
///
/// # Errors
/// `axis` out of range.
pub fn moments<T: Scalar>(x: ArrayView<'_, T, IxDyn>, axis: isize) -> Result<Moments> {
    let ax = normalize_axis(axis, x.ndim(), "axis")?;
    let parallel = pool::worth_parallel(bytes_of(&x));
    // The same (N, C, S…) view and sums as batch norm, so `moments` gives bitwise batch norm's
    // statistics; a channel axis 0 gets a leading unit batch axis.
    let cv = if ax == 0 {
        ChannelView::new(x.insert_axis(Axis(0)), 1, "moments", 2)?
    } else {
        ChannelView::new(x, ax as isize, "moments", 2)?
    };
    let count = (cv.n * cv.s) as u64;
    let (mean, m2) = channel_moments(&cv, parallel);
    Ok(Moments { count, mean, m2 })
}
