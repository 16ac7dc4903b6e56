//! Element types the kernels are generic over.
//!
//! Every statistic is accumulated in `f64`, whatever the storage type: widening f16/f32 to f64
//! is exact, the sum of 1.5·2²⁴ ones stays exact, and Σx² of any f32 (≤ 1.2e77) cannot
//! overflow. That is what makes the two-pass statistics exact at 1e4 + N(0,1) and correct at
//! 3e38, where f32 accumulation (PyTorch's) loses digits or overflows.

use half::f16;

/// A storage type for array elements: f16, f32 or f64.
pub trait Scalar: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// NumPy's name for the dtype, used in messages.
    const NAME: &'static str;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Rounds to nearest (ties to even).
    fn from_f64(v: f64) -> Self;
    /// Machine epsilon of the type statistics are reported in (f32 for f16/f32, f64 for f64);
    /// the `eps=None` default of `rms_norm`, as PyTorch's.
    fn stat_eps() -> f64;
}

impl Scalar for f32 {
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    #[allow(clippy::cast_possible_truncation)] // rounding f64 → f32 is the point
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn stat_eps() -> f64 {
        f32::EPSILON as f64
    }
}

impl Scalar for f64 {
    const NAME: &'static str = "float64";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    fn stat_eps() -> f64 {
        f64::EPSILON
    }
}

impl Scalar for f16 {
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn stat_eps() -> f64 {
        f32::EPSILON as f64
    }
}
