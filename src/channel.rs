//! Geometry of the channel ops (batch, instance and group norm; later LRN, FRN, GDN).
//!
//! The input is seen, without copying, as (N, C, S…): axis 0 is the batch, `axis` the channel,
//! the others spatial, in their logical order. A *plane* is the spatial block of one (n, c).
//! Statistics are canonical sums (see `reduce`) over planes, folded in a fixed order by each op,
//! computed by whichever of three access paths the layout allows:
//! * `Planes`: a plane is contiguous (NCHW);
//! * `Rows`: a sample is contiguous with the channel last (NHWC): rows of C values;
//! * `Strided`: anything else, read in logical order through the view.
//!
//! The three paths perform identical f64 operations in identical order.

use crate::error::{fmt_shape, NormError, Result};
use crate::reduce::{self, SharedMut};
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, Axis, IxDyn};

/// Normalizes a possibly negative channel axis against `ndim`.
pub fn normalize_axis(axis: isize, ndim: usize, arg: &str) -> Result<usize> {
    let n = ndim as isize;
    if axis < -n || axis >= n {
        return Err(NormError::Param(format!(
            "{arg}={axis} is out of range for an input with {ndim} dimensions"
        )));
    }
    Ok(if axis < 0 {
        (axis + n) as usize
    } else {
        axis as usize
    })
}

/// The permutation that moves `axis` to position 1: (0, axis, others…).
fn channel_first_perm(ndim: usize, axis: usize) -> Vec<usize> {
    let mut p = vec![0, axis];
    p.extend((1..ndim).filter(|&a| a != axis));
    p
}

/// How planes are best read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Planes,
    Rows,
    Strided,
}

/// An input viewed as (N, C, S…).
pub struct ChannelView<'a, T> {
    /// (N, C, spatial…), a permuted view of the caller's array.
    pub x: ArrayView<'a, T, IxDyn>,
    pub n: usize,
    pub c: usize,
    /// Number of elements of one plane.
    pub s: usize,
    pub access: Access,
    axis: usize,
    ndim: usize,
}

