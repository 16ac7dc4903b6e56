//! Filter response normalization with the thresholded linear unit (Singh & Krishnan 2019),
//! forward and backward.
//!
//! ```text
//! ν²[n,c] = mean over the spatial axes of x²
//! s = sqrt(ν² + eps + |learned_eps_c|),   x̂ = x / s,   rstd = 1/s
//! z = γ_c·x̂ + β_c,   y = max(z, τ_c)  (TLU, when τ is given)
//! ```
//! With one spatial element, ν² = x² and y = x / sqrt(x² + eps) exactly (weight and bias
//! None: no multiplication by 1 or addition of 0 is performed).
//!
//! Backward (g = ∂L/∂y; at a tie z = τ the gradient is split in halves, as PyTorch's
//! `maximum` does):
//! ```text
//! g_z = g·[z > τ] (+ g/2 at z = τ),   ∂τ_c = Σ g − g_z,   ∂β_c = Σ g_z,   ∂γ_c = Σ g_z·x̂
//! A = Σ_plane g_z·x,   ∂x = γ_c·rstd·g_z − γ_c·rstd³·x·A/S
//! ∂learned_eps_c = −½·sign(learned_eps_c)·Σ_n γ_c·rstd³·A
//! ```
//! Plane sums are canonical f64 sums (`reduce`), per-channel gradients fold the planes in
//! batch order: deterministic for any thread count and layout.

use super::common::{bytes_of, check_eps, check_out};
use super::mixing::{check_same_shape, sums2};
use crate::channel::{check_channel_param, Access, ChannelView};
use crate::error::Result;
use crate::pool;
use crate::reduce::{self, tree, SharedMut, LANES};
use crate::scalar::Scalar;
use multiversion::multiversion;
use ndarray::{ArrayView, ArrayViewMut, IxDyn, Zip};

/// Parameters of [`filter_response_norm`]: per-channel arrays (length C) read as f64.
#[derive(Clone, Copy, Debug)]
pub struct FrnParams<'a> {
    pub weight: Option<&'a [f64]>,
    pub bias: Option<&'a [f64]>,
    pub tau: Option<&'a [f64]>,
    pub eps: f64,
    /// Per channel (a scalar learned eps is broadcast by the caller).
    pub learned_eps: Option<&'a [f64]>,
    pub axis: isize,
}

impl Default for FrnParams<'_> {
    fn default() -> Self {
        Self {
            weight: None,
            bias: None,
            tau: None,
            eps: 1e-6,
            learned_eps: None,
            axis: 1,
        }
    }
}

/// Gradients of the parameters that were given, per channel, accumulated in f64.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FrnGrads {
    pub weight: Option<Vec<f64>>,
    pub bias: Option<Vec<f64>>,
    pub tau: Option<Vec<f64>>,
    pub learned_eps: Option<Vec<f64>>,
}

/// max(z, τ), NaN if either is NaN.
#[inline(always)]
fn tlu1(z: f64, t: f64) -> f64 {
    if z < t || t.is_nan() {
        t
    } else {
        z
    }
}

/// Share of ∂L/∂y that reaches z in max(z, τ): 1, 0, or ½ at a tie (NaN z keeps it all).
#[inline(always)]
fn mask(z: f64, t: f64) -> f64 {
    if z < t {
        0.0
    } else if z == t {
        0.5
    } else {
        1.0
    }
}

fn check_params<T: Scalar>(
    cv: &ChannelView<'_, T>,
    p: &FrnParams<'_>,
    shape: &[usize],
) -> Result<()> {
    check_eps(p.eps)?;
    for (name, v) in [
        ("weight", p.weight),
        ("bias", p.bias),
        ("tau", p.tau),
        ("learned_eps", p.learned_eps),
    ] {
        check_channel_param(name, v.map(|v| v.len()), cv.c, shape)?;
    }
    Ok(())
}

/// Reads x̂ and z the same way in forward and backward, so TLU masks agree bit for bit.
#[derive(Clone, Copy)]
struct Affine {
    /// sqrt(ν² + e) when recomputed (x̂ = x/s), else NaN and x̂ = x·rstd.
    s: f64,
    rstd: f64,
    w: Option<f64>,
    b: Option<f64>,
}

impl Affine {
    #[inline(always)]
    fn xhat(&self, v: f64) -> f64 {
        if self.s.is_nan() {
            v * self.rstd
        } else {
            v / self.s
        }
    }
    #[inline(always)]
    fn z(&self, v: f64) -> f64 {
        let mut z = self.xhat(v);
        if let Some(w) = self.w {
            z *= w;
        }
        if let Some(b) = self.b {
            z += b;
        }
        z
    }
}

