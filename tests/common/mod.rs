//! Naive f64 references shared by the Rust integration tests: written plainly, one formula per
//! op, two-pass statistics over f64 copies of the values.
#![allow(dead_code)]

pub mod streaming;

use ndarray::{Array, ArrayD, Axis, IxDyn};
use rand::{Rng, SeedableRng};

pub fn random(shape: &[usize], seed: u64, offset: f64) -> ArrayD<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Array::from_shape_fn(IxDyn(shape), |_| offset + rng.gen_range(-1.0..1.0) * 2.0)
}

pub fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
    (m, var)
}

/// Batch norm with batch statistics over every axis but `axis`.
pub fn batch_norm_ref(
    x: &ArrayD<f64>,
    axis: usize,
    w: Option<&[f64]>,
    b: Option<&[f64]>,
    eps: f64,
) -> ArrayD<f64> {
    let mut y = x.clone();
    for c in 0..x.shape()[axis] {
        let v: Vec<f64> = x.index_axis(Axis(axis), c).iter().copied().collect();
        let (m, var) = mean_var(&v);
        let a = 1.0 / (var + eps).sqrt() * w.map_or(1.0, |w| w[c]);
        let bb = b.map_or(0.0, |b| b[c]);
        y.index_axis_mut(Axis(axis), c)
            .mapv_inplace(|t| (t - m) * a + bb);
    }
    y
}

/// Layer norm over the last `k` dims (no affine).
pub fn layer_norm_ref(x: &ArrayD<f64>, k: usize, eps: f64) -> ArrayD<f64> {
    let f: usize = x.shape()[x.ndim() - k..].iter().product();
    let flat: Vec<f64> = x.iter().copied().collect();
    let mut out = Vec::with_capacity(flat.len());
    for row in flat.chunks(f) {
        let (m, var) = mean_var(row);
        out.extend(row.iter().map(|t| (t - m) / (var + eps).sqrt()));
    }
    Array::from_shape_vec(IxDyn(x.shape()), out).unwrap()
}

/// RMS norm over the last dim.
pub fn rms_norm_ref(x: &ArrayD<f64>, eps: f64) -> ArrayD<f64> {
    let f = *x.shape().last().unwrap();
    let flat: Vec<f64> = x.iter().copied().collect();
    let mut out = Vec::with_capacity(flat.len());
    for row in flat.chunks(f) {
        let ms = row.iter().map(|t| t * t).sum::<f64>() / f as f64;
        out.extend(row.iter().map(|t| t / (ms + eps).sqrt()));
    }
    Array::from_shape_vec(IxDyn(x.shape()), out).unwrap()
}

/// Group norm of an NCHW-like array (channel axis 1).
pub fn group_norm_ref(x: &ArrayD<f64>, g: usize, eps: f64) -> ArrayD<f64> {
    let n = x.shape()[0];
    let per: usize = x.len() / n;
    let flat: Vec<f64> = x.iter().copied().collect();
    let mut out = Vec::with_capacity(flat.len());
    for sample in flat.chunks(per) {
        for grp in sample.chunks(per / g) {
            let (m, var) = mean_var(grp);
            out.extend(grp.iter().map(|t| (t - m) / (var + eps).sqrt()));
        }
    }
    Array::from_shape_vec(IxDyn(x.shape()), out).unwrap()
}

pub fn max_abs_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
