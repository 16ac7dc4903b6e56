//! Pieces shared by the backward kernels (the kernels themselves sit beside their forwards in
//! `batch.rs`, `layer.rs`, `rms.rs`, `group.rs`, `instance.rs`).
//!
//! Every normalization backward has the same shape. With `d = x − mean`, `g = s·dy` (`s` the
//! per-element weight, or 1) and n values per normalization group:
//!
//! ```text
//! μ  = Σ g / n                 k = rstd² · Σ g·d / n
//! dx = rstd · (g − μ − d·k)    (training / batch statistics; eval: μ = k = 0)
//! dweight = Σ dy·d·rstd        dbias = Σ dy          (over everything but the parameter's axes)
//! ```
//!
//! The sums are canonical (see `reduce`): the pairs (dy, x) are visited in the logical order of
//! the arrays, whatever their strides, value j going to lane j mod 32 (Σ g·d with the fused
//! step `reduce::add_prod`), so a strided input gives
//! bitwise the result of its contiguous copy, and work is split by data only (never by thread),
//! so the thread count never changes a bit. Writing dx as `rstd·(g − μ − d·k)` with `g`
//! computed exactly as in the sum makes the one-element cases exact: layer norm over one value
//! or group norm with one value per group have μ = g and d = 0, so dx = 0 and dweight = 0.

use crate::channel::{Access, ChannelView};
use crate::error::{fmt_shape, NormError, Result};
use crate::reduce::{add_prod, tree, SharedMut, LANES};
use crate::scalar::Scalar;
use multiversion::multiversion;
use ndarray::{ArrayView, ArrayViewMut, Axis, IxDyn, Zip};

/// Gradients of the parameters that were given (f64; the bindings round them to x's dtype).
/// dx is written into the caller's view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamGrads {
    pub weight: Option<Vec<f64>>,
    pub bias: Option<Vec<f64>>,
}

/// grad_y must have x's shape; dx too.
pub fn check_grad_shapes<T>(
    dy: &ArrayView<'_, T, IxDyn>,
    x: &ArrayView<'_, T, IxDyn>,
    dx: &ArrayViewMut<'_, T, IxDyn>,
) -> Result<()> {
    if dy.shape() != x.shape() {
        return Err(NormError::Shape(format!(
            "grad_y must have the shape of x {}, got {}",
            fmt_shape(x.shape()),
            fmt_shape(dy.shape())
        )));
    }
    if dx.shape() != x.shape() {
        return Err(NormError::Shape(format!(
            "the input gradient must have the shape of x {}, got {}",
            fmt_shape(x.shape()),
            fmt_shape(dx.shape())
        )));
    }
    Ok(())
}

/// Forward statistics handed to a backward (`stats=` in Python), flattened in row-major order.
#[derive(Clone, Copy, Debug)]
pub struct StatsIn<'a> {
    pub mean: Option<&'a [f64]>,
    pub rstd: &'a [f64],
}

