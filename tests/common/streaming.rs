//! The streaming kernels against the cached ones, shared by `tests/stream.rs` (the CPU's own
//! SIMD level) and `tests/simd_cap.rs` (capped at AVX2 with `RSNORM_SIMD`).

use rsnorm::{reduce, stream};

pub fn data(n: usize, seed: u64) -> Vec<f64> {
    // A small LCG: deterministic, no dev-dependency needed.
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 8.0 + 3.0
        })
        .collect()
}

pub fn check<T: rsnorm::Scalar>(conv: fn(f64) -> T) {
    let n = 1000;
    let xs: Vec<T> = data(n, 1).into_iter().map(conv).collect();
    let w = data(n, 2);
    let b = data(n, 3);
    for shift in 0..9 {
        for (wo, bo) in [
            (None, None),
            (Some(&w[..]), None),
            (None, Some(&b[..])),
            (Some(&w[..]), Some(&b[..])),
        ] {
            let len = n - shift;
            let mut want = vec![conv(0.0); len];
            reduce::apply_slice(
                &xs[shift..],
                &mut want,
                0.7,
                1.3,
                -0.2,
                wo.map(|v| &v[..len]),
                bo.map(|v| &v[..len]),
            );
            let mut buf = vec![conv(0.0); n + 16];
            let got = &mut buf[shift..shift + len];
            if stream::apply_slice(
                &xs[shift..],
                got,
                0.7,
                1.3,
                -0.2,
                wo.map(|v| &v[..len]),
                bo.map(|v| &v[..len]),
            ) {
                stream::stream_fence(true);
                assert!(got.iter().zip(&want).all(|(a, b)| a == b), "shift {shift}");
            }
        }
    }
    // Rows with per-channel (m, a, b): any channel count, any alignment of the output.
    for c in [1, 3, 8, 16, 32, 70] {
        let rows = 40;
        let m = data(c, 4);
        let a = data(c, 5);
        let bb = data(c, 6);
        let xs: Vec<T> = data(rows * c, 7).into_iter().map(conv).collect();
        let mut want = vec![conv(0.0); rows * c];
        reduce::apply_rows(&xs, &mut want, c, &m, &a, &bb);
        for shift in 0..5 {
            let mut buf = vec![conv(0.0); rows * c + 64];
            let g = &mut buf[shift..shift + rows * c];
            if stream::apply_rows(&xs, g, c, &m, &a, &bb) {
                stream::stream_fence(true);
                assert!(
                    g.iter().zip(&want).all(|(p, q)| p == q),
                    "rows c={c} shift={shift}"
                );
            }
        }
    }
}
