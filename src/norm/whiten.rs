//! Whitening: per-group channel covariance, whitening matrices (ZCA, PCA, Cholesky) and the
//! grouped linear map that applies them.
//!
//! The input is seen as (N, C, S…) like every channel op (batch axis 0, channel `axis`, the
//! rest spatial); a *position* is one (n, s…) and every position is a sample of the C-vector.
//! Channels are split into G contiguous groups of C/G; each group has its own covariance and
//! matrix (G = 1 for `Whitening`, where x is (n_samples, n_features)).
//!
//! ```text
//! mean_c = (1/m) Σ_p x[p, c]                                   m = N · S positions
//! M_g    = Σ_p (x[p, g] − mean_g)(x[p, g] − mean_g)ᵀ           co-moment, C/G × C/G
//! ZCA:      W = U diag((λ + eps)^-½) Uᵀ      Σ = U diag(λ) Uᵀ, λ descending
//! PCA:      W = diag((λ + eps)^-½) Uᵀ        each column of U: its largest-|·| entry positive
//! Cholesky: W = L⁻¹                          Σ + eps·I = L Lᵀ
//! apply:    y[p, g] = A_g (x[p, g] − sub_g) + add_g
//! ```
//!
//! **Determinism.** Positions are cut into blocks of `BLOCK` by the data alone; a block is
//! gathered (any layout, in logical order) into an f64 buffer, and the co-moment of a block is
//! one GEMM (`matrixmultiply`). Blocks are grouped into at most `MAX_TASKS` tasks, again by the
//! data alone, each summing its blocks in order; task partials are folded in task order. So the
//! thread count never changes a bit, and a strided input gives bitwise its contiguous copy's
//! result (the gathered buffers are identical).

use super::common::{bytes_of, check_eps, check_out};
use crate::channel::normalize_axis;
use crate::error::{fmt_shape, NormError, Result};
use crate::pool;
use crate::scalar::Scalar;
use nalgebra::DMatrix;
use ndarray::{ArrayView, ArrayViewMut, IxDyn};

/// Positions per gathered block: big enough for an efficient GEMM, small enough that a block
/// of C ≤ 1024 channels (2 MiB of f64) stays in L2/L3.
const BLOCK: usize = 256;
/// Upper bound on the number of independent partial sums (fixed by the data, never by the
/// thread count).
const MAX_TASKS: usize = 32;
/// Memory cap for the per-task co-moment partials, in f64 values (64 MiB).
const PARTIALS_MAX: usize = 1 << 23;

/// Count, per-channel mean and per-group co-moment of an input.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupCov {
    /// Number of positions m = N · S.
    pub count: u64,
    /// Per-channel mean, length C.
    pub mean: Vec<f64>,
    /// Per-group co-moment Σ (x − mean)(x − mean)ᵀ, G blocks of (C/G)², row-major, exactly
    /// symmetric.
    pub comoment: Vec<f64>,
}

/// Read-only element access to an (N, C, S…) view of any strides, by (position, channel).
struct Geometry<T> {
    ptr: *const T,
    c: usize,
    s: usize,
    m: usize,
    sn: isize,
    sc: isize,
    sp_shape: Vec<usize>,
    sp_strides: Vec<isize>,
}

// SAFETY: Geometry only reads through `ptr`, which points into a view borrowed for the whole
// call; T is Sync, so sharing reads across threads is sound.
unsafe impl<T: Sync> Sync for Geometry<T> {}
unsafe impl<T: Sync> Send for Geometry<T> {}

/// Channel-first permutation (0, axis, others…) of shape and strides.
fn permuted(shape: &[usize], strides: &[isize], axis: usize) -> (Vec<usize>, Vec<isize>) {
    let mut order = vec![0, axis];
    order.extend((1..shape.len()).filter(|&a| a != axis));
    (
        order.iter().map(|&a| shape[a]).collect(),
        order.iter().map(|&a| strides[a]).collect(),
    )
}

impl<T> Geometry<T> {
    fn new(ptr: *const T, shape: &[usize], strides: &[isize], axis: usize) -> Self {
        let (sh, st) = permuted(shape, strides, axis);
        let s: usize = sh[2..].iter().product();
        Self {
            ptr,
            c: sh[1],
            s,
            m: sh[0] * s,
            sn: st[0],
            sc: st[1],
            sp_shape: sh[2..].to_vec(),
            sp_strides: st[2..].to_vec(),
        }
    }

