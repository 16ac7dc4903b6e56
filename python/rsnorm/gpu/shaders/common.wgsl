// common.wgsl -- helpers shared by every rsnorm shader. The loader prepends a dtype prelude
// (which defines `alias T` = f32 or f16 and `fn to_t(f32) -> T`) and then this file to each
// shader source. No bindings here.
//
// Every product that feeds an addition is written as an explicit fma(). WGSL lets a compiler
// contract a * b + c into one fused operation or not, and NVIDIA's Vulkan compiler decides per
// pipeline: two shader variants computing the same formula (fused vs two-pass, per-thread
// channel vs generic indexing) then differed in the last bit on an H200, breaking the bitwise
// contract between paths. With the fusion spelled out there is nothing left to contract. WGSL
// still lets fma() itself round twice (lavapipe does): what keeps paths bitwise equal is that
// they all spell the same operations, which a device then evaluates the same way everywhere.
//
// Statistics are carried as `Part` = (count, exponent, mean = hi + lo, M2) of values scaled by
// 2^-e, the shape of the CPU `Moments`. The mean is an unevaluated sum: hi is a data value (the
// pivot) and lo the small offset of the mean from it, so x - mean is formed as (x - hi) - lo,
// where x - hi is exact for data such as 1e4 + N(0,1) (Sterbenz) and float32 rounding of the
// mean itself (0.5 ulp of 1e4 = 5e-4) never reaches the output. The exponent keeps squares of values up to 3.4e38 finite; it is 0
// for |x| < 2^47, so ordinary data never pays for a rescale. e >= NONFINITE marks a group that
// saw a NaN or an infinity (WGSL may assume finite floats, so bits are tested, never isNan).

const NONFINITE: i32 = 1000;
// Values one invocation holds in registers in the reduction shaders.
const PER: u32 = 16u;

struct Part {
    n: u32,
    e: i32,
    hi: f32,
    lo: f32,
    m2: f32,
}

// Per normalization group, written by stats_finalize.wgsl / stats_from_running.wgsl.
// hi_s + lo_s (the mean) and rstd_s apply to x * 2^-e; mean, rstd are the user-facing
// (unscaled, rounded) values.
struct GStat {
    hi_s: f32,
    rstd_s: f32,
    m2_s: f32,
    e: i32,
    n: u32,
    mean: f32,
    rstd: f32,
    lo_s: f32,
}

fn lin_wg(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

fn nan_f32() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

fn is_nonfinite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) == 0x7f800000u;
}

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Chan et al. pairwise merge of two partial statistics; an empty side is the identity, so
// padding threads change nothing. Both sides are first brought to the larger exponent
// (exact power-of-two scaling).
fn merge(a: Part, b: Part) -> Part {
    if (b.n == 0u) {
        return a;
    }
    if (a.n == 0u) {
        return b;
    }
    var r: Part;
    r.n = a.n + b.n;
    r.e = max(a.e, b.e);
    if (r.e >= NONFINITE) {
        r.hi = 0.0;
        r.lo = 0.0;
        r.m2 = 0.0;
        return r;
    }
    let ha = ldexp(a.hi, a.e - r.e);
    let la = ldexp(a.lo, a.e - r.e);
    let hb = ldexp(b.hi, b.e - r.e);
    let lb = ldexp(b.lo, b.e - r.e);
    let qa = ldexp(a.m2, 2 * (a.e - r.e));
    let qb = ldexp(b.m2, 2 * (b.e - r.e));
    let na = f32(a.n);
    let nb = f32(b.n);
    let n = f32(r.n);
    // mean_b - mean_a, with the pivots subtracted first (exact when they are close).
    let d = ((hb - ha) + lb) - la;
    r.hi = ha;
    r.lo = fma(d, nb / n, la);
    r.m2 = fma(d * d, na * (nb / n), qa + qb);
    return r;
}

// 1/sqrt(v) with one Newton step: WGSL's inverseSqrt is only accurate to a few ulp.
fn rsqrt_nr(v: f32) -> f32 {
    let r = inverseSqrt(v);
    if (v > 0.0 && !is_nonfinite(v)) {
        return r * fma(-(0.5 * v * r), r, 1.5);
    }
    return r;
}

// Statistics of the cnt <= PER values an invocation holds (in *v, overwritten by their scaled
// differences from the pivot): a true two-pass in registers. amax and bad are max |x| and
// "saw a NaN/inf" over the same values.
fn thread_part(v: ptr<function, array<f32, PER>>, cnt: u32, amax: f32, bad: bool) -> Part {
    var p: Part;
    p.n = cnt;
    p.e = 0;
    p.hi = 0.0;
    p.lo = 0.0;
    p.m2 = 0.0;
    if (bad) {
        p.e = NONFINITE;
    } else if (cnt > 0u) {
        let ex = i32((bitcast<u32>(amax) >> 23u) & 0xffu) - 127;
        p.e = max(0, ex - 46);
        let sc = -p.e;
        let kk = ldexp((*v)[0], sc);
        // Differences from the pivot are exact for clustered data; keep them, not the values.
        var s = 0.0;
        for (var i = 0u; i < cnt; i += 1u) {
            (*v)[i] = ldexp((*v)[i], sc) - kk;
            s += (*v)[i];
        }
        let lo = s / f32(cnt);
        var sd = 0.0;
        var ss = 0.0;
        for (var i = 0u; i < cnt; i += 1u) {
            let d = (*v)[i] - lo;
            sd += d;
            ss = fma(d, d, ss);
        }
        p.hi = kk;
        p.lo = lo;
        p.m2 = max(ss - sd * sd / f32(cnt), 0.0);
    }
    return p;
}

