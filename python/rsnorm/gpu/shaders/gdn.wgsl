// gdn.wgsl -- generalized divisive normalization across channels at each position:
//   s_c = beta[c] + sum_j gamma[c * C + j] * f(x_j), f = x^2 (VARIANT 0) or |x| (VARIANT 1, gdn1)
//   y_c = x_c / sqrt(s_c) (VARIANT 0) or x_c / s_c (VARIANT 1); INVERSE == 1 multiplies instead.
//
// Bindings (group 0):
//   0  uniform              P     : Params
//   1  storage, read        x     : array<T>    window of whole (C, I) slabs; x[0] is global P.win_start
//   2  storage, read_write  y     : array<T>    same window
//   3  storage, read        beta  : array<f32>  C
//   4  storage, read        gamma : array<f32>  C * C, gamma[c * C + j] = output c, input j
// Dispatch: 1-D grid-stride loop over elements [first, first + count), WG per workgroup; the sum
//   runs over j in order (deterministic, f32 accumulation).

override WG: u32 = 256u;
override VARIANT: u32 = 0u;
override INVERSE: u32 = 0u;

struct Params {
    first: u32,
    count: u32,
    win_start: u32,
    I: u32,
    C: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read> gamma: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let stride = nwg.x * WG;
    for (var l = wid.x * WG + t; l < P.count; l += stride) {
        let i = P.first + l;
        let li = i - P.win_start;
        let c = (i / P.I) % P.C;
        let b0 = li - c * P.I;
        var s = beta[c];
        for (var j = 0u; j < P.C; j += 1u) {
            let v = f32(x[b0 + j * P.I]);
            var f = v * v;
            if (VARIANT == 1u) {
                f = abs(v);
            }
            s = fma(gamma[c * P.C + j], f, s);
        }
        var m = s;
        if (VARIANT == 0u) {
            m = sqrt(s);
        }
        let xv = f32(x[li]);
        var r = xv / m;
        if (INVERSE == 1u) {
            r = xv * m;
        }
        y[li] = to_t(r);
    }
}
