//! `filter_response_norm` and `tlu` bindings.

use super::array::{
    core, f64_stats, intp, prepare_out, read_param, read_vec, result, run, stats_array,
    stats_tuple, XArray,
};
use super::errors::{shape_error, to_py, type_error};
use super::mixing::{grad_array, nbytes};
use crate::channel::normalize_axis;
use crate::error::fmt_shape;
use crate::norm::frn::{
    filter_response_norm as frn_core, filter_response_norm_backward as frn_bwd, tlu as tlu_core,
    tlu_backward as tlu_bwd, FrnParams,
};
use crate::{dispatch, dispatch_pair};
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// The channel count of x for `axis`, or the core's error for a bad axis/rank.
fn channels(shape: &[usize], axis: isize) -> PyResult<usize> {
    let ax = normalize_axis(axis, shape.len(), "axis").map_err(to_py)?;
    Ok(shape[ax])
}

/// learned_eps per channel, and the shape its gradient takes: `None` per channel (C,), else
/// the shape of the scalar that was given (`()` for a Python number, `()`/`(1,)` arrays).
type LearnedEps = Option<(Vec<f64>, Option<Vec<usize>>)>;

fn learned_eps(obj: Option<&Bound<'_, PyAny>>, c: usize) -> PyResult<LearnedEps> {
    let Some(o) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    if o.cast::<PyUntypedArray>().is_err() {
        let v: f64 = o.extract().map_err(|_| {
            type_error("learned_eps must be None, a number or a numpy.ndarray".into())
        })?;
        return Ok(Some((vec![v; c], Some(vec![]))));
    }
    let p = read_param(Some(o), "learned_eps")?.expect("not None");
    if p.shape == [c] {
        return Ok(Some((p.values, None)));
    }
    if p.values.len() == 1 && p.shape.len() <= 1 {
        return Ok(Some((vec![p.values[0]; c], Some(p.shape))));
    }
    Err(shape_error(format!(
        "learned_eps must be a scalar, shape (1,) or shape ({c},), got {}",
        fmt_shape(&p.shape)
    )))
}

/// `stats.rstd` as (N·C) values, checked to have shape (N, C).
fn stats_rstd(
    stats: Option<&Bound<'_, PyAny>>,
    shape: &[usize],
    axis: isize,
) -> PyResult<Option<Vec<f64>>> {
    let Some(s) = stats.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let r = s
        .getattr("rstd")
        .map_err(|_| type_error("stats must be the Stats returned by return_stats=True".into()))?;
    let Some(p) = read_param(Some(&r), "stats.rstd")? else {
        return Ok(None);
    };
    let want = [shape.first().copied().unwrap_or(0), channels(shape, axis)?];
    if p.shape != want {
        return Err(shape_error(format!(
            "stats.rstd must have shape {} for an input of shape {}, got {}",
            fmt_shape(&want),
            fmt_shape(shape),
            fmt_shape(&p.shape)
        )));
    }
    Ok(Some(p.values))
}

/// Filter response normalization (Singh & Krishnan 2019) with the TLU fused when ``tau``
/// is given.
///
/// ``ν² = mean(x²)`` over the spatial axes per (n, c);
/// ``y = max(γ·x/sqrt(ν² + eps + |learned_eps|) + β, τ)``. weight, bias, tau: (C,);
/// learned_eps: a number, shape () / (1,), or (C,). One spatial element gives
/// ``x/sqrt(x² + eps)`` exactly. Stats: ``Stats(None, rstd)`` of shape (N, C).
#[pyfunction]
#[pyo3(signature = (x, weight=None, bias=None, tau=None, eps=1e-6, *, learned_eps=None, axis=1,
    out=None, return_stats=false))]
#[allow(clippy::too_many_arguments)]
pub fn filter_response_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    tau: Option<&Bound<'py, PyAny>>,
    eps: f64,
    learned_eps: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
    return_stats: bool,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let w = read_vec(weight, "weight")?;
    let b = read_vec(bias, "bias")?;
    let t = read_vec(tau, "tau")?;
    dispatch!(xa, xt => {
        let shape = xt.shape().to_vec();
        let le = learned_eps_for(learned_eps, &shape, axis)?;
        let p = FrnParams {
            weight: w.as_deref(),
            bias: b.as_deref(),
            tau: t.as_deref(),
            eps,
            learned_eps: le.as_ref().map(|l| l.0.as_slice()),
            axis,
        };
        let f64s = f64_stats(&xt);
        let (y, mut yrw) = prepare_out(py, &shape, out)?;
        let bytes = nbytes(&xt);
        let xv = xt.as_array();
        let yv = yrw.as_array_mut();
        let rstd = core(run(py, bytes, || frn_core(xv, yv, &p)))?;
        let s = if return_stats {
            let c = channels(&shape, axis)?;
            Some(stats_tuple(py, None, stats_array(py, &rstd, &[shape[0], c], f64s)?)?)
        } else {
            None
        };
        result(py, y.into_any(), s)
    })
}

