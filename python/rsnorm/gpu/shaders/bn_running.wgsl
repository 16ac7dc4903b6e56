// bn_running.wgsl -- in-place update of device-resident float32 running statistics from the
// batch statistics of batch norm training.
//
// Bindings (group 0):
//   0  uniform              P     : Params
//   1  storage, read        gstat : array<GStat>  C batch statistics (stats_finalize, MODE 0)
//   2  storage, read_write  rm    : array<f32>    C running means, updated in place
//   3  storage, read_write  rv    : array<f32>    C running variances, updated in place
// Dispatch: one invocation per channel, WG per workgroup, 1-D grid.
// convention 0 (torch): new = (1-m)*old + m*batch, unbiased variance M2/(n-1).
// convention 1 (onnx):  new = m*old + (1-m)*batch, biased variance M2/n.

override WG: u32 = 64u;

struct Params {
    C: u32,
    momentum: f32,
    convention: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> gstat: array<GStat>;
@group(0) @binding(2) var<storage, read_write> rm: array<f32>;
@group(0) @binding(3) var<storage, read_write> rv: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= P.C) {
        return;
    }
    let gs = gstat[c];
    let n = f32(gs.n);
    let mean = ldexp(gs.hi_s + gs.lo_s, gs.e);
    // The variance is formed in the scaled domain and scaled back once (it may overflow f32 only
    // when the true variance does).
    var var_b = ldexp(gs.m2_s / n, 2 * gs.e);
    var var_u = ldexp(gs.m2_s / (n - 1.0), 2 * gs.e);
    if (is_nan(gs.m2_s)) {
        var_b = nan_f32();
        var_u = nan_f32();
    }
    let m = P.momentum;
    if (P.convention == 0u) {
        rm[c] = fma(1.0 - m, rm[c], m * mean);
        rv[c] = fma(1.0 - m, rv[c], m * var_u);
    } else {
        rm[c] = fma(m, rm[c], (1.0 - m) * mean);
        rv[c] = fma(m, rv[c], (1.0 - m) * var_b);
    }
}
