// lrn.wgsl -- local response normalization across channels:
//   y[o, c, i] = x[o, c, i] * (k + alpha' * sum_{j = c - lo .. c + hi, 0 <= j < C} x[o, j, i]^2)^-beta
//
// Bindings (group 0):
//   0  uniform              P : Params
//   1  storage, read        x : array<T>  window of whole (C, I) slabs; x[0] is global P.win_start
//   2  storage, read_write  y : array<T>  same window
// Dispatch: 1-D grid-stride loop over elements [first, first + count), WG per workgroup; each
//   invocation re-sums its own window in channel order (no running sum, so no drift and a fixed
//   order). Consecutive invocations touch consecutive positions i (coalesced in NCHW).

override WG: u32 = 256u;

struct Params {
    first: u32,
    count: u32,
    win_start: u32,
    I: u32,
    C: u32,
    lo: u32,
    hi: u32,
    pad0: u32,
    alpha: f32,
    beta: f32,
    k: f32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let stride = nwg.x * WG;
    for (var l = wid.x * WG + t; l < P.count; l += stride) {
        let i = P.first + l;
        let li = i - P.win_start;
        let c = (i / P.I) % P.C;
        let j0 = select(0u, c - P.lo, c >= P.lo);
        let j1 = min(c + P.hi, P.C - 1u);
        // li - (c - j) * I addresses channel j at the same position.
        var s = 0.0;
        // WGSL may assume no NaN (the compiler can drop it from s), so a NaN in the window is
        // tracked on the bits and written explicitly: every channel whose window holds a NaN
        // is NaN, as on the CPU (HOSTILE 26).
        var nan_in_window = false;
        for (var j = j0; j <= j1; j += 1u) {
            let v = f32(x[li + j * P.I - c * P.I]);
            nan_in_window = nan_in_window || ((bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u);
            s = fma(v, v, s);
        }
        let base = fma(P.alpha, s, P.k);
        let xv = f32(x[li]);
        let r = xv * exp2(-P.beta * log2(base));
        y[li] = to_t(select(r, bitcast<f32>(0x7fc00000u), nan_in_window));
    }
}
