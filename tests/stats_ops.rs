//! The statistics family against the naive f64 references of `common`, plus the layout,
//! thread-count and numerics guarantees, on the pure-Rust API (no Python).

mod common;

use common::*;
use ndarray::{Array, ArrayD, Axis, IxDyn};
use rsnorm::{
    batch_norm, group_norm, instance_norm, layer_norm, moments, rms_norm, BatchNormParams,
    InstanceNormParams, Moments, NormError,
};

fn bn_train(x: ndarray::ArrayViewD<'_, f32>, axis: isize) -> ArrayD<f32> {
    let mut y = ArrayD::<f32>::zeros(x.shape());
    let p = BatchNormParams {
        training: true,
        momentum: Some(0.1),
        eps: 1e-5,
        axis,
        ..Default::default()
    };
    batch_norm(x, y.view_mut(), &p).unwrap();
    y
}

#[test]
fn batch_norm_matches_reference_nchw_and_nhwc() {
    let x = random(&[4, 3, 5, 6], 1, 0.0);
    let w = [0.5, 1.5, -2.0];
    let b = [0.1, 0.2, 0.3];
    let mut y = ArrayD::<f64>::zeros(x.shape());
    let p = BatchNormParams {
        weight: Some(&w),
        bias: Some(&b),
        training: true,
        momentum: Some(0.1),
        eps: 1e-5,
        axis: 1,
        ..Default::default()
    };
    batch_norm(x.view(), y.view_mut(), &p).unwrap();
    assert!(max_abs_diff(&y, &batch_norm_ref(&x, 1, Some(&w), Some(&b), 1e-5)) < 1e-12);

    // Channels-last copy with axis = -1.
    let xl = x
        .view()
        .permuted_axes(IxDyn(&[0, 2, 3, 1]))
        .as_standard_layout()
        .into_owned();
    let mut yl = ArrayD::<f64>::zeros(xl.shape());
    let p = BatchNormParams { axis: -1, ..p };
    batch_norm(xl.view(), yl.view_mut(), &p).unwrap();
    assert!(max_abs_diff(&yl, &batch_norm_ref(&xl, 3, Some(&w), Some(&b), 1e-5)) < 1e-12);
}

#[test]
fn running_stats_update_uses_unbiased_variance() {
    let x = random(&[8, 2, 3], 2, 1.0);
    let rm = [0.0, 1.0];
    let rv = [1.0, 2.0];
    let mut y = ArrayD::<f64>::zeros(x.shape());
    let p = BatchNormParams {
        running_mean: Some(&rm),
        running_var: Some(&rv),
        training: true,
        momentum: Some(0.25),
        eps: 1e-5,
        axis: 1,
        ..Default::default()
    };
    let r = batch_norm(x.view(), y.view_mut(), &p).unwrap();
    let (nm, nv) = r.running.unwrap();
    for c in 0..2 {
        let v: Vec<f64> = x.index_axis(Axis(1), c).iter().copied().collect();
        let (m, var) = mean_var(&v);
        let n = v.len() as f64;
        assert!((nm[c] - (0.75 * rm[c] + 0.25 * m)).abs() < 1e-14);
        assert!((nv[c] - (0.75 * rv[c] + 0.25 * var * n / (n - 1.0))).abs() < 1e-14);
    }
}

#[test]
fn one_value_per_channel_in_training_is_an_error() {
    let x = ArrayD::<f32>::zeros(IxDyn(&[1, 3]));
    let mut y = ArrayD::<f32>::zeros(IxDyn(&[1, 3]));
    let p = BatchNormParams {
        training: true,
        momentum: Some(0.1),
        eps: 1e-5,
        axis: 1,
        ..Default::default()
    };
    let e = batch_norm(x.view(), y.view_mut(), &p).unwrap_err();
    assert!(
        matches!(e, NormError::TooFewValues(ref m) if m.contains("Expected more than 1 value per channel"))
    );
}

#[test]
fn strided_views_are_bitwise_equal_to_contiguous_copies() {
    let base = random(&[6, 4, 7, 5], 3, 3.0).mapv(|v| v as f32);
    // Channels-last view of an NCHW buffer, and a reversed, sliced view.
    let views = [
        base.view().permuted_axes(IxDyn(&[0, 2, 3, 1])),
        base.slice_each_axis(|ax| {
            if ax.axis.index() == 2 {
                ndarray::Slice::new(0, None, -2)
            } else {
                ndarray::Slice::from(..)
            }
        })
        .into_dyn(),
    ];
    for (i, v) in views.iter().enumerate() {
        let axis = if i == 0 { -1 } else { 1 };
        let contiguous = v.as_standard_layout().into_owned();
        assert_eq!(bn_train(v.view(), axis), bn_train(contiguous.view(), axis));
        let mut y1 = ArrayD::<f32>::zeros(v.shape());
        let mut y2 = ArrayD::<f32>::zeros(v.shape());
        layer_norm(v.view(), y1.view_mut(), &v.shape()[2..], None, None, 1e-5).unwrap();
        layer_norm(
            contiguous.view(),
            y2.view_mut(),
            &v.shape()[2..],
            None,
            None,
            1e-5,
        )
        .unwrap();
        assert_eq!(y1, y2);
        group_norm(v.view(), y1.view_mut(), 2, None, None, 1e-5, axis).unwrap();
        group_norm(contiguous.view(), y2.view_mut(), 2, None, None, 1e-5, axis).unwrap();
        assert_eq!(y1, y2);
    }
}