/// The per-(n, c) affine from Σx² over the plane (or the given rstd).
fn affine_of(p: &FrnParams<'_>, c: usize, sumsq: f64, count: usize, rstd: Option<f64>) -> Affine {
    let (s, r) = match rstd {
        Some(r) => (f64::NAN, r),
        None => {
            let ms = sumsq / count as f64;
            let e = p.eps + p.learned_eps.map_or(0.0, |l| l[c].abs());
            let s = (ms + e).sqrt();
            if count == 1 {
                // One value per plane: x̂ = x / sqrt(x² + eps) exactly (the closed form).
                (s, 1.0 / s)
            } else {
                // x̂ = x·(1/s): one f64 rounding more than x/s (far below float32's), and an
                // f64 division per element was most of the op's time. Forward and backward
                // both come here, so TLU masks still agree bit for bit.
                (f64::NAN, 1.0 / s)
            }
        }
    };
    Affine {
        s,
        rstd: r,
        w: p.weight.map(|w| w[c]),
        b: p.bias.map(|b| b[c]),
    }
}

fn plane_affine<T: Scalar>(
    cv: &ChannelView<'_, T>,
    p: &FrnParams<'_>,
    n: usize,
    c: usize,
    rstd: Option<&[f64]>,
) -> Affine {
    match rstd {
        Some(r) => affine_of(p, c, 0.0, cv.s, Some(r[n * cv.c + c])),
        None => affine_of(
            p,
            c,
            reduce::sum_view(&cv.plane(n, c), reduce::add_sq),
            cv.s,
            None,
        ),
    }
}

/// Sample n of a channel-first output as rows of C values (S·C contiguous), if it is laid out
/// that way (channels-last).
///
/// # Safety
/// The caller owns sample n of the output.
unsafe fn out_rows<'a, T>(yp: &SharedMut<'a, T>, n: usize) -> Option<&'a mut [T]> {
    // SAFETY: forwarded from the caller.
    let ys = unsafe { yp.sub(&[n]) };
    let k = ys.ndim();
    let mut perm: Vec<usize> = (1..k).collect();
    perm.push(0);
    ys.permuted_axes(IxDyn(&perm)).into_slice()
}

/// y = f(x) over a plane, cloned per instruction set.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn apply_plane<T: Scalar, F: Fn(f64) -> T>(xs: &[T], ys: &mut [T], f: F) {
    for (o, &v) in ys.iter_mut().zip(xs) {
        *o = f(v.to_f64());
    }
}

