//! The core error type. Pure Rust; the Python bindings map each variant to an exception class
//! in one exhaustive `match` (`src/python/errors.rs`).

/// A user mistake detected before any numeric work starts.
///
/// Messages are written for end users: they name the argument and, for shape problems, both the
/// expected and the actual shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormError {
    /// An array argument has the wrong shape or rank (`ShapeError` in Python).
    #[error("{0}")]
    Shape(String),
    /// A scalar parameter is out of its domain: eps, momentum, num_groups, axis, ... (`RsnormError`).
    #[error("{0}")]
    Param(String),
    /// Too few values to compute the statistics the call needs (BN training with one value per
    /// channel, IN with one spatial element). `RsnormError` in Python, message as PyTorch's.
    #[error("{0}")]
    TooFewValues(String),
    /// An output or state array cannot be written (read-only, overlapping an input).
    #[error("{0}")]
    NotWritable(String),
}

/// Result alias used by every kernel.
pub type Result<T> = std::result::Result<T, NormError>;

/// Formats a shape as Python does, e.g. `(2, 3)` or `(4,)`.
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