#[test]
fn thread_count_does_not_change_a_bit() {
    // Large enough to take the parallel path.
    let x = random(&[16, 32, 24, 24], 4, 1e4).mapv(|v| v as f32);
    let run = |threads| {
        rsnorm::set_num_threads(threads);
        let a = bn_train(x.view(), 1);
        let mut b = ArrayD::<f32>::zeros(x.shape());
        layer_norm(x.view(), b.view_mut(), &[24, 24], None, None, 1e-5).unwrap();
        let mut c = ArrayD::<f32>::zeros(x.shape());
        group_norm(x.view(), c.view_mut(), 8, None, None, 1e-5, 1).unwrap();
        (a, b, c)
    };
    let one = run(1);
    let two = run(2);
    let three = run(3);
    rsnorm::set_num_threads(0);
    assert_eq!(one, two);
    assert_eq!(one, three);
}

#[test]
fn large_offset_is_exact_to_f32_rounding() {
    // 1e4 + noise in f32: the f64 reference on the same f32 values, within 2 ulp.
    let x = random(&[4, 1000], 5, 1e4).mapv(|v| v as f32);
    let mut y = ArrayD::<f32>::zeros(x.shape());
    layer_norm(x.view(), y.view_mut(), &[1000], None, None, 1e-5).unwrap();
    let r = layer_norm_ref(&x.mapv(|v| v as f64), 1, 1e-5);
    for (a, b) in y.iter().zip(r.iter()) {
        let ulp = (*b as f32).abs() * f32::EPSILON;
        assert!(
            ((*a as f64) - b).abs() <= 2.0 * ulp as f64 + 1e-30,
            "{a} vs {b}"
        );
    }
}

#[test]
fn constant_rows_give_exact_zero_even_at_3e38() {
    let x = Array::from_elem(IxDyn(&[2, 64]), 3.3e38f32);
    let mut y = ArrayD::<f32>::ones(x.shape());
    layer_norm(x.view(), y.view_mut(), &[64], None, None, 1e-5).unwrap();
    assert!(y.iter().all(|&v| v == 0.0));
}

#[test]
fn rms_norm_of_huge_values() {
    for v in [1e20f32, 3e38] {
        let x = Array::from_shape_vec(IxDyn(&[1, 4]), vec![v, -v, v / 2.0, 0.0]).unwrap();
        let mut y = ArrayD::<f32>::zeros(x.shape());
        rms_norm(x.view(), y.view_mut(), &[4], None, None).unwrap();
        let r = rms_norm_ref(&x.mapv(|t| t as f64), f32::EPSILON as f64);
        assert!(max_abs_diff(&y.mapv(|t| t as f64), &r) < 1e-6, "{y:?}");
    }
}

#[test]
fn group_and_instance_norm_match_references() {
    let x = random(&[3, 6, 4, 5], 6, -2.0);
    let mut y = ArrayD::<f64>::zeros(x.shape());
    group_norm(x.view(), y.view_mut(), 3, None, None, 1e-5, 1).unwrap();
    assert!(max_abs_diff(&y, &group_norm_ref(&x, 3, 1e-5)) < 1e-12);
    let p = InstanceNormParams {
        use_input_stats: true,
        momentum: 0.1,
        eps: 1e-5,
        axis: 1,
        ..Default::default()
    };
    instance_norm(x.view(), y.view_mut(), &p).unwrap();
    assert!(max_abs_diff(&y, &group_norm_ref(&x, 6, 1e-5)) < 1e-12);
    assert!(group_norm(x.view(), y.view_mut(), 4, None, None, 1e-5, 1).is_err());
}

#[test]
fn nan_stays_in_its_group() {
    let mut x = random(&[4, 8], 7, 0.0);
    let clean = {
        let mut y = ArrayD::<f64>::zeros(x.shape());
        layer_norm(x.view(), y.view_mut(), &[8], None, None, 1e-5).unwrap();
        y
    };
    x[[1, 3]] = f64::NAN;
    let mut y = ArrayD::<f64>::zeros(x.shape());
    layer_norm(x.view(), y.view_mut(), &[8], None, None, 1e-5).unwrap();
    assert!(y.index_axis(Axis(0), 1).iter().all(|v| v.is_nan()));
    for r in [0, 2, 3] {
        assert_eq!(y.index_axis(Axis(0), r), clean.index_axis(Axis(0), r));
    }
}

#[test]
fn moments_merge_of_uneven_split_equals_whole() {
    let x = random(&[17, 3, 4], 8, 5.0);
    let whole = moments(x.view(), 1).unwrap();
    let parts: Vec<Moments> = [0..2, 2..11, 11..17]
        .iter()
        .map(|r| moments(x.slice_axis(Axis(0), r.clone().into()), 1).unwrap())
        .collect();
    let merged = Moments::merge(&parts).unwrap();
    assert_eq!(merged.count, whole.count);
    for c in 0..3 {
        assert!((merged.mean[c] - whole.mean[c]).abs() < 1e-13);
        assert!((merged.m2[c] - whole.m2[c]).abs() < 1e-10 * whole.m2[c]);
    }
}

#[test]
fn empty_inputs_give_empty_outputs() {
    let x = ArrayD::<f32>::zeros(IxDyn(&[0, 3, 4]));
    let mut y = ArrayD::<f32>::zeros(IxDyn(&[0, 3, 4]));
    let p = BatchNormParams {
        training: true,
        momentum: Some(0.1),
        eps: 1e-5,
        axis: 1,
        ..Default::default()
    };
    let r = batch_norm(x.view(), y.view_mut(), &p).unwrap();
    assert!(r.stats.mean.iter().all(|m| m.is_nan()));
    let st = layer_norm(x.view(), y.view_mut(), &[4], None, None, 1e-5).unwrap();
    assert!(st.mean.is_empty());
}
