//! Generalized divisive normalization (Ballé et al. 2016) across channels, forward and
//! backward, with its inverse (IGDN) and the simplified GDN1 (Johnston et al. 2019).
//!
//! ```text
//! u_j = x_j²  (variant "gdn")   or |x_j|  (variant "gdn1")
//! D_i = β_i + Σ_j γ_ij·u_j      (γ[i, j]: output i, input j, as CompressAI's conv weight)
//! gdn:  y_i = x_i / sqrt(D_i)    igdn:  y_i = x_i·sqrt(D_i)
//! gdn1: y_i = x_i / D_i          igdn1: y_i = x_i·D_i
//! ```
//! At every position the C×C mixing is a matrix product: a tile of L positions gives
//! D (L×C) = U (L×C)·γᵀ, computed by `matrixmultiply`'s dgemm in f64 (its packing and kernel
//! order depend only on the dimensions, so results do not depend on the input's layout or the
//! thread count; its own threading is off).
//!
//! Backward, with q_i = g_i·∂y_i/∂D_i:
//! ```text
//! ∂β_i = Σ_pos q_i,   ∂γ_ij = Σ_pos q_i·u_j  (= Qᵀ·U),   ∂x_j = g_j·∂y_j/∂x_j|_D + u'_j·(Q·γ)_j
//! ```
//! ∂γ and ∂β are per-task partials (tasks cut from the shape alone) merged in task order.

use super::common::{bytes_of, check_out};
use super::mixing::{check_same_shape, for_tiles, tile_len, zip3_apply, zip_apply};
use crate::channel::{check_channel_param, ChannelView};
use crate::error::{fmt_shape, NormError, Result};
use crate::pool;
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Values per tile buffer: 256 KiB of f64, so the GEMM's k and n dimensions (C) and a few
/// hundred rows make blocks big enough for matrixmultiply's kernels to run at speed.
const GDN_TILE_ELEMS: usize = 32 * 1024;

/// Which nonlinearity of x enters the divisive term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GdnVariant {
    /// u = x², y = x·D^(∓½).
    Gdn,
    /// u = |x|, y = x·D^(∓1).
    Gdn1,
}

/// Parameters of [`gdn`]: β (C,) and γ (C, C) row-major, read as f64.
#[derive(Clone, Copy, Debug)]
pub struct GdnParams<'a> {
    pub beta: &'a [f64],
    pub gamma: &'a [f64],
    pub gamma_shape: &'a [usize],
    pub inverse: bool,
    pub variant: GdnVariant,
    pub axis: isize,
}

fn check<T: Scalar>(cv: &ChannelView<'_, T>, p: &GdnParams<'_>, shape: &[usize]) -> Result<()> {
    let c = cv.c;
    check_channel_param("beta", Some(p.beta.len()), c, shape)?;
    if p.gamma_shape != [c, c] {
        return Err(NormError::Shape(format!(
            "gamma must have shape ({c}, {c}) for an input of shape {} with {c} channels, got {}",
            fmt_shape(shape),
            fmt_shape(p.gamma_shape)
        )));
    }
    if let Some(b) = p.beta.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
        return Err(NormError::Param(format!(
            "beta must be finite and > 0 in every channel, got {b}"
        )));
    }
    if let Some(g) = p.gamma.iter().find(|g| !(g.is_finite() && **g >= 0.0)) {
        return Err(NormError::Param(format!(
            "gamma must be finite and >= 0 everywhere, got {g}"
        )));
    }
    Ok(())
}

/// ∂u/∂x.
#[inline(always)]
fn du(v: GdnVariant, x: f64) -> f64 {
    match v {
        GdnVariant::Gdn => 2.0 * x,
        GdnVariant::Gdn1 => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
    }
}

/// u = x² or |x|, element-wise (AVX2 where available; the same bits either way).
fn fill_u(u: &mut [f64], x: &[f64], var: GdnVariant) {
    match var {
        GdnVariant::Gdn => zip_apply(u, x, |_, v| v * v),
        GdnVariant::Gdn1 => zip_apply(u, x, |_, v| v.abs()),
    }
}

