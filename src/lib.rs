//! # rsnorm
//!
//! Deep-learning normalization layers over ndarray views: batch, layer, RMS, group and instance
//! norm and per-channel moments, exact (two-pass statistics accumulated in f64) and
//! deterministic (bitwise identical for any thread count and memory layout).
//!
//! Every kernel is a plain generic function over `ArrayView<T, IxDyn>` writing into an
//! `ArrayViewMut` of the same shape; the Python bindings (feature `python`) only borrow NumPy
//! arrays, dispatch on the dtype once, release the GIL and convert errors.

#![deny(clippy::cast_possible_truncation)]

pub mod channel;
pub mod error;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod rows;
pub mod scalar;
pub mod scratch;
pub mod stream;

pub use error::{NormError, Result};
pub use norm::*;
pub use pool::{num_threads, set_num_threads};
pub use scalar::Scalar;

#[cfg(feature = "python")]
mod python;

/// The instruction set the hot loops run with on this CPU, chosen at run time (`multiversion`
/// clones in `reduce`): the wheel itself targets the x86-64 baseline.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            return "avx512 (runtime dispatch)";
        }
        if has!("avx2") && has!("fma") {
            return "avx2+fma (runtime dispatch)";
        }
    }
    "baseline"
}