/// Channels-last fast path: x (and grad_y) are `Access::Rows` and the output sample is rows
/// too. Per-channel sums go through `reduce::sum_rows` (or the same lane order by hand), bit
/// for bit the per-plane canonical sums of the other paths.
fn rows_path<T: Scalar>(cvs: &[&ChannelView<'_, T>], yp: &SharedMut<'_, T>) -> bool {
    cvs.iter().all(|v| v.access == Access::Rows)
        && cvs[0].n > 0
        // SAFETY: only inspects the layout of sample 0; nothing is written.
        && unsafe { out_rows(yp, 0) }.is_some()
}

/// Per-channel canonical sums of K quantities f(x, g, k) over the rows of one sample.
fn rows_sums<T: Scalar, const K: usize, F: Fn(f64, f64, usize) -> [f64; K]>(
    xs: &[T],
    gs: &[T],
    c: usize,
    f: F,
) -> Vec<[f64; K]> {
    let mut acc = vec![[[0.0f64; LANES]; K]; c];
    for (r, (xr, gr)) in xs.chunks_exact(c).zip(gs.chunks_exact(c)).enumerate() {
        let lane = r % LANES;
        for (k, ((a, x), g)) in acc.iter_mut().zip(xr).zip(gr).enumerate() {
            let v = f(x.to_f64(), g.to_f64(), k);
            for (aq, vq) in a.iter_mut().zip(v) {
                aq[lane] += vq;
            }
        }
    }
    acc.iter()
        .map(|a| {
            let mut o = [0.0; K];
            for (o, aq) in o.iter_mut().zip(a) {
                *o = tree(aq);
            }
            o
        })
        .collect()
}

/// FRN (+ TLU when `p.tau` is given) of `x` into `y`. Returns rstd per (n, c), row-major.
///
/// # Errors
/// Bad eps or axis, a parameter not of shape (C,), `y` of another shape.
pub fn filter_response_norm<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    p: &FrnParams<'_>,
) -> Result<Vec<f64>> {
    check_out(&x, &y)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(bytes_of(&x));
    let cv = ChannelView::new(x, p.axis, "filter_response_norm", 2)?;
    check_params(&cv, p, &shape)?;
    let yp = SharedMut::new(cv.permute_out(y));
    let c = cv.c;
    if rows_path(&[&cv], &yp) {
        let per_sample = pool::map_tasks(cv.n, parallel, |n| {
            let mut scratch = Vec::new();
            let mut sq = vec![0.0f64; c];
            cv.sample_sums(
                n,
                0..c,
                |a, v, _| reduce::add_sq(a, v),
                &mut scratch,
                &mut sq,
            );
            let a: Vec<Affine> = (0..c).map(|k| affine_of(p, k, sq[k], cv.s, None)).collect();
            // SAFETY: task n owns sample n of the output; `rows_path` checked its layout.
            let ys = unsafe { out_rows(&yp, n) }.unwrap_or_default();
            for (yr, xr) in ys
                .chunks_exact_mut(c)
                .zip(cv.sample_rows(n).chunks_exact(c))
            {
                for (k, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                    let z = a[k].z(v.to_f64());
                    *o = T::from_f64(p.tau.map_or(z, |t| tlu1(z, t[k])));
                }
            }
            a.iter().map(|a| a.rstd).collect::<Vec<f64>>()
        });
        return Ok(per_sample.concat());
    }
    if cv.access == Access::Planes && yp.is_standard_layout() {
        // NCHW into a C-contiguous output: planes as slices, about 64 KiB per task.
        let per = (16 * 1024 / cv.s.max(1)).max(1);
        let st = [yp.strides()[0], yp.strides()[1]];
        let parts = pool::map_tasks((cv.n * c).div_ceil(per), parallel, |t| {
            let planes = t * per..((t + 1) * per).min(cv.n * c);
            let mut rs = Vec::with_capacity(planes.len());
            for i in planes {
                let (n, ch) = (i / c, i % c);
                let xs = cv.plane_slice(n, ch);
                let a = affine_of(p, ch, reduce::sum_slice(xs, reduce::add_sq), cv.s, None);
                let tau = p.tau.map(|t| t[ch]);
                // SAFETY: plane (n, ch) of the C-contiguous output is this block; this task
                // owns it.
                let ys = unsafe { yp.block_mut(n as isize * st[0] + ch as isize * st[1], cv.s) };
                apply_plane(xs, ys, |v| {
                    let z = a.z(v);
                    T::from_f64(tau.map_or(z, |t| tlu1(z, t)))
                });
                rs.push(a.rstd);
            }
            rs
        });
        return Ok(parts.concat());
    }
    Ok(pool::map_tasks(cv.n * c, parallel, |i| {
        let (n, ch) = (i / c, i % c);
        let a = plane_affine(&cv, p, n, ch, None);
        let t = p.tau.map(|t| t[ch]);
        // SAFETY: task i owns plane (n, ch) of the output.
        let mut yv = unsafe { yp.sub(&[n, ch]) };
        Zip::from(&mut yv).and(&cv.plane(n, ch)).for_each(|o, &v| {
            let z = a.z(v.to_f64());
            *o = T::from_f64(t.map_or(z, |t| tlu1(z, t)));
        });
        a.rstd
    }))
}

