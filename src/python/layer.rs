//! `layer_norm` and `rms_norm` bindings.

use super::array::{
    check_out_disjoint, core, f64_stats, int64, prepare_out, read_param, result, run, stats_array,
    stats_tuple, Param, XArray,
};
use super::errors::{is_type_error, type_error, value_error};
use crate::dispatch;
use crate::norm::layer::layer_norm as ln_core;
use crate::norm::rms::rms_norm as rms_core;
use crate::norm::GroupStats;
use crate::scalar::Scalar;
use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// `normalized_shape`: an int or a sequence of ints, as in PyTorch.
pub fn parse_normalized_shape(obj: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    // An int is the common case: test the type first, as a failed extract builds an exception.
    let not_ints = || type_error("normalized_shape must be an int or a sequence of ints".into());
    let dims: Vec<i64> = if obj.is_instance_of::<pyo3::types::PyInt>() {
        vec![int64(obj)?]
    } else {
        // Item by item, so that an entry beyond 64 bits is a ValueError as a lone int is.
        obj.extract::<Vec<Bound<'_, PyAny>>>()
            .map_err(|_| not_ints())?
            .iter()
            .map(|d| int64(d).map_err(|e| if is_type_error(d, &e) { not_ints() } else { e }))
            .collect::<PyResult<_>>()?
    };
    dims.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                value_error(format!(
                    "normalized_shape must not have negative entries, got {dims:?}"
                ))
            })
        })
        .collect()
}

fn lead_shape(shape: &[usize], k: usize) -> Vec<usize> {
    shape[..shape.len().saturating_sub(k)].to_vec()
}

type RowOp<'a, T> = dyn Fn(
        ndarray::ArrayView<'_, T, ndarray::IxDyn>,
        ndarray::ArrayViewMut<'_, T, ndarray::IxDyn>,
    ) -> crate::Result<GroupStats>
    + Send
    + Sync
    + 'a;

fn run_rows<'py, T: Scalar + Element>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, T>,
    out: Option<&Bound<'py, PyAny>>,
    op: &RowOp<'_, T>,
) -> PyResult<(Bound<'py, PyAny>, GroupStats, Vec<usize>)> {
    let shape = x.shape().to_vec();
    let (y, mut yrw) = prepare_out::<T>(py, &shape, out)?;
    let xv = x.as_array();
    let bytes = xv.len() * std::mem::size_of::<T>();
    let yv = yrw.as_array_mut();
    let st = core(run(py, bytes, || op(xv, yv)))?;
    Ok((y.into_any(), st, shape))
}

fn stats_for<'py>(
    py: Python<'py>,
    st: &GroupStats,
    lead: &[usize],
    with_mean: bool,
    f64s: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let mean = if with_mean {
        Some(stats_array(py, &st.mean, lead, f64s)?)
    } else {
        None
    };
    stats_tuple(py, mean, stats_array(py, &st.rstd, lead, f64s)?)
}

fn pv(p: &Option<Param>) -> Option<(&[f64], &[usize])> {
    p.as_ref()
        .map(|p| (p.values.as_slice(), p.shape.as_slice()))
}

/// Layer normalization over the trailing `normalized_shape` dims.
#[pyfunction]
#[pyo3(signature = (x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None, return_stats=false))]
#[allow(clippy::too_many_arguments)]
pub fn layer_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    normalized_shape: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
    return_stats: bool,
) -> PyResult<Py<PyAny>> {
    check_out_disjoint(out, &[("weight", weight), ("bias", bias)])?;
    let xa = XArray::extract(x, "x")?;
    let ns = parse_normalized_shape(normalized_shape)?;
    let w = read_param(weight, "weight")?;
    let b = read_param(bias, "bias")?;
    dispatch!(xa, xt => {
        let f64s = f64_stats(&xt);
        let (y, st, shape) = run_rows(py, xt, out, &|xv, yv| ln_core(xv, yv, &ns, pv(&w), pv(&b), eps))?;
        let stats = if return_stats {
            Some(stats_for(py, &st, &lead_shape(&shape, ns.len()), true, f64s)?)
        } else { None };
        result(py, y, stats)
    })
}

/// RMS normalization over the trailing `normalized_shape` dims.
#[pyfunction]
#[pyo3(signature = (x, normalized_shape, weight=None, eps=None, *, out=None, return_stats=false))]
pub fn rms_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    normalized_shape: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    eps: Option<f64>,
    out: Option<&Bound<'py, PyAny>>,
    return_stats: bool,
) -> PyResult<Py<PyAny>> {
    check_out_disjoint(out, &[("weight", weight)])?;
    let xa = XArray::extract(x, "x")?;
    let ns = parse_normalized_shape(normalized_shape)?;
    let w = read_param(weight, "weight")?;
    dispatch!(xa, xt => {
        let f64s = f64_stats(&xt);
        let (y, st, shape) = run_rows(py, xt, out, &|xv, yv| rms_core(xv, yv, &ns, pv(&w), eps))?;
        let stats = if return_stats {
            Some(stats_for(py, &st, &lead_shape(&shape, ns.len()), false, f64s)?)
        } else { None };
        result(py, y, stats)
    })
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Gradients of `layer_norm`. See `rsnorm.layer_norm_backward` in `_rsnorm.pyi`.
#[pyfunction]
#[pyo3(signature = (grad_y, x, normalized_shape, weight=None, bias=None, eps=1e-5, stats=None))]
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    normalized_shape: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    eps: f64,
    stats: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let pair = super::batch::XPair::extract(grad_y, x)?;
    let ns = parse_normalized_shape(normalized_shape)?;
    let w = read_param(weight, "weight")?;
    let b = read_param(bias, "bias")?;
    let st = super::batch::read_stats(stats)?;
    let sv = st.as_ref().map(|s| s.view());
    crate::dispatch_xpair!(pair, g, xt => super::batch::run_backward(py, g, xt, &ns, &ns,
        |g, xv, d| crate::norm::layer_norm_backward(g, xv, d, &ns, pv(&w), pv(&b), eps, sv)))
}

/// Gradients of `rms_norm`. See `rsnorm.rms_norm_backward` in `_rsnorm.pyi`.
#[pyfunction]
#[pyo3(signature = (grad_y, x, normalized_shape, weight=None, eps=None, stats=None))]
pub fn rms_norm_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    normalized_shape: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    eps: Option<f64>,
    stats: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let pair = super::batch::XPair::extract(grad_y, x)?;
    let ns = parse_normalized_shape(normalized_shape)?;
    let w = read_param(weight, "weight")?;
    let st = super::batch::read_stats(stats)?;
    let sv = st.as_ref().map(|s| s.view());
    crate::dispatch_xpair!(pair, g, xt => super::batch::run_backward(py, g, xt, &ns, &ns,
        |g, xv, d| crate::norm::rms_norm_backward(g, xv, d, &ns, pv(&w), eps, sv)))
}
