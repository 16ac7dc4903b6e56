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

pub use error::{NormError, Result};
pub use norm::*;
pub use pool::{num_threads, set_num_threads};
pub use scalar::Scalar;

#[cfg(feature = "python")]
mod python;
