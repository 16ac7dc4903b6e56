// stats_from_running.wgsl -- normalization parameters from running statistics (batch norm in
// eval mode, instance norm with use_input_stats=False).
//
// Bindings (group 0):
//   0  uniform              P        : Params
//   1  storage, read        rm       : array<f32>    C running means
//   2  storage, read        rv       : array<f32>    C running variances
//   3  storage, read_write  gstat    : array<GStat>  C
//   4  storage, read_write  mean_out : array<f32>    C
//   5  storage, read_write  rstd_out : array<f32>    C
// Dispatch: one invocation per channel, WG per workgroup, 1-D grid.

override WG: u32 = 64u;

struct Params {
    C: u32,
    eps: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> rm: array<f32>;
@group(0) @binding(2) var<storage, read> rv: array<f32>;
@group(0) @binding(3) var<storage, read_write> gstat: array<GStat>;
@group(0) @binding(4) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> rstd_out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= P.C) {
        return;
    }
    var gs: GStat;
    gs.hi_s = rm[c];
    gs.lo_s = 0.0;
    gs.rstd_s = rsqrt_nr(rv[c] + P.eps);
    gs.m2_s = 0.0;
    gs.e = 0;
    gs.n = 0u;
    gs.mean = gs.hi_s;
    gs.rstd = gs.rstd_s;
    gstat[c] = gs;
    mean_out[c] = gs.mean;
    rstd_out[c] = gs.rstd;
}