    /// Element offsets (channel 0) of positions p0 .. p0 + len.
    fn offsets(&self, p0: usize, len: usize, out: &mut Vec<isize>) {
        out.clear();
        for p in p0..p0 + len {
            let (n, mut s) = (p / self.s, p % self.s);
            let mut off = n as isize * self.sn;
            for k in (0..self.sp_shape.len()).rev() {
                let d = self.sp_shape[k];
                off += (s % d) as isize * self.sp_strides[k];
                s /= d;
            }
            out.push(off);
        }
    }
}

impl<T: Scalar> Geometry<T> {
    /// buf[c·BLOCK + j] = x[p0 + j, c] − sub[c] for the channels `cs` (rows relative to cs.start).
    fn gather(&self, offs: &[isize], cs: std::ops::Range<usize>, sub: &[f64], buf: &mut [f64]) {
        for (r, c) in cs.enumerate() {
            let base = c as isize * self.sc;
            let row = &mut buf[r * BLOCK..r * BLOCK + offs.len()];
            let mu = sub[c];
            for (o, &off) in row.iter_mut().zip(offs) {
                // SAFETY: (p, c) is inside the view, so base + off is a valid element offset
                // from the view's first-element pointer (strides may be negative).
                *o = unsafe { *self.ptr.offset(base + off) }.to_f64() - mu;
            }
        }
    }
}

/// Write access to the permuted output, for tasks writing disjoint positions.
struct OutPtr<T> {
    ptr: *mut T,
    g: Geometry<T>,
}

// SAFETY: tasks write disjoint sets of positions (one block each); T is Send.
unsafe impl<T: Send> Sync for OutPtr<T> {}
unsafe impl<T: Send> Send for OutPtr<T> {}

fn blocks(m: usize) -> usize {
    m.div_ceil(BLOCK)
}

/// Blocks [start, end) of task t out of `tasks`.
fn task_range(t: usize, tasks: usize, nb: usize) -> std::ops::Range<usize> {
    (t * nb / tasks)..((t + 1) * nb / tasks)
}

fn check_groups(c: usize, num_groups: i64) -> Result<usize> {
    match usize::try_from(num_groups) {
        Ok(g) if g > 0 => {
            if !c.is_multiple_of(g) {
                return Err(NormError::Param(format!(
                    "num_groups must divide the number of channels: C={c} is not divisible by \
                     num_groups={g}"
                )));
            }
            Ok(g)
        }
        _ => Err(NormError::Param(format!(
            "num_groups must be positive, got {num_groups}"
        ))),
    }
}

fn channel_axis(shape: &[usize], axis: isize, op: &str) -> Result<usize> {
    if shape.len() < 2 {
        return Err(NormError::Shape(format!(
            "{op} expects an input with at least 2 dimensions (N, C, ...), got shape {}",
            fmt_shape(shape)
        )));
    }
    let ax = normalize_axis(axis, shape.len(), "axis")?;
    if ax == 0 {
        return Err(NormError::Param(format!(
            "axis=0 is the batch axis; {op} needs the channel axis to be another one (1 or -1), \
             input shape {}",
            fmt_shape(shape)
        )));
    }
    Ok(ax)
}

/// Per-channel mean and per-group co-moment of `x` (two passes, f64).
///
/// ```text
/// mean_c = (1/m) Σ_p x[p, c],   M_g = Σ_p (x[p, g] − mean_g)(x[p, g] − mean_g)ᵀ
/// ```
/// With m = 0 the mean is NaN and the co-moment 0.
///
/// # Errors
/// Rank < 2, `axis` out of range or 0, `num_groups` not positive or not dividing C.
///
/// ```
/// use ndarray::array;
/// let x = array![[1.0f64, 2.0], [3.0, 6.0]].into_dyn();
/// let cov = rsnorm::norm::whiten::group_covariance(x.view(), 1, 1).unwrap();
/// assert_eq!(cov.mean, vec![2.0, 4.0]);
/// assert_eq!(cov.comoment, vec![2.0, 4.0, 4.0, 8.0]);
/// ```
pub fn group_covariance<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    num_groups: i64,
    axis: isize,
) -> Result<GroupCov> {
    let ax = channel_axis(x.shape(), axis, "covariance")?;
    let geo = Geometry::new(x.as_ptr(), x.shape(), x.strides(), ax);
    let g = check_groups(geo.c, num_groups)?;
    let parallel = pool::worth_parallel(bytes_of(&x));
    Ok(covariance_of(&geo, g, parallel))
}