/// Backward of [`filter_response_norm`]: writes ∂L/∂x into `dx` and returns the gradients of
/// the parameters that were given (per channel). `rstd` (per (n, c), from the forward) skips
/// recomputing the statistics.
///
/// # Errors
/// As the forward; `grad_y`/`dx` of another shape than `x`, `rstd` of length ≠ N·C.
pub fn filter_response_norm_backward<T: Scalar>(
    grad_y: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    p: &FrnParams<'_>,
    rstd: Option<&[f64]>,
) -> Result<FrnGrads> {
    check_same_shape("grad_y", grad_y.shape(), x.shape())?;
    check_out(&x, &dx)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(2 * bytes_of(&x));
    let cv = ChannelView::new(x, p.axis, "filter_response_norm", 2)?;
    let gv = ChannelView::new(grad_y, p.axis, "filter_response_norm", 2)?;
    check_params(&cv, p, &shape)?;
    let c = cv.c;
    if let Some(r) = rstd {
        if r.len() != cv.n * c {
            return Err(crate::error::NormError::Shape(format!(
                "stats.rstd must have shape ({}, {c}) for an input of shape {}, got {} values",
                cv.n,
                crate::error::fmt_shape(&shape),
                r.len()
            )));
        }
    }
    let dxp = SharedMut::new(cv.permute_out(dx));
    let count = cv.s as f64;
    let per_plane: Vec<[f64; 4]> = if rows_path(&[&cv, &gv], &dxp) {
        let per_sample = pool::map_tasks(cv.n, parallel, |n| {
            let a: Vec<Affine> = match rstd {
                Some(r) => (0..c)
                    .map(|k| affine_of(p, k, 0.0, cv.s, Some(r[n * c + k])))
                    .collect(),
                None => {
                    let mut scratch = Vec::new();
                    let mut sq = vec![0.0f64; c];
                    cv.sample_sums(
                        n,
                        0..c,
                        |a, v, _| reduce::add_sq(a, v),
                        &mut scratch,
                        &mut sq,
                    );
                    (0..c).map(|k| affine_of(p, k, sq[k], cv.s, None)).collect()
                }
            };
            let m = |z: f64, k: usize| p.tau.map_or(1.0, |t| mask(z, t[k]));
            let (xs, gs) = (cv.sample_rows(n), gv.sample_rows(n));
            let sums = rows_sums(xs, gs, c, |v, g, k| {
                let gz = g * m(a[k].z(v), k);
                [gz * v, gz * a[k].xhat(v), gz, g - gz]
            });
            let coef: Vec<(f64, f64)> = (0..c)
                .map(|k| {
                    let (w, r) = (a[k].w.unwrap_or(1.0), a[k].rstd);
                    (w * r, w * r * r * r * sums[k][0] / count)
                })
                .collect();
            // SAFETY: task n owns sample n of dx; `rows_path` checked its layout.
            let ds = unsafe { out_rows(&dxp, n) }.unwrap_or_default();
            for ((dr, xr), gr) in ds
                .chunks_exact_mut(c)
                .zip(xs.chunks_exact(c))
                .zip(gs.chunks_exact(c))
            {
                for (k, ((o, &v), &g)) in dr.iter_mut().zip(xr).zip(gr).enumerate() {
                    let v = v.to_f64();
                    let gz = g.to_f64() * m(a[k].z(v), k);
                    *o = T::from_f64(coef[k].0 * gz - coef[k].1 * v);
                }
            }
            (0..c)
                .map(|k| {
                    let (w, r) = (a[k].w.unwrap_or(1.0), a[k].rstd);
                    [
                        sums[k][1],
                        sums[k][2],
                        sums[k][3],
                        -0.5 * w * r * r * r * sums[k][0],
                    ]
                })
                .collect::<Vec<_>>()
        });
        per_sample.concat()
    } else {
        pool::map_tasks(cv.n * c, parallel, |i| {
            let (n, ch) = (i / c, i % c);
            let a = plane_affine(&cv, p, n, ch, rstd);
            let t = p.tau.map(|t| t[ch]);
            let m = |z: f64| t.map_or(1.0, |t| mask(z, t));
            let (xp, gp) = (cv.plane(n, ch), gv.plane(n, ch));
            let [sgx, sgxh, sg, stau] = sums2(&xp, &gp, |v, g| {
                let gz = g * m(a.z(v));
                [gz * v, gz * a.xhat(v), gz, g - gz]
            });
            let w = a.w.unwrap_or(1.0);
            let r = a.rstd;
            let k1 = w * r;
            let k2 = w * r * r * r * sgx / count;
            // SAFETY: task i owns plane (n, ch) of dx.
            let mut dv = unsafe { dxp.sub(&[n, ch]) };
            Zip::from(&mut dv).and(&xp).and(&gp).for_each(|o, &v, &g| {
                let v = v.to_f64();
                let gz = g.to_f64() * m(a.z(v));
                *o = T::from_f64(k1 * gz - k2 * v);
            });
            let dle = -0.5 * w * r * r * r * sgx;
            [sgxh, sg, stau, dle]
        })
    };
    let fold = |k: usize, scale: &dyn Fn(usize) -> f64| -> Vec<f64> {
        let mut acc = vec![0.0f64; c];
        for (i, v) in per_plane.iter().enumerate() {
            acc[i % c] += v[k];
        }
        acc.iter()
            .enumerate()
            .map(|(ch, a)| a * scale(ch))
            .collect()
    };
    let one = |_: usize| 1.0;
    Ok(FrnGrads {
        weight: p.weight.map(|_| fold(0, &one)),
        bias: p.bias.map(|_| fold(1, &one)),
        tau: p.tau.map(|_| fold(2, &one)),
        learned_eps: p.learned_eps.map(|l| {
            fold(3, &|ch| {
                // d|l|/dl: sign, 0 at 0.
                if l[ch] > 0.0 {
                    1.0
                } else if l[ch] < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            })
        }),
    })
}