impl<'a, T: Scalar> ChannelView<'a, T> {
    /// `op` and `min_ndim` are for messages and the rank check.
    pub fn new(x: ArrayView<'a, T, IxDyn>, axis: isize, op: &str, min_ndim: usize) -> Result<Self> {
        let ndim = x.ndim();
        if ndim < min_ndim {
            return Err(NormError::Shape(format!(
                "{op} expects an input with at least {min_ndim} dimensions (N, C, ...), got shape {}",
                fmt_shape(x.shape())
            )));
        }
        let axis = normalize_axis(axis, ndim, "axis")?;
        if axis == 0 {
            return Err(NormError::Param(format!(
                "axis=0 is the batch axis; {op} needs the channel axis to be another one (1 or -1), \
                 input shape {}",
                fmt_shape(x.shape())
            )));
        }
        let shape = x.shape().to_vec();
        let n = shape[0];
        let c = shape[axis];
        let s: usize = shape
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != 0 && i != axis)
            .map(|(_, d)| d)
            .product();
        let xp = x.permuted_axes(IxDyn(&channel_first_perm(ndim, axis)));
        let access = Self::access_of(&xp);
        Ok(Self {
            x: xp,
            n,
            c,
            s,
            access,
            axis,
            ndim,
        })
    }

    fn access_of<U>(xp: &ArrayView<'_, U, IxDyn>) -> Access {
        let (sh, st) = (xp.shape(), xp.strides());
        if sh.contains(&0) {
            return Access::Strided;
        }
        // From the strides alone (no sub-views: building them was a tenth of a tiny batch
        // norm). A plane is C-contiguous; a sample read as (S…, C) is C-contiguous. These are
        // exactly ndarray's `as_slice` conditions on those views.
        let planes = c_contiguous(sh[2..].iter().zip(&st[2..]).rev());
        let rows = c_contiguous(
            std::iter::once((&sh[1], &st[1])).chain(sh[2..].iter().zip(&st[2..]).rev()),
        );
        let plane_len: usize = sh[2..].iter().product();
        // With a single spatial element a plane is one value: rows of C (NC input) is the
        // faster walk. Both paths perform the same arithmetic, so the choice is free.
        match (planes, rows) {
            (true, true) if plane_len == 1 => Access::Rows,
            (true, _) => Access::Planes,
            (false, true) => Access::Rows,
            _ => Access::Strided,
        }
    }

    /// Offset (in elements) of the first value of plane (n, c).
    #[inline]
    fn offset(&self, n: usize, c: usize) -> isize {
        let st = self.x.strides();
        n as isize * st[0] + c as isize * st[1]
    }

    /// Plane (n, c) as a slice (only for `Access::Planes`).
    #[inline]
    pub fn plane_slice(&self, n: usize, c: usize) -> &'a [T] {
        debug_assert_eq!(self.access, Access::Planes);
        // SAFETY: with Access::Planes every plane is a contiguous, standard-layout block of
        // `s` elements starting at its first logical element, inside x's memory.
        unsafe { std::slice::from_raw_parts(self.x.as_ptr().offset(self.offset(n, c)), self.s) }
    }

    /// The plane (n, c) as a view of rank ndim−2.
    pub fn plane(&self, n: usize, c: usize) -> ArrayView<'a, T, IxDyn> {
        self.x
            .clone()
            .index_axis_move(Axis(0), n)
            .index_axis_move(Axis(0), c)
    }

    /// Sample n as a slice of S·C values with the channel last (only for `Access::Rows`).
    #[inline]
    pub fn sample_rows(&self, n: usize) -> &'a [T] {
        debug_assert_eq!(self.access, Access::Rows);
        // SAFETY: with Access::Rows every sample, read as (S…, C), is one contiguous block of
        // s·c elements whose first element is (n, c=0, s=0), inside x's memory.
        unsafe {
            std::slice::from_raw_parts(self.x.as_ptr().offset(self.offset(n, 0)), self.s * self.c)
        }
    }

    /// Permutes an output of the caller's logical shape the same way as the input.
    pub fn permute_out<'b>(&self, out: ArrayViewMut<'b, T, IxDyn>) -> ArrayViewMut<'b, T, IxDyn> {
        out.permuted_axes(IxDyn(&channel_first_perm(self.ndim, self.axis)))
    }

    /// Canonical sums with the step f over each plane of sample n, for channels `cs`, into
    /// `out`. `f(acc, x, c)` may depend on the channel (e.g. subtract that channel's mean).
    pub fn sample_sums<F: Fn(f64, f64, usize) -> f64 + Copy>(
        &self,
        n: usize,
        cs: std::ops::Range<usize>,
        f: F,
        scratch: &mut Vec<f64>,
        out: &mut [f64],
    ) {
        match self.access {
            Access::Rows => reduce::sum_rows(self.sample_rows(n), self.c, cs, f, scratch, out),
            Access::Planes => {
                for (o, c) in out.iter_mut().zip(cs) {
                    *o = reduce::sum_slice(self.plane_slice(n, c), |a, v| f(a, v, c));
                }
            }
            Access::Strided => {
                for (o, c) in out.iter_mut().zip(cs) {
                    *o = reduce::sum_view(&self.plane(n, c), |a, v| f(a, v, c));
                }
            }
        }
    }

    /// [`Self::sample_sums`] with [`reduce::add_sq_dev`], `m` indexed from `cs.start`: the same sums,
    /// through a vectorizable kernel for channels-last rows.
    pub fn sample_sq_dev_sums(
        &self,
        n: usize,
        cs: std::ops::Range<usize>,
        m: &[f64],
        scratch: &mut Vec<f64>,
        out: &mut [f64],
    ) {
        if self.access == Access::Rows {
            reduce::sum_rows_sq_dev(self.sample_rows(n), self.c, cs, m, scratch, out);
        } else {
            let start = cs.start;
            self.sample_sums(
                n,
                cs,
                |a, v, k| reduce::add_sq_dev(a, v, m[k - start]),
                scratch,
                out,
            );
        }
    }

    /// Prepares an output of the caller's logical shape for [`Self::apply_sample`].
    pub fn output<'b>(&self, y: ArrayViewMut<'b, T, IxDyn>) -> ChannelOut<'b, T> {
        let yp = self.permute_out(y);
        let access = Self::access_of(&yp.view());
        // The fast paths need x and y read the same way.
        let access = if access == self.access {
            access
        } else {
            Access::Strided
        };
        ChannelOut {
            shared: SharedMut::new(yp),
            access,
        }
    }

    /// Writes y = (x − m_c)·a_c + b_c for every plane of sample n, (m, a, b) given per channel.
    ///
    /// Tasks calling this for distinct n write disjoint memory.
    pub fn apply_sample(&self, n: usize, y: &ChannelOut<'_, T>, m: &[f64], a: &[f64], b: &[f64]) {
        match y.access {
            Access::Rows => {
                let xs = self.sample_rows(n);
                // SAFETY: y has Rows access like x, so sample n of y is this contiguous block;
                // the task for n owns it.
                let ys = unsafe {
                    y.shared
                        .block_mut(self.offset_in(&y.shared, n, 0), xs.len())
                };
                reduce::apply_rows_to(xs, ys, self.c, m, a, b, y.shared.stream);
            }
            Access::Planes => {
                for c in 0..self.c {
                    let xs = self.plane_slice(n, c);
                    // SAFETY: as above, plane (n, c) of y is contiguous and owned by this task.
                    let ys = unsafe {
                        y.shared
                            .block_mut(self.offset_in(&y.shared, n, c), xs.len())
                    };
                    let stream = y.shared.stream;
                    reduce::apply_slice_to(xs, ys, m[c], a[c], b[c], None, None, stream);
                }
            }
            Access::Strided => {
                // SAFETY: the task for n owns sample n of y.
                let mut ys = unsafe { y.shared.sub(&[n]) };
                for c in 0..self.c {
                    let xpl = self.plane(n, c);
                    let mut ypl = ys.index_axis_mut(Axis(0), c);
                    reduce::apply_view(&xpl, &mut ypl, m[c], a[c], b[c]);
                }
            }
        }
    }

    /// [`Self::apply_sample`] for the samples `ns`; one-value-per-plane rows ((N, C)
    /// C-contiguous) that stay cached go `ROW_BLOCK` rows per kernel call, each coefficient
    /// loaded once per block (bitwise the same values).
    pub fn apply_samples(
        &self,
        ns: std::ops::Range<usize>,
        y: &ChannelOut<'_, T>,
        m: &[f64],
        a: &[f64],
        b: &[f64],
    ) {
        let mut n = ns.start;
        let one_value_rows = self.s == 1 && self.access == Access::Rows && y.access == Access::Rows;
        let c = self.c;
        // SAFETY (used only for one-value rows): as in `apply_sample`: sample n of y is a
        // contiguous run of c values, owned by the caller for n in ns, disjoint for distinct n.
        let y_of = |n: usize| unsafe { y.shared.block_mut(self.offset_in(&y.shared, n, 0), c) };
        if one_value_rows && y.shared.stream {
            let pairs = ns.clone().map(|n| (self.sample_rows(n), y_of(n)));
            if crate::stream::apply_rows_each(pairs, c, m, a, b) {
                return;
            }
        }
        if one_value_rows && !y.shared.stream {
            use reduce::ROW_BLOCK;
            while n + ROW_BLOCK <= ns.end {
                let xs: [&[T]; ROW_BLOCK] = std::array::from_fn(|i| self.sample_rows(n + i));
                let ys: [&mut [T]; ROW_BLOCK] = std::array::from_fn(|i| y_of(n + i));
                reduce::apply_rows_block(xs, ys, m, a, b);
                n += ROW_BLOCK;
            }
        }
        for n in n..ns.end {
            self.apply_sample(n, y, m, a, b);
        }
    }

    /// Writes y = (x − m)·a + b over channel k of every sample (any layout), for callers that
    /// split the work by channel.
    pub fn apply_channel(&self, k: usize, y: &ChannelOut<'_, T>, m: f64, a: f64, b: f64) {
        let xk = self.x.index_axis(Axis(1), k);
        // SAFETY: the caller owns channel k of y.
        let mut yk = unsafe { y.shared.sub_axis(1, k) };
        reduce::apply_view(&xk, &mut yk, m, a, b);
    }

    /// Writes y = (x − m_k)·a_k + b_k for the channels `ks` of an input with one value per
    /// plane, any layout, row by row (a whole-channel view per channel would write y one
    /// element per cache line when x and y have different layouts).
    pub fn apply_channel_group(
        &self,
        ks: std::ops::Range<usize>,
        y: &ChannelOut<'_, T>,
        m: &[f64],
        a: &[f64],
        b: &[f64],
    ) {
        debug_assert_eq!(self.s, 1);
        let (px, xs) = (self.x.as_ptr(), self.x.strides());
        let (py, ys) = (y.shared.as_mut_ptr(), y.shared.strides());
        // SAFETY: (n, k, 0, …) for n < N, k in ks is an element of x and of y (spatial dims
        // are 1); the caller owns channels ks of y.
        unsafe {
            apply_columns(
                self.n,
                ks,
                (px, [xs[0], xs[1]]),
                (py, [ys[0], ys[1]]),
                (m, a, b),
            )
        };
    }

    /// Writes y = (x − m_k)·a_k + b_k for the channels `cs` of every sample of a
    /// one-value-per-plane input with Rows access ((N, C) C-contiguous); `m`, `a`, `b` are
    /// indexed from `cs.start`. Tasks calling this for disjoint `cs` write disjoint memory.
    pub fn apply_rows_chunk(
        &self,
        y: &ChannelOut<'_, T>,
        cs: std::ops::Range<usize>,
        m: &[f64],
        a: &[f64],
        b: &[f64],
    ) {
        debug_assert!(self.s == 1 && self.access == Access::Rows && y.access == Access::Rows);
        use reduce::ROW_BLOCK;
        let x_of = |n: usize| &self.sample_rows(n)[cs.clone()];
        // SAFETY: y has Rows access with one value per plane, so channels cs of sample n are
        // this contiguous run; the caller owns them, and distinct n give disjoint runs.
        let y_of = |n: usize| unsafe {
            y.shared.block_mut(
                self.offset_in(&y.shared, n, 0) + cs.start as isize,
                cs.len(),
            )
        };
        // Cached stores: a streamed run this short would pay one fence per row.
        let mut n = 0;
        while n + ROW_BLOCK <= self.n {
            let xs: [&[T]; ROW_BLOCK] = std::array::from_fn(|i| x_of(n + i));
            let ys: [&mut [T]; ROW_BLOCK] = std::array::from_fn(|i| y_of(n + i));
            reduce::apply_rows_block(xs, ys, m, a, b);
            n += ROW_BLOCK;
        }
        for n in n..self.n {
            reduce::apply_rows(x_of(n), y_of(n), cs.len(), m, a, b);
        }
    }

    /// Writes y = (x − m)·a + b over plane (n, c). Tasks calling this for distinct planes
    /// write disjoint memory.
    pub fn apply_plane(&self, n: usize, c: usize, y: &ChannelOut<'_, T>, m: f64, a: f64, b: f64) {
        if y.access == Access::Planes {
            let xs = self.plane_slice(n, c);
            // SAFETY: plane (n, c) of y is contiguous (Planes access) and owned by the caller.
            let ys = unsafe {
                y.shared
                    .block_mut(self.offset_in(&y.shared, n, c), xs.len())
            };
            reduce::apply_slice_to(xs, ys, m, a, b, None, None, y.shared.stream);
        } else {
            // SAFETY: the caller owns plane (n, c) of y.
            let mut ypl = unsafe { y.shared.sub(&[n, c]) };
            reduce::apply_view(&self.plane(n, c), &mut ypl, m, a, b);
        }
    }

    fn offset_in(&self, y: &SharedMut<'_, T>, n: usize, c: usize) -> isize {
        let st = y.strides();
        n as isize * st[0] + c as isize * st[1]
    }

    /// Samples per task when applying: about 64 KiB of input per task.
    pub fn samples_per_task(&self) -> usize {
        (64 * 1024 / (self.c * self.s * std::mem::size_of::<T>()).max(1)).max(1)
    }
}

