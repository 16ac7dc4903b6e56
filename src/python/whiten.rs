//! Whitening and `iter_norm` bindings: grouped covariance, whitening matrices, the grouped
//! linear map, and iterative normalization. The Python layer (`rsnorm/whitening.py`) builds the
//! `Whitening` class and the public `iter_norm` on these.

use super::array::{
    check_writable, core, f64_stats, int64, intp, prepare_out, read_param, run, XArray,
};
use super::errors::shape_error;
use crate::dispatch;
use crate::error::fmt_shape;
use crate::norm::iternorm::{iter_norm as in_core, IterNormParams};
use crate::norm::whiten::{group_apply, group_covariance, whitening_matrix as wm_core, Method};
use numpy::{PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

fn f64_array<'py>(py: Python<'py>, v: Vec<f64>, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::<f64>::from_vec(py, v).reshape(shape)?.into_any())
}

fn stat_array<'py>(
    py: Python<'py>,
    v: &[f64],
    shape: &[usize],
    f64s: bool,
) -> PyResult<Bound<'py, PyAny>> {
    super::array::stats_array(py, v, shape, f64s)
}

/// Per-channel mean and per-group co-moment of x: (count, mean (C,), comoment (G, C/G, C/G)),
/// float64, two-pass, deterministic.
#[pyfunction]
#[pyo3(signature = (x, num_groups=1, *, axis=1))]
pub fn covariance_moments<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = int64)] num_groups: i64,
    #[pyo3(from_py_with = intp)] axis: isize,
) -> PyResult<(u64, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let xa = XArray::extract(x, "x")?;
    let cov = dispatch!(xa, xt => {
        let xv = xt.as_array();
        let bytes = xv.len() * std::mem::size_of_val(&xv.first().copied());
        core(run(py, bytes, || group_covariance(xv, num_groups, axis)))?
    });
    let c = cov.mean.len();
    let g = usize::try_from(num_groups).unwrap_or(1).max(1);
    let cg = c / g;
    let mean = f64_array(py, cov.mean, &[c])?;
    let cm = f64_array(py, cov.comoment, &[g, cg, cg])?;
    Ok((cov.count, mean, cm))
}

/// Whitening matrix of a (d, d) covariance: (W, W_inv, eigenvalues descending), float64.
#[pyfunction]
#[pyo3(signature = (cov, method="zca", eps=1e-5))]
pub fn whitening_matrix<'py>(
    py: Python<'py>,
    cov: &Bound<'py, PyAny>,
    method: &str,
    eps: f64,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let m = core(Method::parse(method))?;
    let p = read_param(Some(cov), "cov")?.expect("given");
    if p.shape.len() != 2 || p.shape[0] != p.shape[1] {
        return Err(shape_error(format!(
            "cov must be a square 2-D matrix, got shape {}",
            fmt_shape(&p.shape)
        )));
    }
    let d = p.shape[0];
    let r = core(run(py, d * d * d, || wm_core(&p.values, d, m, eps)))?;
    Ok((
        f64_array(py, r.w, &[d, d])?,
        f64_array(py, r.w_inv, &[d, d])?,
        f64_array(py, r.eigenvalues, &[d])?,
    ))
}

/// y[p, g] = A_g (x[p, g] − sub_g) + add_g per group of channels; y has x's dtype.
#[pyfunction]
#[pyo3(signature = (x, mats, sub, add=None, *, axis=1, out=None))]
pub fn group_whiten_apply<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    mats: &Bound<'py, PyAny>,
    sub: &Bound<'py, PyAny>,
    add: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let mp = read_param(Some(mats), "mats")?.expect("given");
    let (g, ok) = match mp.shape.as_slice() {
        [d0, d1] => (1usize, d0 == d1),
        [g, d0, d1] => (*g, d0 == d1),
        _ => (0, false),
    };
    if !ok || g == 0 {
        return Err(shape_error(format!(
            "mats must have shape (d, d) or (G, d, d), got {}",
            fmt_shape(&mp.shape)
        )));
    }
    let sv = read_param(Some(sub), "sub")?.expect("given").values;
    let av = read_param(add, "add")?.map(|p| p.values);
    let y = dispatch!(xa, xt => {
        let shape = xt.shape().to_vec();
        let (y, mut yrw) = prepare_out(py, &shape, out)?;
        let xv = xt.as_array();
        let bytes = xv.len() * std::mem::size_of_val(&xv.first().copied());
        let yv = yrw.as_array_mut();
        core(run(py, bytes, || {
            group_apply(xv, yv, &mp.values, &sv, av.as_deref(), g as i64, axis)
        }))?;
        y.into_any()
    });
    Ok(y.unbind())
}

/// Iterative normalization (forward). Returns y, or (y, (mean, sigma, wm)) with
/// `return_stats=True`: mean (G, C/G), sigma = Σ + eps·I (G, C/G, C/G) (None in eval), wm
/// (G, C/G, C/G); float64 for float64 x, else float32.
#[pyfunction]
#[pyo3(signature = (x, running_mean=None, running_wm=None, num_groups=1, T=5, eps=1e-5,
    training=true, momentum=0.1, *, axis=1, out=None, return_stats=false))]
