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
use crate::scratch::{Parts, Scratch};
use multiversion::multiversion;
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
    let f = rv.features as f64;
    if let Some(ts) = rv.transposed() {
        let parts = transposed_forward(ts, &rv, &yp, RowKind::Layer(eps), w, b, parallel);
        let (mean, rstd) = parts.into_iter().unzip();
        return Ok(GroupStats { mean, rstd });
    }
    let per = rows_per_task(rv.features, std::mem::size_of::<T>());
    let parts = pool::map_tasks(rv.rows.div_ceil(per), parallel, |t| {
        let rows = t * per..((t + 1) * per).min(rv.rows);
        let mut st = Vec::with_capacity(rows.len());
        // No row prefetch here (measured 1.03–1.04× the time; it pays off for RMS norm).
        for r in rows {
            let m = rv.row_sum_add(r) / f;
            let var = rv.row_sum(r, |a, v| crate::reduce::add_sq_dev(a, v, m)) / f;
            let rs = rstd(var, eps);
            // SAFETY: row r belongs to this task only.
            unsafe { rv.apply_row(r, &yp, m, rs, w, b) };
            st.push((m, rs));
        }
        crate::stream::stream_fence(yp.stream);
        st
    });
    let (mean, rstd) = parts.into_iter().flatten().unzip();
    Ok(GroupStats { mean, rstd })
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Gradients of [`layer_norm`]: writes dx into `dx`, returns dweight/dbias (shape
/// `normalized_shape`, flattened) for the parameters that were given.
///
/// ```text
/// per row of F values, d = x − mean, g = w·dy:
///   dx      = rstd · (g − Σg/F − d·rstd²·Σg·d/F)
///   dweight = Σ_rows dy·d·rstd        dbias = Σ_rows dy
/// ```
/// Over one element (F = 1) d is exactly 0 and Σg/F is exactly g: dx = 0, dweight = 0 exactly,
/// dbias = Σdy. Row sums are canonical; parameter gradients are summed row by row within
/// fixed blocks of rows, blocks folded in order.
///
/// # Errors
/// As the forward; grad_y not of x's shape; stats not of shape x.shape[:-k].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<T: Scalar>(
    dy: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    normalized_shape: &[usize],
    weight: Option<(&[f64], &[usize])>,
    bias: Option<(&[f64], &[usize])>,
    eps: f64,
    stats: Option<super::grad::StatsIn<'_>>,
) -> Result<super::grad::ParamGrads> {
    super::grad::check_grad_shapes(&dy, &x, &dx)?;
    check_eps(eps)?;
    check_normalized_shape(x.shape(), normalized_shape)?;
    check_row_param("weight", weight.map(|w| w.1), normalized_shape)?;
    check_row_param("bias", bias.map(|w| w.1), normalized_shape)?;
    let k = normalized_shape.len();
    let lead = &x.shape()[..x.ndim() - k];
    super::grad::check_stats(stats, lead.iter().product(), lead, true)?;
    Ok(row_backward(
        dy,
        x,
        dx,
        k,
        weight.map(|w| w.0),
        bias.is_some(),
        RowKind::Layer(eps),
        stats,
    ))
}

/// Rows per task of the Fortran-order row path (`RowView::transposed`): 64 values of each
/// memory row, one block of accumulators (32 lanes × 64 rows, 16 KiB) in L1.
pub(crate) const TRANSPOSED_BLOCK: usize = 64;

/// Layer or RMS norm, for the shared row backward.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowKind {
    Layer(f64),
    Rms(f64),
}

