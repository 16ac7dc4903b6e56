//! Property tests of the core kernels (issue 7, HOSTILE 14/19/33): on arbitrary shapes (0- and
//! 1-sized dims included), strides (Fortran order, steps of 2, negative steps, permuted axes,
//! broadcast zero strides) and axes, every kernel
//!
//! * never panics, and fails on a strided view exactly when it fails on the contiguous copy;
//! * gives bitwise the result of the contiguous copy;
//! * matches a naive float64 reference (two-pass statistics per normalization group).
//!
//! `PROPTEST_CASES` sets the number of cases per property (default 256; the long local run
//! used 200 000 per property). Self-contained (no `mod common`), so it builds wherever Cargo.toml points.

use ndarray::{ArrayD, ArrayView, Axis, IxDyn, ShapeBuilder, Slice};
use proptest::prelude::*;
use rsnorm::{
    batch_norm, group_norm, instance_norm, layer_norm, moments, rms_norm, BatchNormParams,
    InstanceNormParams, MomentumConvention, Scalar,
};

/// Two-pass mean and biased variance in f64.
fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n)
}

#[derive(Clone, Debug)]
struct Input {
    shape: Vec<usize>,
    layout: u8,
    layout_axis: usize,
    perm_seed: u64,
    seed: u64,
    offset: f64,
}

fn input(min_rank: usize, max_rank: usize) -> impl Strategy<Value = Input> {
    (
        prop::collection::vec(0usize..=5, min_rank..=max_rank),
        0u8..6,
        any::<usize>(),
        any::<u64>(),
        any::<u64>(),
        prop::sample::select(vec![0.0, 0.0, 3.0, -100.0, 1e4]),
    )
        .prop_map(|(shape, layout, a, perm_seed, seed, offset)| Input {
            layout_axis: a % shape.len(),
            shape,
            layout,
            perm_seed,
            seed,
            offset,
        })
}

/// Deterministic values (a 64-bit LCG), `offset + U(-2, 2)`.
fn values(n: usize, seed: u64, offset: f64) -> Vec<f64> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            offset + ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
        })
        .collect()
}

fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut s = seed;
    for i in (1..n).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        p.swap(i, (s >> 33) as usize % (i + 1));
    }
    p
}

