//! `normalize` (Lp normalization) bindings.

use super::array::{core, intp, prepare_out, run, XArray};
use super::mixing::nbytes;
use crate::norm::lp::{normalize as lp_core, normalize_backward as lp_bwd};
use crate::{dispatch, dispatch_pair};
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;

/// Lp normalization along ``axis`` (PyTorch ``F.normalize``):
/// ``y = x / max(‖x‖_p, eps)``, ``‖x‖_p = (Σ|x|^p)^(1/p)`` (``p = inf``: max |x|); p > 0.
/// The norm is computed without overflow or underflow (power-of-two scaling).
#[pyfunction]
#[pyo3(signature = (x, p=2.0, axis=1, eps=1e-12, *, out=None))]
pub fn normalize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    p: f64,
    #[pyo3(from_py_with = intp)] axis: isize,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    dispatch!(xa, xt => {
        let (y, mut yrw) = prepare_out(py, xt.shape(), out)?;
        let bytes = nbytes(&xt);
        let xv = xt.as_array();
        let yv = yrw.as_array_mut();
        core(run(py, bytes, || lp_core(xv, yv, p, axis, eps)))?;
        Ok(y.into_any().unbind())
    })
}

/// Gradient of normalize with respect to x.
#[pyfunction]
#[pyo3(signature = (grad_y, x, p=2.0, axis=1, eps=1e-12))]
pub fn _normalize_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    p: f64,
    #[pyo3(from_py_with = intp)] axis: isize,
    eps: f64,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let ga = XArray::extract(grad_y, "grad_y")?;
    dispatch_pair!(xa, ga, xt, gt => {
        let (dx, mut drw) = prepare_out(py, xt.shape(), None)?;
        let bytes = 2 * nbytes(&xt);
        let (xv, gv) = (xt.as_array(), gt.as_array());
        let dv = drw.as_array_mut();
        core(run(py, bytes, || lp_bwd(gv, xv, dv, p, axis, eps)))?;
        Ok(dx.into_any().unbind())
    })
}