/// The row ops' backward (layer norm: centred; RMS norm: d = x, no μ term).
#[allow(clippy::too_many_arguments)]
pub(crate) fn row_backward<T: Scalar>(
    dy: ArrayView<'_, T, IxDyn>,
    x: ArrayView<'_, T, IxDyn>,
    dx: ArrayViewMut<'_, T, IxDyn>,
    k: usize,
    w: Option<&[f64]>,
    want_bias: bool,
    kind: RowKind,
    stats: Option<super::grad::StatsIn<'_>>,
) -> super::grad::ParamGrads {
    use super::grad::{
        fold_parts, grad_rows_per_block, unravel, visit_pairs, GradRows, ParamGrads,
    };
    use crate::reduce::{sum_view, tree, LANES};
    let parallel = pool::worth_parallel(bytes_of(&x).saturating_mul(2));
    let xr = GradRows::new(x, k);
    let gr = GradRows::new(dy, k);
    let (rows, f) = (xr.rows, xr.features);
    let ff = f as f64;
    let want_w = w.is_some();
    let dxp = shared_out(dx);
    let per = grad_rows_per_block(f, std::mem::size_of::<T>());
    let centred = matches!(kind, RowKind::Layer(_));
    // The forward's statistics of row r, recomputed bitwise as it does, unless given.
    let row_stats = |r: usize, xv: &ArrayView<'_, T, IxDyn>| -> (f64, f64) {
        let (m, rs) = match (stats, kind) {
            (Some(s), _) => (s.mean.map_or(0.0, |m| m[r]), s.rstd[r]),
            (None, RowKind::Layer(eps)) => {
                let m = sum_view(xv, crate::reduce::add) / ff;
                let var = sum_view(xv, |a, v| crate::reduce::add_sq_dev(a, v, m)) / ff;
                (m, rstd(var, eps))
            }
            (None, RowKind::Rms(eps)) => (0.0, rstd(sum_view(xv, crate::reduce::add_sq) / ff, eps)),
        };
        (if centred { m } else { 0.0 }, rs)
    };
    // All three arrays C-contiguous (the common case): rows in small groups, see `group_rows`.
    let blocks = match (xr.contiguous(), gr.contiguous(), dxp.is_standard_layout()) {
        (Some(xs), Some(gs), true) => Some((xs, gs)),
        _ => None,
    };
    // x and grad_y 2-D Fortran-order (e.g. the transpose of a C array): blocks of rows side by
    // side, see `transposed_rows`. dx in any layout.
    let transposed = match (xr.transposed(), gr.transposed()) {
        (Some(xt), Some(gt)) if dxp.shape().len() == 2 => Some((xt, gt)),
        _ => None,
    };
    // One row of partial parameter gradients per block, folded in block order at the end —
    // except for rows so wide that a block is one row: the partials would take twice the
    // input per gradient, so `column_param_grads` sums them column by column afterwards
    // (bitwise the same: a fold of one-row partials is the row-order sum).
    let tasks = rows.div_ceil(per);
    let wide = per == 1 && blocks.is_some() && (want_w || want_bias);
    let mut w_parts = Scratch::take(if want_w && !wide { tasks * f } else { 0 });
    let mut b_parts = Scratch::take(if want_bias && !wide { tasks * f } else { 0 });
    let (wp, bp) = (Parts::new(&mut w_parts, f), Parts::new(&mut b_parts, f));
    pool::for_each_task(tasks, parallel, |t| {
        // SAFETY: task t is the only one that takes part t.
        let mut pw = (want_w && !wide).then(|| unsafe { wp.zeroed(t) });
        let mut pb = (want_bias && !wide).then(|| unsafe { bp.zeroed(t) });
        let end = ((t + 1) * per).min(rows);
        if let Some((xt, gt)) = transposed {
            let rr = t * per..end;
            let st: Vec<(f64, f64)> = transposed_stats(xt, rows, f, rr.clone(), kind, stats);
            let (ds, dp) = (dxp.strides(), dxp.as_mut_ptr());
            let args = TransposedArgs {
                rows,
                f,
                centred,
                w,
                dx: (dp, [ds[0], ds[1]]),
            };
            let (pwv, pbv) = (pw.as_deref_mut(), pb.as_deref_mut());
            // SAFETY: rows rr of dx (elements (r, j) at r·s₀ + j·s₁) belong to this task only.
            unsafe { transposed_rows(xt, gt, rr, &st, &args, pwv, pbv) };
            return;
        }
        if let Some((xs, gs)) = blocks {
            let r0 = t * per;
            // SAFETY: rows r0..end of dx belong to this task only; the array is one
            // C-contiguous block.
            let o = unsafe { dxp.block_mut((r0 * f) as isize, (end - r0) * f) };
            let pwv = pw.as_deref_mut().unwrap_or(&mut []);
            let pbv = pb.as_deref_mut().unwrap_or(&mut []);
            let rng = r0 * f..end * f;
            let (xs, gs) = (&xs[rng.clone()], &gs[rng]);
            let stats_of = |r: usize| {
                let xv = ArrayView::from_shape(IxDyn(&[f]), &xs[(r - r0) * f..(r - r0 + 1) * f])
                    .expect("one row");
                row_stats(r, &xv)
            };
            let args = GroupArgs {
                f,
                ff,
                centred,
                w: w.unwrap_or(&[]),
                stream: dxp.stream,
            };
            let (has_w, has_pw, has_pb) = (w.is_some(), !wide && want_w, !wide && want_bias);
            match (has_w, has_pw, has_pb) {
                (false, _, false) => {
                    group_rows::<T, false, false, false>(o, gs, xs, r0, &args, stats_of, pwv, pbv)
                }
                (false, _, true) => {
                    group_rows::<T, false, false, true>(o, gs, xs, r0, &args, stats_of, pwv, pbv)
                }
                (true, false, _) => {
                    group_rows::<T, true, false, false>(o, gs, xs, r0, &args, stats_of, pwv, pbv)
                }
                (true, true, false) => {
                    group_rows::<T, true, true, false>(o, gs, xs, r0, &args, stats_of, pwv, pbv)
                }
                (true, true, true) => {
                    group_rows::<T, true, true, true>(o, gs, xs, r0, &args, stats_of, pwv, pbv)
                }
            }
            return;
        }
        for r in t * per..end {
            xr.prefetch_ahead(r, end);
            gr.prefetch_ahead(r, end);
            let xv = xr.row(r);
            let gv = gr.row(r);
            let (m, rs) = row_stats(r, &xv);
            // SAFETY: row r belongs to this task only.
            let mut dr = unsafe { dxp.sub(&unravel(xr.lead(), r)) };
            if let (Some(o), Some(gs), Some(xs)) = (dr.as_slice_mut(), gv.as_slice(), xv.as_slice())
            {
                // Contiguous rows: monomorphic loops (same f64 operations as the general path).
                let wv = w.unwrap_or(&[]);
                let pwv = pw.as_deref_mut().unwrap_or(&mut []);
                let pbv = pb.as_deref_mut().unwrap_or(&mut []);
                let [s1, s2] = match (w.is_some(), want_w, want_bias) {
                    (false, false, false) => {
                        row_sums::<T, false, false, false>(gs, xs, m, rs, wv, pwv, pbv)
                    }
                    (false, false, true) => {
                        row_sums::<T, false, false, true>(gs, xs, m, rs, wv, pwv, pbv)
                    }
                    (true, true, false) => {
                        row_sums::<T, true, true, false>(gs, xs, m, rs, wv, pwv, pbv)
                    }
                    (true, true, true) => {
                        row_sums::<T, true, true, true>(gs, xs, m, rs, wv, pwv, pbv)
                    }
                    // The weight's gradient is returned exactly when the weight is given.
                    _ => unreachable!("want_w == w.is_some()"),
                };
                let mu = if centred { s1 / ff } else { 0.0 };
                let kk = rs * rs * s2 / ff;
                if w.is_some() {
                    row_apply::<T, true>(o, gs, xs, wv, m, rs, mu, kk);
                } else {
                    row_apply::<T, false>(o, gs, xs, wv, m, rs, mu, kk);
                }
                continue;
            }
            let mut sg = [0.0f64; LANES];
            let mut sgd = [0.0f64; LANES];
            visit_pairs(&gv, &xv, |j, l, g0, v| {
                let d = v - m;
                let g = w.map_or(g0, |w| w[j] * g0);
                sg[l] += g;
                sgd[l] = crate::reduce::add_prod(sgd[l], g, d);
                if let Some(pw) = pw.as_mut() {
                    pw[j] += g0 * d * rs;
                }
                if let Some(pb) = pb.as_mut() {
                    pb[j] += g0;
                }
            });
            let mu = if centred { tree(&sg) / ff } else { 0.0 };
            let kk = rs * rs * tree(&sgd) / ff;
            let (po, pg, px) = (dr.as_mut_ptr(), gv.as_ptr(), xv.as_ptr());
            let st = [dr.strides(), gv.strides(), xv.strides()].map(crate::reduce::inner_stride);
            let mut j = 0;
            assert!(
                dr.shape() == xv.shape() && gv.shape() == xv.shape(),
                "rows of one shape"
            );
            let strides = [dr.strides(), gv.strides(), xv.strides()];
            crate::reduce::for_each_run(xv.shape(), strides, |[oo, og, ox], len| {
                for k in 0..len as isize {
                    // SAFETY: offsets of elements of the three row views (same shape); row r
                    // of dx is this task's.
                    unsafe {
                        let g0 = (*pg.offset(og + k * st[1])).to_f64();
                        let v = (*px.offset(ox + k * st[2])).to_f64();
                        let g = w.map_or(g0, |w| w[j] * g0);
                        *po.offset(oo + k * st[0]) = T::from_f64(rs * (g - mu - (v - m) * kk));
                    }
                    j += 1;
                }
            });
        }
    });
    if let (true, Some((xs, gs))) = (wide, blocks) {
        let st: Vec<(f64, f64)> = pool::map_tasks(rows, parallel, |r| {
            let xv = ArrayView::from_shape(IxDyn(&[f]), &xs[r * f..(r + 1) * f]).expect("one row");
            row_stats(r, &xv)
        });
        let (pw, pb) = column_param_grads(xs, gs, f, &st, parallel);
        return ParamGrads {
            weight: want_w.then_some(pw),
            bias: want_bias.then_some(pb),
        };
    }
    ParamGrads {
        weight: want_w.then(|| fold_parts(&w_parts, f)),
        bias: want_bias.then(|| fold_parts(&b_parts, f)),
    }
}