// Normalization parameters of a merged group. mode 0: variance, rstd = 1/sqrt(M2/n + eps);
// mode 1: mean square (RMS, FRN), rstd = 1/sqrt(M2/n + mean^2 + eps) (no cancellation).
// Empty groups and groups with NaN/inf give NaN.
fn finalize(acc: Part, eps: f32, mode: u32) -> GStat {
    var gs: GStat;
    gs.n = acc.n;
    if (acc.n == 0u || acc.e >= NONFINITE) {
        gs.hi_s = nan_f32();
        gs.lo_s = nan_f32();
        gs.rstd_s = nan_f32();
        gs.m2_s = nan_f32();
        gs.e = 0;
        gs.mean = nan_f32();
        gs.rstd = nan_f32();
        return gs;
    }
    let n = f32(acc.n);
    // eps enters the scaled domain as eps * 2^-2e (it underflows harmlessly for huge data).
    let eps_s = ldexp(eps, -2 * acc.e);
    let mean = acc.hi + acc.lo;
    var v = acc.m2 / n;
    if (mode == 1u) {
        v = fma(mean, mean, v);
    }
    gs.hi_s = acc.hi;
    gs.lo_s = acc.lo;
    gs.rstd_s = rsqrt_nr(v + eps_s);
    gs.m2_s = acc.m2;
    gs.e = acc.e;
    gs.mean = ldexp(mean, acc.e);
    gs.rstd = ldexp(gs.rstd_s, -acc.e);
    return gs;
}

// The normalized value of x in its group followed by the per-channel affine (weight wv and bias
// bv where has_w / has_b): mode 0 centred, mode 1 scale only. A zero deviation stays exactly 0
// (so y is exactly the bias) even when rstd is infinite (constant group with eps = 0). With a
// bias alone, d * rstd + b is one explicit fma: spelled as a product and a sum, a compiler may
// contract it in one pipeline and not in another (see the top of this file).
fn normalize_affine(xv: f32, gs: GStat, mode: u32, wv: f32, bv: f32, has_w: bool,
                    has_b: bool) -> f32 {
    var d = ldexp(xv, -gs.e);
    if (mode == 0u) {
        d = (d - gs.hi_s) - gs.lo_s;
    }
    let zero = d == 0.0 && !is_nan(gs.rstd_s);
    if (has_b && !has_w) {
        return select(fma(d, gs.rstd_s, bv), bv, zero);
    }
    let v = select(d * gs.rstd_s, 0.0, zero);
    if (has_w && has_b) {
        return fma(v, wv, bv);
    }
    if (has_w) {
        return v * wv;
    }
    return v;
}

// dx of one value of a centred group (layer, group, batch norm) of n values, from g = dy * w
// (dyv and wc), xhat, rstd r and the group sums s = (sum g, sum g * xhat):
// r * (g - s.x / n - xhat * s.y / n). Shared by grad_fused and grad_apply, whose results must
// agree bitwise.
fn dx_centred(dyv: f32, wc: f32, xh: f32, xv: f32, r: f32, s: vec2<f32>, n: f32,
              eps: f32) -> f32 {
    // A group of one value is constant in x: dx is exactly 0 (NaN for non-finite inputs). The
    // fused formula leaves the rounding error of dy * w times rstd where fma is fused (NVIDIA;
    // lavapipe rounds twice and gets 0 anyway).
    if (n == 1.0) {
        return select(0.0, nan_f32(), is_nonfinite(dyv * wc) || is_nonfinite(xv) || is_nan(r));
    }
    // Two values: d1 = -d2, and the terms cancel to r (g1 - g2) / 2 * eps r^2, about eps / var
    // of their size: float32 lost every digit for tiny variances (x ~ 1e-3, eps = 1e-12: 20 %
    // off). The closed form (g1 - g2 = 2 g1 - sum) keeps them.
    if (n == 2.0) {
        let gd = fma(2.0, dyv * wc, -s.x) * 0.5;
        return select(gd * eps * r * r * r, nan_f32(),
                      is_nonfinite(s.x) || is_nonfinite(s.y) || is_nonfinite(xv) || is_nan(r));
    }
    return r * fma(-xh, s.y / n, fma(dyv, wc, -(s.x / n)));
}

// dx of one value of a mean-square group (RMS norm): r * (g - xhat * s.y / n).
fn dx_mean_square(g: f32, xh: f32, xv: f32, r: f32, s: vec2<f32>, n: f32, eps: f32) -> f32 {
    // One value: 1 - xhat^2 = eps r^2 cancels in float32 when eps << x^2 (1.7 % off in the long
    // fuzz run); dx = g eps r^3 is its closed form.
    if (n == 1.0) {
        return select(g * eps * r * r * r, nan_f32(),
                      is_nonfinite(g) || is_nonfinite(xv) || is_nan(r));
    }
    return r * fma(-xh, s.y / n, g);
}