fn covariance_of<T: Scalar>(geo: &Geometry<T>, g: usize, parallel: bool) -> GroupCov {
    let (c, m) = (geo.c, geo.m);
    let cg = c / g;
    if m == 0 || c == 0 {
        return GroupCov {
            count: m as u64,
            mean: vec![f64::NAN; c],
            comoment: vec![0.0; g * cg * cg],
        };
    }
    let nb = blocks(m);
    let per_task = (g * cg * cg).max(1);
    let tasks = nb.min(MAX_TASKS).min((PARTIALS_MAX / per_task).max(1));
    let zero = vec![0.0f64; c];
    // Pass 1: per-channel sums, each task summing its positions in order.
    let sums = pool::map_tasks(tasks, parallel, |t| {
        let mut buf = vec![0.0f64; c * BLOCK];
        let mut offs = Vec::with_capacity(BLOCK);
        let mut acc = vec![0.0f64; c];
        for b in task_range(t, tasks, nb) {
            let p0 = b * BLOCK;
            let len = BLOCK.min(m - p0);
            geo.offsets(p0, len, &mut offs);
            geo.gather(&offs, 0..c, &zero, &mut buf);
            for (k, a) in acc.iter_mut().enumerate() {
                for &v in &buf[k * BLOCK..k * BLOCK + len] {
                    *a += v;
                }
            }
        }
        acc
    });
    let mut mean = vec![0.0f64; c];
    for s in &sums {
        for (a, v) in mean.iter_mut().zip(s) {
            *a += v;
        }
    }
    for a in &mut mean {
        *a /= m as f64;
    }
    // Pass 2: centered co-moments, one GEMM per (block, group).
    let parts = pool::map_tasks(tasks, parallel, |t| {
        let mut buf = vec![0.0f64; c * BLOCK];
        let mut offs = Vec::with_capacity(BLOCK);
        let mut acc = vec![0.0f64; g * cg * cg];
        for b in task_range(t, tasks, nb) {
            let p0 = b * BLOCK;
            let len = BLOCK.min(m - p0);
            geo.offsets(p0, len, &mut offs);
            geo.gather(&offs, 0..c, &mean, &mut buf);
            for gi in 0..g {
                let a = buf[gi * cg * BLOCK..].as_ptr();
                let out = acc[gi * cg * cg..(gi + 1) * cg * cg].as_mut_ptr();
                // SAFETY: `a` addresses cg rows of BLOCK (≥ len) f64 inside `buf`; `out` a
                // cg × cg row-major block of `acc`; the operands do not overlap.
                unsafe {
                    matrixmultiply::dgemm(
                        cg,
                        len,
                        cg,
                        1.0,
                        a,
                        BLOCK as isize,
                        1,
                        a,
                        1,
                        BLOCK as isize,
                        1.0,
                        out,
                        cg as isize,
                        1,
                    );
                }
            }
        }
        acc
    });
    let mut comoment = vec![0.0f64; g * cg * cg];
    for p in &parts {
        for (a, v) in comoment.iter_mut().zip(p) {
            *a += v;
        }
    }
    for gi in 0..g {
        symmetrize(&mut comoment[gi * cg * cg..(gi + 1) * cg * cg], cg);
    }
    GroupCov {
        count: m as u64,
        mean,
        comoment,
    }
}

/// a ← (a + aᵀ)/2, so the result is exactly symmetric (a no-op on a symmetric matrix).
fn symmetrize(a: &mut [f64], d: usize) {
    for i in 0..d {
        for j in i + 1..d {
            let v = 0.5 * (a[i * d + j] + a[j * d + i]);
            a[i * d + j] = v;
            a[j * d + i] = v;
        }
    }
}