/// Features per group in [`transposed_rows`].
const JG: usize = 8;

/// The forward of a row op on a 2-D Fortran-order input (`xt`: its transpose's memory): per
/// block of `TRANSPOSED_BLOCK` rows, the statistics side by side ([`transposed_stats`]) and
/// the normalization feature by feature ([`transposed_apply`]). Returns (m, rs) per row.
pub(crate) fn transposed_forward<T: Scalar>(
    xt: &[T],
    rv: &RowView<'_, T>,
    yp: &crate::reduce::SharedMut<'_, T>,
    kind: RowKind,
    w: Option<&[f64]>,
    b: Option<&[f64]>,
    parallel: bool,
) -> Vec<(f64, f64)> {
    let (rows, f) = (rv.rows, rv.features);
    let parts = pool::map_tasks(rows.div_ceil(TRANSPOSED_BLOCK), parallel, |t| {
        let rr = t * TRANSPOSED_BLOCK..((t + 1) * TRANSPOSED_BLOCK).min(rows);
        let st = transposed_stats(xt, rows, f, rr.clone(), kind, None);
        let ys = yp.strides();
        let y = (yp.as_mut_ptr(), [ys[0], ys[1]]);
        // SAFETY: rows rr of y (elements (r, j) at r·s₀ + j·s₁) belong to this task only.
        unsafe { transposed_apply(xt, rows, f, rr, &st, w, b, y) };
        st
    });
    parts.concat()
}

