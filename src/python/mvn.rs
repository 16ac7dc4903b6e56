//! `mean_variance_norm` bindings.

use super::array::{core, intp, prepare_out, run, XArray};
use super::errors::{is_type_error, type_error};
use super::mixing::nbytes;
use crate::norm::mvn::{mean_variance_norm as mvn_core, mean_variance_norm_backward as mvn_bwd};
use crate::{dispatch, dispatch_pair};
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;

/// `axes` as an int or a sequence of ints.
fn axes_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<isize>> {
    let not_ints = || type_error("axes must be an int or a sequence of ints".into());
    // An int beyond 64 bits, alone or in the sequence, is a ValueError (intp), not a TypeError.
    match intp(obj) {
        Ok(a) => return Ok(vec![a]),
        Err(e) if !is_type_error(obj, &e) => return Err(e),
        Err(_) => {}
    }
    obj.extract::<Vec<Bound<'_, PyAny>>>()
        .map_err(|_| not_ints())?
        .iter()
        .map(|a| intp(a).map_err(|e| if is_type_error(a, &e) { not_ints() } else { e }))
        .collect()
}

/// Mean-variance normalization (ONNX MeanVarianceNormalization) over ``axes`` (default
/// (0, 2, 3)): ``y = (x − mean)/(sqrt(var) + eps)``, biased variance, eps added to the
/// standard deviation as in ONNX's function body.
#[pyfunction]
#[pyo3(signature = (x, axes=None, eps=1e-9, *, out=None))]
pub fn mean_variance_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    axes: Option<&Bound<'py, PyAny>>,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let axes = match axes {
        Some(a) => axes_of(a)?,
        None => vec![0, 2, 3],
    };
    dispatch!(xa, xt => {
        let (y, mut yrw) = prepare_out(py, xt.shape(), out)?;
        let bytes = nbytes(&xt);
        let xv = xt.as_array();
        let yv = yrw.as_array_mut();
        core(run(py, bytes, || mvn_core(xv, yv, &axes, eps)))?;
        Ok(y.into_any().unbind())
    })
}

/// Gradient of mean_variance_norm with respect to x.
#[pyfunction]
#[pyo3(signature = (grad_y, x, axes=None, eps=1e-9))]
pub fn _mean_variance_norm_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    axes: Option<&Bound<'py, PyAny>>,
    eps: f64,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let ga = XArray::extract(grad_y, "grad_y")?;
    let axes = match axes {
        Some(a) => axes_of(a)?,
        None => vec![0, 2, 3],
    };
    dispatch_pair!(xa, ga, xt, gt => {
        let (dx, mut drw) = prepare_out(py, xt.shape(), None)?;
        let bytes = 2 * nbytes(&xt);
        let (xv, gv) = (xt.as_array(), gt.as_array());
        let dv = drw.as_array_mut();
        core(run(py, bytes, || mvn_bwd(gv, xv, dv, &axes, eps)))?;
        Ok(dx.into_any().unbind())
    })
}