/// y[p, g] = A_g (x[p, g] − sub_g) + add_g, A_g the g-th (C/G)² row-major block of `mats`.
///
/// Any layout of x and y; bitwise identical for any thread count and for strided vs
/// contiguous x. Values are computed in f64 and rounded once to T.
///
/// # Errors
/// Shapes: y not x's shape, `mats` not G·(C/G)² values, `sub`/`add` not C values; bad axis or
/// num_groups.
pub fn group_apply<T: Scalar>(
    x: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    mats: &[f64],
    sub: &[f64],
    add: Option<&[f64]>,
    num_groups: i64,
    axis: isize,
) -> Result<()> {
    check_out(&x, &y)?;
    let ax = channel_axis(x.shape(), axis, "whitening")?;
    let geo = Geometry::new(x.as_ptr(), x.shape(), x.strides(), ax);
    let g = check_groups(geo.c, num_groups)?;
    let cg = geo.c / g;
    if mats.len() != g * cg * cg {
        return Err(NormError::Shape(format!(
            "the whitening matrix must have shape ({g}, {cg}, {cg}) for {} channels in {g} \
             group(s), got {} values",
            geo.c,
            mats.len()
        )));
    }
    for (name, v) in [("mean", Some(sub)), ("offset", add)] {
        if let Some(v) = v {
            if v.len() != geo.c {
                return Err(NormError::Shape(format!(
                    "{name} must have {} values (one per channel), got {}",
                    geo.c,
                    v.len()
                )));
            }
        }
    }
    let parallel = pool::worth_parallel(bytes_of(&x));
    let mut y = y;
    let out = OutPtr {
        ptr: y.as_mut_ptr(),
        g: Geometry::new(std::ptr::null::<T>(), y.shape(), y.strides(), ax),
    };
    let term = Term {
        geo: &geo,
        mats,
        sub,
    };
    apply_of(&[term], &out, g, add, parallel);
    Ok(())
}

/// One term A_g (x − sub) of a grouped linear map.
struct Term<'a, T> {
    geo: &'a Geometry<T>,
    mats: &'a [f64],
    sub: &'a [f64],
}

/// y = Σ_terms A_g (x_t − sub_t) + add, block by block (one GEMM per term and group).
fn apply_of<T: Scalar>(
    terms: &[Term<'_, T>],
    out: &OutPtr<T>,
    g: usize,
    add: Option<&[f64]>,
    parallel: bool,
) {
    let (c, m) = (out.g.c, out.g.m);
    if m == 0 || c == 0 {
        return;
    }
    let cg = c / g;
    let nb = blocks(m);
    let tasks = nb.min(MAX_TASKS * 4);
    pool::for_each_task(tasks, parallel, |t| {
        let mut xb = vec![0.0f64; c * BLOCK];
        let mut yb = vec![0.0f64; c * BLOCK];
        let mut offs = Vec::with_capacity(BLOCK);
        let mut ooffs = Vec::with_capacity(BLOCK);
        for b in task_range(t, tasks, nb) {
            let p0 = b * BLOCK;
            let len = BLOCK.min(m - p0);
            out.g.offsets(p0, len, &mut ooffs);
            for (ti, term) in terms.iter().enumerate() {
                term.geo.offsets(p0, len, &mut offs);
                term.geo.gather(&offs, 0..c, term.sub, &mut xb);
                let beta = if ti == 0 { 0.0 } else { 1.0 };
                for gi in 0..g {
                    // SAFETY: A_g is cg × cg row-major inside `mats`; the block rows of group
                    // gi are cg rows of BLOCK (≥ len) values in `xb` / `yb`, which do not
                    // overlap.
                    unsafe {
                        matrixmultiply::dgemm(
                            cg,
                            cg,
                            len,
                            1.0,
                            term.mats[gi * cg * cg..].as_ptr(),
                            cg as isize,
                            1,
                            xb[gi * cg * BLOCK..].as_ptr(),
                            BLOCK as isize,
                            1,
                            beta,
                            yb[gi * cg * BLOCK..].as_mut_ptr(),
                            BLOCK as isize,
                            1,
                        );
                    }
                }
            }
            for k in 0..c {
                let base = k as isize * out.g.sc;
                let a = add.map_or(0.0, |a| a[k]);
                for (&v, &off) in yb[k * BLOCK..k * BLOCK + len].iter().zip(&ooffs) {
                    // SAFETY: (p, k) is inside the output view; this task owns positions
                    // p0 .. p0 + len of every channel exclusively.
                    unsafe { *out.ptr.offset(base + off) = T::from_f64(v + a) };
                }
            }
        }
    });
}

fn check_mats(mats: &[f64], g: usize, c: usize, name: &str) -> Result<()> {
    let cg = c / g;
    if mats.len() != g * cg * cg {
        return Err(NormError::Shape(format!(
            "{name} must have shape ({g}, {cg}, {cg}) for {c} channels in {g} group(s), got {} \
             values",
            mats.len()
        )));
    }
    Ok(())
}

fn check_len(v: &[f64], c: usize, name: &str) -> Result<()> {
    if v.len() != c {
        return Err(NormError::Shape(format!(
            "{name} must have {c} values (one per channel), got {}",
            v.len()
        )));
    }
    Ok(())
}

fn check_same_shape<T>(a: &ArrayView<'_, T, IxDyn>, b: &ArrayView<'_, T, IxDyn>) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(NormError::Shape(format!(
            "the two inputs must have the same shape, got {} and {}",
            fmt_shape(a.shape()),
            fmt_shape(b.shape())
        )));
    }
    Ok(())
}

