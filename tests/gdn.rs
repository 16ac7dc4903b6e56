//! GDN on the pure-Rust API against naive f64 loops; parameter validation; gradients.

mod common;

use common::*;
use ndarray::ArrayD;
use rsnorm::{gdn, gdn_backward, GdnParams, GdnVariant};

fn gdn_ref(
    x: &ArrayD<f64>,
    beta: &[f64],
    gamma: &[f64],
    var: GdnVariant,
    inv: bool,
) -> ArrayD<f64> {
    let (n, c, s) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let mut y = x.clone();
    for b in 0..n {
        for p in 0..s {
            for i in 0..c {
                let mut d = beta[i];
                for j in 0..c {
                    let v = x[[b, j, p]];
                    d += gamma[i * c + j]
                        * if var == GdnVariant::Gdn {
                            v * v
                        } else {
                            v.abs()
                        };
                }
                let f = match (var, inv) {
                    (GdnVariant::Gdn, false) => 1.0 / d.sqrt(),
                    (GdnVariant::Gdn, true) => d.sqrt(),
                    (GdnVariant::Gdn1, false) => 1.0 / d,
                    (GdnVariant::Gdn1, true) => d,
                };
                y[[b, i, p]] = x[[b, i, p]] * f;
            }
        }
    }
    y
}

fn params(c: usize) -> (Vec<f64>, Vec<f64>) {
    let beta: Vec<f64> = (0..c).map(|i| 0.5 + 0.1 * i as f64).collect();
    let gamma: Vec<f64> = (0..c * c)
        .map(|i| 0.01 + 0.01 * ((i * 7) % 11) as f64)
        .collect();
    (beta, gamma)
}

#[test]
fn gdn_matches_reference_all_variants() {
    // Enough positions for several tiles.
    let c = 9;
    let x = random(&[3, c, 400], 21, 0.0);
    let (beta, gamma) = params(c);
    for var in [GdnVariant::Gdn, GdnVariant::Gdn1] {
        for inverse in [false, true] {
            let p = GdnParams {
                beta: &beta,
                gamma: &gamma,
                gamma_shape: &[c, c],
                inverse,
                variant: var,
                axis: 1,
            };
            let mut y = ArrayD::<f64>::zeros(x.shape());
            gdn(x.view(), y.view_mut(), &p).unwrap();
            let want = gdn_ref(&x, &beta, &gamma, var, inverse);
            assert!(max_abs_diff(&y, &want) < 1e-12, "{var:?} {inverse}");
        }
    }
}

#[test]
fn gdn_rejects_bad_parameters() {
    let c = 3;
    let x = random(&[2, c, 4], 1, 0.0);
    let mut y = ArrayD::<f64>::zeros(x.shape());
    let (beta, gamma) = params(c);
    let mut bad_beta = beta.clone();
    bad_beta[1] = 0.0;
    let mut bad_gamma = gamma.clone();
    bad_gamma[4] = -1e-12;
    for (b, g, shape) in [
        (&bad_beta, &gamma, [c, c]),
        (&beta, &bad_gamma, [c, c]),
        (&beta, &gamma, [c + 1, c - 1]),
    ] {
        let p = GdnParams {
            beta: b,
            gamma: g,
            gamma_shape: &shape,
            inverse: false,
            variant: GdnVariant::Gdn,
            axis: 1,
        };
        assert!(gdn(x.view(), y.view_mut(), &p).is_err());
    }
}

#[test]
fn gdn_backward_matches_finite_differences() {
    let c = 4;
    let x = random(&[2, c, 3], 5, 0.0);
    let g = random(&[2, c, 3], 6, 0.0);
    let (beta, gamma) = params(c);
    for var in [GdnVariant::Gdn, GdnVariant::Gdn1] {
        for inverse in [false, true] {
            let loss = |x: &ArrayD<f64>, beta: &[f64], gamma: &[f64]| {
                let p = GdnParams {
                    beta,
                    gamma,
                    gamma_shape: &[c, c],
                    inverse,
                    variant: var,
                    axis: 1,
                };
                let mut y = ArrayD::<f64>::zeros(x.shape());
                gdn(x.view(), y.view_mut(), &p).unwrap();
                (&y * &g).sum()
            };
            let p = GdnParams {
                beta: &beta,
                gamma: &gamma,
                gamma_shape: &[c, c],
                inverse,
                variant: var,
                axis: 1,
            };
            let mut dx = ArrayD::<f64>::zeros(x.shape());
            let gr = gdn_backward(g.view(), x.view(), dx.view_mut(), &p).unwrap();
            let h = 1e-6;
            let close = |got: f64, num: f64| (got - num).abs() <= 1e-5 + 1e-3 * num.abs();
            for i in 0..x.len() {
                let (mut a, mut b) = (x.clone(), x.clone());
                a.as_slice_mut().unwrap()[i] += h;
                b.as_slice_mut().unwrap()[i] -= h;
                let num = (loss(&a, &beta, &gamma) - loss(&b, &beta, &gamma)) / (2.0 * h);
                assert!(close(dx.as_slice().unwrap()[i], num));
            }
            for i in 0..c {
                let (mut a, mut b) = (beta.clone(), beta.clone());
                a[i] += h;
                b[i] -= h;
                let num = (loss(&x, &a, &gamma) - loss(&x, &b, &gamma)) / (2.0 * h);
                assert!(close(gr.beta[i], num));
            }
            for i in 0..c * c {
                let (mut a, mut b) = (gamma.clone(), gamma.clone());
                a[i] += h;
                b[i] -= h;
                let num = (loss(&x, &beta, &a) - loss(&x, &beta, &b)) / (2.0 * h);
                assert!(close(gr.gamma[i], num), "{var:?} {inverse} gamma {i}");
            }
        }
    }
}
