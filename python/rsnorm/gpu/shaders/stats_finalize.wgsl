// stats_finalize.wgsl -- pass 2: merge the chunk partials of each group (left to right, a fixed
// order) and turn them into normalization parameters.
//
// Bindings (group 0):
//   0  uniform              P        : Params
//   1  storage, read        part     : array<Part>   n_groups * n_chunks
//   2  storage, read_write  gstat    : array<GStat>  n_groups
//   3  storage, read_write  mean_out : array<f32>    n_groups (user-facing mean, NaN for MODE 1)
//   4  storage, read_write  rstd_out : array<f32>    n_groups
//   5  storage, read_write  hi_out   : array<f32>    n_groups, unscaled pivot of the mean (backward)
//   6  storage, read_write  lo_out   : array<f32>    n_groups, mean - pivot (backward uses (x-hi)-lo)
// Dispatch: entry `main`: one invocation per group, WG per workgroup, 2-D grid (linear workgroup
//   id), each walking the group's chunks left to right. Entry `main_tree` (for many chunks per
//   group): one workgroup per group; invocation t merges chunks t, t + WG, ... in order, then a
//   fixed pairwise tree. Either way the order depends only on the number of chunks.
// MODE 0: variance norm, rstd = 1/sqrt(M2/n + eps). MODE 1: mean-square norm (RMS, FRN),
//   rstd = 1/sqrt(mean(x^2) + eps) with mean(x^2) = M2/n + mean^2 (no cancellation: both >= 0).
// Empty groups and groups with NaN/inf give NaN statistics.

override WG: u32 = 64u;
override MODE: u32 = 0u;

struct Params {
    n_groups: u32,
    n_chunks: u32,
    eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> part: array<Part>;
@group(0) @binding(2) var<storage, read_write> gstat: array<GStat>;
@group(0) @binding(3) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> hi_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> lo_out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let q = lin_wg(wid, nwg) * WG + t;
    if (q >= P.n_groups) {
        return;
    }
    var acc = part[q * P.n_chunks];
    for (var j = 1u; j < P.n_chunks; j += 1u) {
        acc = merge(acc, part[q * P.n_chunks + j]);
    }
    store(q, finalize(acc, P.eps, MODE));
}

var<workgroup> sh: array<Part, WG>;

@compute @workgroup_size(WG)
fn main_tree(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) t: u32) {
    let q = lin_wg(wid, nwg);
    if (q >= P.n_groups) {
        return;
    }
    var acc: Part;
    acc.n = 0u;
    acc.e = 0;
    acc.hi = 0.0;
    acc.lo = 0.0;
    acc.m2 = 0.0;
    for (var j = t; j < P.n_chunks; j += WG) {
        acc = merge(acc, part[q * P.n_chunks + j]);
    }
    sh[t] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (t < s) {
            sh[t] = merge(sh[t], sh[t + s]);
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        store(q, finalize(sh[0], P.eps, MODE));
    }
}

fn store(q: u32, gs: GStat) {
    gstat[q] = gs;
    if (MODE == 1u) {
        mean_out[q] = nan_f32();
    } else {
        mean_out[q] = gs.mean;
    }
    rstd_out[q] = gs.rstd;
    hi_out[q] = ldexp(gs.hi_s, gs.e);
    lo_out[q] = ldexp(gs.lo_s, gs.e);
}
