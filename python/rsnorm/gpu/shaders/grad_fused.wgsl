// grad_fused.wgsl -- input gradient of layer/RMS/group norm for groups of at most FUSED_CHUNKS
// chunks, in one kernel: the group sums and dx from one read of x and dy (re-read from cache for
// dx), instead of sum_partial + sum_finalize + grad_apply.
//
// Bindings (group 0):
//   0  uniform              P    : Params
//   1  storage, read        x    : array<T>    window; x[0] is global element P.win_start
//   2  storage, read        dy   : array<T>    same window
//   3  storage, read_write  dx   : array<T>    same window
//   4  storage, read        mean : array<f32>  per group (CENTER == 1)
//   5  storage, read        rstd : array<f32>  per group
//   6  storage, read        w    : array<f32>  C (USE_W == 1)
//   7  storage, read        lo   : array<f32>  per group (HAS_LO == 1)
// Dispatch: one workgroup of WG invocations per group q in [q0, q0 + nq), 2-D grid; ids >= nq
//   return before any barrier.
// Bitwise the same as sum_partial + sum_finalize (n_chunks < 8: chunks added left to right) +
//   grad_apply: per chunk each invocation adds its elements k = t, t + WG, ... in order, the
//   workgroup adds them in the same pairwise tree, then
//   dx = rstd * (g - s.x / n - xhat * (s.y / n)) (CENTER == 1) or rstd * (g - xhat * (s.y / n)),
//   with the products fused explicitly (see common.wgsl).
//   Group q = o * n_g + g at o * outer_stride + g * g_stride, k-th element at
//   base + (k / run_len) * run_stride + k % run_len; channel of global element i: (i / I) % C.

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
    q0: u32,
    nq: u32,
    win_start: u32,
    I: u32,
    C: u32,
    n_chunks: u32,
    n: f32,
    eps: f32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> dy: array<T>;
@group(0) @binding(3) var<storage, read_write> dx: array<T>;
@group(0) @binding(4) var<storage, read> mean: array<f32>;
@group(0) @binding(5) var<storage, read> rstd: array<f32>;
@group(0) @binding(6) var<storage, read> w: array<f32>;
@group(0) @binding(7) var<storage, read> lo: array<f32>;

var<workgroup> sh: array<vec2<f32>, WG>;

fn index_of(base: u32, k: u32) -> u32 {
    if (P.run_len >= P.len) {
        return base + k;
    }
    let r = k / P.run_len;
    return base + r * P.run_stride + (k - r * P.run_len);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let wl = lin_wg(wid, nwg);
    if (wl >= P.nq) {
        return;
    }
    let q = P.q0 + wl;
    let base = (q / P.n_g) * P.outer_stride + (q % P.n_g) * P.g_stride;
    let r = rstd[q];
    var m = 0.0;
    var l = 0.0;
    if (CENTER == 1u) {
        m = mean[q];
        if (HAS_LO == 1u) {
            l = lo[q];
        }
    }
    var tot = vec2<f32>(0.0, 0.0);
    for (var j = 0u; j < P.n_chunks; j += 1u) {
        var acc = vec2<f32>(0.0, 0.0);
        let k1 = min((j + 1u) * WG * PER, P.len);
        for (var k = j * WG * PER + t; k < k1; k += WG) {
            let i = index_of(base, k);
            let c = (i / P.I) % P.C;
            let xv = f32(x[i - P.win_start]);
            let dyv = f32(dy[i - P.win_start]);
            var wv = 1.0;
            if (USE_W == 1u) {
                wv = w[c];
            }
            let a = dyv * wv;
            var xh = xv * r;
            if (CENTER == 1u) {
                var dv = xv - m;
                if (HAS_LO == 1u) {
                    dv = dv - l;
                }
                xh = dv * r;
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
        tot += sh[0];
        workgroupBarrier();
    }
    for (var k = t; k < P.len; k += WG) {
        let i = index_of(base, k);
        let c = (i / P.I) % P.C;
        var wc = 1.0;
        if (USE_W == 1u) {
            wc = w[c];
        }
        let dyv = f32(dy[i - P.win_start]);
        let g = dyv * wc;
        let xv = f32(x[i - P.win_start]);
        var res: f32;
        if (CENTER == 1u) {
            var dv = xv - m;
            if (HAS_LO == 1u) {
                dv = dv - l;
            }
            let xh = dv * r;
            res = dx_centred(dyv, wc, xh, xv, r, tot, P.n, P.eps);
        } else {
            let xh = xv * r;
            res = dx_mean_square(g, xh, xv, r, tot, P.n, P.eps);
        }
        dx[i - P.win_start] = to_t(res);
    }
}