/// Calls `f` with a view of `inp.shape` in the drawn layout.
fn with_view<T: Scalar, R>(inp: &Input, f: impl FnOnce(ArrayView<'_, T, IxDyn>) -> R) -> R {
    let shape = &inp.shape;
    let ax = inp.layout_axis;
    let n: usize = shape.iter().product();
    let conv = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
    match inp.layout {
        1 => {
            let a = ArrayD::from_shape_vec(IxDyn(shape).f(), conv(values(n, inp.seed, inp.offset)))
                .unwrap();
            f(a.view())
        }
        2 => {
            let mut big = shape.clone();
            big[ax] *= 2;
            let m: usize = big.iter().product();
            let a =
                ArrayD::from_shape_vec(IxDyn(&big), conv(values(m, inp.seed, inp.offset))).unwrap();
            f(a.slice_axis(Axis(ax), Slice::new(0, None, 2)))
        }
        3 => {
            let a = ArrayD::from_shape_vec(IxDyn(shape), conv(values(n, inp.seed, inp.offset)))
                .unwrap();
            f(a.slice_axis(Axis(ax), Slice::new(0, None, -1)))
        }
        4 => {
            let perm = permutation(shape.len(), inp.perm_seed);
            let pshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let a = ArrayD::from_shape_vec(IxDyn(&pshape), conv(values(n, inp.seed, inp.offset)))
                .unwrap();
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            f(a.view().permuted_axes(IxDyn(&inv)))
        }
        5 => {
            let mut one = shape.clone();
            one[ax] = 1;
            let m: usize = one.iter().product();
            let a =
                ArrayD::from_shape_vec(IxDyn(&one), conv(values(m, inp.seed, inp.offset))).unwrap();
            let v = a.view();
            f(v.broadcast(IxDyn(shape)).unwrap())
        }
        _ => {
            let a = ArrayD::from_shape_vec(IxDyn(shape), conv(values(n, inp.seed, inp.offset)))
                .unwrap();
            f(a.view())
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Batch { axis: isize, training: bool },
    Layer { k: usize },
    Rms { k: usize },
    Group { groups: i64, axis: isize },
    Instance { axis: isize },
}

/// Runs `op` on `x` into a fresh output; returns y as f64 bits (None on a clean error).
fn run<T: Scalar>(op: Op, x: ArrayView<'_, T, IxDyn>, eps: f64) -> Option<Vec<u64>> {
    let mut y = ArrayD::<T>::from_elem(IxDyn(x.shape()), T::from_f64(f64::NAN));
    let nd = x.ndim();
    let ok = match op {
        Op::Batch { axis, training } => {
            let p = BatchNormParams {
                training,
                momentum: Some(0.1),
                eps,
                axis,
                convention: MomentumConvention::Torch,
                ..Default::default()
            };
            batch_norm(x, y.view_mut(), &p).is_ok()
        }
        Op::Layer { k } => {
            let ns = x.shape()[nd - k..].to_vec();
            layer_norm(x, y.view_mut(), &ns, None, None, eps).is_ok()
        }
        Op::Rms { k } => {
            let ns = x.shape()[nd - k..].to_vec();
            rms_norm(x, y.view_mut(), &ns, None, Some(eps)).is_ok()
        }
        Op::Group { groups, axis } => {
            group_norm(x, y.view_mut(), groups, None, None, eps, axis).is_ok()
        }
        Op::Instance { axis } => {
            let p = InstanceNormParams {
                use_input_stats: true,
                momentum: 0.1,
                eps,
                axis,
                ..Default::default()
            };
            instance_norm(x, y.view_mut(), &p).is_ok()
        }
    };
    ok.then(|| y.iter().map(|v| v.to_f64().to_bits()).collect())
}

/// Normalization group of each element (row-major order) and whether the mean is subtracted.
fn groups_of(op: Op, shape: &[usize]) -> (Vec<usize>, bool) {
    let nd = shape.len();
    let n: usize = shape.iter().product();
    let norm = |a: isize| (if a < 0 { a + nd as isize } else { a }) as usize;
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; nd];
    for _ in 0..n {
        let g = match op {
            Op::Batch { axis, .. } => idx[norm(axis)],
            Op::Layer { k } | Op::Rms { k } => idx[..nd - k]
                .iter()
                .zip(&shape[..nd - k])
                .fold(0, |acc, (&i, &s)| acc * s + i),
            Op::Group { groups, axis } => {
                let a = norm(axis);
                let per = shape[a] / groups as usize;
                idx[0] * groups as usize + idx[a] / per
            }
            Op::Instance { axis } => {
                let a = norm(axis);
                idx[0] * shape[a] + idx[a]
            }
        };
        out.push(g);
        for d in (0..nd).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    (out, !matches!(op, Op::Rms { .. }))
}

/// y per element, and the rounding any f64 two-pass formula makes there: a sum of n values
/// knows the mean to about n ulps of the group's largest |x| (the reference sums naively),
/// scaled by rstd; it matters for large offsets and tiny spreads.
fn reference(op: Op, x: &[f64], shape: &[usize], eps: f64) -> Vec<(f64, f64)> {
    let (groups, center) = groups_of(op, shape);
    let ng = groups.iter().copied().max().map_or(0, |m| m + 1);
    let mut members = vec![Vec::new(); ng];
    for (i, &g) in groups.iter().enumerate() {
        members[g].push(x[i]);
    }
    let stats: Vec<(f64, f64, f64)> = members
        .iter()
        .map(|v| {
            let big = v.iter().fold(0.0f64, |a, t| a.max(t.abs())) * (8 + v.len()) as f64;
            if center {
                let (m, var) = mean_var(v);
                (m, 1.0 / (var + eps).sqrt(), big)
            } else {
                let ms = v.iter().map(|t| t * t).sum::<f64>() / v.len() as f64;
                (0.0, 1.0 / (ms + eps).sqrt(), 0.0)
            }
        })
        .collect();
    x.iter()
        .zip(&groups)
        .map(|(&t, &g)| {
            let (m, r, big) = stats[g];
            ((t - m) * r, f64::EPSILON * big * r)
        })
        .collect()
}

fn check<T: Scalar>(op: Op, inp: &Input, eps: f64, tol: f64) -> Result<(), TestCaseError> {
    let (strided, contig, xs) = with_view::<T, _>(inp, |x| {
        let c = x.as_standard_layout().into_owned();
        let xs: Vec<f64> = c.iter().map(|v| v.to_f64()).collect();
        (run(op, x, eps), run(op, c.view(), eps), xs)
    });
    prop_assert_eq!(
        strided.is_some(),
        contig.is_some(),
        "strided and contiguous disagree"
    );
    let (Some(a), Some(b)) = (strided, contig) else {
        return Ok(());
    };
    prop_assert!(
        a == b,
        "{:?}: strided result differs from the contiguous copy's",
        op
    );
    let want = reference(op, &xs, &inp.shape, eps);
    for (i, (&bits, &(w, cancel))) in a.iter().zip(&want).enumerate() {
        let got = f64::from_bits(bits);
        prop_assert!(
            (got - w).abs() <= tol * (1.0 + w.abs()) + cancel || (got.is_nan() && w.is_nan()),
            "{:?} element {}: got {} want {}",
            op,
            i,
            got,
            w
        );
    }
    Ok(())
}

fn both(op: Op, inp: &Input, eps: f64) -> Result<(), TestCaseError> {
    check::<f64>(op, inp, eps, 1e-12)?;
    check::<f32>(op, inp, eps, 2e-6)
}

fn eps_s() -> impl Strategy<Value = f64> {
    prop::sample::select(vec![1e-5, 1e-3, 0.5])
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn batch_norm_any_layout(inp in input(2, 4), a in any::<usize>(), training: bool,
                             eps in eps_s()) {
        let nd = inp.shape.len();
        let axis = [1isize, -1, (nd as isize) - 1][a % 3];
        both(Op::Batch { axis, training }, &inp, eps)?;
    }

    #[test]
    fn layer_and_rms_norm_any_layout(inp in input(1, 4), k in any::<usize>(), eps in eps_s()) {
        let k = 1 + k % inp.shape.len();
        both(Op::Layer { k }, &inp, eps)?;
        both(Op::Rms { k }, &inp, eps)?;
    }

    #[test]
    fn group_norm_any_layout(mut inp in input(2, 4), g in 1usize..=3, per in 0usize..=3,
                             last: bool, eps in eps_s()) {
        let nd = inp.shape.len();
        let axis: isize = if last && nd > 2 { -1 } else { 1 };
        let a = if axis < 0 { nd - 1 } else { 1 };
        inp.shape[a] = g * per;
        both(Op::Group { groups: g as i64, axis }, &inp, eps)?;
    }

    #[test]
    fn instance_norm_any_layout(inp in input(3, 4), last: bool, eps in eps_s()) {
        let axis = if last { -1 } else { 1 };
        both(Op::Instance { axis }, &inp, eps)?;
    }

    #[test]
    fn moments_any_layout(inp in input(1, 4), a in any::<usize>()) {
        let nd = inp.shape.len();
        let axis = (a % nd) as isize;
        let (s, c, xs) = with_view::<f32, _>(&inp, |x| {
            let c = x.as_standard_layout().into_owned();
            let xs: Vec<f64> = c.iter().map(|v| v.to_f64()).collect();
            (moments(x, axis), moments(c.view(), axis), xs)
        });
        prop_assert_eq!(s.is_ok(), c.is_ok());
        if let (Ok(s), Ok(c)) = (s, c) {
            prop_assert_eq!(s.count, c.count);
            let bits = |v: &[f64]| v.iter().map(|t| t.to_bits()).collect::<Vec<_>>();
            prop_assert!(bits(&s.mean) == bits(&c.mean) && bits(&s.m2) == bits(&c.m2));
            let op = Op::Batch { axis, training: true };
            let (groups, _) = groups_of(op, &inp.shape);
            let mut members = vec![Vec::new(); inp.shape[axis as usize]];
            for (i, &g) in groups.iter().enumerate() {
                members[g].push(xs[i]);
            }
            for (ch, v) in members.iter().enumerate() {
                if v.is_empty() {
                    prop_assert!(s.mean[ch].is_nan());
                    continue;
                }
                let (m, var) = mean_var(v);
                prop_assert!((s.mean[ch] - m).abs() <= 1e-12 * (1.0 + m.abs()));
                let m2 = var * v.len() as f64;
                prop_assert!((s.m2[ch] - m2).abs() <= 1e-9 * (1.0 + m2));
            }
        }
    }
}
