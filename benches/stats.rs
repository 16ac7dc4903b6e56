//! Criterion benches of the statistics family (f32), each next to a same-size parallel copy:
//! the memory-bound ceiling. `Throughput::Bytes` = input read once + output written once, so
//! the report reads as GB/s comparable to the copy's.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use rsnorm::{
    batch_norm, group_norm, layer_norm, layer_norm_backward, rms_norm, rms_norm_backward,
    BatchNormParams,
};

fn input(shape: &[usize]) -> ArrayD<f32> {
    let mut s = 1u32;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    })
}

fn bench(c: &mut Criterion) {
    let cases: [(&str, Vec<usize>); 4] = [
        ("batch_norm_nchw", vec![32, 64, 56, 56]),
        ("batch_norm_nhwc", vec![32, 56, 56, 64]),
        ("layer_norm", vec![8192, 1024]),
        ("group_norm", vec![16, 256, 32, 32]),
    ];
    let mut g = c.benchmark_group("stats_f32");
    g.sample_size(10);
    for (name, shape) in cases.iter() {
        let x = input(shape);
        let mut y = ArrayD::<f32>::zeros(x.shape());
        g.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
        g.bench_function(BenchmarkId::new("copy", name), |b| {
            b.iter(|| {
                let (xs, ys) = (x.as_slice().unwrap(), y.as_slice_mut().unwrap());
                ys.par_chunks_mut(1 << 16)
                    .zip(xs.par_chunks(1 << 16))
                    .for_each(|(o, i)| o.copy_from_slice(i));
            })
        });
        g.bench_function(BenchmarkId::new("rsnorm", name), |b| {
            b.iter(|| match *name {
                "batch_norm_nchw" | "batch_norm_nhwc" => {
                    let axis = if *name == "batch_norm_nchw" { 1 } else { -1 };
                    let p = BatchNormParams {
                        training: true,
                        momentum: Some(0.1),
                        eps: 1e-5,
                        axis,
                        ..Default::default()
                    };
                    batch_norm(x.view(), y.view_mut(), &p).map(|_| ()).unwrap()
                }
                "layer_norm" => layer_norm(x.view(), y.view_mut(), &[1024], None, None, 1e-5)
                    .map(|_| ())
                    .unwrap(),
                _ => group_norm(x.view(), y.view_mut(), 32, None, None, 1e-5, 1)
                    .map(|_| ())
                    .unwrap(),
            })
        });
        if *name == "layer_norm" {
            g.bench_function(BenchmarkId::new("rsnorm", "rms_norm"), |b| {
                b.iter(|| {
                    rms_norm(x.view(), y.view_mut(), &[1024], None, None)
                        .map(|_| ())
                        .unwrap()
                })
            });
        }
    }
    g.finish();

    // Row backward with weight and bias (dweight, dbias returned): reads x and dy, writes dx.
    let x = input(&[8192, 1024]);
    let dy = input(&[8192, 1024]);
    let mut dx = ArrayD::<f32>::zeros(x.shape());
    let w: Vec<f64> = (0..1024).map(|j| 0.5 + j as f64 / 1024.0).collect();
    let mut g = c.benchmark_group("backward_f32");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((3 * x.len() * 4) as u64));
    g.bench_function(BenchmarkId::new("rsnorm", "layer_norm_backward"), |b| {
        b.iter(|| {
            let p = Some((&w[..], &[1024usize][..]));
            layer_norm_backward(
                dy.view(),
                x.view(),
                dx.view_mut(),
                &[1024],
                p,
                p,
                1e-5,
                None,
            )
            .map(|_| ())
            .unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("rsnorm", "rms_norm_backward"), |b| {
        b.iter(|| {
            let p = Some((&w[..], &[1024usize][..]));
            rms_norm_backward(dy.view(), x.view(), dx.view_mut(), &[1024], p, None, None)
                .map(|_| ())
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
