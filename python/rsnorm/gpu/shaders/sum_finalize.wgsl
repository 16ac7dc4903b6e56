// sum_finalize.wgsl -- pass 2 of the backward reductions: add the chunk partials of each group
// left to right (fixed order) and optionally write them as parameter gradients.
//
// Bindings (group 0):
//   0  uniform              P     : Params
//   1  storage, read        part  : array<vec2<f32>>  n_groups * n_chunks
//   2  storage, read_write  sums  : array<vec2<f32>>  n_groups (sum a, sum a * xhat)
//   3  storage, read_write  g_w   : array<T>          n_groups: sum a * xhat (dweight), WRITE_GRADS
//   4  storage, read_write  g_b   : array<T>          n_groups: sum a (dbias), WRITE_GRADS
// Dispatch: entry `main`: one invocation per group, WG per workgroup, 2-D grid (linear workgroup
//   id), adding the chunks left to right. Entry `main_tree` (many chunks per group): one
//   workgroup per group; invocation t adds chunks t, t + WG, ... in order, then a fixed pairwise
//   tree. Either way the order depends only on the number of chunks.

override WG: u32 = 64u;
override WRITE_GRADS: u32 = 0u;

struct Params {
    n_groups: u32,
    n_chunks: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> part: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> sums: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> g_w: array<T>;
@group(0) @binding(4) var<storage, read_write> g_b: array<T>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let q = lin_wg(wid, nwg) * WG + t;
    if (q >= P.n_groups) {
        return;
    }
    var acc = vec2<f32>(0.0, 0.0);
    for (var j = 0u; j < P.n_chunks; j += 1u) {
        acc += part[q * P.n_chunks + j];
    }
    store(q, acc);
}

var<workgroup> sh: array<vec2<f32>, WG>;

@compute @workgroup_size(WG)
fn main_tree(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) t: u32) {
    let q = lin_wg(wid, nwg);
    if (q >= P.n_groups) {
        return;
    }
    var acc = vec2<f32>(0.0, 0.0);
    for (var j = t; j < P.n_chunks; j += WG) {
        acc += part[q * P.n_chunks + j];
    }
    sh[t] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (t < s) {
            sh[t] = sh[t] + sh[t + s];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        store(q, sh[0]);
    }
}

fn store(q: u32, acc: vec2<f32>) {
    sums[q] = acc;
    if (WRITE_GRADS == 1u) {
        g_w[q] = to_t(acc.y);
        g_b[q] = to_t(acc.x);
    }
}