/// d ← x·factor(d), with the variant chosen once outside the loop so it vectorizes.
fn apply_factor(d: &mut [f64], x: &[f64], var: GdnVariant, inv: bool) {
    match (var, inv) {
        (GdnVariant::Gdn, false) => zip_apply(d, x, |d, v| v / d.sqrt()),
        (GdnVariant::Gdn, true) => zip_apply(d, x, |d, v| v * d.sqrt()),
        (GdnVariant::Gdn1, false) => zip_apply(d, x, |d, v| v / d),
        (GdnVariant::Gdn1, true) => zip_apply(d, x, |d, v| v * d),
    }
}

/// Channel-major D (C×len, leading dimension ld) = γ·U (+ β per channel row).
fn divisor(u: &[f64], gamma: &[f64], beta: &[f64], c: usize, len: usize, ld: usize, d: &mut [f64]) {
    // SAFETY: u and d hold C rows of ld ≥ len values, gamma C·C row-major; the strides
    // describe exactly those shapes.
    unsafe {
        matrixmultiply::dgemm(
            c,
            c,
            len,
            1.0,
            gamma.as_ptr(),
            c as isize,
            1,
            u.as_ptr(),
            ld as isize,
            1,
            0.0,
            d.as_mut_ptr(),
            ld as isize,
            1,
        );
    }
    for (k, b) in beta.iter().enumerate() {
        for v in &mut d[k * ld..k * ld + len] {
            *v += b;
        }
    }
}

/// GDN of `x` into `y` (same shape, any layouts).
///
/// # Errors
/// β not (C,) or not all > 0, γ not (C, C) or any < 0 (non-finite values are refused too),
/// input of fewer than 2 dimensions, bad axis, `y` of another shape.
pub fn gdn<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    p: &GdnParams<'_>,
) -> Result<()> {
    check_out(&x, &y)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(bytes_of(&x));
    let cv = ChannelView::new(x, p.axis, "gdn", 2)?;
    check(&cv, p, &shape)?;
    let c = cv.c;
    let y = cv.permute_out(y);
    let (var, inv) = (p.variant, p.inverse);
    for_tiles(
        &[&cv.x],
        Some(y),
        1,
        tile_len(c, GDN_TILE_ELEMS),
        4,
        parallel,
        || (),
        |_, ins, out, len, ld| {
            let x = &ins[0];
            let mut u = vec![0.0f64; c * ld];
            fill_u(&mut u, x, var);
            divisor(&u, p.gamma, p.beta, c, len, ld, out);
            for k in 0..c {
                let r = k * ld..k * ld + len;
                apply_factor(&mut out[r.clone()], &x[r], var, inv);
            }
        },
    );
    Ok(())
}

/// Gradients of [`gdn`] with respect to β (C,) and γ (C, C, row-major), accumulated in f64.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GdnGrads {
    pub beta: Vec<f64>,
    pub gamma: Vec<f64>,
}

