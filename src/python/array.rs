//! Borrowing NumPy arrays: dtype dispatch, parameter reading, output preparation, GIL release.
//!
//! No input is ever copied or cast: `x` is borrowed read-only as it is (any strides), and a
//! dtype outside float16/32/64 or a non-native byte order is a `TypeError`. Per-channel
//! parameters are small (O(C)), so they are read into `Vec<f64>` (exact widening), which also
//! releases their borrows before running statistics are written back: the same array may be
//! passed as `bias` and `running_mean`.

use super::errors::{shape_error, to_py, type_error, value_error};
use crate::error::fmt_shape;
use crate::scalar::Scalar;
use half::f16;
use numpy::{
    Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyOverflowError;
use pyo3::prelude::*;

/// Below this many bytes a kernel runs without releasing the GIL: releasing and re-taking it
/// costs about a microsecond, as much as normalizing a few thousand values.
const DETACH_MIN_BYTES: usize = 64 * 1024;

pub const ACCEPTED: &str = "float16, float32, float64";

/// The input array, borrowed read-only, by dtype.
pub enum XArray<'py> {
    F16(PyReadonlyArrayDyn<'py, f16>),
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

/// `from_py_with` extractor of an integer argument (axis, num_groups, size, T, n, ...): an int
/// beyond 64 bits is an `RsnormError` (a `ValueError`, as every bad parameter value) instead of
/// pyo3's `OverflowError`; a non-integer keeps pyo3's `TypeError`. pyo3 notes the argument's
/// name on the exception ("while processing 'axis'").
pub fn int64(obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    obj.extract::<i64>().map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(obj.py()) {
            out_of_range(obj)
        } else {
            e
        }
    })
}

/// [`int64`] for an `isize` argument (an axis).
pub fn intp(obj: &Bound<'_, PyAny>) -> PyResult<isize> {
    isize::try_from(int64(obj)?).map_err(|_| out_of_range(obj))
}

#[cold]
fn out_of_range(obj: &Bound<'_, PyAny>) -> PyErr {
    // str() of an int refuses beyond sys.int_info.str_digits_check_threshold digits.
    let v = obj
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "an integer".into());
    value_error(format!(
        "{v} is out of range (an integer argument must fit in 64 bits)"
    ))
}

/// The ndarray behind `obj`, with a float dtype of native byte order, else `TypeError`.
fn float_array<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    name: &str,
) -> PyResult<(&'a Bound<'py, PyUntypedArray>, u8)> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        type_error(format!(
            "{name} must be a numpy.ndarray, got {}",
            describe(obj)
        ))
    })?;
    if !obj.is_exact_instance_of::<PyUntypedArray>() && is_masked(obj)? {
        return Err(type_error(format!(
            "{name} is a numpy.ma.MaskedArray; rsnorm does not honour masks and will not drop \
             one silently: pass {name}.filled(value) (masked entries replaced) or \
             np.asarray({name}) (the data with the mask ignored)"
        )));
    }
    let dt = arr.dtype();
    let kind = dt.kind();
    let size = dt.itemsize();
    let ok = kind == b'f' && matches!(size, 2 | 4 | 8);
    // Built only on the error paths: the happy path stays free of Python string work.
    let dname = || {
        dt.str()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".into())
    };
    if !ok {
        let dname = dname();
        return Err(type_error(format!(
            "{name} has dtype {dname}; rsnorm accepts {ACCEPTED} (convert explicitly, e.g. \
             {name}.astype(np.float32))"
        )));
    }
    if dt.is_native_byteorder() == Some(false) {
        return Err(type_error(format!(
            "{name} has non-native byte order (dtype {}); convert with \
             {name}.astype({name}.dtype.newbyteorder('='))",
            dt.repr().map(|s| s.to_string()).unwrap_or_else(|_| dname())
        )));
    }
    if arr.ndim() > MAX_NDIM {
        return Err(value_error(format!(
            "{name} has {} dimensions; rsnorm supports at most {MAX_NDIM}",
            arr.ndim()
        )));
    }
    Ok((arr, u8::try_from(size).unwrap_or(8)))
}

/// Whether `obj` is a `numpy.ma.MaskedArray` (only asked for ndarray subclasses: the exact
/// type check above keeps plain arrays off this path).
fn is_masked(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    static CLS: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    let py = obj.py();
    let cls = CLS.get_or_try_init(py, || -> PyResult<_> {
        Ok(py.import("numpy.ma")?.getattr("MaskedArray")?.unbind())
    })?;
    obj.is_instance(cls.bind(py))
}

