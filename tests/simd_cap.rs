//! The hand-written AVX2 kernels (streaming stores, plain sums), run on whatever CPU this is by
//! capping them with `RSNORM_SIMD=avx2`: on an AVX-512 machine they would otherwise never run.
//! One test function, so that the variable is set before anything reads the level.

mod common;

use rsnorm::{reduce, stream};

#[test]
fn avx2_kernels_match_the_generic_ones() {
    #[cfg(target_arch = "x86_64")]
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    {
        return; // nothing to cap: the portable kernels are what runs, tested everywhere else
    }
    std::env::set_var("RSNORM_SIMD", "avx2");
    #[cfg(target_arch = "x86_64")]
    assert_eq!(stream::simd_level(), 1, "the cap is honoured");
    #[allow(clippy::cast_possible_truncation)]
    common::streaming::check::<f32>(|v| v as f32);
    common::streaming::check::<f64>(|v| v);
    for n in 0usize..=200 {
        let v: Vec<f64> = common::streaming::data(n, n as u64);
        let v = v
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 5 == 0 { -0.0 } else { x * 1e3 });
        let v64: Vec<f64> = v.collect();
        #[allow(clippy::cast_possible_truncation)]
        let v32: Vec<f32> = v64.iter().map(|&x| x as f32).collect();
        let generic = |s: &[f64]| reduce::sum_slice(s, reduce::add).to_bits();
        assert_eq!(
            reduce::sum_slice_add(&v64).to_bits(),
            generic(&v64),
            "f64 n={n}"
        );
        assert_eq!(
            reduce::sum_slice_add(&v32).to_bits(),
            reduce::sum_slice(&v32, reduce::add).to_bits(),
            "f32 n={n}"
        );
    }
}
