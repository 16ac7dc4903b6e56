//! Exception classes and the one mapping from core errors to them.

use crate::error::NormError;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    rsnorm,
    RsnormError,
    PyValueError,
    "A bad shape or parameter value (a ValueError)."
);
pyo3::create_exception!(
    rsnorm,
    ShapeError,
    RsnormError,
    "An array argument of the wrong shape or rank."
);

/// Exhaustive on purpose: a new variant must choose its Python class here.
pub fn to_py(e: NormError) -> PyErr {
    match e {
        NormError::Shape(m) => ShapeError::new_err(m),
        NormError::Param(m) => RsnormError::new_err(m),
        NormError::TooFewValues(m) => RsnormError::new_err(m),
        NormError::NotWritable(m) => RsnormError::new_err(m),
    }
}

pub fn value_error(msg: String) -> PyErr {
    RsnormError::new_err(msg)
}

pub fn shape_error(msg: String) -> PyErr {
    ShapeError::new_err(msg)
}

pub fn type_error(msg: String) -> PyErr {
    PyTypeError::new_err(msg)
}

/// Whether `e` (raised while converting `obj`) is a `TypeError`.
pub fn is_type_error(obj: &Bound<'_, PyAny>, e: &PyErr) -> bool {
    e.is_instance_of::<PyTypeError>(obj.py())
}
