//! Geometry of the row-wise ops (layer norm, RMS norm): the input seen as R rows of F values,
//! F the product of the trailing `normalized_shape` dims, without copying. A row is a slice
//! when the input is C-contiguous, else a strided view read in logical order; both go through
//! the same canonical sum (see `reduce`), so layouts agree bitwise.

use crate::error::{fmt_shape, NormError, Result};
use crate::reduce::{self, SharedMut};
use crate::scalar::Scalar;
use ndarray::{ArrayView, ArrayViewMut, Axis, IxDyn};

/// Rows of `x` over its trailing dims.
pub struct RowView<'a, T> {
    x: ArrayView<'a, T, IxDyn>,
    lead: Vec<usize>,
    contiguous: Option<&'a [T]>,
    /// A 2-D Fortran-order input (rows × features) as the C-contiguous memory of its
    /// transpose: feature j of row r at `j·rows + r`.
    transposed: Option<&'a [T]>,
    pub rows: usize,
    pub features: usize,
}

/// Checks `normalized_shape` against x's trailing dims and a parameter's shape.
pub fn check_normalized_shape(shape: &[usize], normalized: &[usize]) -> Result<()> {
    let k = normalized.len();
    if k == 0 || shape.len() < k || &shape[shape.len() - k..] != normalized {
        return Err(NormError::Shape(format!(
            "normalized_shape {} must be non-empty and equal the trailing dimensions of the input, \
             got input shape {}",
            fmt_shape(normalized),
            fmt_shape(shape)
        )));
    }
    Ok(())
}

/// A parameter (weight, bias) of the row ops must have shape `normalized_shape`.
pub fn check_row_param(name: &str, shape: Option<&[usize]>, normalized: &[usize]) -> Result<()> {
    if let Some(s) = shape {
        if s != normalized {
            return Err(NormError::Shape(format!(
                "{name} must have shape normalized_shape={}, got {}",
                fmt_shape(normalized),
                fmt_shape(s)
            )));
        }
    }
    Ok(())
}

impl<'a, T: Scalar> RowView<'a, T> {
    pub fn new(x: ArrayView<'a, T, IxDyn>, k: usize) -> Self {
        let nd = x.ndim();
        let lead = x.shape()[..nd - k].to_vec();
        let rows = lead.iter().product();
        let features = x.shape()[nd - k..].iter().product();
        let contiguous = x.to_slice();
        let transposed = if contiguous.is_none() && nd == 2 && k == 1 {
            x.clone().reversed_axes().to_slice()
        } else {
            None
        };
        Self {
            x,
            lead,
            contiguous,
            transposed,
            rows,
            features,
        }
    }