/// y = affine(x, m_r, rs_r·w_j, b_j) over the rows `rr` of a 2-D Fortran-order x (`xt`: its
/// transpose's memory), each feature's rows read contiguously; bitwise `RowView::apply_row`.
/// (Row by row, each value read was a cache line of its own.)
///
/// # Safety
/// `y` must address a 2-D array of x's shape whose rows `rr` the caller owns.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
unsafe fn transposed_apply<T: Scalar>(
    xt: &[T],
    rows: usize,
    f: usize,
    rr: std::ops::Range<usize>,
    st: &[(f64, f64)],
    w: Option<&[f64]>,
    b: Option<&[f64]>,
    (yp, [s0, s1]): (*mut T, [isize; 2]),
) {
    let mut out = [0.0f64; JG * TRANSPOSED_BLOCK];
    let nb = rr.len().min(TRANSPOSED_BLOCK);
    // JG features at a time, stored by `store_tile`.
    for jg in (0..f).step_by(JG) {
        let js = jg..(jg + JG).min(f);
        for (q, j) in js.clone().enumerate() {
            let xs = &xt[j * rows + rr.start..j * rows + rr.start + nb];
            let bj = b.map_or(0.0, |b| b[j]);
            let oq = &mut out[q * nb..(q + 1) * nb];
            for ((o, &v), &(m, rs)) in oq.iter_mut().zip(xs).zip(st) {
                let a = w.map_or(rs, |w| rs * w[j]);
                // `reduce::affine` before its rounding to T (done in the stores below: rounding
                // here made this loop 1.6× slower).
                *o = (v.to_f64() - m).mul_add(a, bj);
            }
        }
        // SAFETY: rows rr.start.. of y are the caller's (this function's contract).
        unsafe { store_tile(&out, nb, rr.start, js, (yp, [s0, s1])) };
    }
}

/// y[r0 + i, j] = out[q·nb + i] rounded to T, for the features `js` (q = j − js.start) and
/// i < nb: row by row, so that a row's JG stores share one cache line (one line per value
/// was 3× the time of a transposed apply).
///
/// # Safety
/// Every addressed element must lie in y, in rows the caller owns.
#[inline(always)]
unsafe fn store_tile<T: Scalar>(
    out: &[f64],
    nb: usize,
    r0: usize,
    js: std::ops::Range<usize>,
    (yp, [s0, s1]): (*mut T, [isize; 2]),
) {
    for i in 0..nb {
        let r = (r0 + i) as isize;
        for (q, j) in js.clone().enumerate() {
            // SAFETY: the caller's contract.
            unsafe { *yp.offset(r * s0 + j as isize * s1) = T::from_f64(out[q * nb + i]) };
        }
    }
}

/// The fixed arguments of [`transposed_rows`].
struct TransposedArgs<'a, T> {
    rows: usize,
    f: usize,
    centred: bool,
    w: Option<&'a [f64]>,
    /// dx: base pointer and (row, feature) strides in elements.
    dx: (*mut T, [isize; 2]),
}

/// (m, rs) of the rows `rr` of a 2-D Fortran-order input (`xt`: its transpose's memory), as
/// the forward computes them (canonical row sums side by side, `reduce::sum_rows`), or as given.
fn transposed_stats<T: Scalar>(
    xt: &[T],
    rows: usize,
    f: usize,
    rr: std::ops::Range<usize>,
    kind: RowKind,
    stats: Option<super::grad::StatsIn<'_>>,
) -> Vec<(f64, f64)> {
    use crate::reduce::{add, add_sq, sum_rows, sum_rows_sq_dev};
    if let Some(s) = stats {
        return rr
            .map(|r| (s.mean.map_or(0.0, |m| m[r]), s.rstd[r]))
            .map(|(m, rs)| {
                (
                    if matches!(kind, RowKind::Layer(_)) {
                        m
                    } else {
                        0.0
                    },
                    rs,
                )
            })
            .collect();
    }
    let ff = f as f64;
    let (mut scratch, mut sums) = (Vec::new(), vec![0.0f64; rr.len()]);
    match kind {
        RowKind::Layer(eps) => {
            sum_rows(
                xt,
                rows,
                rr.clone(),
                |a, v, _| add(a, v),
                &mut scratch,
                &mut sums,
            );
            let means: Vec<f64> = sums.iter().map(|&s| s / ff).collect();
            sum_rows_sq_dev(xt, rows, rr, &means, &mut scratch, &mut sums);
            means
                .iter()
                .zip(&sums)
                .map(|(&m, &q)| (m, rstd(q / ff, eps)))
                .collect()
        }
        RowKind::Rms(eps) => {
            sum_rows(
                xt,
                rows,
                rr,
                |a, v, _| add_sq(a, v),
                &mut scratch,
                &mut sums,
            );
            sums.iter().map(|&q| (0.0, rstd(q / ff, eps))).collect()
        }
    }
}

