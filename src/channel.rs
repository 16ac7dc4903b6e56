//! Geometry of the channel ops (batch, instance and group norm; later LRN, FRN, GDN).
//!
//! The input is seen, without copying, as (N, C, S…): axis 0 is the batch, `axis` the channel,
//! the others spatial, in their logical order. A *plane* is the spatial block of one (n, c).
//! Statistics are canonical sums (see `reduce`) over planes, folded in a fixed order by each op,
//! computed by whichever of three access paths the layout allows:
//! * `Planes`: a plane is contiguous (NCHW);
//! * `Rows`: a sample is contiguous with the channel last (NHWC): rows of C values;
//! * `Strided`: anything else, read in logical order through the view.
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
        if xp.shape().iter().any(|&d| d == 0) {
            return Access::Strided;
        }
        // Every plane has the shape and strides of the first one.
        let plane = xp.index_axis(Axis(0), 0).index_axis_move(Axis(0), 0);
        if plane.as_slice().is_some() {
            return Access::Planes;
        }
        let sample = xp.index_axis(Axis(0), 0);
        if Self::rows_contig(&sample) {
            return Access::Rows;
        }
        Access::Strided
    }

    /// Is a (C, S…) sample contiguous when read as (S…, C)?
    fn rows_contig<U>(sample: &ArrayView<'_, U, IxDyn>) -> bool {
        let k = sample.ndim();
        let mut perm: Vec<usize> = (1..k).collect();
        perm.push(0);
        sample
            .clone()
            .permuted_axes(IxDyn(&perm))
            .as_slice()
            .is_some()
    }

    /// The plane (n, c) as a view of rank ndim−2.
    pub fn plane(&self, n: usize, c: usize) -> ArrayView<'a, T, IxDyn> {
        self.x
            .clone()
            .index_axis_move(Axis(0), n)
            .index_axis_move(Axis(0), c)
    }

    /// Sample n as a slice of S·C values with the channel last (only for `Access::Rows`).
    pub fn sample_rows(&self, n: usize) -> &'a [T] {
        let sample = self.x.clone().index_axis_move(Axis(0), n);
        let k = sample.ndim();
        let mut perm: Vec<usize> = (1..k).collect();
        perm.push(0);
        let v = sample.permuted_axes(IxDyn(&perm));
        // Access::Rows guarantees contiguity; fall back to an empty slice never happens.
        v.to_slice().unwrap_or(&[])
    }

    /// Permutes an output of the caller's logical shape the same way as the input.
    pub fn permute_out<'b>(&self, out: ArrayViewMut<'b, T, IxDyn>) -> ArrayViewMut<'b, T, IxDyn> {
        out.permuted_axes(IxDyn(&channel_first_perm(self.ndim, self.axis)))
    }

    /// Canonical sums of f over each plane of sample n, for channels `cs`, into `out`.
    /// `f(x, c)` may depend on the channel (e.g. subtract that channel's group mean).
    pub fn sample_sums<F: Fn(f64, usize) -> f64 + Copy>(
        &self,
        n: usize,
        cs: std::ops::Range<usize>,
        f: F,
        scratch: &mut Vec<f64>,
        out: &mut [f64],
    ) {
        match self.access {
            Access::Rows => {
                reduce::sum_rows(self.sample_rows(n), self.c, cs, f, scratch, out);
            }
            _ => {
                for (o, c) in out.iter_mut().zip(cs) {
                    *o = reduce::sum_view(&self.plane(n, c), |v| f(v, c));
                }
            }
        }
    }

    /// Writes y = (x − m_c)·a_c + b_c for every plane of sample n, (m, a, b) given per channel.
    pub fn apply_sample(&self, n: usize, yp: &SharedMut<'_, T>, m: &[f64], a: &[f64], b: &[f64]) {
        // SAFETY (both arms): a task owns sample n of the output exclusively.
        let mut ys = unsafe { yp.sub(&[n]) };
        if self.access == Access::Rows {
            let xs = self.sample_rows(n);
            let k = ys.ndim();
            let mut perm: Vec<usize> = (1..k).collect();
            perm.push(0);
            let mut yv = ys.view_mut().permuted_axes(IxDyn(&perm));
            if let Some(yr) = yv.as_slice_mut() {
                let c = self.c;
                for (yrow, xrow) in yr.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                    for k in 0..c {
                        yrow[k] = reduce::affine(xrow[k], m[k], a[k], b[k]);
                    }
                }
                return;
            }
        }
        for c in 0..self.c {
            let xpl = self.plane(n, c);
            let mut ypl = ys.index_axis_mut(Axis(0), c);
            reduce::apply_view(&xpl, &mut ypl, m[c], a[c], b[c]);
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
