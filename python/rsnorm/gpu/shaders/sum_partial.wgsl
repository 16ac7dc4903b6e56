// sum_partial.wgsl -- pass 1 of the backward reductions: per (reduction group q, chunk j) the
// pair (sum a, sum a * xhat) with a = dy (* w[c] when USE_W == 1) and
// xhat = ((x - mean[s]) - lo[s]) * rstd[s] (CENTER == 1; lo only when HAS_LO == 1) or x * rstd[s] (CENTER == 0, RMS norm), where s is
// the element's normalization group.
//
// Bindings (group 0):
//   0  uniform              P    : Params
//   1  storage, read        x    : array<T>          window; x[0] is global element P.win_start
//   2  storage, read        dy   : array<T>          same window
//   3  storage, read        mean : array<f32>        per normalization group (CENTER == 1)
//   4  storage, read        rstd : array<f32>        per normalization group
//   5  storage, read        w    : array<f32>        C (USE_W == 1)
//   6  storage, read_write  part : array<vec2<f32>>  n_groups * n_chunks, index q * n_chunks + j
//   7  storage, read        lo   : array<f32>        per normalization group (HAS_LO == 1)
// Dispatch and element order: exactly as stats_partial.wgsl (same reduction description, same
//   chunks of WG * PER elements, same fixed pairwise tree), so results are bitwise reproducible.
// The normalization group of global element i follows norm_apply.wgsl (I, C, a_stride, G, cpg,
//   group_mode), which lets the same shader reduce per group (dx) or per channel (dweight, dbias).

override WG: u32 = 256u;
override USE_W: u32 = 0u;
override CENTER: u32 = 1u;
override HAS_LO: u32 = 0u;

struct Params {
    n_g: u32,
    outer_stride: u32,
    g_stride: u32,
    run_len: u32,
    run_stride: u32,
    len: u32,
    n_chunks: u32,
    q0: u32,
    j0: u32,
    nq: u32,
    nj: u32,
    win_start: u32,
    I: u32,
    C: u32,
    a_stride: u32,
    G: u32,
    cpg: u32,
    group_mode: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> dy: array<T>;
@group(0) @binding(3) var<storage, read> mean: array<f32>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read_write> part: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read> lo: array<f32>;

var<workgroup> sh: array<vec2<f32>, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let wl = lin_wg(wid, nwg);
    if (wl >= P.nq * P.nj) {
        return;
    }
    let q = P.q0 + wl / P.nj;
    let j = P.j0 + wl % P.nj;
    let o = q / P.n_g;
    let g = q % P.n_g;
    let base = o * P.outer_stride + g * P.g_stride;
    let k0 = j * (WG * PER);
    let k1 = min(k0 + WG * PER, P.len);
    var acc = vec2<f32>(0.0, 0.0);
    // A chunk inside one run needs no division per element (see stats_partial.wgsl).
    let r0 = k0 / P.run_len;
    let contiguous = k1 == k0 || (k1 - 1u) / P.run_len == r0;
    let cbase = base + r0 * P.run_stride - r0 * P.run_len;
    for (var k = k0 + t; k < k1; k += WG) {
        var i = cbase + k;
        if (!contiguous) {
            let r = k / P.run_len;
            i = base + r * P.run_stride + (k - r * P.run_len);
        }
        let c = (i / P.I) % P.C;
        var grp = c / P.cpg;
        if (P.group_mode == 1u) {
            grp = (i / P.a_stride) * P.G + grp;
        }
        let xv = f32(x[i - P.win_start]);
        let dyv = f32(dy[i - P.win_start]);
        var wv = 1.0;
        if (USE_W == 1u) {
            wv = w[c];
        }
        let a = dyv * wv;
        var xh = xv * rstd[grp];
        if (CENTER == 1u) {
            var dv = xv - mean[grp];
            if (HAS_LO == 1u) {
                dv = dv - lo[grp];
            }
            xh = dv * rstd[grp];
        }
        acc = vec2<f32>(fma(dyv, wv, acc.x), fma(a, xh, acc.y));
    }
    sh[t] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (t < s) {
            sh[t] = sh[t] + sh[t + s];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        part[q * P.n_chunks + j] = sh[0];
    }
}
