//! `gdn` bindings.

use super::array::{core, intp, prepare_out, read_param, read_vec, run, XArray};
use super::errors::{shape_error, value_error};
use super::mixing::{grad_array, nbytes};
use crate::norm::gdn::{gdn as gdn_core, gdn_backward as gdn_bwd, GdnParams, GdnVariant};
use crate::{dispatch, dispatch_pair};
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;

fn variant(v: &str) -> PyResult<GdnVariant> {
    match v {
        "gdn" => Ok(GdnVariant::Gdn),
        "gdn1" => Ok(GdnVariant::Gdn1),
        _ => Err(value_error(format!(
            "variant must be \"gdn\" or \"gdn1\", got {v:?}"
        ))),
    }
}

fn params(
    beta: &Bound<'_, PyAny>,
    gamma: &Bound<'_, PyAny>,
) -> PyResult<(Vec<f64>, super::array::Param)> {
    let b = read_vec(Some(beta), "beta")?
        .ok_or_else(|| shape_error("beta is required (shape (C,))".into()))?;
    let g = read_param(Some(gamma), "gamma")?
        .ok_or_else(|| shape_error("gamma is required (shape (C, C))".into()))?;
    Ok((b, g))
}

/// Generalized divisive normalization (Ballé et al. 2016) across channels, any rank >= 2.
///
/// ``D_i = β_i + Σ_j γ_ij·x_j²``, ``y_i = x_i/sqrt(D_i)`` (``inverse=True``, IGDN:
/// ``x_i·sqrt(D_i)``); ``variant="gdn1"``: ``D_i = β_i + Σ_j γ_ij·|x_j|``, ``y_i = x_i/D_i``
/// (inverse: ``x_i·D_i``). β: (C,), all > 0; γ: (C, C), all >= 0, ``γ[i, j]`` = output i,
/// input j (CompressAI's layout). The per-position mixing is a GEMM, float64 inside.
#[pyfunction]
#[pyo3(signature = (x, beta, gamma, *, inverse=false, variant="gdn", axis=1, out=None))]
#[allow(clippy::too_many_arguments)]
pub fn gdn<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    beta: &Bound<'py, PyAny>,
    gamma: &Bound<'py, PyAny>,
    inverse: bool,
    variant: &str,
    #[pyo3(from_py_with = intp)] axis: isize,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let (b, g) = params(beta, gamma)?;
    let p = GdnParams {
        beta: &b,
        gamma: &g.values,
        gamma_shape: &g.shape,
        inverse,
        variant: self::variant(variant)?,
        axis,
    };
    dispatch!(xa, xt => {
        let (y, mut yrw) = prepare_out(py, xt.shape(), out)?;
        let bytes = nbytes(&xt);
        let xv = xt.as_array();
        let yv = yrw.as_array_mut();
        core(run(py, bytes, || gdn_core(xv, yv, &p)))?;
        Ok(y.into_any().unbind())
    })
}

/// Gradients of gdn: (dx, dbeta, dgamma).
#[pyfunction]
#[pyo3(signature = (grad_y, x, beta, gamma, *, inverse=false, variant="gdn", axis=1))]
#[allow(clippy::too_many_arguments)]
pub fn _gdn_backward<'py>(
    py: Python<'py>,
    grad_y: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    beta: &Bound<'py, PyAny>,
    gamma: &Bound<'py, PyAny>,
    inverse: bool,
    variant: &str,
    #[pyo3(from_py_with = intp)] axis: isize,
) -> PyResult<Py<PyAny>> {
    let xa = XArray::extract(x, "x")?;
    let ga = XArray::extract(grad_y, "grad_y")?;
    let (b, g) = params(beta, gamma)?;
    let p = GdnParams {
        beta: &b,
        gamma: &g.values,
        gamma_shape: &g.shape,
        inverse,
        variant: self::variant(variant)?,
        axis,
    };
    dispatch_pair!(xa, ga, xt, gt => {
        let (dx, mut drw) = prepare_out(py, xt.shape(), None)?;
        let bytes = 2 * nbytes(&xt);
        let (xv, gv) = (xt.as_array(), gt.as_array());
        let dv = drw.as_array_mut();
        let gr = core(run(py, bytes, || gdn_bwd(gv, xv, dv, &p)))?;
        let c = b.len();
        let db = grad_array(py, &xt, &gr.beta, &[c])?;
        let dg = grad_array(py, &xt, &gr.gamma, &[c, c])?;
        Ok((dx.into_any(), db, dg).into_pyobject(py)?.into_any().unbind())
    })
}