    /// A 2-D Fortran-order input as the C-contiguous memory of its transpose (feature j of
    /// row r at `j·rows + r`), else None.
    ///
    /// Walking such a row touches one value per cache line; callers sum the rows of a block
    /// side by side instead, each memory row (one feature of every row) read contiguously, with
    /// `reduce::sum_rows(t, rows, block, …)` — bit for bit the canonical sum of each row (lane
    /// = feature mod 32).
    pub fn transposed(&self) -> Option<&'a [T]> {
        self.transposed
    }

    fn unravel(lead: &[usize], mut r: usize) -> Vec<usize> {
        let mut idx = vec![0; lead.len()];
        for (i, &d) in lead.iter().enumerate().rev() {
            idx[i] = r % d;
            r /= d;
        }
        idx
    }

    /// Asks for the row `ahead` rows past r to be brought into cache (a hint; contiguous
    /// inputs only), if it is before `end` (the task's own rows: prefetching the next task's
    /// rows into this core's cache cost 8 %): the first pass over a row reads memory, and the
    /// hardware prefetcher alone left it waiting (0.84× the time on RMS norm (8192, 1024)).
    #[inline]
    pub fn prefetch_ahead(&self, r: usize, end: usize) {
        let row = self.features * std::mem::size_of::<T>();
        let ahead = (8 * 1024 / row.max(1)).max(1);
        if r + ahead >= end {
            return;
        }
        if let Some(s) = self.contiguous {
            if let Some(next) = s.get((r + ahead) * self.features..(r + ahead + 1) * self.features)
            {
                crate::stream::prefetch_bytes(next.as_ptr().cast(), row);
            }
        }
    }

    /// Canonical sum of row r (`row_sum(r, reduce::add)`, through the vector kernel when the
    /// row is contiguous).
    pub fn row_sum_add(&self, r: usize) -> f64 {
        match self.contiguous {
            Some(s) => reduce::sum_slice_add(&s[r * self.features..(r + 1) * self.features]),
            None => self.row_sum(r, reduce::add),
        }
    }

    /// Canonical sum over row r with the step f (e.g. [`reduce::add`]).
    pub fn row_sum<F: Fn(f64, f64) -> f64>(&self, r: usize, f: F) -> f64 {
        match self.contiguous {
            Some(s) => reduce::sum_slice(&s[r * self.features..(r + 1) * self.features], f),
            None => {
                let mut v = self.x.clone();
                for i in Self::unravel(&self.lead, r) {
                    v = v.index_axis_move(Axis(0), i);
                }
                reduce::sum_view(&v, f)
            }
        }
    }

    /// Writes y_j = (x_j − m)·a_j + b_j over row r, with a_j = scale·w_j and b_j = bias_j.
    ///
    /// # Safety
    /// The caller owns row r of `y` exclusively.
    pub unsafe fn apply_row(
        &self,
        r: usize,
        y: &SharedMut<'_, T>,
        m: f64,
        scale: f64,
        w: Option<&[f64]>,
        b: Option<&[f64]>,
    ) {
        let f = self.features;
        if let (Some(xs), true) = (self.contiguous, y.is_standard_layout()) {
            // The common case, without building a sub-view per row (a Vec and an IxDyn each,
            // measured at ~10 % of a (8192, 1024) layer norm).
            // SAFETY: y is C-contiguous with x's shape, so row r is this block; the caller
            // owns it.
            let ys = unsafe { y.block_mut((r * f) as isize, f) };
            let xs = &xs[r * f..(r + 1) * f];
            reduce::apply_slice_to(xs, ys, m, scale, 0.0, w, b, y.stream);
            return;
        }
        let idx = Self::unravel(&self.lead, r);
        // SAFETY: forwarded from the caller.
        let mut yr = unsafe { y.sub(&idx) };
        let a = |j: usize| w.map_or(scale, |w| scale * w[j]);
        let bj = |j: usize| b.map_or(0.0, |b| b[j]);
        if let (Some(xs), Some(ys)) = (self.contiguous, yr.as_slice_mut()) {
            let xs = &xs[r * f..(r + 1) * f];
            reduce::apply_slice(xs, ys, m, scale, 0.0, w, b);
            return;
        }
        let mut xv = self.x.clone();
        for &i in &idx {
            xv = xv.index_axis_move(Axis(0), i);
        }
        assert_eq!(yr.shape(), xv.shape(), "rows of one shape");
        apply_strided_row(&xv, &mut yr, m, a, bj);
    }
}

/// y = affine(x, m, a(j), b(j)) over one row of any strides, j the element's logical index
/// (compiled with FMA, like every caller of `reduce::affine`).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx2+fma"
))]
fn apply_strided_row<T: Scalar, A: Fn(usize) -> f64, B: Fn(usize) -> f64>(
    xv: &ArrayView<'_, T, IxDyn>,
    yr: &mut ArrayViewMut<'_, T, IxDyn>,
    m: f64,
    a: A,
    bj: B,
) {
    let (py, px) = (yr.as_mut_ptr(), xv.as_ptr());
    let (sy, sx) = (
        reduce::inner_stride(yr.strides()),
        reduce::inner_stride(xv.strides()),
    );
    let mut j = 0;
    reduce::for_each_run(xv.shape(), [yr.strides(), xv.strides()], |[oy, ox], len| {
        for k in 0..len as isize {
            // SAFETY: offsets of elements of the row views (same shape); yr is ours.
            unsafe {
                *py.offset(oy + k * sy) = reduce::affine(*px.offset(ox + k * sx), m, a(j), bj(j));
            }
            j += 1;
        }
    });
}

/// Rows per task: about 64 KiB of input, so small rows are batched and the pool is not woken
/// per row.
pub fn rows_per_task(features: usize, elem: usize) -> usize {
    (256 * 1024 / (features.max(1) * elem)).max(1)
}

/// Output helper for the row ops.
pub fn shared_out<'b, T>(y: ArrayViewMut<'b, T, IxDyn>) -> SharedMut<'b, T> {
    SharedMut::new(y)
}
