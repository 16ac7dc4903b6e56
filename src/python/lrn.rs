//! `local_response_norm` bindings.

use super::array::{core, int64, intp, prepare_out, run, XArray};
use super::errors::value_error;
use super::mixing::nbytes;
use crate::norm::lrn::{
    local_response_norm as lrn_core, local_response_norm_backward as lrn_bwd, LrnParams, LrnWindow,
};
use crate::{dispatch, dispatch_pair};
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;

fn window(w: &str) -> PyResult<LrnWindow> {
    match w {
        "torch" => Ok(LrnWindow::Torch),
        "onnx" => Ok(LrnWindow::Onnx),
        _ => Err(value_error(format!(
            "window must be \"torch\" or \"onnx\", got {w:?}"
        ))),
    }
}

/// Local response normalization across channels (input of rank >= 3).
///
/// ``y_c = x_c / (k + α'·Σ_{j∈W(c)} x_j²)^β`` with zero padding; ``α' = α/size`` when
/// ``alpha_over_size`` (PyTorch, ONNX, Caffe), else ``α`` (AlexNet paper, TensorFlow).
/// ``window="torch"``: ``W(c) = [c − ⌊n/2⌋, c + ⌊(n−1)/2⌋]``; ``"onnx"``:
/// ``[c − ⌊(n−1)/2⌋, c + ⌈(n−1)/2⌉]`` (they differ for even sizes). ``size`` may exceed C;
/// ``size <= 0`` raises ``RsnormError``. O(1) work per element in the window size, with no
/// add/subtract running sum (which drifts after a large value).
#[pyfunction]
#[pyo3(signature = (x, size, alpha=1e-4, beta=0.75, k=1.0, *, alpha_over_size=true,
    window="torch", axis=1, out=None))]
#[allow(clippy::too_many_arguments)]
pub fn local_response_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = int64)] size: i64,
    alpha: f64,
    beta: f64,
    k: f64,
    alpha_over_size: bool,
    window: &str,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let p = LrnParams {
        size,
        alpha,
        beta,
        k,
        alpha_over_size,
        window: self::window(window)?,
        axis,
    };
    dispatch!(xa, xt => {
        let (y, mut yrw) = prepare_out(py, xt.shape(), out)?;
        let bytes = nbytes(&xt);
        let xv = xt.as_array();
        let yv = yrw.as_array_mut();
        core(run(py, bytes, || lrn_core(xv, yv, &p)))?;
        Ok(y.into_any().unbind())
    })
}

/// Gradient of local_response_norm with respect to x.
#[pyfunction]
#[pyo3(signature = (grad_y, x, size, alpha=1e-4, beta=0.75, k=1.0, *, alpha_over_size=true,
    window="torch", axis=1))]
#[allow(clippy::too_many_arguments)]
pub fn _local_response_norm_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = int64)] size: i64,
    alpha: f64,
    beta: f64,
    k: f64,
    alpha_over_size: bool,
    window: &str,
    #[pyo3(from_py_with = intp)] axis: isize,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let ga = XArray::extract(grad_y, "grad_y")?;
    let p = LrnParams {
        size,
        alpha,
        beta,
        k,
        alpha_over_size,
        window: self::window(window)?,
        axis,
    };
    dispatch_pair!(xa, ga, xt, gt => {
        let (dx, mut drw) = prepare_out(py, xt.shape(), None)?;
        let bytes = 2 * nbytes(&xt);
        let (xv, gv) = (xt.as_array(), gt.as_array());
        let dv = drw.as_array_mut();
        core(run(py, bytes, || lrn_bwd(gv, xv, dv, &p)))?;
        Ok(dx.into_any().unbind())
    })
}
