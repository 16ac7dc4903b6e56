// common.wgsl -- helpers shared by every rsnorm shader. The loader prepends a dtype prelude
// (which defines `alias T` = f32 or f16 and `fn to_t(f32) -> T`) and then this file to each
// shader source. No bindings here.
//
// Statistics are carried as `Part` = (count, exponent, mean = hi + lo, M2) of values scaled by
// 2^-e, the shape of the CPU `Moments`. The mean is an unevaluated sum: hi is a data value (the
// pivot) and lo the small offset of the mean from it, so x - mean is formed as (x - hi) - lo,
// where x - hi is exact for data such as 1e4 + N(0,1) (Sterbenz) and float32 rounding of the
// mean itself (0.5 ulp of 1e4 = 5e-4) never reaches the output. The exponent keeps squares of values up to 3.4e38 finite; it is 0
// for |x| < 2^47, so ordinary data never pays for a rescale. e >= NONFINITE marks a group that
// saw a NaN or an infinity (WGSL may assume finite floats, so bits are tested, never isNan).

const NONFINITE: i32 = 1000;

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
    r.lo = la + d * (nb / n);
    r.m2 = qa + qb + d * d * (na * (nb / n));
    return r;
}

// 1/sqrt(v) with one Newton step: WGSL's inverseSqrt is only accurate to a few ulp.
fn rsqrt_nr(v: f32) -> f32 {
    let r = inverseSqrt(v);
    if (v > 0.0 && !is_nonfinite(v)) {
        return r * (1.5 - 0.5 * v * r * r);
    }
    return r;
}