/// Backward of [`gdn`]: writes ∂L/∂x into `dx`, returns ∂L/∂β and ∂L/∂γ.
///
/// # Errors
/// As the forward; `grad_y`/`dx` of another shape than `x`.
pub fn gdn_backward<T: Scalar>(
    grad_y: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    p: &GdnParams<'_>,
) -> Result<GdnGrads> {
    check_same_shape("grad_y", grad_y.shape(), x.shape())?;
    check_out(&x, &dx)?;
    let shape = x.shape().to_vec();
    let parallel = pool::worth_parallel(2 * bytes_of(&x));
    let cv = ChannelView::new(x, p.axis, "gdn", 2)?;
    let gv = ChannelView::new(grad_y, p.axis, "gdn", 2)?;
    check(&cv, p, &shape)?;
    let c = cv.c;
    let dx = cv.permute_out(dx);
    let tile = tile_len(c, GDN_TILE_ELEMS / 2);
    let tiles = (cv.n * cv.s).div_ceil(tile.max(1));
    // At most 16 partial (∂β, ∂γ) pairs, fewer when C² is large: bounded memory, and a count
    // that depends on the shape only, so the merge order never changes.
    let max_tasks = (32 * 1024 * 1024 / (c * c).max(1)).clamp(1, 16);
    let per_task = tiles.div_ceil(max_tasks).max(1);
    let (var, inv) = (p.variant, p.inverse);
    let parts = for_tiles(
        &[&cv.x, &gv.x],
        Some(dx),
        1,
        tile,
        per_task,
        parallel,
        || (vec![0.0f64; c], vec![0.0f64; c * c]),
        |acc, ins, out, len, ld| {
            let (x, g) = (&ins[0], &ins[1]);
            let mut u = vec![0.0f64; c * ld];
            fill_u(&mut u, x, var);
            let mut d = vec![0.0f64; c * ld];
            divisor(&u, p.gamma, p.beta, c, len, ld, &mut d);
            let mut q = vec![0.0f64; c * ld];
            for k in 0..c {
                let r = k * ld..k * ld + len;
                let qr = &mut q[r.clone()];
                let (dr, xr, gr) = (&d[r.clone()], &x[r.clone()], &g[r]);
                match (var, inv) {
                    (GdnVariant::Gdn, false) => {
                        zip3_apply(qr, dr, xr, gr, |_, d, v, g| g * v * (-0.5 / (d * d.sqrt())))
                    }
                    (GdnVariant::Gdn, true) => {
                        zip3_apply(qr, dr, xr, gr, |_, d, v, g| g * v * (0.5 / d.sqrt()))
                    }
                    (GdnVariant::Gdn1, false) => {
                        zip3_apply(qr, dr, xr, gr, |_, d, v, g| g * v * (-1.0 / (d * d)))
                    }
                    (GdnVariant::Gdn1, true) => zip3_apply(qr, dr, xr, gr, |_, _, v, g| g * v),
                }
                // ∂β in position order, whatever the vector width above.
                acc.0[k] += qr.iter().fold(0.0, |a, &v| a + v);
            }
            // SAFETY (both calls): q, u, out hold C rows of ld ≥ len values, gamma and acc.1
            // C·C row-major; the strides describe exactly those shapes (Uᵀ and γᵀ are read
            // with swapped strides).
            unsafe {
                matrixmultiply::dgemm(
                    c,
                    len,
                    c,
                    1.0,
                    q.as_ptr(),
                    ld as isize,
                    1,
                    u.as_ptr(),
                    1,
                    ld as isize,
                    1.0,
                    acc.1.as_mut_ptr(),
                    c as isize,
                    1,
                );
                matrixmultiply::dgemm(
                    c,
                    c,
                    len,
                    1.0,
                    p.gamma.as_ptr(),
                    1,
                    c as isize,
                    q.as_ptr(),
                    ld as isize,
                    1,
                    0.0,
                    out.as_mut_ptr(),
                    ld as isize,
                    1,
                );
            }
            for k in 0..c {
                let r = k * ld..k * ld + len;
                let o = &mut out[r.clone()];
                let (xr, gr, dr) = (&x[r.clone()], &g[r.clone()], &d[r]);
                match (var, inv) {
                    (GdnVariant::Gdn, false) => {
                        zip3_apply(o, xr, gr, dr, |s, v, g, d| g / d.sqrt() + 2.0 * v * s)
                    }
                    (GdnVariant::Gdn, true) => {
                        zip3_apply(o, xr, gr, dr, |s, v, g, d| g * d.sqrt() + 2.0 * v * s)
                    }
                    (GdnVariant::Gdn1, false) => {
                        zip3_apply(o, xr, gr, dr, |s, v, g, d| g / d + du(var, v) * s)
                    }
                    (GdnVariant::Gdn1, true) => {
                        zip3_apply(o, xr, gr, dr, |s, v, g, d| g * d + du(var, v) * s)
                    }
                }
            }
        },
    );
    let mut grads = GdnGrads {
        beta: vec![0.0; c],
        gamma: vec![0.0; c * c],
    };
    for (b, g) in parts {
        for (a, v) in grads.beta.iter_mut().zip(&b) {
            *a += v;
        }
        for (a, v) in grads.gamma.iter_mut().zip(&g) {
            *a += v;
        }
    }
    Ok(grads)
}