/// rust-numpy's dynamic views support up to 32 dimensions (NumPy 2 allows 64).
const MAX_NDIM: usize = 32;

impl<'py> XArray<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        let (arr, size) = float_array(obj, name)?;
        let err = |e: PyErr| e;
        Ok(match size {
            2 => XArray::F16(
                arr.cast::<PyArrayDyn<f16>>()?
                    .try_readonly()
                    .map_err(|e| value_error(format!("{name}: {e}")))
                    .map_err(err)?,
            ),
            4 => XArray::F32(
                arr.cast::<PyArrayDyn<f32>>()?
                    .try_readonly()
                    .map_err(|e| value_error(format!("{name}: {e}")))?,
            ),
            _ => XArray::F64(
                arr.cast::<PyArrayDyn<f64>>()?
                    .try_readonly()
                    .map_err(|e| value_error(format!("{name}: {e}")))?,
            ),
        })
    }
}

/// Dispatches once on the input dtype into a generic body. `$x` becomes the typed borrow.
#[macro_export]
macro_rules! dispatch {
    ($arr:expr, $x:ident => $body:expr) => {
        match $arr {
            $crate::python::array::XArray::F16($x) => $body,
            $crate::python::array::XArray::F32($x) => $body,
            $crate::python::array::XArray::F64($x) => $body,
        }
    };
}

/// A parameter array read as f64 in logical order, with its shape.
pub struct Param {
    pub values: Vec<f64>,
    pub shape: Vec<usize>,
}

fn read_typed<T: Scalar + Element>(arr: &Bound<'_, PyUntypedArray>, name: &str) -> PyResult<Param> {
    let a = arr.cast::<PyArrayDyn<T>>()?;
    let _ = name;
    // SAFETY: the values are copied out right here, while this thread holds the GIL, and no
    // borrow of this call is live yet (outputs are prepared later, and checked not to
    // overlap parameters). Skipping rust-numpy's borrow registry (a global hash map insert
    // and remove per array) saves ~0.2 µs per parameter, a tenth of a tiny batch norm; a
    // parameter written concurrently by another thread is a race NumPy does not guard
    // against either.
    let shape = a.shape().to_vec();
    // C-contiguous (the usual parameter): read the buffer directly, without building an
    // ndarray view. SAFETY: as above; `as_slice` checks contiguity itself.
    if let Ok(sl) = unsafe { a.as_slice() } {
        return Ok(Param {
            values: sl.iter().map(|x| x.to_f64()).collect(),
            shape,
        });
    }
    let v = unsafe { a.as_array() };
    Ok(Param {
        values: v.iter().map(|x| x.to_f64()).collect(),
        shape,
    })
}

/// Reads an optional parameter (None → None).
pub fn read_param(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<Param>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let (arr, size) = float_array(obj, name)?;
    Ok(Some(match size {
        2 => read_typed::<f16>(arr, name)?,
        4 => read_typed::<f32>(arr, name)?,
        _ => read_typed::<f64>(arr, name)?,
    }))
}

