//! Backward kernels on the pure-Rust API: finite differences of the forward, layouts (every
//! access path, run with debug assertions here), threads and the exact edge cases.

mod common;

use common::*;
use ndarray::{ArrayD, IxDyn};
use rsnorm::{
    batch_norm, batch_norm_backward, group_norm, group_norm_backward, instance_norm_backward,
    layer_norm, layer_norm_backward, rms_norm_backward, BatchNormBackwardParams, BatchNormParams,
    InstanceNormBackwardParams, ParamGrads,
};

/// Σ gy·f(x) for the central differences.
fn dot(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    a.iter().zip(b.iter()).map(|(u, v)| u * v).sum()
}

fn numeric_dx<F: Fn(&ArrayD<f64>) -> ArrayD<f64>>(
    x: &ArrayD<f64>,
    gy: &ArrayD<f64>,
    f: F,
) -> ArrayD<f64> {
    let h = 1e-6;
    let mut g = ArrayD::<f64>::zeros(x.shape());
    let mut xp = x.clone();
    for i in 0..x.len() {
        let v = xp.as_slice().unwrap()[i];
        xp.as_slice_mut().unwrap()[i] = v + h;
        let p = dot(&f(&xp), gy);
        xp.as_slice_mut().unwrap()[i] = v - h;
        let m = dot(&f(&xp), gy);
        xp.as_slice_mut().unwrap()[i] = v;
        g.as_slice_mut().unwrap()[i] = (p - m) / (2.0 * h);
    }
    g
}

fn close(a: &ArrayD<f64>, b: &ArrayD<f64>) {
    for (u, v) in a.iter().zip(b.iter()) {
        assert!((u - v).abs() <= 1e-5 + 1e-3 * v.abs(), "{u} vs {v}");
    }
}

#[test]
fn batch_norm_training_matches_finite_differences() {
    let x = random(&[3, 4, 5], 1, 0.5);
    let gy = random(&[3, 4, 5], 2, 0.0);
    let w = [0.5, 1.5, -2.0, 1.0];
    let fwd = |x: &ArrayD<f64>| {
        let mut y = ArrayD::<f64>::zeros(x.shape());
        let p = BatchNormParams {
            weight: Some(&w),
            training: true,
            momentum: Some(0.1),
            eps: 1e-5,
            axis: 1,
            ..Default::default()
        };
        batch_norm(x.view(), y.view_mut(), &p).unwrap();
        y
    };
    let mut dx = ArrayD::<f64>::zeros(x.shape());
    let p = BatchNormBackwardParams {
        weight: Some(&w),
        training: true,
        eps: 1e-5,
        axis: 1,
        ..Default::default()
    };
    let g = batch_norm_backward(gy.view(), x.view(), dx.view_mut(), &p).unwrap();
    close(&dx, &numeric_dx(&x, &gy, fwd));
    assert!(g.bias.is_none() && g.weight.is_some());
}

#[test]
fn layer_and_group_norm_match_finite_differences() {
    let x = random(&[3, 4, 6], 3, -1.0);
    let gy = random(&[3, 4, 6], 4, 0.0);
    let mut dx = ArrayD::<f64>::zeros(x.shape());
    layer_norm_backward(
        gy.view(),
        x.view(),
        dx.view_mut(),
        &[4, 6],
        None,
        None,
        1e-5,
        None,
    )
    .unwrap();
    close(
        &dx,
        &numeric_dx(&x, &gy, |x| {
            let mut y = ArrayD::<f64>::zeros(x.shape());
            layer_norm(x.view(), y.view_mut(), &[4, 6], None, None, 1e-5).unwrap();
            y
        }),
    );
    group_norm_backward(
        gy.view(),
        x.view(),
        dx.view_mut(),
        2,
        None,
        None,
        1e-5,
        1,
        None,
    )
    .unwrap();
    close(
        &dx,
        &numeric_dx(&x, &gy, |x| {
            let mut y = ArrayD::<f64>::zeros(x.shape());
            group_norm(x.view(), y.view_mut(), 2, None, None, 1e-5, 1).unwrap();
            y
        }),
    );
}