/// The row backward over the rows `rr` of 2-D Fortran-order x and grad_y (`xt`, `gt`: the
/// memory of their transposes, feature j of row r at j·rows + r), `TRANSPOSED_BLOCK` rows side
/// by side so that every memory row is read contiguously (row by row, each value was a cache
/// line of its own: 15× the contiguous time). Bitwise the per-row path: row r's lanes get
/// feature j at lane j mod 32 in feature order, the parameter partials every row of the task in
/// row order, with the same f64 expressions.
///
/// The loops over a feature's rows vectorize; the parameter partials, serial sums over the
/// rows, are added afterwards from per-row terms, `JG` features interleaved (one chain at a
/// time was bound by the add latency).
///
/// # Safety
/// `args.dx` must address a 2-D array of x's shape whose rows `rr` the caller owns.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
unsafe fn transposed_rows<T: Scalar>(
    xt: &[T],
    gt: &[T],
    rr: std::ops::Range<usize>,
    st: &[(f64, f64)],
    args: &TransposedArgs<'_, T>,
    mut pw: Option<&mut [f64]>,
    mut pb: Option<&mut [f64]>,
) {
    use crate::reduce::{add_prod, tree, LANES};
    const B: usize = TRANSPOSED_BLOCK;
    let (rows, f, ff) = (args.rows, args.f, args.f as f64);
    let (dp, [s0, s1]) = args.dx;
    let mut sg = vec![0.0f64; LANES * B];
    let mut sgd = vec![0.0f64; LANES * B];
    // Per-row terms of the parameter partials of a group of features: g0·d·rs and g0.
    let mut tw = vec![0.0f64; JG * B];
    let mut tb = vec![0.0f64; JG * B];
    let (mut ms, mut rss, mut mus, mut kks) = ([0.0f64; B], [0.0f64; B], [0.0f64; B], [0.0f64; B]);
    let mut y = [0.0f64; JG * B];
    let mut b0 = rr.start;
    while b0 < rr.end {
        let b1 = (b0 + B).min(rr.end);
        let nb = b1 - b0;
        for (i, &(m, rs)) in st[b0 - rr.start..b1 - rr.start].iter().enumerate() {
            (ms[i], rss[i]) = (m, rs);
        }
        let (ms, rss) = (&ms[..nb], &rss[..nb]);
        // Feature j of the block's rows of x and grad_y (the transposes' memory).
        let mem_rows = |j: usize| {
            (
                &xt[j * rows + b0..j * rows + b1],
                &gt[j * rows + b0..j * rows + b1],
            )
        };
        sg.fill(0.0);
        sgd.fill(0.0);
        for jg in (0..f).step_by(JG) {
            let js = jg..(jg + JG).min(f);
            for (q, j) in js.clone().enumerate() {
                let (xs, gs) = mem_rows(j);
                let wj = args.w.map_or(1.0, |w| w[j]);
                let l = j % LANES;
                let lg = &mut sg[l * nb..(l + 1) * nb];
                let lgd = &mut sgd[l * nb..(l + 1) * nb];
                let (twq, tbq) = (&mut tw[q * nb..(q + 1) * nb], &mut tb[q * nb..(q + 1) * nb]);
                for i in 0..nb {
                    let (g0, v) = (gs[i].to_f64(), xs[i].to_f64());
                    let d = v - ms[i];
                    let g = if args.w.is_some() { wj * g0 } else { g0 };
                    lg[i] += g;
                    lgd[i] = add_prod(lgd[i], g, d);
                    twq[i] = g0 * d * rss[i];
                    tbq[i] = g0;
                }
            }
            let n = js.len();
            if let Some(pw) = pw.as_deref_mut() {
                serial_column_sums(&mut pw[js.clone()], &tw, n, nb);
            }
            if let Some(pb) = pb.as_deref_mut() {
                serial_column_sums(&mut pb[js.clone()], &tb, n, nb);
            }
        }
        for i in 0..nb {
            let lanes = |s: &[f64]| -> [f64; LANES] { std::array::from_fn(|l| s[l * nb + i]) };
            mus[i] = if args.centred {
                tree(&lanes(&sg)) / ff
            } else {
                0.0
            };
            kks[i] = rss[i] * rss[i] * tree(&lanes(&sgd)) / ff;
        }
        // JG features at a time, stored by `store_tile`.
        for jg in (0..f).step_by(JG) {
            let js = jg..(jg + JG).min(f);
            for (q, j) in js.clone().enumerate() {
                let (xs, gs) = mem_rows(j);
                let wj = args.w.map_or(1.0, |w| w[j]);
                let yq = &mut y[q * nb..(q + 1) * nb];
                for i in 0..nb {
                    let (g0, v) = (gs[i].to_f64(), xs[i].to_f64());
                    let g = if args.w.is_some() { wj * g0 } else { g0 };
                    yq[i] = rss[i] * (g - mus[i] - (v - ms[i]) * kks[i]);
                }
            }
            // SAFETY: rows b0..b1 of dx are this task's (the caller's contract).
            unsafe { store_tile(&y, nb, b0, js, (dp, [s0, s1])) };
        }
        b0 = b1;
    }
}