/// Whether (dim, stride) pairs, innermost first, describe a C-contiguous block with positive
/// strides (dimensions of length 1 may have any stride), as ndarray's standard layout.
fn c_contiguous<'s>(mut dims: impl Iterator<Item = (&'s usize, &'s isize)>) -> bool {
    let mut expect: isize = 1;
    dims.all(|(&d, &st)| {
        let ok = d == 1 || st == expect;
        expect = expect.saturating_mul(d as isize);
        ok
    })
}

/// An output permuted like its input, with the access path both share.
pub struct ChannelOut<'b, T> {
    shared: SharedMut<'b, T>,
    access: Access,
}

impl<T> ChannelOut<'_, T> {
    /// The access path x and y share (`Strided` when they differ).
    pub fn access(&self) -> Access {
        self.access
    }

    /// Whether applies may stream (a task that applied ends with `stream::stream_fence`).
    pub fn stream(&self) -> bool {
        self.shared.stream
    }
}

/// y[n, k] = affine(x[n, k], m_k, a_k, b_k) for n < `rows`, k in `ks`, elements addressed by
/// their (row, channel) strides (compiled with FMA, like every caller of `reduce::affine`).
///
/// # Safety
/// Every addressed element must lie in x and y, and the caller must own those of y.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx2+fma"
))]
unsafe fn apply_columns<T: Scalar>(
    rows: usize,
    ks: std::ops::Range<usize>,
    (px, xs): (*const T, [isize; 2]),
    (py, ys): (*mut T, [isize; 2]),
    (m, a, b): (&[f64], &[f64], &[f64]),
) {
    for n in 0..rows as isize {
        for k in ks.clone() {
            let ki = k as isize;
            // SAFETY: the caller's contract.
            unsafe {
                let v = *px.offset(n * xs[0] + ki * xs[1]);
                *py.offset(n * ys[0] + ki * ys[1]) = reduce::affine(v, m[k], a[k], b[k]);
            }
        }
    }
}

/// Checks that a per-channel parameter has shape (C,).
pub fn check_channel_param(
    name: &str,
    len: Option<usize>,
    c: usize,
    x_shape: &[usize],
) -> Result<()> {
    if let Some(l) = len {
        if l != c {
            return Err(NormError::Shape(format!(
                "{name} must have shape ({c},) for an input of shape {} with {c} channels, got ({l},)",
                fmt_shape(x_shape)
            )));
        }
    }
    Ok(())
}
