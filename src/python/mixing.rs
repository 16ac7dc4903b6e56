//! Helpers shared by the channel-mixing bindings (LRN, FRN/TLU, GDN, MVN, normalize).

use super::array::XArray;
use super::errors::type_error;
use crate::scalar::Scalar;
use numpy::{Element, PyArray1, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::prelude::*;

/// Dispatches on the dtype of `x` and requires `grad_y` to have the same one.
#[macro_export]
macro_rules! dispatch_pair {
    ($xa:expr, $ga:expr, $x:ident, $g:ident => $body:expr) => {
        match ($xa, $ga) {
            ($crate::python::array::XArray::F16($x), $crate::python::array::XArray::F16($g)) => {
                $body
            }
            ($crate::python::array::XArray::F32($x), $crate::python::array::XArray::F32($g)) => {
                $body
            }
            ($crate::python::array::XArray::F64($x), $crate::python::array::XArray::F64($g)) => {
                $body
            }
            (x, g) => {
                return Err($crate::python::mixing::dtype_mismatch(&x, &g));
            }
        }
    };
}

fn name(a: &XArray<'_>) -> &'static str {
    match a {
        XArray::F16(_) => "float16",
        XArray::F32(_) => "float32",
        XArray::F64(_) => "float64",
    }
}

pub fn dtype_mismatch(x: &XArray<'_>, g: &XArray<'_>) -> PyErr {
    type_error(format!(
        "grad_y has dtype {} but x has dtype {}; they must match",
        name(g),
        name(x)
    ))
}

/// A gradient (accumulated in f64) as an array of x's dtype and the given shape.
pub fn grad_array<'py, T: Scalar + Element>(
    py: Python<'py>,
    _like: &PyReadonlyArrayDyn<'_, T>,
    vals: &[f64],
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let v: Vec<T> = vals.iter().map(|&x| T::from_f64(x)).collect();
    Ok(PyArray1::<T>::from_vec(py, v).reshape(shape)?.into_any())
}

/// Bytes of x, for the GIL-release threshold.
pub fn nbytes<T>(x: &PyReadonlyArrayDyn<'_, T>) -> usize
where
    T: Element,
{
    use numpy::PyUntypedArrayMethods;
    x.len().saturating_mul(std::mem::size_of::<T>())
}
