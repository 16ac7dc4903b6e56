// norm_small.wgsl -- statistics and apply for groups of at most PER elements (short layer/RMS
// rows, one-element groups, small GN groups): one invocation per group, so short rows do not
// occupy a whole workgroup each.
//
// Bindings (group 0): exactly those of norm_fused.wgsl
//   0  uniform              P        : Params (same layout as norm_fused.wgsl; n_chunks is 1)
//   1  storage, read        x        : array<T>    window; x[0] is global element P.win_start
//   2  storage, read_write  y        : array<T>    same window as x
//   3  storage, read        w        : array<f32>  C (HAS_W == 1)
//   4  storage, read        b        : array<f32>  C (HAS_B == 1)
//   5  storage, read        tau      : array<f32>  C (HAS_TAU == 1)
//   6  storage, read_write  mean_out : array<f32>  n_groups (NaN for MODE 1)
//   7  storage, read_write  rstd_out : array<f32>  n_groups
// Dispatch: WG invocations per workgroup, invocation (linear workgroup id * WG + t) handles group
//   q0 + that index, on a 2-D grid; indices >= nq return (there is no barrier).
// Bitwise the same result as the two-pass path: with a group of len <= PER, invocation k of the
//   TREE_WG-wide reduction workgroup holds element k alone, so each element becomes a
//   thread_part of one value and the partials are merged in the same pairwise tree
//   (s = TREE_WG / 2, ..., 1; slot k takes slot k + s), here inside one invocation.

override WG: u32 = 64u;
override TREE_WG: u32 = 64u;
override MODE: u32 = 0u;
override HAS_W: u32 = 0u;
override HAS_B: u32 = 0u;
override HAS_TAU: u32 = 0u;

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
    eps: f32,
    n_chunks: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> b: array<f32>;
@group(0) @binding(5) var<storage, read> tau: array<f32>;
@group(0) @binding(6) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> rstd_out: array<f32>;

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
    let ql = lin_wg(wid, nwg) * WG + t;
    if (ql >= P.nq) {
        return;
    }
    let q = P.q0 + ql;
    let base = (q / P.n_g) * P.outer_stride + (q % P.n_g) * P.g_stride;
    let len = min(P.len, PER);
    var parts: array<Part, PER>;
    for (var k = 0u; k < len; k += 1u) {
        let val = f32(x[index_of(base, k) - P.win_start]);
        var v: array<f32, PER>;
        v[0] = val;
        parts[k] = thread_part(&v, 1u, abs(val), is_nonfinite(val));
    }
    for (var s = TREE_WG / 2u; s > 0u; s = s / 2u) {
        for (var k = 0u; k < s && k + s < len; k += 1u) {
            parts[k] = merge(parts[k], parts[k + s]);
        }
    }
    let gs = finalize(parts[0], P.eps, MODE);
    if (MODE == 1u) {
        mean_out[q] = nan_f32();
    } else {
        mean_out[q] = gs.mean;
    }
    rstd_out[q] = gs.rstd;
    for (var k = 0u; k < len; k += 1u) {
        let i = index_of(base, k);
        let c = (i / P.I) % P.C;
        var wv = 1.0;
        if (HAS_W == 1u) {
            wv = w[c];
        }
        var bv = 0.0;
        if (HAS_B == 1u) {
            bv = b[c];
        }
        var yv = normalize_affine(f32(x[i - P.win_start]), gs, MODE, wv, bv, HAS_W == 1u,
                                  HAS_B == 1u);
        if (HAS_TAU == 1u) {
            yv = select(max(yv, tau[c]), yv, is_nan(yv));
        }
        y[i - P.win_start] = to_t(yv);
    }
}