/// A per-channel parameter must be 1-D; its length is checked by the kernel.
pub fn read_vec(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<Vec<f64>>> {
    match read_param(obj, name)? {
        None => Ok(None),
        Some(p) if p.shape.len() == 1 => Ok(Some(p.values)),
        Some(p) => Err(shape_error(format!(
            "{name} must be a 1-D array of one value per channel, got shape {}",
            fmt_shape(&p.shape)
        ))),
    }
}

fn write_typed<T: Scalar + Element>(
    arr: &Bound<'_, PyUntypedArray>,
    name: &str,
    vals: &[f64],
) -> PyResult<()> {
    let a = arr.cast::<PyArrayDyn<T>>()?;
    // SAFETY: called with the GIL held after the kernel, when this call's own borrows of x and
    // the output are released; the array was checked writable before any work
    // (`check_writable`). As for parameter reads (`read_typed`), rust-numpy's borrow registry
    // is skipped: its insert and remove were a fifth of a tiny training batch norm.
    if !is_writeable(arr) {
        return Err(value_error(format!("{name} is read-only")));
    }
    // C-contiguous (the usual state array): the buffer directly, no ndarray view.
    if let Ok(sl) = unsafe { a.as_slice_mut() } {
        for (o, &x) in sl.iter_mut().zip(vals) {
            *o = T::from_f64(x);
        }
        return Ok(());
    }
    let mut v = unsafe { a.as_array_mut() };
    for (o, &x) in v.iter_mut().zip(vals) {
        *o = T::from_f64(x);
    }
    Ok(())
}

/// Writes `vals` into a state array in place (in its own dtype).
pub fn write_param(obj: &Bound<'_, PyAny>, name: &str, vals: &[f64]) -> PyResult<()> {
    let (arr, size) = float_array(obj, name)?;
    match size {
        2 => write_typed::<f16>(arr, name, vals),
        4 => write_typed::<f32>(arr, name, vals),
        _ => write_typed::<f64>(arr, name, vals),
    }
}

fn borrow_error(name: &str, e: numpy::BorrowError) -> PyErr {
    match e {
        numpy::BorrowError::NotWriteable => value_error(format!("{name} is read-only")),
        _ => value_error(format!(
            "{name} overlaps an input array (same memory); pass a separate output array"
        )),
    }
}

/// NumPy's writeable flag, read directly (not `arr.flags.writeable`: two attribute lookups and
/// a flags object cost ~1 µs, half of a tiny batch norm).
fn is_writeable(arr: &Bound<'_, PyUntypedArray>) -> bool {
    // SAFETY: `arr` is a live ndarray; reading its flags field is what NumPy's own
    // PyArray_ISWRITEABLE macro does.
    let flags = unsafe { (*numpy::npyffi::_PyArray_GET_ITEM_DATA(arr.as_array_ptr())).flags };
    flags & numpy::npyffi::NPY_ARRAY_WRITEABLE != 0
}

/// A state array the call will update must be writable: checked before any work so a failing
/// call leaves every array untouched.
pub fn check_writable(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<()> {
    if let Some(o) = obj.filter(|o| !o.is_none()) {
        let (arr, _) = float_array(o, name)?;
        if !is_writeable(arr) {
            return Err(value_error(format!("{name} is read-only")));
        }
    }
    Ok(())
}

/// `out=` if given (validated: ndarray, x's dtype and shape, writable, not overlapping an input
/// borrowed so far, no self-overlap), else a fresh uninitialized C-order array allocated by
/// NumPy (so large outputs get NumPy's huge-page hint).
pub fn prepare_out<'py, T: Element>(
    py: Python<'py>,
    shape: &[usize],
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyArrayDyn<T>>, PyReadwriteArrayDyn<'py, T>)> {
    let arr = match out.filter(|o| !o.is_none()) {
        None => match super::outbuf::pooled_array::<T>(py, shape) {
            Some(a) => a,
            // SAFETY: every element is written by the kernel before Python can see the array.
            None => unsafe { PyArrayDyn::<T>::new(py, shape, false) },
        },
        Some(o) => {
            let u = o.cast::<PyUntypedArray>().map_err(|_| {
                type_error(format!("out must be a numpy.ndarray, got {}", describe(o)))
            })?;
            if !o.is_exact_instance_of::<PyUntypedArray>() && is_masked(o)? {
                return Err(type_error(
                    "out is a numpy.ma.MaskedArray; its mask would not describe the result: \
                     pass a plain ndarray"
                        .into(),
                ));
            }
            let a = u.cast::<PyArrayDyn<T>>().map_err(|_| {
                type_error(format!(
                    "out has dtype {}, but the result has dtype {} (the input's)",
                    u.dtype().str().map(|s| s.to_string()).unwrap_or_default(),
                    numpy::dtype::<T>(py)
                        .str()
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                ))
            })?;
            if a.shape() != shape {
                return Err(shape_error(format!(
                    "out must have the input's shape {}, got {}",
                    fmt_shape(shape),
                    fmt_shape(a.shape())
                )));
            }
            let empty = a.shape().contains(&0);
            if !empty
                && a.shape()
                    .iter()
                    .zip(a.strides())
                    .any(|(&d, &s)| d > 1 && s == 0)
            {
                return Err(value_error(
                    "out has overlapping memory (a zero stride); pass a writable array of distinct elements"
                        .into(),
                ));
            }
            a.clone()
        }
    };
    let rw = arr.try_readwrite().map_err(|e| borrow_error("out", e))?;
    Ok((arr, rw))
}

/// Bytes of a view, for the GIL-release threshold.
pub fn nbytes<T>(v: &ndarray::ArrayView<'_, T, ndarray::IxDyn>) -> usize {
    v.len().saturating_mul(std::mem::size_of::<T>())
}

/// Runs `f` with the GIL released when the work is large enough to be worth it.
pub fn run<R: Send, F: FnOnce() -> R + Send>(py: Python<'_>, bytes: usize, f: F) -> R {
    if bytes >= DETACH_MIN_BYTES {
        py.detach(f)
    } else {
        f()
    }
}

pub fn core<T>(r: crate::error::Result<T>) -> PyResult<T> {
    r.map_err(to_py)
}

/// An f64 statistics vector as a NumPy array of the statistics dtype (f64 for f64 input, f32
/// otherwise: never f16) with the given shape.
pub fn stats_array<'py>(
    py: Python<'py>,
    v: &[f64],
    shape: &[usize],
    f64_stats: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if f64_stats {
        Ok(numpy::PyArray1::<f64>::from_vec(py, v.to_vec())
            .reshape(shape)?
            .into_any())
    } else {
        // Statistics of f16/f32 inputs are reported in f32, rounded once from f64.
        #[allow(clippy::cast_possible_truncation)]
        let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        Ok(numpy::PyArray1::<f32>::from_vec(py, f)
            .reshape(shape)?
            .into_any())
    }
}

