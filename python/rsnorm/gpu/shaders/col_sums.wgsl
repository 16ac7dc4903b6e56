// col_sums.wgsl -- pass 1 of the backward sums for column reductions (row-major (N, R, C), summed
// over the R rows for every (n, c)): (sum a, sum a * xhat) with a = dy (* w[c] when USE_W == 1)
// and xhat = ((x - mean[s]) - lo[s]) * rstd[s] (CENTER == 1; lo when HAS_LO == 1) or x * rstd[s]
// (CENTER == 0), s being the element's normalization group. Used for dweight/dbias of layer norm
// and of channels-last batch/group norm: coalesced, unlike a strided walk down each column.
//
// Bindings (group 0):
//   0  uniform              P    : Params
//   1  storage, read        x    : array<T>          window; x[0] is global element P.win_start
//   2  storage, read        dy   : array<T>          same window
//   3  storage, read        mean : array<f32>        per normalization group (CENTER == 1)
//   4  storage, read        rstd : array<f32>        per normalization group
//   5  storage, read        w    : array<f32>        C (USE_W == 1)
//   6  storage, read_write  part : array<vec2<f32>>  N * C * n_rb, index (n * C + c) * n_rb + rb
//   7  storage, read        lo   : array<f32>        per normalization group (HAS_LO == 1)
// Dispatch: as col_stats.wgsl (workgroup -> (n, row block, column block), invocation -> column);
//   rows of a block are added in order. The normalization group of global element i follows
//   norm_apply.wgsl (gI, gC, a_stride, G, cpg, group_mode).

override WG: u32 = 64u;
override USE_W: u32 = 0u;
override CENTER: u32 = 1u;
override HAS_LO: u32 = 0u;
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
    gI: u32,
    gC: u32,
    a_stride: u32,
    G: u32,
    cpg: u32,
    group_mode: u32,
    pad0: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> dy: array<T>;
@group(0) @binding(3) var<storage, read> mean: array<f32>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read_write> part: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read> lo: array<f32>;

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
    var acc = vec2<f32>(0.0, 0.0);
    for (var r = rb * RB; r < r_end; r += 1u) {
        let i = (n * P.R + r) * P.C + c;
        let ch = (i / P.gI) % P.gC;
        var grp = ch / P.cpg;
        if (P.group_mode == 1u) {
            grp = (i / P.a_stride) * P.G + grp;
        }
        let xv = f32(x[i - P.win_start]);
        let dyv = f32(dy[i - P.win_start]);
        var wv = 1.0;
        if (USE_W == 1u) {
            wv = w[ch];
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
    part[(n * P.C + c) * P.n_rb + rb] = acc;
}
