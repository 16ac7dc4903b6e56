//! `batch_norm` and `moments` bindings.

use super::array::{
    check_out_disjoint, check_writable, core, f64_stats, intp, prepare_out, read_vec, result, run,
    stats_array, stats_tuple, write_param, XArray,
};
use super::errors::{type_error, value_error};
use crate::dispatch;
use crate::norm::batch::{batch_norm as bn_core, BatchNormParams, MomentumConvention};
use crate::norm::moments::moments as moments_core;
use crate::scalar::Scalar;
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

fn convention(s: &str) -> PyResult<MomentumConvention> {
    match s {
        "torch" => Ok(MomentumConvention::Torch),
        "onnx" => Ok(MomentumConvention::Onnx),
        other => Err(value_error(format!(
            "momentum_convention must be \"torch\" or \"onnx\", got {other:?}"
        ))),
    }
}

/// Reads `num_batches_tracked`: a 0-d (or one-element) int64 array updated in place.
fn read_nbt(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<i64>> {
    let Some(o) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let a = o.cast::<PyArrayDyn<i64>>().map_err(|_| {
        type_error(
            "num_batches_tracked must be a 0-d numpy int64 array (it is incremented in place)"
                .into(),
        )
    })?;
    if a.len() != 1 {
        return Err(super::errors::shape_error(format!(
            "num_batches_tracked must hold one value, got shape {:?}",
            a.shape()
        )));
    }
    let ro = a
        .try_readonly()
        .map_err(|e| value_error(format!("num_batches_tracked: {e}")))?;
    let v = ro.as_array().iter().next().copied();
    if let Some(n) = v.filter(|&n| n < 0) {
        return Err(value_error(format!(
            "num_batches_tracked must be >= 0, got {n}"
        )));
    }
    Ok(v)
}

fn write_nbt(obj: &Bound<'_, PyAny>, v: i64) -> PyResult<()> {
    let a = obj.cast::<PyArrayDyn<i64>>()?;
    let mut rw = a
        .try_readwrite()
        .map_err(|_| value_error("num_batches_tracked is read-only".into()))?;
    if let Some(x) = rw.as_array_mut().iter_mut().next() {
        *x = v;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bn_typed<'py, T: Scalar + Element>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, T>,
    p: &BatchNormParams<'_>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyAny>, crate::norm::BatchNormOutput)> {
    let (y, mut yrw) = prepare_out::<T>(py, x.shape(), out)?;
    let xv = x.as_array();
    let bytes = xv.len() * std::mem::size_of::<T>();
    let yv = yrw.as_array_mut();
    let r = core(run(py, bytes, || bn_core(xv, yv, p)))?;
    drop(yrw);
    drop(x);
    Ok((y.into_any(), r))
}

/// Batch normalization. See `rsnorm.batch_norm` in `_rsnorm.pyi` for the full docstring.
#[pyfunction]
#[pyo3(signature = (x, running_mean=None, running_var=None, weight=None, bias=None, training=false,
    momentum=Some(0.1), eps=1e-5, *, axis=1, out=None, return_stats=false, num_batches_tracked=None,
    momentum_convention="torch"),
    text_signature = "(x, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1, eps=1e-05, *, axis=1, out=None, return_stats=False, num_batches_tracked=None, momentum_convention='torch')")]
#[allow(clippy::too_many_arguments)]
pub fn batch_norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_var: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    training: bool,
    momentum: Option<f64>,
    eps: f64,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
    return_stats: bool,
    num_batches_tracked: Option<&Bound<'py, PyAny>>,
    momentum_convention: &str,
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
    let conv = convention(momentum_convention)?;
    let rm = read_vec(running_mean, "running_mean")?;
    let rv = read_vec(running_var, "running_var")?;
    let w = read_vec(weight, "weight")?;
    let b = read_vec(bias, "bias")?;
    let nbt = read_nbt(num_batches_tracked)?;
    if training {
        check_writable(running_mean, "running_mean")?;
        check_writable(running_var, "running_var")?;
    }
    let p = BatchNormParams {
        running_mean: rm.as_deref(),
        running_var: rv.as_deref(),
        weight: w.as_deref(),
        bias: b.as_deref(),
        training,
        momentum,
        eps,
        axis,
        convention: conv,
        num_batches_tracked: nbt,
    };
    let (y, r, c, f64_stats) = dispatch!(xa, xt => {
        let f64s = f64_stats(&xt);
        let (y, r) = bn_typed(py, xt, &p, out)?;
        let c = r.stats.mean.len();
        (y, r, c, f64s)
    });
    if let Some((new_m, new_v)) = &r.running {
        // Borrows of x and y are released: running stats may alias weight/bias safely.
        write_param(
            running_mean.expect("running stats were given"),
            "running_mean",
            new_m,
        )?;
        write_param(
            running_var.expect("running stats were given"),
            "running_var",
            new_v,
        )?;
        if let (Some(o), Some(v)) = (num_batches_tracked, r.num_batches_tracked) {
            write_nbt(o, v)?;
        }
    }
    let stats = if return_stats {
        let m = stats_array(py, &r.stats.mean, &[c], f64_stats)?;
        let s = stats_array(py, &r.stats.rstd, &[c], f64_stats)?;
        Some(stats_tuple(py, Some(m), s)?)
    } else {
        None
    };
    result(py, y, stats)
}