/// Builds `rsnorm.Stats(mean, rstd)` (a NamedTuple defined in Python).
pub fn stats_tuple<'py>(
    py: Python<'py>,
    mean: Option<Bound<'py, PyAny>>,
    rstd: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    static CLS: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    let cls = CLS.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("rsnorm._types")?.getattr("Stats")?.unbind())
    })?;
    cls.bind(py)
        .call1((mean.unwrap_or_else(|| py.None().into_bound(py)), rstd))
}

/// (y) or (y, stats) as the Python result.
pub fn result<'py>(
    py: Python<'py>,
    y: Bound<'py, PyAny>,
    stats: Option<Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    Ok(match stats {
        None => y.unbind(),
        Some(s) => (y, s).into_pyobject(py)?.into_any().unbind(),
    })
}

/// Whether statistics of this input are reported in float64 (else float32).
pub fn f64_stats<T: Scalar + Element>(_x: &PyReadonlyArrayDyn<'_, T>) -> bool {
    T::NAME == "float64"
}

/// The byte range [lo, hi) an array's elements span (empty arrays span nothing).
fn extent(a: &Bound<'_, PyUntypedArray>) -> Option<(usize, usize)> {
    if a.shape().contains(&0) {
        return None;
    }
    // SAFETY: reading the data pointer of a live array; it is not dereferenced.
    let base = unsafe { (*numpy::npyffi::_PyArray_GET_ITEM_DATA(a.as_array_ptr())).data } as usize;
    let item = a.dtype().itemsize();
    let (mut lo, mut hi) = (base as isize, base as isize);
    for (&d, &s) in a.shape().iter().zip(a.strides()) {
        let span = (d as isize - 1) * s;
        if span < 0 {
            lo += span;
        } else {
            hi += span;
        }
    }
    Some((lo as usize, hi as usize + item))
}

/// `out` must not share memory with any parameter array (x is checked by the borrow tracker
/// in `prepare_out`). A bounds test, like `numpy.may_share_memory`: conservative and O(1).
pub fn check_out_disjoint(
    out: Option<&Bound<'_, PyAny>>,
    params: &[(&str, Option<&Bound<'_, PyAny>>)],
) -> PyResult<()> {
    let Some(o) = out.filter(|o| !o.is_none()) else {
        return Ok(());
    };
    let Ok(ou) = o.cast::<PyUntypedArray>() else {
        return Ok(());
    };
    let Some((olo, ohi)) = extent(ou) else {
        return Ok(());
    };
    for (name, p) in params {
        if let Some(pu) = p.and_then(|p| p.cast::<PyUntypedArray>().ok()) {
            if let Some((lo, hi)) = extent(pu) {
                if lo < ohi && olo < hi {
                    return Err(value_error(format!(
                        "out overlaps {name} (same memory); pass a separate output array"
                    )));
                }
            }
        }
    }
    Ok(())
}