/// All five backwards of one input, for bitwise comparisons.
fn all(
    x: ndarray::ArrayViewD<'_, f32>,
    gy: ndarray::ArrayViewD<'_, f32>,
    axis: isize,
) -> Vec<Vec<f32>> {
    let c = x.shape()[if axis == 1 { 1 } else { x.ndim() - 1 }];
    let w: Vec<f64> = (0..c).map(|k| 0.5 + k as f64 / c as f64).collect();
    let f = x.shape()[x.ndim() - 1];
    let wl: Vec<f64> = (0..f).map(|k| 0.5 + k as f64 / f as f64).collect();
    let mut out = Vec::new();
    let mut push = |dx: ArrayD<f32>, g: ParamGrads| {
        out.push(dx.iter().copied().collect());
        for v in [g.weight, g.bias].into_iter().flatten() {
            out.push(v.iter().map(|&u| u as f32).collect());
        }
    };
    let mut dx = ArrayD::<f32>::zeros(x.shape());
    let p = BatchNormBackwardParams {
        weight: Some(&w),
        bias: Some(&w),
        training: true,
        eps: 1e-5,
        axis,
        ..Default::default()
    };
    let g = batch_norm_backward(gy.view(), x.view(), dx.view_mut(), &p).unwrap();
    push(dx.clone(), g);
    let g = group_norm_backward(
        gy.view(),
        x.view(),
        dx.view_mut(),
        2,
        Some(&w),
        Some(&w),
        1e-5,
        axis,
        None,
    )
    .unwrap();
    push(dx.clone(), g);
    let p = InstanceNormBackwardParams {
        weight: Some(&w),
        bias: Some(&w),
        use_input_stats: true,
        momentum: 0.1,
        eps: 1e-5,
        axis,
        ..Default::default()
    };
    let g = instance_norm_backward(gy.view(), x.view(), dx.view_mut(), &p).unwrap();
    push(dx.clone(), g);
    let k = [f];
    let g = layer_norm_backward(
        gy.view(),
        x.view(),
        dx.view_mut(),
        &k,
        Some((&wl, &k)),
        Some((&wl, &k)),
        1e-5,
        None,
    )
    .unwrap();
    push(dx.clone(), g);
    let g = rms_norm_backward(
        gy.view(),
        x.view(),
        dx.view_mut(),
        &k,
        Some((&wl, &k)),
        None,
        None,
    )
    .unwrap();
    push(dx.clone(), g);
    out
}

#[test]
fn bitwise_across_layouts_and_threads() {
    let x: ArrayD<f32> = random(&[6, 4, 5, 7], 5, 3.0).mapv(|v| v as f32);
    let gy: ArrayD<f32> = random(&[6, 4, 5, 7], 6, 0.0).mapv(|v| v as f32);
    let base = all(x.view(), gy.view(), 1);
    // Channels-last memory, NCHW logical shape (Rows access).
    let perm = |a: &ArrayD<f32>| {
        a.view()
            .permuted_axes(IxDyn(&[0, 2, 3, 1]))
            .as_standard_layout()
            .into_owned()
    };
    let (xl, gl) = (perm(&x), perm(&gy));
    let xv = xl.view().permuted_axes(IxDyn(&[0, 3, 1, 2]));
    let gv = gl.view().permuted_axes(IxDyn(&[0, 3, 1, 2]));
    assert_eq!(base, all(xv, gv, 1));
    // Fortran order (Strided access).
    let xf = x.t().as_standard_layout().into_owned();
    let gf = gy.t().as_standard_layout().into_owned();
    assert_eq!(base, all(xf.t(), gf.t(), 1));
    for t in [1, 2, 3] {
        rsnorm::set_num_threads(t);
        assert_eq!(base, all(x.view(), gy.view(), 1));
    }
    rsnorm::set_num_threads(0);
}

#[test]
fn one_element_per_group_is_exact() {
    let x = random(&[5, 6], 7, 0.0);
    let gy = random(&[5, 6], 8, 0.0);
    let w = [1.5; 6];
    let mut dx = ArrayD::<f64>::zeros(x.shape());
    let g = group_norm_backward(
        gy.view(),
        x.view(),
        dx.view_mut(),
        6,
        Some(&w),
        None,
        1e-5,
        1,
        None,
    )
    .unwrap();
    assert!(dx.iter().all(|&v| v == 0.0));
    assert!(g.weight.unwrap().iter().all(|&v| v == 0.0));
    let x1 = random(&[5, 1], 9, 0.0);
    let g1 = random(&[5, 1], 10, 0.0);
    let mut dx1 = ArrayD::<f64>::zeros(x1.shape());
    let w1 = [2.0];
    let g = layer_norm_backward(
        g1.view(),
        x1.view(),
        dx1.view_mut(),
        &[1],
        Some((&w1, &[1])),
        Some((&w1, &[1])),
        1e-5,
        None,
    )
    .unwrap();
    assert!(dx1.iter().all(|&v| v == 0.0));
    assert_eq!(g.weight.unwrap(), vec![0.0]);
    let s: f64 = g1.iter().sum();
    assert!((g.bias.unwrap()[0] - s).abs() < 1e-12);
}