/// TLU `y = max(x, τ_c)` of `x` into `y`.
///
/// # Errors
/// `tau` not of shape (C,), bad axis, `y` of another shape.
pub fn tlu<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    tau: &[f64],
    axis: isize,
) -> Result<()> {
    check_out(&x, &y)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(bytes_of(&x));
    let cv = ChannelView::new(x, axis, "tlu", 2)?;
    check_channel_param("tau", Some(tau.len()), cv.c, &shape)?;
    let yp = SharedMut::new(cv.permute_out(y));
    let c = cv.c;
    if rows_path(&[&cv], &yp) {
        pool::for_each_task(cv.n, parallel, |n| {
            // SAFETY: task n owns sample n of the output; `rows_path` checked its layout.
            let ys = unsafe { out_rows(&yp, n) }.unwrap_or_default();
            for (yr, xr) in ys
                .chunks_exact_mut(c)
                .zip(cv.sample_rows(n).chunks_exact(c))
            {
                for ((o, &v), &t) in yr.iter_mut().zip(xr).zip(tau) {
                    *o = T::from_f64(tlu1(v.to_f64(), t));
                }
            }
        });
        return Ok(());
    }
    pool::for_each_task(cv.n * c, parallel, |i| {
        let (n, ch) = (i / c, i % c);
        // SAFETY: task i owns plane (n, ch) of the output.
        let mut yv = unsafe { yp.sub(&[n, ch]) };
        let t = tau[ch];
        Zip::from(&mut yv)
            .and(&cv.plane(n, ch))
            .for_each(|o, &v| *o = T::from_f64(tlu1(v.to_f64(), t)));
    });
    Ok(())
}

/// Backward of [`tlu`]: writes ∂L/∂x into `dx`, returns ∂L/∂τ per channel (f64).
///
/// # Errors
/// As [`tlu`]; `grad_y`/`dx` of another shape than `x`.
pub fn tlu_backward<T: Scalar>(
    grad_y: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    tau: &[f64],
    axis: isize,
) -> Result<Vec<f64>> {
    check_same_shape("grad_y", grad_y.shape(), x.shape())?;
    check_out(&x, &dx)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(2 * bytes_of(&x));
    let cv = ChannelView::new(x, axis, "tlu", 2)?;
    let gv = ChannelView::new(grad_y, axis, "tlu", 2)?;
    check_channel_param("tau", Some(tau.len()), cv.c, &shape)?;
    let dxp = SharedMut::new(cv.permute_out(dx));
    let c = cv.c;
    if rows_path(&[&cv, &gv], &dxp) {
        let per_sample = pool::map_tasks(cv.n, parallel, |n| {
            let (xs, gs) = (cv.sample_rows(n), gv.sample_rows(n));
            let sums = rows_sums(xs, gs, c, |v, g, k| [g - g * mask(v, tau[k])]);
            // SAFETY: task n owns sample n of dx; `rows_path` checked its layout.
            let ds = unsafe { out_rows(&dxp, n) }.unwrap_or_default();
            for ((dr, xr), gr) in ds
                .chunks_exact_mut(c)
                .zip(xs.chunks_exact(c))
                .zip(gs.chunks_exact(c))
            {
                for (((o, &v), &g), &t) in dr.iter_mut().zip(xr).zip(gr).zip(tau) {
                    *o = T::from_f64(g.to_f64() * mask(v.to_f64(), t));
                }
            }
            sums.iter().map(|s| s[0]).collect::<Vec<f64>>()
        });
        let mut acc = vec![0.0f64; c];
        for (i, v) in per_sample.concat().iter().enumerate() {
            acc[i % c] += v;
        }
        return Ok(acc);
    }
    let per_plane = pool::map_tasks(cv.n * c, parallel, |i| {
        let (n, ch) = (i / c, i % c);
        let t = tau[ch];
        let (xp, gp) = (cv.plane(n, ch), gv.plane(n, ch));
        let [st] = sums2(&xp, &gp, |v, g| [g - g * mask(v, t)]);
        // SAFETY: task i owns plane (n, ch) of dx.
        let mut dv = unsafe { dxp.sub(&[n, ch]) };
        Zip::from(&mut dv)
            .and(&xp)
            .and(&gp)
            .for_each(|o, &v, &g| *o = T::from_f64(g.to_f64() * mask(v.to_f64(), t)));
        st
    });
    let mut acc = vec![0.0f64; c];
    for (i, v) in per_plane.iter().enumerate() {
        acc[i % c] += v;
    }
    Ok(acc)
}