/// y[p, g] = A_g a[p, g] + B_g b[p, g] + add_g: the two-input grouped map (backward passes:
/// a gradient term plus an input term). Same layout, thread and rounding contract as
/// [`group_apply`].
///
/// # Errors
/// Shapes (a, b, y not all the same; matrices not G·(C/G)²; add not C values), bad axis or
/// num_groups.
#[allow(clippy::too_many_arguments)]
pub fn group_apply2<T: Scalar>(
    a: ArrayView<'_, T, IxDyn>,
    b: ArrayView<'_, T, IxDyn>,
    y: ArrayViewMut<'_, T, IxDyn>,
    mats_a: &[f64],
    mats_b: &[f64],
    add: &[f64],
    num_groups: i64,
    axis: isize,
) -> Result<()> {
    check_same_shape(&a, &b)?;
    check_out(&a, &y)?;
    let ax = channel_axis(a.shape(), axis, "whitening")?;
    let ga = Geometry::new(a.as_ptr(), a.shape(), a.strides(), ax);
    let gb = Geometry::new(b.as_ptr(), b.shape(), b.strides(), ax);
    let g = check_groups(ga.c, num_groups)?;
    check_mats(mats_a, g, ga.c, "the first matrix")?;
    check_mats(mats_b, g, ga.c, "the second matrix")?;
    check_len(add, ga.c, "offset")?;
    let zero = vec![0.0f64; ga.c];
    let parallel = pool::worth_parallel(bytes_of(&a).saturating_mul(2));
    let mut y = y;
    let out = OutPtr {
        ptr: y.as_mut_ptr(),
        g: Geometry::new(std::ptr::null::<T>(), y.shape(), y.strides(), ax),
    };
    let terms = [
        Term {
            geo: &ga,
            mats: mats_a,
            sub: &zero,
        },
        Term {
            geo: &gb,
            mats: mats_b,
            sub: &zero,
        },
    ];
    apply_of(&terms, &out, g, Some(add), parallel);
    Ok(())
}

/// Per-channel sums of `a` and per-group cross co-moments with a centered `b`:
///
/// ```text
/// sum_c = Σ_p a[p, c],   X_g = Σ_p a[p, g] (b[p, g] − mean_b,g)ᵀ     (C/G × C/G)
/// ```
/// (backward: a = dy, b = x gives ∂L/∂W = X_g). Same determinism contract as
/// [`group_covariance`].
///
/// # Errors
/// a and b of different shapes, `mean_b` not C values, bad axis or num_groups.
pub fn group_cross_moments<T: Scalar>(
    a: ArrayView<'_, T, IxDyn>,
    b: ArrayView<'_, T, IxDyn>,
    mean_b: &[f64],
    num_groups: i64,
    axis: isize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    check_same_shape(&a, &b)?;
    let ax = channel_axis(a.shape(), axis, "cross moments")?;
    let ga = Geometry::new(a.as_ptr(), a.shape(), a.strides(), ax);
    let gb = Geometry::new(b.as_ptr(), b.shape(), b.strides(), ax);
    let g = check_groups(ga.c, num_groups)?;
    check_len(mean_b, ga.c, "mean")?;
    let (c, m) = (ga.c, ga.m);
    let cg = c / g;
    if m == 0 || c == 0 {
        return Ok((vec![0.0; c], vec![0.0; g * cg * cg]));
    }
    let parallel = pool::worth_parallel(bytes_of(&a).saturating_mul(2));
    let nb = blocks(m);
    let per_task = (g * cg * cg + c).max(1);
    let tasks = nb.min(MAX_TASKS).min((PARTIALS_MAX / per_task).max(1));
    let zero = vec![0.0f64; c];
    let parts = pool::map_tasks(tasks, parallel, |t| {
        let mut abuf = vec![0.0f64; c * BLOCK];
        let mut bbuf = vec![0.0f64; c * BLOCK];
        let mut offs = Vec::with_capacity(BLOCK);
        let mut sum = vec![0.0f64; c];
        let mut acc = vec![0.0f64; g * cg * cg];
        for blk in task_range(t, tasks, nb) {
            let p0 = blk * BLOCK;
            let len = BLOCK.min(m - p0);
            ga.offsets(p0, len, &mut offs);
            ga.gather(&offs, 0..c, &zero, &mut abuf);
            gb.offsets(p0, len, &mut offs);
            gb.gather(&offs, 0..c, mean_b, &mut bbuf);
            for (k, s) in sum.iter_mut().enumerate() {
                for &v in &abuf[k * BLOCK..k * BLOCK + len] {
                    *s += v;
                }
            }
            for gi in 0..g {
                // SAFETY: cg rows of BLOCK (≥ len) values of `abuf` and `bbuf`; `acc` block
                // gi is cg × cg row-major; no overlap.
                unsafe {
                    matrixmultiply::dgemm(
                        cg,
                        len,
                        cg,
                        1.0,
                        abuf[gi * cg * BLOCK..].as_ptr(),
                        BLOCK as isize,
                        1,
                        bbuf[gi * cg * BLOCK..].as_ptr(),
                        1,
                        BLOCK as isize,
                        1.0,
                        acc[gi * cg * cg..].as_mut_ptr(),
                        cg as isize,
                        1,
                    );
                }
            }
        }
        (sum, acc)
    });
    let mut sum = vec![0.0f64; c];
    let mut cross = vec![0.0f64; g * cg * cg];
    for (s, x) in &parts {
        for (o, v) in sum.iter_mut().zip(s) {
            *o += v;
        }
        for (o, v) in cross.iter_mut().zip(x) {
            *o += v;
        }
    }
    Ok((sum, cross))
}

