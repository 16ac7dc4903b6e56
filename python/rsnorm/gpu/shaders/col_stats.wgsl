// col_stats.wgsl -- pass 1 of the statistics for column reductions: a row-major (N, R, C) tensor
// reduced over its R rows for every (n, c), the channels-last case (batch norm and instance norm
// over NHWC, moments with axis=-1). Consecutive invocations take consecutive columns, so every
// row is read coalesced (the generic stats_partial would stride by C between invocations).
//
// Bindings (group 0):
//   0  uniform              P    : Params
//   1  storage, read        x    : array<T>     window; x[0] is global element P.win_start
//   2  storage, read_write  part : array<Part>  N * C * n_rb partials, index (n * C + c) * n_rb + rb
// Dispatch: WG invocations per workgroup; linear workgroup id (2-D grid) -> (n, row block rb,
//   column block cb) with n in [n0, n0 + nn), rb in [rb0, rb0 + nrb), cb < n_cb; invocation t
//   owns column c = cb * WG + t (none past C; there is no barrier).
// Each invocation walks rows [rb * RB, min((rb + 1) * RB, R)) in runs of PER: thread_part per
//   run, runs merged left to right. The order depends only on R (and the device).

override WG: u32 = 64u;
const RB: u32 = 256u;

struct Params {
    R: u32,
    C: u32,
    n_rb: u32,
    n_cb: u32,
    n0: u32,
    nn: u32,
    rb0: u32,
    nrb: u32,
    win_start: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> part: array<Part>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let wl = lin_wg(wid, nwg);
    if (wl >= P.nn * P.nrb * P.n_cb) {
        return;
    }
    let cb = wl % P.n_cb;
    let rb = P.rb0 + (wl / P.n_cb) % P.nrb;
    let n = P.n0 + wl / (P.n_cb * P.nrb);
    let c = cb * WG + t;
    if (c >= P.C) {
        return;
    }
    let r_end = min((rb + 1u) * RB, P.R);
    var acc: Part;
    acc.n = 0u;
    acc.e = 0;
    acc.hi = 0.0;
    acc.lo = 0.0;
    acc.m2 = 0.0;
    for (var r0 = rb * RB; r0 < r_end; r0 += PER) {
        var v: array<f32, PER>;
        var cnt = 0u;
        var amax = 0.0;
        var bad = false;
        let r1 = min(r0 + PER, r_end);
        for (var r = r0; r < r1; r += 1u) {
            let val = f32(x[(n * P.R + r) * P.C + c - P.win_start]);
            v[cnt] = val;
            cnt += 1u;
            bad = bad || is_nonfinite(val);
            amax = max(amax, abs(val));
        }
        acc = merge(acc, thread_part(&v, cnt, amax, bad));
    }
    part[(n * P.C + c) * P.n_rb + rb] = acc;
}