/// Checks that given statistics hold `len` values each (`shape` is for the message); the mean
/// is required unless `need_mean` is false.
pub fn check_stats(
    stats: Option<StatsIn<'_>>,
    len: usize,
    shape: &[usize],
    need_mean: bool,
) -> Result<()> {
    let Some(s) = stats else { return Ok(()) };
    let bad = |name: &str, got: usize| {
        NormError::Shape(format!(
            "stats.{name} must have shape {} (one value per normalization group), got {got} values",
            fmt_shape(shape)
        ))
    };
    if s.rstd.len() != len {
        return Err(bad("rstd", s.rstd.len()));
    }
    match s.mean {
        Some(m) if m.len() != len => Err(bad("mean", m.len())),
        None if need_mean => Err(NormError::Param(
            "stats.mean is None, but this backward needs the mean (pass the Stats returned by \
             return_stats=True)"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Visits `(j, lane, dy_j, x_j)` over two same-shape views in logical order (compiled with FMA:
/// its callers' sums use [`add_prod`]).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn visit_pairs<T: Scalar, F: FnMut(usize, usize, f64, f64)>(
    dy: &ArrayView<'_, T, IxDyn>,
    x: &ArrayView<'_, T, IxDyn>,
    mut f: F,
) {
    if let (Some(a), Some(b)) = (dy.as_slice(), x.as_slice()) {
        visit_slices(a, b, f);
        return;
    }
    assert_eq!(
        dy.shape(),
        x.shape(),
        "visit_pairs needs views of one shape"
    );
    let (pa, pb) = (dy.as_ptr(), x.as_ptr());
    let (sa, sb) = (
        crate::reduce::inner_stride(dy.strides()),
        crate::reduce::inner_stride(x.strides()),
    );
    let mut j = 0;
    crate::reduce::for_each_run(x.shape(), [dy.strides(), x.strides()], |[oa, ob], len| {
        for k in 0..len as isize {
            // SAFETY: offsets of elements of the two views, which have the same shape.
            let (a, b) = unsafe { (*pa.offset(oa + k * sa), *pb.offset(ob + k * sb)) };
            f(j, j % LANES, a.to_f64(), b.to_f64());
            j += 1;
        }
    });
}

/// [`visit_pairs`] over two slices of equal length, unrolled by lanes so lane indices are
/// constants the compiler can vectorize over.
#[inline(always)]
pub fn visit_slices<T: Scalar, F: FnMut(usize, usize, f64, f64)>(dy: &[T], x: &[T], mut f: F) {
    let mut dc = dy.chunks_exact(LANES);
    let mut xc = x.chunks_exact(LANES);
    let mut q = 0;
    // Fixed-size chunks: no bounds checks, lane l is a constant after unrolling.
    for (d8, x8) in (&mut dc).zip(&mut xc) {
        for l in 0..LANES {
            f(q + l, l, d8[l].to_f64(), x8[l].to_f64());
        }
        q += LANES;
    }
    for (l, (d, v)) in dc.remainder().iter().zip(xc.remainder()).enumerate() {
        f(q + l, l, d.to_f64(), v.to_f64());
    }
}

/// Canonical sums of `[Σdy, Σdy·(x − m)]` over two same-shape views.
#[inline]
pub fn pair_sums<T: Scalar>(
    dy: &ArrayView<'_, T, IxDyn>,
    x: &ArrayView<'_, T, IxDyn>,
    m: f64,
) -> [f64; 2] {
    let mut a = [0.0f64; LANES];
    let mut b = [0.0f64; LANES];
    visit_pairs(dy, x, |_, l, g, v| {
        a[l] += g;
        b[l] = add_prod(b[l], g, v - m);
    });
    [tree(&a), tree(&b)]
}

/// [`pair_sums`] over two slices (the contiguous-plane path; bitwise the same sums). The two
/// sums run as two loops over the (cache-resident) plane: each then has one accumulator array
/// and vectorizes, where one fused loop would not.
#[inline]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn pair_sums_slices<T: Scalar>(dy: &[T], x: &[T], m: f64) -> [f64; 2] {
    // Both canonical sums in one pass over dy (bitwise `sum_slice(dy, ident)` and
    // `centred_dot(dy, x, m)`: the same lanes, the same operations): dy is read once.
    let n = dy.len().min(x.len());
    let (dy, x) = (&dy[..n], &x[..n]);
    let mut a = [0.0f64; LANES];
    let mut b = [0.0f64; LANES];
    let mut dc = dy.chunks_exact(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (d, v) in (&mut dc).zip(&mut xc) {
        let d: &[T; LANES] = d.try_into().expect("chunks_exact yields LANES values");
        let v: &[T; LANES] = v.try_into().expect("chunks_exact yields LANES values");
        for l in 0..LANES {
            let g = d[l].to_f64();
            a[l] += crate::reduce::ident(g);
            b[l] = add_prod(b[l], g, v[l].to_f64() - m);
        }
    }
    for (l, (g, v)) in dc.remainder().iter().zip(xc.remainder()).enumerate() {
        let g = g.to_f64();
        a[l] += crate::reduce::ident(g);
        b[l] = add_prod(b[l], g, v.to_f64() - m);
    }
    [tree(&a), tree(&b)]
}

/// The lanes of `[Σdy, Σdy·(x − m_j)]` for the `ms.len()` channels from `start` of channels-last
/// rows of `c` values: `lanes[(r mod LANES)·2w + j]` and `[… + w + j]` (w = ms.len()).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn pair_lanes_rows<T: Scalar>(
    xs: &[T],
    ds: &[T],
    c: usize,
    start: usize,
    ms: &[f64],
    lanes: &mut [f64],
) {
    let w = ms.len();
    for (r, (xr, dr)) in xs.chunks_exact(c).zip(ds.chunks_exact(c)).enumerate() {
        let lane = &mut lanes[(r % LANES) * 2 * w..(r % LANES + 1) * 2 * w];
        let (la, lb) = lane.split_at_mut(w);
        for j in 0..w {
            let g = dr[start + j].to_f64();
            la[j] += g;
            lb[j] = add_prod(lb[j], g, xr[start + j].to_f64() - ms[j]);
        }
    }
}

/// Canonical `Σ dy·(x − m)` over two slices.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn centred_dot<T: Scalar>(dy: &[T], x: &[T], m: f64) -> f64 {
    let mut b = [0.0f64; LANES];
    let mut dc = dy.chunks_exact(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (d8, x8) in (&mut dc).zip(&mut xc) {
        for l in 0..LANES {
            b[l] = add_prod(b[l], d8[l].to_f64(), x8[l].to_f64() - m);
        }
    }
    for (l, (g, v)) in dc.remainder().iter().zip(xc.remainder()).enumerate() {
        b[l] = add_prod(b[l], g.to_f64(), v.to_f64() - m);
    }
    tree(&b)
}

/// The coefficients of `dx = r·(s·dy − μ − (x − m)·k)` for one channel (or group).
#[derive(Clone, Copy, Debug, Default)]
pub struct Coef {
    pub m: f64,
    pub r: f64,
    pub s: f64,
    pub mu: f64,
    pub k: f64,
}

impl Coef {
    #[inline(always)]
    pub fn dx<T: Scalar>(&self, dy: T, x: T) -> T {
        let g = self.s * dy.to_f64();
        T::from_f64(self.r * (g - self.mu - (x.to_f64() - self.m) * self.k))
    }
}

/// [`apply_slices`], with streaming stores when `stream` (the calling task then ends with
/// `crate::stream::stream_fence`).
pub fn apply_slices_to<T: Scalar>(dx: &mut [T], dy: &[T], x: &[T], cf: Coef, stream: bool) {
    if !(stream && crate::stream::grad_slices(dx, dy, x, cf.m, cf.r, cf.s, cf.mu, cf.k)) {
        apply_slices(dx, dy, x, cf);
    }
}

/// `dx = cf.dx(dy, x)` over contiguous slices (one vectorizable loop).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn apply_slices<T: Scalar>(dx: &mut [T], dy: &[T], x: &[T], cf: Coef) {
    for ((o, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
        *o = cf.dx(g, v);
    }
}

/// The view of grad_y matching an input's [`ChannelView`] (same axis), and per-sample helpers
/// of the channel ops' backward.
pub struct ChannelPair<'a, 'b, T> {
    pub x: &'b ChannelView<'a, T>,
    pub dy: ChannelView<'a, T>,
    rows: bool,
}

impl<'a, 'b, T: Scalar> ChannelPair<'a, 'b, T> {
    pub fn new(
        x: &'b ChannelView<'a, T>,
        dy: ArrayView<'a, T, IxDyn>,
        axis: isize,
        op: &str,
    ) -> Result<Self> {
        let dy = ChannelView::new(dy, axis, op, 2)?;
        // The rows path gives bitwise the plane path's sums (lane = spatial index mod 8); the
        // channel view picks it for channels-last and for (N, C) inputs.
        let rows = x.access == Access::Rows && dy.access == Access::Rows;
        Ok(Self { x, dy, rows })
    }

    /// Whether planes are read as columns of contiguous rows (channels-last, or (N, C)).
    pub fn rows(&self) -> bool {
        self.rows
    }

    /// `[Σdy, Σdy·(x − m_c)]` over each plane (n, c) for c in `cs`, into `out`; `m(c)` is the
    /// mean the plane is centred on.
    pub fn sample_sums<M: Fn(usize) -> f64>(
        &self,
        n: usize,
        cs: std::ops::Range<usize>,
        m: M,
        scratch: &mut Vec<f64>,
        out: &mut [[f64; 2]],
    ) {
        if self.rows() && self.x.s == 1 {
            // One value per plane ((N, C) input): its canonical sum is the value plus 0.0 (the
            // first add of the lane tree, which turns −0.0 into +0.0), without lanes.
            let xs = self.x.sample_rows(n);
            let ds = self.dy.sample_rows(n);
            for (o, k) in out.iter_mut().zip(cs) {
                let g = ds[k].to_f64();
                // `g·d + 0.0` is bitwise `add_prod(0.0, g, d)` (one rounding either way), without
                // the FMA this function is not compiled for.
                *o = [g + 0.0, g * (xs[k].to_f64() - m(k)) + 0.0];
            }
            return;
        }
        if self.rows() {
            let xs = self.x.sample_rows(n);
            let ds = self.dy.sample_rows(n);
            let c = self.x.c;
            let w = cs.len();
            scratch.clear();
            scratch.resize(2 * LANES * w, 0.0);
            if c > 0 {
                let ms: Vec<f64> = cs.clone().map(&m).collect();
                pair_lanes_rows(xs, ds, c, cs.start, &ms, scratch);
            }
            for (j, o) in out.iter_mut().enumerate().take(w) {
                let mut a = [0.0f64; LANES];
                let mut b = [0.0f64; LANES];
                for l in 0..LANES {
                    a[l] = scratch[l * 2 * w + j];
                    b[l] = scratch[l * 2 * w + w + j];
                }
                *o = [tree(&a), tree(&b)];
            }
            return;
        }
        if self.x.access == Access::Planes && self.dy.access == Access::Planes {
            for (o, c) in out.iter_mut().zip(cs) {
                *o = pair_sums_slices(self.dy.plane_slice(n, c), self.x.plane_slice(n, c), m(c));
            }
            return;
        }
        for (o, c) in out.iter_mut().zip(cs) {
            *o = pair_sums(&self.dy.plane(n, c), &self.x.plane(n, c), m(c));
        }
    }

    /// Writes dx for every plane of sample n with per-channel coefficients.
    pub fn apply_sample(&self, n: usize, dxp: &SharedMut<'_, T>, coef: &[Coef]) {
        // SAFETY (both arms): a task owns sample n of dx exclusively.
        let mut ds = unsafe { dxp.sub(&[n]) };
        if self.rows() {
            let xs = self.x.sample_rows(n);
            let gs = self.dy.sample_rows(n);
            let k = ds.ndim();
            let mut perm: Vec<usize> = (1..k).collect();
            perm.push(0);
            let mut dv = ds.view_mut().permuted_axes(IxDyn(&perm));
            if let Some(dr) = dv.as_slice_mut() {
                let c = self.x.c;
                if c == 0 {
                    return;
                }
                for ((drow, xrow), grow) in dr
                    .chunks_exact_mut(c)
                    .zip(xs.chunks_exact(c))
                    .zip(gs.chunks_exact(c))
                {
                    for k in 0..c {
                        drow[k] = coef[k].dx(grow[k], xrow[k]);
                    }
                }
                return;
            }
        }
        if self.x.access == Access::Planes && self.dy.access == Access::Planes && self.x.s > 0 {
            // dx planes contiguous too (a fresh C-order output): address them directly instead
            // of building a view per plane.
            if ds.ndim() >= 1 && ds.index_axis(Axis(0), 0).is_standard_layout() {
                let st0 = ds.strides()[0];
                let base = ds.as_mut_ptr();
                for (c, cf) in coef.iter().enumerate().take(self.x.c) {
                    // SAFETY: plane c of this sample of dx is a standard-layout block of s
                    // elements starting at base + c·stride (dx never self-overlaps), inside
                    // the sample this task owns.
                    let d = unsafe {
                        std::slice::from_raw_parts_mut(base.offset(c as isize * st0), self.x.s)
                    };
                    apply_slices(d, self.dy.plane_slice(n, c), self.x.plane_slice(n, c), *cf);
                }
                return;
            }
        }
        for (c, cf) in coef.iter().enumerate().take(self.x.c) {
            let xpl = self.x.plane(n, c);
            let gpl = self.dy.plane(n, c);
            let mut dpl = ds.index_axis_mut(Axis(0), c);
            let cf = *cf;
            if let (Some(d), Some(g), Some(xv)) =
                (dpl.as_slice_mut(), gpl.as_slice(), xpl.as_slice())
            {
                apply_slices(d, g, xv, cf);
                continue;
            }
            Zip::from(&mut dpl)
                .and(&gpl)
                .and(&xpl)
                .for_each(|o, &gv, &v| *o = cf.dx(gv, v));
        }
    }
}

/// Rows of an array over its trailing `k` dims (layer and RMS norm), for x, grad_y and dx.
pub struct GradRows<'a, T> {
    v: ArrayView<'a, T, IxDyn>,
    lead: Vec<usize>,
    contiguous: Option<&'a [T]>,
    transposed: Option<&'a [T]>,
    pub rows: usize,
    pub features: usize,
}

/// The multi-index of row r over the leading dims `lead` (row-major).
pub fn unravel(lead: &[usize], mut r: usize) -> Vec<usize> {
    let mut idx = vec![0; lead.len()];
    for (i, &d) in lead.iter().enumerate().rev() {
        if d > 0 {
            idx[i] = r % d;
            r /= d;
        }
    }
    idx
}

impl<'a, T: Scalar> GradRows<'a, T> {
    pub fn new(v: ArrayView<'a, T, IxDyn>, k: usize) -> Self {
        let nd = v.ndim();
        let lead = v.shape()[..nd - k].to_vec();
        let rows = lead.iter().product();
        let features = v.shape()[nd - k..].iter().product();
        let contiguous = v.to_slice();
        // A 2-D Fortran-order array normalized over its last axis: the C-contiguous memory of
        // its transpose (feature j of row r at j·rows + r).
        let transposed = if nd == 2 && k == 1 && contiguous.is_none() {
            v.clone().reversed_axes().to_slice()
        } else {
            None
        };
        Self {
            v,
            lead,
            contiguous,
            transposed,
            rows,
            features,
        }
    }

    pub fn lead(&self) -> &[usize] {
        &self.lead
    }

    /// A 2-D Fortran-order array as the C-contiguous memory of its transpose, if it is one.
    pub fn transposed(&self) -> Option<&'a [T]> {
        self.transposed
    }

    /// The whole array as one C-contiguous slice (rows of `features` values), if it is one.
    pub fn contiguous(&self) -> Option<&'a [T]> {
        self.contiguous
    }

    /// Row r as a view of the trailing dims (logical order = canonical order).
    pub fn row(&self, r: usize) -> ArrayView<'a, T, IxDyn> {
        if let Some(s) = self.contiguous {
            // The row keeps its trailing shape: paths that walk two rows together by runs
            // (`reduce::for_each_run`) need both of one shape.
            let f = self.features;
            let trailing = &self.v.shape()[self.lead.len()..];
            return ArrayView::from_shape(IxDyn(trailing), &s[r * f..(r + 1) * f]).unwrap_or_else(
                |_| ArrayView::from_shape(IxDyn(&[0]), &s[..0]).expect("empty view"),
            );
        }
        let mut v = self.v.clone();
        for i in unravel(&self.lead, r) {
            v = v.index_axis_move(Axis(0), i);
        }
        v
    }

    /// Hints row `r + ahead` (about 8 KiB ahead) into cache if it is before `end`, the task's
    /// own rows (contiguous inputs only): as in the forward (`RowView::prefetch_ahead`).
    #[inline]
    pub fn prefetch_ahead(&self, r: usize, end: usize) {
        let row = self.features * std::mem::size_of::<T>();
        let ahead = (8 * 1024 / row.max(1)).max(1);
        if let (true, Some(s)) = (r + ahead < end, self.contiguous) {
            if let Some(next) = s.get((r + ahead) * self.features..(r + ahead + 1) * self.features)
            {
                crate::stream::prefetch_bytes(next.as_ptr().cast(), row);
            }
        }
    }
}

/// Rows per block of the row ops' backward: about 256 KiB of input per block. Parameter
/// gradients are summed row by row inside a block and the blocks folded in order, so the
/// block size (fixed by the shape and dtype alone) fixes the rounding, never the thread count.
pub fn grad_rows_per_block(features: usize, elem: usize) -> usize {
    (256 * 1024 / (features.max(1) * elem)).max(1)
}

/// Folds per-block parameter partials (rows of `len` values, one per block) in block order:
/// `Σ_b parts[b]` element-wise.
pub fn fold_parts(parts: &[f64], len: usize) -> Vec<f64> {
    let mut acc = vec![0.0f64; len];
    if len > 0 {
        for p in parts.chunks_exact(len) {
            for (a, v) in acc.iter_mut().zip(p) {
                *a += v;
            }
        }
    }
    acc
}

/// Whether every plane (n, c) of a permuted (N, C, S…) array is a standard-layout block.
pub fn planes_standard(shape: &[usize], strides: &[isize]) -> bool {
    let mut expect = 1isize;
    for (&d, &st) in shape.iter().zip(strides).skip(2).rev() {
        if d > 1 && st != expect {
            return false;
        }
        expect = expect.saturating_mul(d as isize);
    }
    true
}
