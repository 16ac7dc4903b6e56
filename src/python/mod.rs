//! The `rsnorm._rsnorm` extension module. Each family's wrappers live in the file of the same
//! name as its kernel module (`src/norm/`); they extract, dispatch on the dtype once, release
//! the GIL and convert errors — no numerics here.

pub mod array;
pub mod batch;
pub mod errors;
mod frn;
mod gdn;
mod group;
mod layer;
mod lp;
mod lrn;
pub mod mixing;
mod mvn;
mod outbuf;
mod whiten;

use pyo3::prelude::*;

const MAX_THREADS: usize = 1024;

/// Sets the number of threads kernels use (0 = default: RAYON_NUM_THREADS or the CPU count).
#[pyfunction]
fn set_num_threads(#[pyo3(from_py_with = array::int64)] n: i64) -> PyResult<()> {
    // Beyond a few hundred threads the OS spends its time creating them (100 000 hangs the
    // next call); no machine this library targets benefits from more than MAX_THREADS.
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_THREADS)
        .ok_or_else(|| {
            errors::value_error(format!(
                "set_num_threads expects 0 <= n <= {MAX_THREADS}, got {n}"
            ))
        })?;
    crate::pool::set_num_threads(n);
    Ok(())
}

/// The number of threads kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::pool::num_threads()
}

/// CPU features detected at run time (the wheel itself targets the x86-64 baseline).
fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            v.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            v.push("fma");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            v.push("avx512f");
        }
    }
    v
}

/// Build and run-time information: version, profile, kernel ISA, CPU features, threads.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let d = pyo3::types::PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    d.set_item(
        "profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    d.set_item("simd", crate::simd_level())?;
    d.set_item("cpu_features", cpu_features())?;
    d.set_item("num_threads", crate::pool::num_threads())?;
    d.set_item("target", std::env::consts::ARCH)?;
    d.set_item("output_pool_idle_bytes", outbuf::idle_bytes())?;
    Ok(d.into_any().unbind())
}

#[pymodule(gil_used = false)]
fn _rsnorm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("RsnormError", m.py().get_type::<errors::RsnormError>())?;
    m.add("ShapeError", m.py().get_type::<errors::ShapeError>())?;
    m.add_function(wrap_pyfunction!(batch::batch_norm, m)?)?;
    m.add_function(wrap_pyfunction!(batch::moments, m)?)?;
    m.add_function(wrap_pyfunction!(layer::layer_norm, m)?)?;
    m.add_function(wrap_pyfunction!(layer::rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(group::group_norm, m)?)?;
    m.add_function(wrap_pyfunction!(group::instance_norm, m)?)?;
    m.add_function(wrap_pyfunction!(batch::batch_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(layer::layer_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(layer::rms_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(group::group_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(group::instance_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(lrn::local_response_norm, m)?)?;
    m.add_function(wrap_pyfunction!(lrn::_local_response_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(frn::filter_response_norm, m)?)?;
    m.add_function(wrap_pyfunction!(frn::_filter_response_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(frn::tlu, m)?)?;
    m.add_function(wrap_pyfunction!(frn::_tlu_backward, m)?)?;
    m.add_function(wrap_pyfunction!(gdn::gdn, m)?)?;
    m.add_function(wrap_pyfunction!(gdn::_gdn_backward, m)?)?;
    m.add_function(wrap_pyfunction!(mvn::mean_variance_norm, m)?)?;
    m.add_function(wrap_pyfunction!(mvn::_mean_variance_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(lp::normalize, m)?)?;
    m.add_function(wrap_pyfunction!(lp::_normalize_backward, m)?)?;
    m.add_function(wrap_pyfunction!(whiten::covariance_moments, m)?)?;
    m.add_function(wrap_pyfunction!(whiten::whitening_matrix, m)?)?;
    m.add_function(wrap_pyfunction!(whiten::group_whiten_apply, m)?)?;
    m.add_function(wrap_pyfunction!(whiten::iter_norm, m)?)?;
    m.add_function(wrap_pyfunction!(whiten::group_cross_moments, m)?)?;
    m.add_function(wrap_pyfunction!(whiten::group_whiten_apply2, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    Ok(())
}
