//! Batch normalization (Ioffe & Szegedy 2015): per channel, over the batch and spatial axes.
//!
//! ```text
//! y = (x − mean_c) / sqrt(var_c + eps) · weight_c + bias_c
//! training:  mean_c, var_c = batch statistics (biased variance)
//!            running ← (1 − m)·running + m·batch   (PyTorch; var unbiased, ×n/(n−1))
//!            running ← m·running + (1 − m)·batch   (ONNX; var biased)
//! eval:      mean_c, var_c = running statistics (batch statistics if none are given)
//! ```

use super::common::{bytes_of, check_eps, check_momentum, check_out, rstd, GroupStats};
use crate::channel::{check_channel_param, Access, ChannelView};
use crate::error::{fmt_shape, NormError, Result};
use crate::pool;
use crate::reduce;
use crate::scalar::Scalar;
use multiversion::multiversion;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Which running-statistics update rule `momentum` refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MomentumConvention {
    /// `new = (1 − m)·old + m·batch`, unbiased batch variance (PyTorch, the default).
    #[default]
    Torch,
    /// `new = m·old + (1 − m)·batch`, biased batch variance (ONNX, Keras).
    Onnx,
}

/// Parameters of [`batch_norm`]; per-channel arrays are read as f64.
#[derive(Clone, Debug, Default)]
pub struct BatchNormParams<'a> {
    pub running_mean: Option<&'a [f64]>,
    pub running_var: Option<&'a [f64]>,
    pub weight: Option<&'a [f64]>,
    pub bias: Option<&'a [f64]>,
    pub training: bool,
    /// `None`: cumulative moving average driven by `num_batches_tracked`.
    pub momentum: Option<f64>,
    pub eps: f64,
    pub axis: isize,
    pub convention: MomentumConvention,
    pub num_batches_tracked: Option<i64>,
}

/// What [`batch_norm`] computed besides `y`.
#[derive(Clone, Debug, Default)]
pub struct BatchNormOutput {
    /// The mean and rstd used to normalize, per channel.
    pub stats: GroupStats,
    /// New running (mean, var) to store, when the call updates them.
    pub running: Option<(Vec<f64>, Vec<f64>)>,
    /// New `num_batches_tracked`, when the call increments it.
    pub num_batches_tracked: Option<i64>,
}