/// Per-channel (count, mean, M2) of x over every axis but `axis`, in float64.
#[pyfunction]
#[pyo3(signature = (x, axis=1))]
pub fn moments<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = intp)] axis: isize,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let m = dispatch!(xa, xt => {
        let xv = xt.as_array();
        let bytes = super::array::nbytes(&xv);
        core(run(py, bytes, || moments_core(xv, axis)))?
    });
    let mean = numpy::PyArray1::from_vec(py, m.mean);
    let m2 = numpy::PyArray1::from_vec(py, m.m2);
    Ok((m.count, mean, m2).into_pyobject(py)?.into_any().unbind())
}

// ---------------------------------------------------------------------------------------------
// Backward (shared helpers used by layer.rs and group.rs too)
// ---------------------------------------------------------------------------------------------

/// grad_y and x borrowed read-only, of one dtype.
pub enum XPair<'py> {
    F16(
        PyReadonlyArrayDyn<'py, half::f16>,
        PyReadonlyArrayDyn<'py, half::f16>,
    ),
    F32(PyReadonlyArrayDyn<'py, f32>, PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>, PyReadonlyArrayDyn<'py, f64>),
}

fn xname(a: &XArray<'_>) -> &'static str {
    match a {
        XArray::F16(_) => "float16",
        XArray::F32(_) => "float32",
        XArray::F64(_) => "float64",
    }
}

impl<'py> XPair<'py> {
    /// Both arrays, same dtype (a mismatch is a `TypeError`: never a silent cast).
    pub fn extract(grad_y: &Bound<'py, PyAny>, x: &Bound<'py, PyAny>) -> PyResult<Self> {
        let xa = XArray::extract(x, "x")?;
        let ga = XArray::extract(grad_y, "grad_y")?;
        match (ga, xa) {
            (XArray::F16(g), XArray::F16(x)) => Ok(XPair::F16(g, x)),
            (XArray::F32(g), XArray::F32(x)) => Ok(XPair::F32(g, x)),
            (XArray::F64(g), XArray::F64(x)) => Ok(XPair::F64(g, x)),
            (g, x) => Err(type_error(format!(
                "grad_y has dtype {} but x has dtype {}; they must match (convert explicitly)",
                xname(&g),
                xname(&x)
            ))),
        }
    }
}

/// Dispatches once on the dtype of (grad_y, x); `$g`, `$x` become the typed borrows.
#[macro_export]
macro_rules! dispatch_xpair {
    ($pair:expr, $g:ident, $x:ident => $body:expr) => {
        match $pair {
            $crate::python::batch::XPair::F16($g, $x) => $body,
            $crate::python::batch::XPair::F32($g, $x) => $body,
            $crate::python::batch::XPair::F64($g, $x) => $body,
        }
    };
}

/// `stats=`: a `Stats(mean, rstd)` (or any 2-sequence) read as f64; mean may be None.
pub struct StatsOwned {
    pub mean: Option<Vec<f64>>,
    pub rstd: Vec<f64>,
}

impl StatsOwned {
    pub fn view(&self) -> crate::norm::StatsIn<'_> {
        crate::norm::StatsIn {
            mean: self.mean.as_deref(),
            rstd: &self.rstd,
        }
    }
}