fn learned_eps_for(
    obj: Option<&Bound<'_, PyAny>>,
    shape: &[usize],
    axis: isize,
) -> PyResult<LearnedEps> {
    if obj.is_none_or(|o| o.is_none()) {
        return Ok(None);
    }
    learned_eps(obj, channels(shape, axis)?)
}

/// Gradients of filter_response_norm: (dx, dweight, dbias, dtau, dlearned_eps), None for
/// parameters not given.
#[pyfunction]
#[pyo3(signature = (grad_y, x, weight=None, bias=None, tau=None, eps=1e-6, *, learned_eps=None,
    axis=1, stats=None))]
#[allow(clippy::too_many_arguments)]
pub fn _filter_response_norm_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    tau: Option<&Bound<'py, PyAny>>,
    eps: f64,
    learned_eps: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = intp)] axis: isize,
    stats: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let ga = XArray::extract(grad_y, "grad_y")?;
    let w = read_vec(weight, "weight")?;
    let b = read_vec(bias, "bias")?;
    let t = read_vec(tau, "tau")?;
    dispatch_pair!(xa, ga, xt, gt => {
        let shape = xt.shape().to_vec();
        let rstd = stats_rstd(stats, &shape, axis)?;
        let le = learned_eps_for(learned_eps, &shape, axis)?;
        let p = FrnParams {
            weight: w.as_deref(),
            bias: b.as_deref(),
            tau: t.as_deref(),
            eps,
            learned_eps: le.as_ref().map(|l| l.0.as_slice()),
            axis,
        };
        let (dx, mut drw) = prepare_out(py, &shape, None)?;
        let bytes = 2 * nbytes(&xt);
        let (xv, gv) = (xt.as_array(), gt.as_array());
        let dv = drw.as_array_mut();
        let gr = core(run(py, bytes, || frn_bwd(gv, xv, dv, &p, rstd.as_deref())))?;
        let per_c = |v: &Option<Vec<f64>>| -> PyResult<Option<Bound<'py, PyAny>>> {
            v.as_ref().map(|v| grad_array(py, &xt, v, &[v.len()])).transpose()
        };
        let dle = match (&gr.learned_eps, &le) {
            (Some(v), Some((_, Some(sshape)))) => {
                // A scalar learned_eps feeds every channel: its gradient is the sum, in
                // channel order.
                let total: f64 = v.iter().sum();
                Some(grad_array(py, &xt, &[total], sshape)?)
            }
            (v, _) => per_c(v)?,
        };
        let none = || py.None().into_bound(py);
        Ok((
            dx.into_any(),
            per_c(&gr.weight)?.unwrap_or_else(none),
            per_c(&gr.bias)?.unwrap_or_else(none),
            per_c(&gr.tau)?.unwrap_or_else(none),
            dle.unwrap_or_else(none),
        )
            .into_pyobject(py)?
            .into_any()
            .unbind())
    })
}

/// Thresholded linear unit ``y = max(x, τ_c)``, τ of shape (C,) (NaN propagates).
#[pyfunction]
#[pyo3(signature = (x, tau, *, axis=1, out=None))]
pub fn tlu<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    tau: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let t = read_vec(Some(tau), "tau")?.unwrap_or_default();
    dispatch!(xa, xt => {
        let (y, mut yrw) = prepare_out(py, xt.shape(), out)?;
        let bytes = nbytes(&xt);
        let xv = xt.as_array();
        let yv = yrw.as_array_mut();
        core(run(py, bytes, || tlu_core(xv, yv, &t, axis)))?;
        Ok(y.into_any().unbind())
    })
}

/// Gradients of tlu: (dx, dtau).
#[pyfunction]
#[pyo3(signature = (grad_y, x, tau, *, axis=1))]
pub fn _tlu_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    tau: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = intp)] axis: isize,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let ga = XArray::extract(grad_y, "grad_y")?;
    let t = read_vec(Some(tau), "tau")?.unwrap_or_default();
    dispatch_pair!(xa, ga, xt, gt => {
        let (dx, mut drw) = prepare_out(py, xt.shape(), None)?;
        let bytes = 2 * nbytes(&xt);
        let (xv, gv) = (xt.as_array(), gt.as_array());
        let dv = drw.as_array_mut();
        let dt = core(run(py, bytes, || tlu_bwd(gv, xv, dv, &t, axis)))?;
        let dtau = grad_array(py, &xt, &dt, &[dt.len()])?;
        Ok((dx.into_any(), dtau).into_pyobject(py)?.into_any().unbind())
    })
}