/// Batch normalization of `x` into `y` (same shape, any layouts).
///
/// # Errors
/// Bad eps/momentum, parameter shapes, axis; training with one value per channel.
pub fn batch_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    p: &BatchNormParams<'_>,
) -> Result<BatchNormOutput> {
    check_out(&x, &y)?;
    check_eps(p.eps)?;
    if let Some(m) = p.momentum {
        check_momentum(m)?;
    }
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(bytes_of(&x));
    let cv = ChannelView::new(x, p.axis, "batch_norm", 2)?;
    let c = cv.c;
    for (name, v) in [
        ("running_mean", p.running_mean),
        ("running_var", p.running_var),
        ("weight", p.weight),
        ("bias", p.bias),
    ] {
        check_channel_param(name, v.map(|v| v.len()), c, &shape)?;
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
    let count = cv.n * cv.s;
    let use_batch = p.training || running.is_none();
    if p.training && count == 1 {
        return Err(NormError::TooFewValues(format!(
            "Expected more than 1 value per channel when training, got input size {}",
            fmt_shape(&shape)
        )));
    }
    if p.training && running.is_some() {
        match (p.momentum, p.convention, p.num_batches_tracked) {
            (None, MomentumConvention::Onnx, _) => {
                return Err(NormError::Param(
                    "momentum=None (cumulative average) is only defined for momentum_convention=\"torch\""
                        .into(),
                ))
            }
            (None, _, None) => {
                return Err(NormError::Param(
                    "momentum=None (cumulative average) needs num_batches_tracked".into(),
                ))
            }
            _ => {}
        }
    }

    let b: Vec<f64> = (0..c).map(|k| p.bias.map_or(0.0, |b| b[k])).collect();
    let scale = |k: usize, rs: f64| rs * p.weight.map_or(1.0, |w| w[k]);
    let yo = cv.output(y);
    let (mean, var, m2) = if use_batch && fused_rows_fit(&cv) && yo.access() == Access::Rows {
        // (N, C) with a C-contiguous layout: one task per block of channels computes their
        // statistics and normalizes them while the block is in L2.
        let per_chunk = pool::map_tasks(c.div_ceil(FUSED_ROW_CHUNK), parallel, |t| {
            let cs = t * FUSED_ROW_CHUNK..((t + 1) * FUSED_ROW_CHUNK).min(c);
            let sums = rows_chunk_sums(&cv, cs.clone(), None);
            let mean: Vec<f64> = sums.iter().map(|&s| s / count as f64).collect();
            let m2 = rows_chunk_sums(&cv, cs.clone(), Some(&mean));
            let a: Vec<f64> = cs
                .clone()
                .zip(&m2)
                .map(|(k, &q)| scale(k, rstd(q / count as f64, p.eps)))
                .collect();
            // Channels `cs` of every row belong to this task only.
            cv.apply_rows_chunk(&yo, cs.clone(), &mean, &a, &b[cs]);
            (mean, m2)
        });
        let (mean, m2): (Vec<Vec<f64>>, Vec<Vec<f64>>) = per_chunk.into_iter().unzip();
        let (mean, m2) = (mean.concat(), m2.concat());
        let var = m2.iter().map(|&s| s / count as f64).collect();
        (mean, var, Some(m2))
    } else if use_batch && cv.access == Access::Planes && cv.s > 1 {
        // NCHW: one task per channel computes its statistics and normalizes it while its
        // planes are still in cache: one DRAM read and one write instead of three reads.
        // Small channels are grouped, about 64 KiB per task (a task per 6 KiB channel spent
        // more in scheduling than in the sums).
        let channel_bytes = cv.n * cv.s * std::mem::size_of::<T>();
        let per = (64 * 1024 / channel_bytes.max(1)).max(1);
        let per_task = pool::map_tasks(c.div_ceil(per), parallel, |t| {
            let ks = t * per..((t + 1) * per).min(c);
            let mut out = Vec::with_capacity(ks.len());
            for k in ks {
                let (m, m2) = channel_plane_moments(&cv, k);
                let rs = rstd(m2 / count as f64, p.eps);
                let a = scale(k, rs);
                for n in 0..cv.n {
                    // Planes of channel k belong to this task only.
                    cv.apply_plane(n, k, &yo, m, a, b[k]);
                }
                out.push((m, m2));
            }
            crate::stream::stream_fence(yo.stream());
            out
        });
        let (mean, m2): (Vec<f64>, Vec<f64>) = per_task.into_iter().flatten().unzip();
        let var = m2.iter().map(|&s| s / count as f64).collect();
        (mean, var, Some(m2))
    } else {
        let (mean, var, m2) = if use_batch {
            let (mean, m2) = channel_moments(&cv, parallel);
            let var = m2.iter().map(|&s| s / count as f64).collect::<Vec<_>>();
            (mean, var, Some(m2))
        } else {
            let (rm, rv) = running.expect("checked above");
            (rm.to_vec(), rv.to_vec(), None)
        };
        let a: Vec<f64> = (0..c).map(|k| scale(k, rstd(var[k], p.eps))).collect();
        if yo.access() == Access::Strided {
            // Layouts without contiguous samples or planes (e.g. a Fortran-order (N, C)
            // array): one whole-channel view per channel instead of one view per (n, c)
            // plane, which with one value per plane cost 100× the arithmetic.
            // With one value per plane, groups of 8 channels go row by row instead (8, not 16:
            // in a Fortran-order (N, C) array with N a multiple of 1024 the columns are 4 KiB
            // multiples apart and share one L1 set; 16 of them overflowed its 12 ways).
            let channel_bytes = cv.n * cv.s * std::mem::size_of::<T>();
            let per = if cv.s == 1 {
                8
            } else {
                (64 * 1024 / channel_bytes.max(1)).max(1)
            };
            pool::for_each_task(c.div_ceil(per), parallel, |t| {
                let ks = t * per..((t + 1) * per).min(c);
                // Channels ks of y belong to this task only.
                if cv.s == 1 {
                    cv.apply_channel_group(ks, &yo, &mean, &a, &b);
                } else {
                    for k in ks {
                        cv.apply_channel(k, &yo, mean[k], a[k], b[k]);
                    }
                }
            });
        } else {
            let per = cv.samples_per_task();
            // Each task writes its own block of samples of y.
            pool::for_each_task(cv.n.div_ceil(per), parallel, |t| {
                cv.apply_samples(t * per..((t + 1) * per).min(cv.n), &yo, &mean, &a, &b);
                crate::stream::stream_fence(yo.stream());
            });
        }
        (mean, var, m2)
    };
    let rs: Vec<f64> = var.iter().map(|&v| rstd(v, p.eps)).collect();

    let mut out = BatchNormOutput {
        stats: GroupStats {
            mean: mean.clone(),
            rstd: rs,
        },
        ..Default::default()
    };
    if p.training && count > 0 {
        if let Some((rm, rv)) = running {
            let m2 = m2.expect("batch statistics were computed");
            let nbt = p.num_batches_tracked.map(|v| v.saturating_add(1));
            let n = count as f64;
            let (new_m, new_v) = match p.convention {
                MomentumConvention::Torch => {
                    let f = p.momentum.unwrap_or_else(|| 1.0 / nbt.unwrap_or(1) as f64);
                    let unbiased = |k: usize| m2[k] / (n - 1.0);
                    (
                        (0..c).map(|k| (1.0 - f) * rm[k] + f * mean[k]).collect(),
                        (0..c)
                            .map(|k| (1.0 - f) * rv[k] + f * unbiased(k))
                            .collect(),
                    )
                }
                MomentumConvention::Onnx => {
                    let m = p.momentum.unwrap_or(0.9);
                    (
                        (0..c).map(|k| m * rm[k] + (1.0 - m) * mean[k]).collect(),
                        (0..c).map(|k| m * rv[k] + (1.0 - m) * var[k]).collect(),
                    )
                }
            };
            out.running = Some((new_m, new_v));
            out.num_batches_tracked = nbt;
        }
    }
    Ok(out)
}

/// Per-channel (mean, M2) over the batch and spatial axes. Shared with `moments` and the
/// backward.
///
/// With more than one value per plane, every plane (n, c) gets its own exact two passes —
/// Σx, then Σ(x − x̄ₙ)² about the plane's mean x̄ₙ = Σx/S (both canonical sums) — and the
/// planes are merged in batch order (Chan et al.):
/// ```text
/// mean = (Σₙ Σx) / (N·S)          M2 = Σₙ [ M2ₙ + S·(x̄ₙ − mean)² ]
/// ```
/// Every term is non-negative (no cancellation), and both passes over a plane run while it
/// is in L1/L2, whatever the layout: channels-last needs one read of each sample from memory
/// for its statistics instead of two. With one value per plane ((N, C) inputs) the shape's own
/// block order of [`batch_block_sums`] applies, about the global mean.
pub(crate) fn channel_moments<T: Scalar>(
    cv: &ChannelView<'_, T>,
    parallel: bool,
) -> (Vec<f64>, Vec<f64>) {
    if cv.n * cv.s == 0 {
        // No values: mean 0/0 (NaN, as any empty mean), M2 an empty sum.
        return (vec![f64::NAN; cv.c], vec![0.0; cv.c]);
    }
    if cv.s == 1 {
        let count = cv.n as f64;
        let sums = batch_block_sums(cv, parallel, |a, v, _| reduce::add(a, v));
        let mean: Vec<f64> = sums.iter().map(|&s| s / count).collect();
        let m2 = batch_block_sums(cv, parallel, |a, v, k| reduce::add_sq_dev(a, v, mean[k]));
        return (mean, m2);
    }
    if cv.access == Access::Planes {
        return pool::map_tasks(cv.c, parallel, |k| channel_plane_moments(cv, k))
            .into_iter()
            .unzip();
    }
    let c = cv.c;
    if cv.access == Access::Rows && cv.s >= ROW_SAMPLE_TASKS_MIN_S {
        // NHWC: one task per sample (contiguous, in L2 for both passes); planes merged in
        // batch order below.
        let planes = pool::map_tasks(cv.n, parallel, |n| {
            let mut scratch = Vec::new();
            sample_plane_moments(cv, n, 0..c, &mut scratch)
        });
        let mut m = PlaneMerge::new(c, cv.s);
        for (sums, _) in &planes {
            m.add_sums(sums);
        }
        let mean = m.mean(cv.n);
        for (sums, q) in &planes {
            m.add_m2(sums, q, &mean);
        }
        (mean, m.m2)
    } else {
        let chunk = if cv.access == Access::Rows {
            ROW_CHANNEL_CHUNK
        } else {
            1
        };
        let parts = pool::map_tasks(c.div_ceil(chunk), parallel, |t| {
            let cs = t * chunk..((t + 1) * chunk).min(c);
            let mut scratch = Vec::new();
            let planes: Vec<(Vec<f64>, Vec<f64>)> = (0..cv.n)
                .map(|n| sample_plane_moments(cv, n, cs.clone(), &mut scratch))
                .collect();
            merge_planes(&planes, cs.len(), cv.s)
        });
        let (mean, m2): (Vec<Vec<f64>>, Vec<Vec<f64>>) = parts.into_iter().unzip();
        (mean.concat(), m2.concat())
    }
}

/// (Σx, Σ(x − x̄)²) of each plane (n, c), c in `cs`, x̄ = Σx/S the plane's own mean.
fn sample_plane_moments<T: Scalar>(
    cv: &ChannelView<'_, T>,
    n: usize,
    cs: std::ops::Range<usize>,
    scratch: &mut Vec<f64>,
) -> (Vec<f64>, Vec<f64>) {
    let s = cv.s as f64;
    let mut sums = vec![0.0f64; cs.len()];
    cv.sample_sums(
        n,
        cs.clone(),
        |a, v, _| reduce::add(a, v),
        scratch,
        &mut sums,
    );
    let means: Vec<f64> = sums.iter().map(|&t| t / s).collect();
    let mut q = vec![0.0f64; cs.len()];
    cv.sample_sq_dev_sums(n, cs, &means, scratch, &mut q);
    (sums, q)
}

/// The batch-order merge of per-plane (Σx, M2ₙ) into per-channel (mean, M2).
struct PlaneMerge {
    total: Vec<f64>,
    m2: Vec<f64>,
    s: f64,
}

impl PlaneMerge {
    fn new(c: usize, s: usize) -> Self {
        Self {
            total: vec![0.0; c],
            m2: vec![0.0; c],
            s: s as f64,
        }
    }

    fn add_sums(&mut self, sums: &[f64]) {
        for (t, v) in self.total.iter_mut().zip(sums) {
            *t += *v;
        }
    }

    fn mean(&self, n: usize) -> Vec<f64> {
        let count = n as f64 * self.s;
        self.total.iter().map(|&t| t / count).collect()
    }

    fn add_m2(&mut self, sums: &[f64], q: &[f64], mean: &[f64]) {
        for (((a, &t), &qk), &mk) in self.m2.iter_mut().zip(sums).zip(q).zip(mean) {
            let d = t / self.s - mk;
            *a += qk + self.s * (d * d);
        }
    }
}

/// Merges the planes of a range of channels, given in batch order.
fn merge_planes(planes: &[(Vec<f64>, Vec<f64>)], c: usize, s: usize) -> (Vec<f64>, Vec<f64>) {
    let mut m = PlaneMerge::new(c, s);
    for (sums, _) in planes {
        m.add_sums(sums);
    }
    let mean = m.mean(planes.len());
    for (sums, q) in planes {
        m.add_m2(sums, q, &mean);
    }
    (mean, m.m2)
}

/// (mean, M2) of one channel with the same arithmetic as [`channel_moments`]; each plane's
/// two passes run back to back, while it is in L1. Planes are slices here (NCHW), so this is
/// [`sample_plane_moments`] and [`PlaneMerge`] without their per-plane vectors (small planes
/// made the allocations cost more than the sums).
fn channel_plane_moments<T: Scalar>(cv: &ChannelView<'_, T>, k: usize) -> (f64, f64) {
    let s = cv.s as f64;
    let planes: Vec<(f64, f64)> = (0..cv.n)
        .map(|n| {
            if n + 1 < cv.n && cv.s * std::mem::size_of::<T>() >= 4096 {
                // The next plane of this channel is a sample stride away: a jump the
                // hardware prefetcher cannot guess (0.94× the time on (32,64,56,56); on
                // planes under 4 KiB the hints cost more than they save: 1.18×).
                let next = cv.plane_slice(n + 1, k);
                crate::stream::prefetch_bytes(next.as_ptr().cast(), std::mem::size_of_val(next));
            }
            let xs = cv.plane_slice(n, k);
            let t = reduce::sum_slice_add(xs);
            let mp = t / s;
            (
                t,
                reduce::sum_slice(xs, |a, v| reduce::add_sq_dev(a, v, mp)),
            )
        })
        .collect();
    let total = planes.iter().fold(0.0f64, |acc, &(t, _)| acc + t);
    let mean = total / (cv.n as f64 * s);
    let m2 = planes.iter().fold(0.0f64, |acc, &(t, q)| {
        let d = t / s - mean;
        acc + (q + s * (d * d))
    });
    (mean, m2)
}

/// Channels per task in the channels-last path: 16 f32 = one cache line, so two tasks never
/// share a line of a row.
const ROW_CHANNEL_CHUNK: usize = 16;

/// From this many spatial positions per sample on, channels-last sums run one task per block
/// of samples and keep the N×C plane sums (at most 1/64 of the input's size in f64).
const ROW_SAMPLE_TASKS_MIN_S: usize = 64;

/// Rows per block of the (N, C) reduction (see [`batch_block_sums`]).
const BATCH_BLOCK: usize = 256;

/// Channels per task of the fused (N, C) path: 1 KiB of each f32 row (shorter runs made the
/// per-row call overhead dominate).
const FUSED_ROW_CHUNK: usize = 256;

/// The fused (N, C) path keeps a block of `FUSED_ROW_CHUNK` channels of every row in L2
/// between its three passes; beyond that size the block path streams rows instead.
fn fused_rows_fit<T: Scalar>(cv: &ChannelView<'_, T>) -> bool {
    cv.access == Access::Rows
        && cv.s == 1
        && cv.n * FUSED_ROW_CHUNK * std::mem::size_of::<T>() <= 512 * 1024
}

/// [`batch_block_sums`] for the channels `cs` only, of x itself (`mean` None) or of (x − m_k)²:
/// the same blocks of rows, each summed in row order, folded in order — the same f64
/// operations — with the rows taken `ROW_BLOCK` at a time by the blocked kernels of `reduce`.
fn rows_chunk_sums<T: Scalar>(
    cv: &ChannelView<'_, T>,
    cs: std::ops::Range<usize>,
    mean: Option<&[f64]>,
) -> Vec<f64> {
    use reduce::ROW_BLOCK;
    let mut total = vec![0.0f64; cs.len()];
    let mut acc = vec![0.0f64; cs.len()];
    let row = |n: usize| &cv.sample_rows(n)[cs.clone()];
    for b in 0..cv.n.div_ceil(BATCH_BLOCK) {
        acc.iter_mut().for_each(|a| *a = 0.0);
        let rows = b * BATCH_BLOCK..((b + 1) * BATCH_BLOCK).min(cv.n);
        let mut n = rows.start;
        while n + ROW_BLOCK <= rows.end {
            let block: [&[T]; ROW_BLOCK] = std::array::from_fn(|i| row(n + i));
            match mean {
                None => reduce::accumulate_rows_add(&mut acc, block),
                Some(m) => reduce::accumulate_rows_sq_dev(&mut acc, block, m),
            }
            n += ROW_BLOCK;
        }
        for n in n..rows.end {
            match mean {
                None => reduce::accumulate_row(&mut acc, row(n), |a, v, _| reduce::add(a, v)),
                Some(m) => reduce::accumulate_row_sq_dev(&mut acc, row(n), m),
            }
        }
        for (t, a) in total.iter_mut().zip(&acc) {
            *t += *a;
        }
    }
    total
}

/// Per-channel sums of f for inputs with one value per plane, (N, C) and the like.
///
/// Planes of one value would make the batch fold a serial chain of N adds per channel, so
/// these shapes use their own canonical order instead (chosen by the shape alone, hence the
/// same for every layout): blocks of `BATCH_BLOCK` consecutive rows, each summed in row order,
/// blocks folded in order. Blocks run in parallel, a C-contiguous input streams whole rows, and
/// the vectors run across channels (C accumulators: one row's worth, in L1).
fn batch_block_sums<T: Scalar, F: Fn(f64, f64, usize) -> f64 + Copy + Sync>(
    cv: &ChannelView<'_, T>,
    parallel: bool,
    f: F,
) -> Vec<f64> {
    debug_assert_eq!(cv.s, 1);
    let c = cv.c;
    let blocks = cv.n.div_ceil(BATCH_BLOCK);
    let rows_of = |b: usize| b * BATCH_BLOCK..((b + 1) * BATCH_BLOCK).min(cv.n);
    let partials: Vec<Vec<f64>> = if cv.access == Access::Rows {
        pool::map_tasks(blocks, parallel, |b| {
            let mut acc = vec![0.0f64; c];
            for n in rows_of(b) {
                reduce::accumulate_row(&mut acc, cv.sample_rows(n), f);
            }
            acc
        })
    } else {
        // Any other layout (one value per plane: element (n, k) at n·s₀ + k·s₁): one task
        // per group of channels walks the rows in order, one serial chain per channel (the
        // canonical order), the chains of the group interleaved so that they overlap (one
        // channel at a time was bound by the add latency).
        let per_group = pool::map_tasks(c.div_ceil(COLUMN_GROUP), parallel, |g| {
            let ks = g * COLUMN_GROUP..((g + 1) * COLUMN_GROUP).min(c);
            (0..blocks)
                .map(|b| {
                    // SAFETY: rows_of(b) < n and ks < c index elements of x.
                    unsafe { column_group_sums(cv, rows_of(b), ks.clone(), f) }
                })
                .collect::<Vec<_>>()
        });
        (0..blocks)
            .map(|b| {
                (0..c)
                    .map(|k| per_group[k / COLUMN_GROUP][b][k % COLUMN_GROUP])
                    .collect()
            })
            .collect()
    };
    let mut total = vec![0.0f64; c];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Channels summed side by side by [`column_group_sums`].
const COLUMN_GROUP: usize = 8;

/// Sums with the step f of the channels `ks` (at most `COLUMN_GROUP`) over the rows `rows`, one
/// serial chain per channel, for inputs with one value per plane in any layout.
///
/// # Safety
/// `rows` and `ks` must index elements of `cv.x` (spatial dims are 1).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
unsafe fn column_group_sums<T: Scalar, F: Fn(f64, f64, usize) -> f64>(
    cv: &ChannelView<'_, T>,
    rows: std::ops::Range<usize>,
    ks: std::ops::Range<usize>,
    f: F,
) -> [f64; COLUMN_GROUP] {
    let (p, st) = (cv.x.as_ptr(), cv.x.strides());
    let (s0, s1) = (st[0], st[1]);
    let mut acc = [0.0f64; COLUMN_GROUP];
    for n in rows {
        for (a, k) in acc.iter_mut().zip(ks.clone()) {
            // SAFETY: (n, k, 0, …) is an element of x (the caller's contract).
            let x = unsafe { *p.offset(n as isize * s0 + k as isize * s1) };
            *a = f(*a, x.to_f64(), k);
        }
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Parameters of [`batch_norm_backward`]: the forward's, plus the forward's statistics.
#[derive(Clone, Debug, Default)]
pub struct BatchNormBackwardParams<'a> {
    pub running_mean: Option<&'a [f64]>,
    pub running_var: Option<&'a [f64]>,
    pub weight: Option<&'a [f64]>,
    /// Only whether it was given matters (dbias is returned for it).
    pub bias: Option<&'a [f64]>,
    pub training: bool,
    /// Checked as in the forward, otherwise unused.
    pub momentum: Option<f64>,
    pub eps: f64,
    pub axis: isize,
    /// (mean, rstd) per channel from `return_stats=True`: skips recomputing them.
    pub stats: Option<super::grad::StatsIn<'a>>,
}

/// Gradients of [`batch_norm`]: writes dx into `dx`, returns dweight/dbias for the parameters
/// that were given.
///
/// ```text
/// training (or no running stats), per channel c over its n values, d = x − mean_c:
///   dx      = w_c·rstd_c · (dy − Σdy/n − d·rstd_c²·Σdy·d/n)
/// eval with running stats (an affine map):
///   dx      = w_c·rstd_c · dy
/// dweight_c = rstd_c · Σ dy·d        dbias_c = Σ dy
/// ```
/// Σdy and Σdy·d are canonical plane sums folded in batch order (the forward's order), so the
/// result is bitwise independent of layout and threads. An empty batch gives zero gradients.
///
/// # Errors
/// As the forward: bad eps/momentum/axis, parameter or stats shapes, training with one value
/// per channel; grad_y not of x's shape.
pub fn batch_norm_backward<T: Scalar>(
    dy: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    p: &BatchNormBackwardParams<'_>,
) -> Result<super::grad::ParamGrads> {
    use super::grad::{check_grad_shapes, check_stats, ChannelPair, Coef, ParamGrads};
    check_grad_shapes(&dy, &x, &dx)?;
    check_eps(p.eps)?;
    if let Some(m) = p.momentum {
        check_momentum(m)?;
    }
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(bytes_of(&x).saturating_mul(2));
    let cv = ChannelView::new(x, p.axis, "batch_norm", 2)?;
    let c = cv.c;
    for (name, v) in [
        ("running_mean", p.running_mean),
        ("running_var", p.running_var),
        ("weight", p.weight),
        ("bias", p.bias),
    ] {
        check_channel_param(name, v.map(|v| v.len()), c, &shape)?;
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
    check_stats(p.stats, c, &[c], true)?;
    let count = cv.n * cv.s;
    let use_batch = p.training || running.is_none();
    if p.training && count == 1 {
        return Err(NormError::TooFewValues(format!(
            "Expected more than 1 value per channel when training, got input size {}",
            fmt_shape(&shape)
        )));
    }
    let pair = ChannelPair::new(&cv, dy, p.axis, "batch_norm")?;
    let nf = count as f64;
    // dx = r·(dy − μ − (x − m)·k) for channel k, from its mean, rstd and [Σdy, Σdy·(x − m)].
    let coef_of = |k: usize, m: f64, rs: f64, sums: [f64; 2]| {
        let (mu, kk) = if use_batch {
            (sums[0] / nf, rs * rs * sums[1] / nf)
        } else {
            (0.0, 0.0)
        };
        Coef {
            m,
            r: rs * p.weight.map_or(1.0, |w| w[k]),
            s: 1.0,
            mu,
            k: kk,
        }
    };
    let dxp = crate::reduce::SharedMut::new(cv.permute_out(dx));
    let planes = cv.access == crate::channel::Access::Planes
        && pair.dy.access == crate::channel::Access::Planes;
    if planes && cv.s > 1 && super::grad::planes_standard(dxp.shape(), dxp.strides()) {
        // NCHW: one task per channel computes its sums and writes its dx while its planes are
        // still in cache: one DRAM read of x and grad_y instead of two. Same sums, same order.
        let (st0, st1) = (dxp.strides()[0], dxp.strides()[1]);
        let per_channel = pool::map_tasks(c, parallel, |k| {
            let (m, rs) = match (p.stats, use_batch, running) {
                (Some(s), _, _) => (s.mean.map_or(0.0, |m| m[k]), s.rstd[k]),
                (None, true, _) | (None, false, None) => {
                    let (m, m2) = channel_plane_moments(&cv, k);
                    (m, rstd(m2 / nf, p.eps))
                }
                (None, false, Some((rm, rv))) => (rm[k], rstd(rv[k], p.eps)),
            };
            let mut acc = [0.0f64; 2];
            for n in 0..cv.n {
                let q = super::grad::pair_sums_slices(
                    pair.dy.plane_slice(n, k),
                    cv.plane_slice(n, k),
                    m,
                );
                acc[0] += q[0];
                acc[1] += q[1];
            }
            let cf = coef_of(k, m, rs, acc);
            for n in 0..cv.n {
                // SAFETY: plane (n, k) of dx is a standard-layout block of s elements (checked
                // above) written only by the task of channel k.
                let d = unsafe { dxp.block_mut(n as isize * st0 + k as isize * st1, cv.s) };
                let (g, v) = (pair.dy.plane_slice(n, k), cv.plane_slice(n, k));
                super::grad::apply_slices_to(d, g, v, cf, dxp.stream);
            }
            crate::stream::stream_fence(dxp.stream);
            (rs, acc)
        });
        return Ok(ParamGrads {
            weight: p.weight.map(|_| {
                let empty = count == 0;
                per_channel
                    .iter()
                    .map(|(rs, a)| if empty { 0.0 } else { rs * a[1] })
                    .collect()
            }),
            bias: p
                .bias
                .map(|_| per_channel.iter().map(|(_, a)| a[0]).collect()),
        });
    }

    let (mean, rs): (Vec<f64>, Vec<f64>) = match (p.stats, use_batch) {
        (Some(s), _) => (s.mean.unwrap_or_default().to_vec(), s.rstd.to_vec()),
        (None, true) => {
            let (mean, m2) = channel_moments(&cv, parallel);
            let rs = m2.iter().map(|&s| rstd(s / count as f64, p.eps)).collect();
            (mean, rs)
        }
        (None, false) => {
            let (rm, rv) = running.expect("checked above");
            (rm.to_vec(), rv.iter().map(|&v| rstd(v, p.eps)).collect())
        }
    };

    // One value per plane in a layout without contiguous samples (a Fortran-order (N, C)
    // array, a sliced one): see `one_value_sums`.
    let one_value = cv.s == 1 && !pair.rows();
    // [Σdy, Σdy·(x − mean)] per channel: channel chunks as tasks, planes folded in batch order.
    let chunk = if pair.rows() { ROW_CHANNEL_CHUNK } else { 1 };
    let parts = if one_value {
        one_value_sums(&cv, &pair.dy, &mean, parallel)
    } else if pair.rows() && cv.s == 1 {
        // (N, C) C-contiguous: one chunk of channels per thread walking its segment of every
        // row (16-channel chunks read one cache line per row per task: 8× the time on
        // (16384, 1024)). Each channel's sum is one chain over the rows whatever the chunks.
        let threads = if parallel { pool::num_threads() } else { 1 };
        let chunk = c.div_ceil(threads).next_multiple_of(16).max(16);
        pool::map_tasks(c.div_ceil(chunk), parallel, |t| {
            let cs = t * chunk..((t + 1) * chunk).min(c);
            let (mut a0, mut a1) = (vec![0.0f64; cs.len()], vec![0.0f64; cs.len()]);
            for n in 0..cv.n {
                let (g, x) = (
                    &pair.dy.sample_rows(n)[cs.clone()],
                    &cv.sample_rows(n)[cs.clone()],
                );
                one_value_row_sums(&mut a0, &mut a1, g, x, &mean[cs.clone()]);
            }
            a0.into_iter()
                .zip(a1)
                .map(|(s0, s1)| [s0, s1])
                .collect::<Vec<_>>()
        })
    } else {
        pool::map_tasks(c.div_ceil(chunk), parallel, |t| {
            let cs = t * chunk..((t + 1) * chunk).min(c);
            let mut scratch = Vec::new();
            let mut part = vec![[0.0f64; 2]; cs.len()];
            let mut acc = vec![[0.0f64; 2]; cs.len()];
            for n in 0..cv.n {
                pair.sample_sums(n, cs.clone(), |k| mean[k], &mut scratch, &mut part);
                for (a, q) in acc.iter_mut().zip(&part) {
                    a[0] += q[0];
                    a[1] += q[1];
                }
            }
            acc
        })
    };
    let sums: Vec<[f64; 2]> = parts.concat();

    let coef: Vec<Coef> = (0..c)
        .map(|k| coef_of(k, mean[k], rs[k], sums[k]))
        .collect();
    if one_value {
        one_value_apply(&cv, &pair.dy, &dxp, &coef, parallel);
    } else if pair.rows() && cv.s == 1 && dxp.is_standard_layout() {
        // (N, C) C-contiguous with a C-contiguous dx: blocks of rows per task, the coefficients
        // as arrays so that the row loop vectorizes (a task and a sub-view per row, and the
        // per-channel structs, cost 40 % of a (16384, 1024) backward).
        let field = |f: fn(&Coef) -> f64| coef.iter().map(f).collect::<Vec<f64>>();
        let cols = [
            field(|c| c.m),
            field(|c| c.r),
            field(|c| c.s),
            field(|c| c.mu),
            field(|c| c.k),
        ];
        let per = cv.samples_per_task();
        pool::for_each_task(cv.n.div_ceil(per), parallel, |t| {
            for n in t * per..((t + 1) * per).min(cv.n) {
                // SAFETY: row n of dx (C-contiguous, x's shape) belongs to this task only.
                let d = unsafe { dxp.block_mut((n * c) as isize, c) };
                one_value_row_dx(d, pair.dy.sample_rows(n), cv.sample_rows(n), &cols);
            }
        });
    } else {
        // Each task writes sample n of dx only.
        pool::for_each_task(cv.n, parallel, |n| pair.apply_sample(n, &dxp, &coef));
    }

    let empty = count == 0;
    Ok(ParamGrads {
        weight: p.weight.map(|_| {
            (0..c)
                .map(|k| if empty { 0.0 } else { rs[k] * sums[k][1] })
                .collect()
        }),
        bias: p.bias.map(|_| sums.iter().map(|s| s[0]).collect()),
    })
}

/// Channels per task of the one-value-per-plane backward in strided layouts (8: see the
/// forward's channel groups).
const ONE_VALUE_GROUP: usize = 8;

/// Per-channel [Σdy, Σdy·(x − m)] of inputs with one value per plane in any layout, in groups
/// of channels that walk the rows (a plane view per value cost ~100× the arithmetic). A
/// one-value plane's canonical sums are its terms themselves (+0.0 for a −0.0 term, which adds
/// the same to a sum that starts at +0.0), so these are the plane path's f64 operations, folded
/// in batch order. One vector of sums per group, in channel order.
fn one_value_sums<T: Scalar>(
    x: &ChannelView<'_, T>,
    dy: &ChannelView<'_, T>,
    mean: &[f64],
    parallel: bool,
) -> Vec<Vec<[f64; 2]>> {
    let c = x.c;
    pool::map_tasks(c.div_ceil(ONE_VALUE_GROUP), parallel, |t| {
        let ks = t * ONE_VALUE_GROUP..((t + 1) * ONE_VALUE_GROUP).min(c);
        one_value_group_sums(x, dy, mean, ks)
    })
}

/// Adds one row's one-value planes to the per-channel [Σdy, Σdy·(x − m)]: a plane's sum is
/// its term plus 0.0 (`ChannelPair::sample_sums`), folded in batch order — bitwise that path.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn one_value_row_sums<T: Scalar>(a0: &mut [f64], a1: &mut [f64], g: &[T], x: &[T], m: &[f64]) {
    for ((((s0, s1), &g), &v), &mk) in a0.iter_mut().zip(a1.iter_mut()).zip(g).zip(x).zip(m) {
        let g = g.to_f64();
        *s0 += g + 0.0;
        *s1 += g * (v.to_f64() - mk) + 0.0;
    }
}

/// dx of one (N, C) row: `Coef::dx` per channel, the coefficients given as columns
/// [m, r, s, μ, k] (bitwise the same expression).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn one_value_row_dx<T: Scalar>(d: &mut [T], g: &[T], x: &[T], [m, r, s, mu, k]: &[Vec<f64>; 5]) {
    let n = d.len().min(g.len()).min(x.len()).min(m.len());
    let (m, r, s, mu, k) = (&m[..n], &r[..n], &s[..n], &mu[..n], &k[..n]);
    for j in 0..n {
        let gj = s[j] * g[j].to_f64();
        d[j] = T::from_f64(r[j] * (gj - mu[j] - (x[j].to_f64() - m[j]) * k[j]));
    }
}

/// One channel group of [`one_value_sums`].
fn one_value_group_sums<T: Scalar>(
    x: &ChannelView<'_, T>,
    dy: &ChannelView<'_, T>,
    mean: &[f64],
    ks: std::ops::Range<usize>,
) -> Vec<[f64; 2]> {
    let (px, sx) = (x.x.as_ptr(), x.x.strides());
    let (pg, sg) = (dy.x.as_ptr(), dy.x.strides());
    let mut acc = vec![[0.0f64; 2]; ks.len()];
    for n in 0..x.n as isize {
        for (a, k) in acc.iter_mut().zip(ks.clone()) {
            let ki = k as isize;
            // SAFETY: (n, k, 0, …) is an element of x and of grad_y (spatial dims are 1).
            let (g, v) = unsafe {
                (
                    (*pg.offset(n * sg[0] + ki * sg[1])).to_f64(),
                    (*px.offset(n * sx[0] + ki * sx[1])).to_f64(),
                )
            };
            // A one-value plane's sum is its rounded term (`add_prod(0.0, g, d)` = g·d + 0.0),
            // and planes are folded with plain adds: no fused step across planes.
            a[0] += g;
            a[1] += g * (v - mean[k]);
        }
    }
    acc
}

/// dx = coef_k.dx(dy, x) for inputs with one value per plane in any layout, channel groups
/// walking the rows (as [`one_value_sums`]).
fn one_value_apply<T: Scalar>(
    x: &ChannelView<'_, T>,
    dy: &ChannelView<'_, T>,
    dx: &crate::reduce::SharedMut<'_, T>,
    coef: &[super::grad::Coef],
    parallel: bool,
) {
    let c = x.c;
    pool::for_each_task(c.div_ceil(ONE_VALUE_GROUP), parallel, |t| {
        let (px, sx) = (x.x.as_ptr(), x.x.strides());
        let (pg, sg) = (dy.x.as_ptr(), dy.x.strides());
        let (pd, sd) = (dx.as_mut_ptr(), dx.strides());
        let ks = t * ONE_VALUE_GROUP..((t + 1) * ONE_VALUE_GROUP).min(c);
        for n in 0..x.n as isize {
            for (cf, k) in coef[ks.clone()].iter().zip(ks.clone()) {
                let ki = k as isize;
                // SAFETY: (n, k, 0, …) is an element of x, grad_y and dx; this group's channels
                // of dx are written by this task only.
                unsafe {
                    let g = *pg.offset(n * sg[0] + ki * sg[1]);
                    let v = *px.offset(n * sx[0] + ki * sx[1]);
                    *pd.offset(n * sd[0] + ki * sd[1]) = cf.dx(g, v);
                }
            }
        }
    });
}