pub fn read_stats(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<StatsOwned>> {
    let Some(o) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let len = o.len().map_err(|_| {
        type_error(
            "stats must be the rsnorm.Stats(mean, rstd) returned by return_stats=True".into(),
        )
    })?;
    if len != 2 {
        return Err(type_error(format!(
            "stats must be the rsnorm.Stats(mean, rstd) returned by return_stats=True, got {len} items"
        )));
    }
    let mean = o.get_item(0)?;
    let rstd = o.get_item(1)?;
    let mean = super::array::read_param(Some(&mean), "stats.mean")?.map(|p| p.values);
    let rstd = super::array::read_param(Some(&rstd), "stats.rstd")?
        .ok_or_else(|| type_error("stats.rstd must be an array, got None".into()))?
        .values;
    Ok(Some(StatsOwned { mean, rstd }))
}

fn grad_array<'py, T: Scalar + Element>(
    py: Python<'py>,
    v: Vec<f64>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let t: Vec<T> = v.into_iter().map(T::from_f64).collect();
    Ok(numpy::PyArray1::<T>::from_vec(py, t)
        .reshape(shape)?
        .into_any())
}

/// Runs a backward kernel into a fresh dx (x's shape and dtype) and builds
/// `rsnorm.Grads(x, weight, bias)`, parameter gradients in x's dtype with the parameters' shapes.
pub fn run_backward<'py, T, F>(
    py: Python<'py>,
    g: PyReadonlyArrayDyn<'py, T>,
    x: PyReadonlyArrayDyn<'py, T>,
    wshape: &[usize],
    bshape: &[usize],
    op: F,
) -> PyResult<Py<PyAny>>
where
    T: Scalar + Element,
    F: for<'v> FnOnce(
            ndarray::ArrayView<'v, T, ndarray::IxDyn>,
            ndarray::ArrayView<'v, T, ndarray::IxDyn>,
            ndarray::ArrayViewMut<'v, T, ndarray::IxDyn>,
        ) -> crate::Result<crate::norm::ParamGrads>
        + Send,
{
    let (dx, mut dxrw) = prepare_out::<T>(py, x.shape(), None)?;
    let xv = x.as_array();
    let gv = g.as_array();
    let bytes = 2 * xv.len() * std::mem::size_of::<T>();
    let dv = dxrw.as_array_mut();
    let r = core(run(py, bytes, || op(gv, xv, dv)))?;
    drop(dxrw);
    static CLS: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    let cls = CLS.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("rsnorm._grads")?.getattr("Grads")?.unbind())
    })?;
    let none = || py.None().into_bound(py);
    let dw = match r.weight {
        Some(v) => grad_array::<T>(py, v, wshape)?,
        None => none(),
    };
    let db = match r.bias {
        Some(v) => grad_array::<T>(py, v, bshape)?,
        None => none(),
    };
    Ok(cls.bind(py).call1((dx, dw, db))?.unbind())
}

/// Gradients of `batch_norm`. See `rsnorm.batch_norm_backward` in `_rsnorm.pyi`.
#[pyfunction]
#[pyo3(signature = (grad_y, x, running_mean=None, running_var=None, weight=None, bias=None,
    training=false, momentum=Some(0.1), eps=1e-5, stats=None, *, axis=1,
    momentum_convention="torch", num_batches_tracked=None),
    text_signature = "(grad_y, x, running_mean=None, running_var=None, weight=None, bias=None, \
        training=False, momentum=0.1, eps=1e-05, stats=None, *, axis=1, \
        momentum_convention='torch', num_batches_tracked=None)")]
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_var: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    training: bool,
    momentum: Option<f64>,
    eps: f64,
    stats: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = intp)] axis: isize,
    momentum_convention: &str,
    num_batches_tracked: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    // Accepted so a forward's keyword arguments can be passed unchanged; validated, not used.
    convention(momentum_convention)?;
    read_nbt(num_batches_tracked)?;
    let pair = XPair::extract(grad_y, x)?;
    let rm = read_vec(running_mean, "running_mean")?;
    let rv = read_vec(running_var, "running_var")?;
    let w = read_vec(weight, "weight")?;
    let b = read_vec(bias, "bias")?;
    let st = read_stats(stats)?;
    let p = crate::norm::BatchNormBackwardParams {
        running_mean: rm.as_deref(),
        running_var: rv.as_deref(),
        weight: w.as_deref(),
        bias: b.as_deref(),
        training,
        momentum,
        eps,
        axis,
        stats: st.as_ref().map(|s| s.view()),
    };
    let cshape = [w.as_ref().or(b.as_ref()).map_or(0, |v| v.len())];
    dispatch_xpair!(pair, g, xt => run_backward(py, g, xt, &cshape, &cshape,
        |g, xv, d| crate::norm::batch_norm_backward(g, xv, d, &p)))
}
