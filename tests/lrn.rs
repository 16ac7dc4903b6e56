//! Local response norm and Lp normalize on the pure-Rust API against naive f64 loops.

mod common;

use common::*;
use ndarray::{ArrayD, Axis};
use rsnorm::{local_response_norm, local_response_norm_backward, normalize, LrnParams, LrnWindow};

/// (N, C, S) reference with an explicit window [c − lo, c + hi].
fn lrn_ref(
    x: &ArrayD<f64>,
    size: usize,
    lo: usize,
    hi: usize,
    a: f64,
    b: f64,
    k: f64,
) -> ArrayD<f64> {
    let c = x.shape()[1];
    let mut y = x.clone();
    for n in 0..x.shape()[0] {
        for ch in 0..c {
            for s in 0..x.shape()[2] {
                let mut sum = 0.0;
                for j in ch.saturating_sub(lo)..=(ch + hi).min(c - 1) {
                    sum += x[[n, j, s]] * x[[n, j, s]];
                }
                y[[n, ch, s]] = x[[n, ch, s]] / (k + a / size as f64 * sum).powf(b);
            }
        }
    }
    y
}

#[test]
fn lrn_matches_reference_for_both_windows() {
    let x = random(&[3, 7, 5], 11, 0.0);
    for size in 1..10usize {
        for (window, lo, hi) in [
            (LrnWindow::Torch, size / 2, (size - 1) / 2),
            (LrnWindow::Onnx, (size - 1) / 2, size / 2),
        ] {
            let p = LrnParams {
                size: size as i64,
                alpha: 0.7,
                beta: 0.75,
                k: 1.3,
                window,
                ..Default::default()
            };
            let mut y = ArrayD::<f64>::zeros(x.shape());
            local_response_norm(x.view(), y.view_mut(), &p).unwrap();
            let want = lrn_ref(&x, size, lo, hi, 0.7, 0.75, 1.3);
            assert!(max_abs_diff(&y, &want) < 1e-14, "size {size} {window:?}");
        }
    }
}

#[test]
fn lrn_channels_last_is_bitwise_channels_first() {
    let x = random(&[2, 6, 4, 3], 5, 0.0).mapv(|v| v as f32);
    let p = LrnParams {
        size: 4,
        alpha: 0.5,
        ..Default::default()
    };
    let mut y = ArrayD::<f32>::zeros(x.shape());
    local_response_norm(x.view(), y.view_mut(), &p).unwrap();
    // The same values stored channels-last, viewed back as (N, C, H, W).
    let mut xl = x.view().permuted_axes(vec![0, 2, 3, 1]).to_owned();
    xl = xl.as_standard_layout().to_owned();
    let xv = xl.view().permuted_axes(vec![0, 3, 1, 2]);
    let mut y2 = ArrayD::<f32>::zeros(x.shape());
    local_response_norm(xv.into_dyn(), y2.view_mut(), &p).unwrap();
    assert!(y
        .iter()
        .zip(y2.iter())
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn lrn_rejects_bad_parameters() {
    let x = random(&[2, 3, 4], 1, 0.0);
    let mut y = ArrayD::<f64>::zeros(x.shape());
    for size in [0, -3] {
        let p = LrnParams {
            size,
            ..Default::default()
        };
        assert!(local_response_norm(x.view(), y.view_mut(), &p).is_err());
    }
    let x2 = random(&[2, 3], 1, 0.0);
    let mut y2 = ArrayD::<f64>::zeros(x2.shape());
    assert!(local_response_norm(x2.view(), y2.view_mut(), &LrnParams::default()).is_err());
}

#[test]
fn lrn_backward_matches_finite_differences() {
    let x = random(&[2, 5, 3], 3, 0.0);
    let g = random(&[2, 5, 3], 4, 0.0);
    let p = LrnParams {
        size: 4,
        alpha: 0.9,
        beta: 0.75,
        k: 1.1,
        window: LrnWindow::Onnx,
        ..Default::default()
    };
    let loss = |x: &ArrayD<f64>| {
        let mut y = ArrayD::<f64>::zeros(x.shape());
        local_response_norm(x.view(), y.view_mut(), &p).unwrap();
        (&y * &g).sum()
    };
    let mut dx = ArrayD::<f64>::zeros(x.shape());
    local_response_norm_backward(g.view(), x.view(), dx.view_mut(), &p).unwrap();
    let h = 1e-6;
    for i in 0..x.len() {
        let (mut a, mut b) = (x.clone(), x.clone());
        a.as_slice_mut().unwrap()[i] += h;
        b.as_slice_mut().unwrap()[i] -= h;
        let num = (loss(&a) - loss(&b)) / (2.0 * h);
        let got = dx.as_slice().unwrap()[i];
        assert!(
            (got - num).abs() <= 1e-5 + 1e-3 * num.abs(),
            "{i}: {got} vs {num}"
        );
    }
}

#[test]
fn normalize_matches_reference_on_any_axis() {
    let x = random(&[3, 4, 5], 9, 0.0);
    for axis in 0..3 {
        let mut y = ArrayD::<f64>::zeros(x.shape());
        normalize(x.view(), y.view_mut(), 2.0, axis as isize, 1e-12).unwrap();
        let norms = x.mapv(|v| v * v).sum_axis(Axis(axis)).mapv(f64::sqrt);
        let want = &x / &norms.insert_axis(Axis(axis));
        assert!(max_abs_diff(&y, &want) < 1e-15);
    }
}