/// Which whitening matrix to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Zca,
    Pca,
    Cholesky,
}

impl Method {
    /// Parses "zca", "pca" or "cholesky" (case-insensitive).
    ///
    /// # Errors
    /// Any other name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "zca" => Ok(Method::Zca),
            "pca" => Ok(Method::Pca),
            "cholesky" => Ok(Method::Cholesky),
            _ => Err(NormError::Param(format!(
                "method must be 'zca', 'pca' or 'cholesky', got {s:?}"
            ))),
        }
    }
}

/// A whitening matrix, its inverse (the coloring matrix) and the covariance eigenvalues.
#[derive(Clone, Debug, PartialEq)]
pub struct WhiteningMatrices {
    /// W, d × d row-major: y = W (x − mean).
    pub w: Vec<f64>,
    /// W⁻¹, d × d row-major: x = W⁻¹ y + mean.
    pub w_inv: Vec<f64>,
    /// Eigenvalues of the covariance (without eps), descending.
    pub eigenvalues: Vec<f64>,
}

fn eigen_sorted(cov: &DMatrix<f64>) -> Result<(Vec<f64>, DMatrix<f64>)> {
    let d = cov.nrows();
    let eig = nalgebra::SymmetricEigen::try_new(cov.clone(), f64::EPSILON, 1000 + 100 * d)
        .ok_or_else(|| {
            NormError::Param("the covariance eigendecomposition did not converge".into())
        })?;
    let mut order: Vec<usize> = (0..d).collect();
    // Stable: equal eigenvalues keep nalgebra's (deterministic) order.
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let vals: Vec<f64> = order.iter().map(|&i| eig.eigenvalues[i]).collect();
    let mut u = DMatrix::<f64>::zeros(d, d);
    for (j, &i) in order.iter().enumerate() {
        let mut col = eig.eigenvectors.column(i).into_owned();
        // Sign convention: the entry of largest magnitude (first one on ties) is positive.
        let mut best = 0;
        for r in 1..d {
            if col[r].abs() > col[best].abs() {
                best = r;
            }
        }
        if col[best] < 0.0 {
            col.neg_mut();
        }
        u.set_column(j, &col);
    }
    Ok((vals, u))
}

fn to_rows(m: &DMatrix<f64>) -> Vec<f64> {
    let (r, c) = m.shape();
    let mut v = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            v.push(m[(i, j)]);
        }
    }
    v
}

