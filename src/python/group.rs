//! `group_norm` and `instance_norm` bindings.

use super::array::{
    check_out_disjoint, check_writable, core, f64_stats, int64, intp, prepare_out, read_vec,
    result, run, stats_array, stats_tuple, write_param, XArray,
};
use crate::dispatch;
use crate::norm::group::group_norm as gn_core;
use crate::norm::instance::{instance_norm as in_core, InstanceNormParams};
use crate::norm::GroupStats;
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;

fn stats<'py>(
    py: Python<'py>,
    st: &GroupStats,
    shape: &[usize],
    f64s: bool,
) -> PyResult<Bound<'py, PyAny>> {
    stats_tuple(
        py,
        Some(stats_array(py, &st.mean, shape, f64s)?),
        stats_array(py, &st.rstd, shape, f64s)?,
    )
}

/// Group normalization.
#[pyfunction]
#[pyo3(signature = (x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None, return_stats=false))]
#[allow(clippy::too_many_arguments)]
pub fn group_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = int64)] num_groups: i64,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    eps: f64,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
    return_stats: bool,
) -> PyResult<Py<PyAny>> {
    check_out_disjoint(out, &[("weight", weight), ("bias", bias)])?;
    let xa = XArray::extract(x, "x")?;
    let w = read_vec(weight, "weight")?;
    let b = read_vec(bias, "bias")?;
    dispatch!(xa, xt => {
        let f64s = f64_stats(&xt);
        let shape = xt.shape().to_vec();
        let (y, mut yrw) = prepare_out(py, &shape, out)?;
        let xv = xt.as_array();
        let bytes = super::array::nbytes(&xv);
        let yv = yrw.as_array_mut();
        let st = core(run(py, bytes, || gn_core(xv, yv, num_groups, w.as_deref(), b.as_deref(), eps, axis)))?;
        let s = if return_stats {
            Some(stats(py, &st, &[shape[0], usize::try_from(num_groups).unwrap_or(0)], f64s)?)
        } else { None };
        result(py, y.into_any(), s)
    })
}

/// Instance normalization.
#[pyfunction]
#[pyo3(signature = (x, running_mean=None, running_var=None, weight=None, bias=None,
    use_input_stats=true, momentum=0.1, eps=1e-5, *, axis=1, out=None, return_stats=false))]
#[allow(clippy::too_many_arguments)]
pub fn instance_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_var: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    use_input_stats: bool,
    momentum: f64,
    eps: f64,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
    return_stats: bool,
) -> PyResult<Py<PyAny>> {
    check_out_disjoint(
        out,
        &[
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ],
    )?;
    let xa = XArray::extract(x, "x")?;
    let rm = read_vec(running_mean, "running_mean")?;
    let rv = read_vec(running_var, "running_var")?;
    let w = read_vec(weight, "weight")?;
    let b = read_vec(bias, "bias")?;
    if use_input_stats {
        check_writable(running_mean, "running_mean")?;
        check_writable(running_var, "running_var")?;
    }
    let p = InstanceNormParams {
        running_mean: rm.as_deref(),
        running_var: rv.as_deref(),
        weight: w.as_deref(),
        bias: b.as_deref(),
        use_input_stats,
        momentum,
        eps,
        axis,
    };
    let (y, r, nc, f64s) = dispatch!(xa, xt => {
        let f64s = f64_stats(&xt);
        let shape = xt.shape().to_vec();
        let (y, mut yrw) = prepare_out(py, &shape, out)?;
        let xv = xt.as_array();
        let bytes = super::array::nbytes(&xv);
        let yv = yrw.as_array_mut();
        let r = core(run(py, bytes, || in_core(xv, yv, &p)))?;
        let ax = crate::channel::normalize_axis(axis, shape.len(), "axis").unwrap_or(1);
        (y.into_any(), r, [shape[0], shape[ax]], f64s)
    });
    if let Some((m, v)) = &r.running {
        write_param(running_mean.expect("given"), "running_mean", m)?;
        write_param(running_var.expect("given"), "running_var", v)?;
    }
    let s = if return_stats {
        Some(stats(py, &r.stats, &nc, f64s)?)
    } else {
        None
    };
    result(py, y, s)
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Gradients of `group_norm`. See `rsnorm.group_norm_backward` in `_rsnorm.pyi`.
#[pyfunction]
#[pyo3(signature = (grad_y, x, num_groups, weight=None, bias=None, eps=1e-5, stats=None, *, axis=1))]
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = int64)] num_groups: i64,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    eps: f64,
    stats: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = intp)] axis: isize,
) -> PyResult<Py<PyAny>> {
    let pair = super::batch::XPair::extract(grad_y, x)?;
    let w = read_vec(weight, "weight")?;
    let b = read_vec(bias, "bias")?;
    let st = super::batch::read_stats(stats)?;
    let sv = st.as_ref().map(|s| s.view());
    let cshape = [w.as_ref().or(b.as_ref()).map_or(0, |v| v.len())];
    crate::dispatch_xpair!(pair, g, xt => super::batch::run_backward(py, g, xt, &cshape, &cshape,
        |g, xv, d| crate::norm::group_norm_backward(g, xv, d, num_groups, w.as_deref(),
            b.as_deref(), eps, axis, sv)))
}

/// Gradients of `instance_norm`. See `rsnorm.instance_norm_backward` in `_rsnorm.pyi`.
#[pyfunction]
#[pyo3(signature = (grad_y, x, running_mean=None, running_var=None, weight=None, bias=None,
    use_input_stats=true, momentum=0.1, eps=1e-5, stats=None, *, axis=1))]
#[allow(clippy::too_many_arguments)]
pub fn instance_norm_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_var: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    use_input_stats: bool,
    momentum: f64,
    eps: f64,
    stats: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = intp)] axis: isize,
) -> PyResult<Py<PyAny>> {
    let pair = super::batch::XPair::extract(grad_y, x)?;
    let rm = read_vec(running_mean, "running_mean")?;
    let rv = read_vec(running_var, "running_var")?;
    let w = read_vec(weight, "weight")?;
    let b = read_vec(bias, "bias")?;
    let st = super::batch::read_stats(stats)?;
    let p = crate::norm::InstanceNormBackwardParams {
        running_mean: rm.as_deref(),
        running_var: rv.as_deref(),
        weight: w.as_deref(),
        bias: b.as_deref(),
        use_input_stats,
        momentum,
        eps,
        axis,
        stats: st.as_ref().map(|s| s.view()),
    };
    let cshape = [w.as_ref().or(b.as_ref()).map_or(0, |v| v.len())];
    crate::dispatch_xpair!(pair, g, xt => super::batch::run_backward(py, g, xt, &cshape, &cshape,
        |g, xv, d| crate::norm::instance_norm_backward(g, xv, d, &p)))
}
