//! The streaming-store kernels (`rsnorm::stream`) write bitwise what the cached kernels
//! (`rsnorm::reduce`) write, for every alignment of the output and every optional array.

mod common;

use common::streaming::check;

#[test]
fn streamed_f32_is_bitwise_cached() {
    #[allow(clippy::cast_possible_truncation)]
    check::<f32>(|v| v as f32);
}

#[test]
fn streamed_f64_is_bitwise_cached() {
    check::<f64>(|v| v);
}