/// The whitening matrix of a d × d covariance (row-major, symmetrized first).
///
/// ```text
/// Σ = U diag(λ) Uᵀ, λ descending, each column of U with its largest-magnitude entry positive
/// s_i = (max(λ_i, 0) + eps)^-½         (rounding can make a zero eigenvalue slightly negative)
/// ZCA:      W = U diag(s) Uᵀ,  W⁻¹ = U diag(1/s) Uᵀ      (exactly symmetric)
/// PCA:      W = diag(s) Uᵀ,    W⁻¹ = U diag(1/s)
/// Cholesky: Σ + eps·I = L Lᵀ,  W = L⁻¹,  W⁻¹ = L
/// ```
///
/// # Errors
/// `cov` not d² values or not finite, eps negative or not finite, a singular covariance with
/// eps = 0, a non-converging eigendecomposition.
///
/// ```
/// use rsnorm::norm::whiten::{whitening_matrix, Method};
/// let m = whitening_matrix(&[4.0, 0.0, 0.0, 1.0], 2, Method::Zca, 0.0).unwrap();
/// assert_eq!(m.w, vec![0.5, 0.0, 0.0, 1.0]);
/// assert_eq!(m.eigenvalues, vec![4.0, 1.0]);
/// ```
pub fn whitening_matrix(
    cov: &[f64],
    d: usize,
    method: Method,
    eps: f64,
) -> Result<WhiteningMatrices> {
    check_eps(eps)?;
    if cov.len() != d * d {
        return Err(NormError::Shape(format!(
            "cov must be a square ({d}, {d}) matrix, got {} values",
            cov.len()
        )));
    }
    if cov.iter().any(|v| !v.is_finite()) {
        return Err(NormError::Param(
            "the covariance contains NaN or infinity (does the input contain NaN or inf?)".into(),
        ));
    }
    if d == 0 {
        // nalgebra's decompositions reject empty matrices; zero features whiten to nothing.
        return Ok(WhiteningMatrices {
            w: Vec::new(),
            w_inv: Vec::new(),
            eigenvalues: Vec::new(),
        });
    }
    let mut c = cov.to_vec();
    symmetrize(&mut c, d);
    let sigma = DMatrix::from_row_slice(d, d, &c);
    let singular = || {
        NormError::Param(
            "the covariance is singular (rank-deficient) and eps=0; use eps > 0".into(),
        )
    };
    let (w, w_inv, vals) = match method {
        Method::Zca | Method::Pca => {
            let (vals, u) = eigen_sorted(&sigma)?;
            let mut s = Vec::with_capacity(d);
            for &l in &vals {
                let v = l.max(0.0) + eps;
                if v <= 0.0 {
                    return Err(singular());
                }
                s.push(1.0 / v.sqrt());
            }
            let mut us = u.clone();
            let mut uinv = u.clone();
            for (j, &sj) in s.iter().enumerate() {
                us.column_mut(j).scale_mut(sj);
                uinv.column_mut(j).scale_mut(1.0 / sj);
            }
            if method == Method::Zca {
                let mut w = to_rows(&(&us * u.transpose()));
                let mut wi = to_rows(&(&uinv * u.transpose()));
                symmetrize(&mut w, d);
                symmetrize(&mut wi, d);
                (w, wi, vals)
            } else {
                (to_rows(&us.transpose()), to_rows(&uinv), vals)
            }
        }
        Method::Cholesky => {
            let a = &sigma + DMatrix::<f64>::identity(d, d) * eps;
            let chol = nalgebra::Cholesky::new(a).ok_or_else(singular)?;
            let l = chol.l();
            let linv = l
                .solve_lower_triangular(&DMatrix::<f64>::identity(d, d))
                .ok_or_else(singular)?;
            // Eigenvalues only (no vectors): a fraction of the full decomposition's cost.
            let mut vals: Vec<f64> = sigma.symmetric_eigenvalues().iter().copied().collect();
            vals.sort_by(|a, b| b.total_cmp(a));
            (to_rows(&linv), to_rows(&l), vals)
        }
    };
    Ok(WhiteningMatrices {
        w,
        w_inv,
        eigenvalues: vals,
    })
}

