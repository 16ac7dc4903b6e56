// grad_apply.wgsl -- elementwise input gradient of the statistics norms.
//
// Bindings (group 0):
//   0  uniform              P    : Params
//   1  storage, read        x    : array<T>          window; x[0] is global element P.win_start
//   2  storage, read        dy   : array<T>          same window
//   3  storage, read_write  dx   : array<T>          same window
//   4  storage, read        mean : array<f32>        per normalization group (MODE 0, 2)
//   5  storage, read        rstd : array<f32>        per normalization group
//   6  storage, read        sums : array<vec2<f32>>  per group: (sum g, sum g * xhat) (MODE 0, 1)
//   7  storage, read        w    : array<f32>        C (HAS_W == 1)
//   8  storage, read        lo   : array<f32>        per group, xhat = ((x - mean) - lo) * rstd (HAS_LO)
// Dispatch: 1-D grid-stride loop over elements [first, first + count), WG per workgroup.
// With g = dy * w[c], xhat = (x - mean) * rstd and n = P.n (elements per group):
//   MODE 0 (LN, GN, BN train): dx = rstd * (g - sum_g / n - xhat * sum_gx / n)
//   MODE 1 (RMS, xhat = x * rstd): dx = rstd * (g - xhat * sum_gx / n)
//   MODE 2 (BN eval, affine map): dx = g * rstd
// W_ON_SUMS == 1: the sums were taken without w and the group is the channel (batch norm), so
//   they are scaled by w[c] here; this lets one reduction serve dx, dweight and dbias.

override WG: u32 = 256u;
// FIXED_C == 1: the grid stride (nwg.x * WG) is a multiple of I * C and the group is the channel
// (group_mode 0), so channel and group stay the same for all elements of an invocation and are
// computed once, not with two integer divisions per element.
override FIXED_C: u32 = 0u;
override MODE: u32 = 0u;
override HAS_W: u32 = 0u;
override W_ON_SUMS: u32 = 0u;
override HAS_LO: u32 = 0u;

struct Params {
    first: u32,
    count: u32,
    win_start: u32,
    I: u32,
    C: u32,
    a_stride: u32,
    G: u32,
    cpg: u32,
    group_mode: u32,
    n: f32,
    eps: f32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> dy: array<T>;
@group(0) @binding(3) var<storage, read_write> dx: array<T>;
@group(0) @binding(4) var<storage, read> mean: array<f32>;
@group(0) @binding(5) var<storage, read> rstd: array<f32>;
@group(0) @binding(6) var<storage, read> sums: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read> w: array<f32>;
@group(0) @binding(8) var<storage, read> lo: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let stride = nwg.x * WG;
    let l0 = wid.x * WG + t;
    let c0 = ((P.first + l0) / P.I) % P.C;
    for (var l = l0; l < P.count; l += stride) {
        let i = P.first + l;
        let li = i - P.win_start;
        var c = c0;
        if (FIXED_C == 0u) {
            c = (i / P.I) % P.C;
        }
        var grp = c / P.cpg;
        if (P.group_mode == 1u && FIXED_C == 0u) {
            grp = (i / P.a_stride) * P.G + grp;
        }
        let r = rstd[grp];
        var wc = 1.0;
        if (HAS_W == 1u) {
            wc = w[c];
        }
        let dyv = f32(dy[li]);
        let g = dyv * wc;
        var res = g * r;
        if (MODE != 2u) {
            var s = sums[grp];
            if (W_ON_SUMS == 1u) {
                s = s * wc;
            }
            let xv = f32(x[li]);
            if (MODE == 0u) {
                var dv = xv - mean[grp];
                if (HAS_LO == 1u) {
                    dv = dv - lo[grp];
                }
                let xh = dv * r;
                res = dx_centred(dyv, wc, xh, xv, r, s, P.n, P.eps);
            } else {
                let xh = xv * r;
                res = dx_mean_square(g, xh, xv, r, s, P.n, P.eps);
            }
        }
        dx[li] = to_t(res);
    }
}