#[allow(clippy::too_many_arguments, non_snake_case)]
pub fn iter_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_wm: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = int64)] num_groups: i64,
    #[pyo3(from_py_with = int64)] T: i64,
    eps: f64,
    training: bool,
    momentum: f64,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
    return_stats: bool,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let rm = read_param(running_mean, "running_mean")?.map(|p| p.values);
    let rw = read_param(running_wm, "running_wm")?.map(|p| p.values);
    if training {
        check_writable(running_mean, "running_mean")?;
        check_writable(running_wm, "running_wm")?;
    }
    let p = IterNormParams {
        running_mean: rm.as_deref(),
        running_wm: rw.as_deref(),
        num_groups,
        t: T,
        eps,
        training,
        momentum,
        axis,
    };
    let (y, r, f64s) = dispatch!(xa, xt => {
        let f64s = f64_stats(&xt);
        let shape = xt.shape().to_vec();
        let (y, mut yrw) = prepare_out(py, &shape, out)?;
        let xv = xt.as_array();
        let bytes = xv.len() * std::mem::size_of_val(&xv.first().copied());
        let yv = yrw.as_array_mut();
        let r = core(run(py, bytes, || in_core(xv, yv, &p)))?;
        (y.into_any(), r, f64s)
    });
    if let Some((m, w)) = &r.running {
        super::array::write_param(running_mean.expect("given"), "running_mean", m)?;
        super::array::write_param(running_wm.expect("given"), "running_wm", w)?;
    }
    if !return_stats {
        return Ok(y.unbind());
    }
    let g = usize::try_from(num_groups).unwrap_or(1).max(1);
    let cg = r.mean.len() / g;
    let mean = stat_array(py, &r.mean, &[g, cg], f64s)?;
    let sigma = if r.sigma.is_empty() && !(training && cg == 0) {
        py.None().into_bound(py)
    } else {
        stat_array(py, &r.sigma, &[g, cg, cg], f64s)?
    };
    let wm = stat_array(py, &r.wm, &[g, cg, cg], f64s)?;
    Ok((y, (mean, sigma, wm))
        .into_pyobject(py)?
        .into_any()
        .unbind())
}

/// Matches two borrowed inputs of the same dtype into one generic body; different dtypes are
/// a `TypeError` (never a silent cast).
macro_rules! dispatch2 {
    ($a:expr, $b:expr, $x:ident, $y:ident => $body:expr) => {
        match ($a, $b) {
            (XArray::F16($x), XArray::F16($y)) => $body,
            (XArray::F32($x), XArray::F32($y)) => $body,
            (XArray::F64($x), XArray::F64($y)) => $body,
            _ => {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "the two arrays must have the same dtype",
                ))
            }
        }
    };
}

fn group_mats(p: &super::array::Param, name: &str) -> PyResult<usize> {
    match p.shape.as_slice() {
        [d0, d1] if d0 == d1 => Ok(1),
        [g, d0, d1] if d0 == d1 && *g > 0 => Ok(*g),
        _ => Err(shape_error(format!(
            "{name} must have shape (d, d) or (G, d, d), got {}",
            fmt_shape(&p.shape)
        ))),
    }
}

/// Per-channel sums of a and per-group cross co-moments Σ_p a_p (b_p − mean_b)ᵀ:
/// (sum (C,), cross (G, C/G, C/G)), float64, deterministic.
#[pyfunction]
#[pyo3(signature = (a, b, mean_b, num_groups=1, *, axis=1))]
pub fn group_cross_moments<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    mean_b: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = int64)] num_groups: i64,
    #[pyo3(from_py_with = intp)] axis: isize,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let aa = XArray::extract(a, "a")?;
    let ba = XArray::extract(b, "b")?;
    let mb = read_param(Some(mean_b), "mean_b")?.expect("given").values;
    let (sum, cross) = dispatch2!(aa, ba, at, bt => {
        let av = at.as_array();
        let bv = bt.as_array();
        let bytes = 2 * av.len() * std::mem::size_of_val(&av.first().copied());
        core(run(py, bytes, || {
            crate::norm::whiten::group_cross_moments(av, bv, &mb, num_groups, axis)
        }))?
    });
    let c = sum.len();
    let g = usize::try_from(num_groups).unwrap_or(1).max(1);
    let cg = c / g;
    Ok((
        f64_array(py, sum, &[c])?,
        f64_array(py, cross, &[g, cg, cg])?,
    ))
}

/// y[p, g] = A_g a[p, g] + B_g b[p, g] + offset_g per group of channels; y has a's dtype.
#[pyfunction]
#[pyo3(signature = (a, b, mats_a, mats_b, offset, *, axis=1, out=None))]
#[allow(clippy::too_many_arguments)]
pub fn group_whiten_apply2<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    mats_a: &Bound<'py, PyAny>,
    mats_b: &Bound<'py, PyAny>,
    offset: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let aa = XArray::extract(a, "a")?;
    let ba = XArray::extract(b, "b")?;
    let ma = read_param(Some(mats_a), "mats_a")?.expect("given");
    let mb = read_param(Some(mats_b), "mats_b")?.expect("given");
    let g = group_mats(&ma, "mats_a")?;
    if group_mats(&mb, "mats_b")? != g || ma.shape.last() != mb.shape.last() {
        return Err(shape_error(format!(
            "mats_a and mats_b must have the same shape, got {} and {}",
            fmt_shape(&ma.shape),
            fmt_shape(&mb.shape)
        )));
    }
    let off = read_param(Some(offset), "offset")?.expect("given").values;
    let y = dispatch2!(aa, ba, at, bt => {
        let shape = at.shape().to_vec();
        let (y, mut yrw) = prepare_out(py, &shape, out)?;
        let av = at.as_array();
        let bv = bt.as_array();
        let bytes = 2 * av.len() * std::mem::size_of_val(&av.first().copied());
        let yv = yrw.as_array_mut();
        core(run(py, bytes, || {
            crate::norm::whiten::group_apply2(
                av, bv, yv, &ma.values, &mb.values, &off, g as i64, axis,
            )
        }))?;
        y.into_any()
    });
    Ok(y.unbind())
}