/// Σ^-½ of each group's SPD matrix by Newton–Schulz iterations on the trace-normalized matrix
/// (Huang et al. 2019, "Iterative Normalization"):
///
/// ```text
/// Σ_N = Σ / tr(Σ),  P₀ = I,  P_{k+1} = ½(3 P_k − P_k³ Σ_N)  (k < T),  W = P_T / sqrt(tr(Σ))
/// ```
/// `sigma`: G blocks of d², row-major (eps already added). A zero trace gives NaN (0/0).
/// The uncoupled iteration amplifies rounding once converged when κ(Σ) ≳ 9 (Higham 1986):
/// large T on ill-conditioned Σ can overflow, as in the reference implementation.
pub fn newton_inv_sqrt(sigma: &[f64], d: usize, t: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(sigma.len());
    if d == 0 {
        return out;
    }
    for blk in sigma.chunks_exact(d * d) {
        let s = DMatrix::from_row_slice(d, d, blk);
        let tr = s.trace();
        let sn = &s / tr;
        let mut p = DMatrix::<f64>::identity(d, d);
        for _ in 0..t {
            let p3 = &p * &p * &p;
            p = &p * 1.5 - (p3 * &sn) * 0.5;
        }
        out.extend(to_rows(&(p / tr.sqrt())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, ShapeBuilder};

    fn data(n: usize, c: usize) -> Array<f64, IxDyn> {
        // Deterministic, correlated values without a RNG dependency.
        Array::from_shape_fn(IxDyn(&[n, c]), |ix| {
            let (i, j) = (ix[0] as f64, ix[1] as f64);
            (i * (0.37 + 0.21 * j) + j).sin()
                + 0.3 * (i * 0.11 * (j + 1.0)).cos() * j
                + 0.4 * (i * 0.37).sin()
                + 3.0
        })
    }

    fn naive_cov(x: &Array<f64, IxDyn>) -> (Vec<f64>, Vec<f64>) {
        let (n, c) = (x.shape()[0], x.shape()[1]);
        let mean: Vec<f64> = (0..c)
            .map(|k| (0..n).map(|i| x[[i, k]]).sum::<f64>() / n as f64)
            .collect();
        let mut cm = vec![0.0; c * c];
        for a in 0..c {
            for b in 0..c {
                cm[a * c + b] = (0..n)
                    .map(|i| (x[[i, a]] - mean[a]) * (x[[i, b]] - mean[b]))
                    .sum();
            }
        }
        (mean, cm)
    }

    #[test]
    fn covariance_matches_naive_and_is_layout_independent() {
        let x = data(1000, 5);
        let got = group_covariance(x.view(), 1, 1).unwrap();
        let (mean, cm) = naive_cov(&x);
        for (a, b) in got.mean.iter().zip(&mean) {
            assert!((a - b).abs() < 1e-12);
        }
        for (a, b) in got.comoment.iter().zip(&cm) {
            assert!((a - b).abs() < 1e-9 * b.abs().max(1.0));
        }
        let mut f = Array::<f64, _>::zeros(IxDyn(&[1000, 5]).f());
        f.assign(&x);
        assert_eq!(group_covariance(f.view(), 1, 1).unwrap(), got);
    }

    #[test]
    fn zca_whitens() {
        let x = data(500, 4);
        let cov = group_covariance(x.view(), 1, 1).unwrap();
        let sigma: Vec<f64> = cov.comoment.iter().map(|v| v / 500.0).collect();
        for method in [Method::Zca, Method::Pca, Method::Cholesky] {
            let m = whitening_matrix(&sigma, 4, method, 0.0).unwrap();
            let mut y = Array::<f64, _>::zeros(IxDyn(&[500, 4]));
            group_apply(x.view(), y.view_mut(), &m.w, &cov.mean, None, 1, 1).unwrap();
            let (_, cy) = naive_cov(&y);
            for a in 0..4 {
                for b in 0..4 {
                    let want = if a == b { 1.0 } else { 0.0 };
                    assert!((cy[a * 4 + b] / 500.0 - want).abs() < 1e-8, "{method:?}");
                }
            }
        }
    }

    #[test]
    fn newton_converges_to_inverse_sqrt() {
        let s = [2.0, 0.5, 0.5, 1.0];
        let w = newton_inv_sqrt(&s, 2, 30);
        // W Σ W = I
        let ws = [
            w[0] * s[0] + w[1] * s[2],
            w[0] * s[1] + w[1] * s[3],
            w[2] * s[0] + w[3] * s[2],
            w[2] * s[1] + w[3] * s[3],
        ];
        let i00 = ws[0] * w[0] + ws[1] * w[2];
        let i01 = ws[0] * w[1] + ws[1] * w[3];
        let i11 = ws[2] * w[1] + ws[3] * w[3];
        assert!((i00 - 1.0).abs() < 1e-12 && i01.abs() < 1e-12 && (i11 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bad_arguments() {
        let x = data(10, 4);
        assert!(group_covariance(x.view(), 3, 1).is_err());
        assert!(group_covariance(x.view(), 0, 1).is_err());
        assert!(group_covariance(x.view(), 1, 0).is_err());
        assert!(whitening_matrix(&[1.0, 0.0, 0.0, 0.0], 2, Method::Zca, 0.0).is_err());
        assert!(whitening_matrix(&[1.0, 0.0, 0.0, 0.0], 2, Method::Cholesky, 0.0).is_err());
        assert!(whitening_matrix(&[f64::NAN, 0.0, 0.0, 1.0], 2, Method::Zca, 1e-5).is_err());
        assert!(Method::parse("svd").is_err());
    }
}