/// acc[q] += t[q·nb + i] for i in 0..nb, in that order, for q < n (n ≤ JG): the serial sums of
/// [`transposed_rows`]' parameter partials, the chains of the features interleaved.
#[inline(always)]
fn serial_column_sums(acc: &mut [f64], t: &[f64], n: usize, nb: usize) {
    if n == JG {
        let mut a: [f64; JG] = std::array::from_fn(|q| acc[q]);
        for i in 0..nb {
            for q in 0..JG {
                a[q] += t[q * nb + i];
            }
        }
        acc[..JG].copy_from_slice(&a);
    } else {
        for (q, a) in acc.iter_mut().enumerate().take(n) {
            for v in &t[q * nb..(q + 1) * nb] {
                *a += v;
            }
        }
    }
}

/// dweight_j = Σ_r dy·(x − m_r)·rs_r and dbias_j = Σ_r dy over C-contiguous rows of `f`
/// values, each column summed over the rows in order (tasks by column chunks: no partials).
fn column_param_grads<T: Scalar>(
    xs: &[T],
    gs: &[T],
    f: usize,
    st: &[(f64, f64)],
    parallel: bool,
) -> (Vec<f64>, Vec<f64>) {
    const CHUNK: usize = 4096;
    let parts = pool::map_tasks(f.div_ceil(CHUNK), parallel, |t| {
        let js = t * CHUNK..((t + 1) * CHUNK).min(f);
        let (mut pw, mut pb) = (vec![0.0f64; js.len()], vec![0.0f64; js.len()]);
        for (r, &(m, rs)) in st.iter().enumerate() {
            let at = r * f + js.start..r * f + js.end;
            column_step(&mut pw, &mut pb, &gs[at.clone()], &xs[at], m, rs);
        }
        (pw, pb)
    });
    let (pw, pb): (Vec<Vec<f64>>, Vec<Vec<f64>>) = parts.into_iter().unzip();
    (pw.concat(), pb.concat())
}

/// One row's terms of [`column_param_grads`]: the per-row path's f64 operations.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn column_step<T: Scalar>(pw: &mut [f64], pb: &mut [f64], gs: &[T], xs: &[T], m: f64, rs: f64) {
    for (((p, q), g), v) in pw.iter_mut().zip(pb.iter_mut()).zip(gs).zip(xs) {
        let g0 = g.to_f64();
        *p += g0 * (v.to_f64() - m) * rs;
        *q += g0;
    }
}

/// What `group_rows` needs besides the arrays.
struct GroupArgs<'a> {
    f: usize,
    ff: f64,
    centred: bool,
    w: &'a [f64],
    /// The output is large enough to be streamed (`SharedMut::stream`).
    stream: bool,
}

/// The coefficients of `dx = rs·(g − mu − (x − m)·kk)` for one row.
#[derive(Clone, Copy, Default)]
struct RowCoef {
    m: f64,
    rs: f64,
    mu: f64,
    kk: f64,
}

/// Rows in a group of the grouped row backward: about 32 KiB of dy and x, so that the group is
/// still in L1/L2 when pass 2 reads it again.
fn group_len(f: usize, elem: usize) -> usize {
    (32 * 1024 / (2 * f * elem).max(1)).clamp(1, 16)
}

/// The row backward over C-contiguous rows `r0..` of one task (`o`, `gs`, `xs`: whole rows).
///
/// Rows go in groups: pass 1 takes each row's two sums, then pass 2 walks the group column
/// chunk by column chunk, writing dx for every row of the group and adding the rows' dweight
/// and dbias terms to accumulators held in registers. The per-row path read and wrote the two
/// f64 parameter-gradient arrays once per row; with the rows streaming through L1 those
/// arrays were evicted to L2 on every row, which cost more than the arithmetic (layer-norm
/// backward (8192, 1024): 8.6 ms against 3.9 ms without weight and bias at one thread).
/// Each dweight/dbias value still receives the rows' terms one by one in row order, and dx
/// and the sums use the per-row path's f64 operations, so the results are bitwise those of the
/// per-row path.
#[allow(clippy::too_many_arguments)]
fn group_rows<T: Scalar, const W: bool, const PW: bool, const PB: bool>(
    o: &mut [T],
    gs: &[T],
    xs: &[T],
    r0: usize,
    a: &GroupArgs<'_>,
    stats_of: impl Fn(usize) -> (f64, f64),
    pw: &mut [f64],
    pb: &mut [f64],
) {
    let f = a.f;
    if f == 0 {
        return;
    }
    let rows = xs.len() / f;
    let per = group_len(f, std::mem::size_of::<T>());
    // Large float32 outputs are written around the caches (as the forward's, see
    // `crate::stream`) when every 32-value chunk of every row is two aligned cache lines.
    let stream = a.stream
        && crate::stream::as_f32(o).is_some()
        && crate::stream::can_stream()
        && f.is_multiple_of(16)
        && (o.as_ptr() as usize).is_multiple_of(64);
    let mut coef = [RowCoef::default(); 16];
    for g0 in (0..rows).step_by(per) {
        let g1 = (g0 + per).min(rows);
        // The next group into cache while this one is computed: without it the reads of
        // pass 1 waited for memory and the arithmetic did not overlap them.
        let next = g1 * f..((g1 + per).min(rows) * f);
        if let (Some(a), Some(b)) = (gs.get(next.clone()), xs.get(next)) {
            let bytes = std::mem::size_of_val(a);
            crate::stream::prefetch_bytes(a.as_ptr().cast(), bytes);
            crate::stream::prefetch_bytes(b.as_ptr().cast(), bytes);
        }
        for r in g0..g1 {
            let row = r * f..(r + 1) * f;
            let (m, rs) = stats_of(r0 + r);
            let [s1, s2] = row_sums::<T, W, false, false>(
                &gs[row.clone()],
                &xs[row],
                m,
                rs,
                a.w,
                &mut [],
                &mut [],
            );
            coef[r - g0] = RowCoef {
                m,
                rs,
                mu: if a.centred { s1 / a.ff } else { 0.0 },
                kk: rs * rs * s2 / a.ff,
            };
        }
        let span = g0 * f..g1 * f;
        group_apply::<T, W, PW, PB>(
            &mut o[span.clone()],
            &gs[span.clone()],
            &xs[span],
            f,
            &coef[..g1 - g0],
            a.w,
            pw,
            pb,
            stream,
        );
    }
    crate::stream::stream_fence(stream);
}

/// Pass 2 of `group_rows` over the rows of one group (`co.len()` rows of `f` values).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn group_apply<T: Scalar, const W: bool, const PW: bool, const PB: bool>(
    o: &mut [T],
    gs: &[T],
    xs: &[T],
    f: usize,
    co: &[RowCoef],
    w: &[f64],
    pw: &mut [f64],
    pb: &mut [f64],
    stream: bool,
) {
    use crate::reduce::LANES;
    // One value of row c: its dx, and its terms added to the dweight/dbias accumulators.
    #[inline(always)]
    fn one<T: Scalar, const W: bool, const PW: bool, const PB: bool>(
        c: &RowCoef,
        g0: T,
        v: T,
        wj: f64,
        aw: &mut f64,
        ab: &mut f64,
    ) -> T {
        let g0 = g0.to_f64();
        let d = v.to_f64() - c.m;
        if PW {
            *aw += g0 * d * c.rs;
        }
        if PB {
            *ab += g0;
        }
        let g = if W { wj * g0 } else { g0 };
        T::from_f64(c.rs * (g - c.mu - d * c.kk))
    }
    let full = f / LANES * LANES;
    let no_w = [0.0f64; LANES];
    for base in (0..full).step_by(LANES) {
        let lanes = base..base + LANES;
        let mut aw = [0.0f64; LANES];
        let mut ab = [0.0f64; LANES];
        if PW {
            aw.copy_from_slice(&pw[lanes.clone()]);
        }
        if PB {
            ab.copy_from_slice(&pb[lanes.clone()]);
        }
        let w8: &[f64; LANES] = if W {
            w[lanes.clone()].try_into().expect("LANES values")
        } else {
            &no_w
        };
        for (r, c) in co.iter().enumerate() {
            let at = r * f + base..r * f + base + LANES;
            let g8: &[T; LANES] = gs[at.clone()].try_into().expect("LANES values");
            let x8: &[T; LANES] = xs[at.clone()].try_into().expect("LANES values");
            let o8: &mut [T; LANES] = (&mut o[at]).try_into().expect("LANES values");
            if stream {
                let mut buf = [T::from_f64(0.0); LANES];
                for l in 0..LANES {
                    buf[l] = one::<T, W, PW, PB>(c, g8[l], x8[l], w8[l], &mut aw[l], &mut ab[l]);
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `stream` is set only for T = f32 on AVX-512 CPUs with every chunk
                // 64-byte aligned (see `group_rows`); o8 holds 32 values.
                unsafe {
                    crate::stream::stream_32_f32(
                        o8.as_mut_ptr().cast::<f32>(),
                        &*buf.as_ptr().cast::<[f32; LANES]>(),
                    );
                }
                #[cfg(not(target_arch = "x86_64"))]
                o8.copy_from_slice(&buf);
                continue;
            }
            for l in 0..LANES {
                o8[l] = one::<T, W, PW, PB>(c, g8[l], x8[l], w8[l], &mut aw[l], &mut ab[l]);
            }
        }
        if PW {
            pw[lanes.clone()].copy_from_slice(&aw);
        }
        if PB {
            pb[lanes].copy_from_slice(&ab);
        }
    }
    for j in full..f {
        let (mut aw, mut ab) = (if PW { pw[j] } else { 0.0 }, if PB { pb[j] } else { 0.0 });
        let wj = if W { w[j] } else { 0.0 };
        for (r, c) in co.iter().enumerate() {
            o[r * f + j] =
                one::<T, W, PW, PB>(c, gs[r * f + j], xs[r * f + j], wj, &mut aw, &mut ab);
        }
        if PW {
            pw[j] = aw;
        }
        if PB {
            pb[j] = ab;
        }
    }
}

/// Pass 1 of the row backward over a contiguous row: canonical `[Σg, Σg·d]` (g = w·dy,
/// d = x − m), and the row's dweight (`dy·d·rs`) and dbias (`dy`) terms added in place.
///
/// One loop does all four so that dy and x are loaded and widened to f64 once (it was four
/// loops, one per quantity: the row backward was compute-bound at about twice the forward's
/// time). The const flags select the work at compile time. The f64 operations per value and
/// the lane of each value (i mod LANES) are those of the general path in `row_backward` and of
/// `reduce::sum_slice` / `grad::centred_dot`, so the results are bitwise the same: without a
/// weight, `Σg` adds dy itself where `sum_slice(.., ident)` adds `dy + 0.0`, which differ only
/// for −0.0, and a lane that starts at +0.0 never holds −0.0.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_sums<T: Scalar, const W: bool, const PW: bool, const PB: bool>(
    gs: &[T],
    xs: &[T],
    m: f64,
    rs: f64,
    w: &[f64],
    pw: &mut [f64],
    pb: &mut [f64],
) -> [f64; 2] {
    let n = gs.len().min(xs.len());
    // Empty parameter slices stand in for the quantities a flag switches off.
    let (w, pw, pb) = (
        if W { &w[..n] } else { w },
        if PW { &mut pw[..n] } else { pw },
        if PB { &mut pb[..n] } else { pb },
    );
    row_pass1::<T, W, PW, PB>(&gs[..n], &xs[..n], w, pw, pb, m, rs)
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn row_pass1<T: Scalar, const W: bool, const PW: bool, const PB: bool>(
    gs: &[T],
    xs: &[T],
    w: &[f64],
    pw: &mut [f64],
    pb: &mut [f64],
    m: f64,
    rs: f64,
) -> [f64; 2] {
    use crate::reduce::{tree, LANES};
    let mut sg = [0.0f64; LANES];
    let mut sgd = [0.0f64; LANES];
    // Stand-ins for the slices a flag switches off (never touched then).
    let (no_w, mut no_pw, mut no_pb) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
    let full = gs.len() / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        let lanes = base..base + LANES;
        // Fixed-size chunks keep the lanes in vector registers.
        let g8: &[T; LANES] = gs[lanes.clone()].try_into().expect("LANES values");
        let x8: &[T; LANES] = xs[lanes.clone()].try_into().expect("LANES values");
        let w8: &[f64; LANES] = if W {
            w[lanes.clone()].try_into().expect("LANES values")
        } else {
            &no_w
        };
        let pw8: &mut [f64; LANES] = if PW {
            (&mut pw[lanes.clone()]).try_into().expect("LANES values")
        } else {
            &mut no_pw
        };
        let pb8: &mut [f64; LANES] = if PB {
            (&mut pb[lanes]).try_into().expect("LANES values")
        } else {
            &mut no_pb
        };
        for l in 0..LANES {
            let (sums, grads) = ((&mut sg[l], &mut sgd[l]), (&mut pw8[l], &mut pb8[l]));
            pass1_one::<W, PW, PB>(g8[l].to_f64(), x8[l].to_f64(), w8[l], m, rs, sums, grads);
        }
    }
    let (mut no_pw1, mut no_pb1) = (0.0f64, 0.0f64);
    for i in full..gs.len() {
        let l = i - full;
        let wi = if W { w[i] } else { 0.0 };
        let pwi = if PW { &mut pw[i] } else { &mut no_pw1 };
        let pbi = if PB { &mut pb[i] } else { &mut no_pb1 };
        let sums = (&mut sg[l], &mut sgd[l]);
        pass1_one::<W, PW, PB>(gs[i].to_f64(), xs[i].to_f64(), wi, m, rs, sums, (pwi, pbi));
    }
    [tree(&sg), tree(&sgd)]
}

/// One value of [`row_pass1`]: its lane's two sums and its dweight/dbias terms.
#[inline(always)]
fn pass1_one<const W: bool, const PW: bool, const PB: bool>(
    g0: f64,
    v: f64,
    wj: f64,
    m: f64,
    rs: f64,
    (sg, sgd): (&mut f64, &mut f64),
    (pw, pb): (&mut f64, &mut f64),
) {
    let d = v - m;
    let g = if W { wj * g0 } else { g0 };
    *sg += g;
    *sgd = crate::reduce::add_prod(*sgd, g, d);
    if PW {
        *pw += g0 * d * rs;
    }
    if PB {
        *pb += g0;
    }
}

/// Pass 2 over a contiguous row: `dx = rs·(g − mu − (x − m)·kk)`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn row_apply<T: Scalar, const W: bool>(
    o: &mut [T],
    gs: &[T],
    xs: &[T],
    w: &[f64],
    m: f64,
    rs: f64,
    mu: f64,
    kk: f64,
) {
    if W {
        for (((o, &g0), &v), &wj) in o.iter_mut().zip(gs).zip(xs).zip(w) {
            let g = wj * g0.to_f64();
            *o = T::from_f64(rs * (g - mu - (v.to_f64() - m) * kk));
        }
    } else {
        for ((o, &g0), &v) in o.iter_mut().zip(gs).zip(xs) {
            let g = g0.to_f64();
            *o = T::from_f64(rs * (g - mu - (v.to_f64() - m) * kk));
        }
    }
}
