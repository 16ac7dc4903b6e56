// stats_partial.wgsl -- pass 1 of every statistics reduction: (count, exponent, mean, M2)
// partials per (group q, chunk j).
//
// Bindings (group 0):
//   0  uniform              P     : Params
//   1  storage, read        x     : array<T>     window of the input; x[0] is global element P.win_start
//   2  storage, read_write  part  : array<Part>  n_groups * n_chunks partials, index q * n_chunks + j
// Dispatch: one workgroup of WG invocations per (q, j) in the block [q0, q0+nq) x [j0, j0+nj),
//   on a 2-D grid (linear id = wid.y * nwg.x + wid.x); ids >= nq * nj return before any barrier.
// Group q = o * n_g + g starts at o * outer_stride + g * g_stride; its k-th element (k < len) is at
//   base + (k / run_len) * run_stride + k % run_len. Chunk j holds k in [j*WG*PER, (j+1)*WG*PER).
// Invocation t reads k = t, t + WG, ... (coalesced), keeps its <= PER values in registers and does
//   a true two-pass (mean = first value + mean offset, then sum (x-m)^2 minus the sum (x-m)
//   correction); the workgroup then
//   merges in a fixed pairwise tree. The order depends only on the group length, never on the
//   grid or the binding split, so results are bitwise reproducible.
// Assumes: WG is a power of two; all global indices < 2^32 (checked in Python).

override WG: u32 = 256u;

struct Params {
    n_g: u32,
    outer_stride: u32,
    g_stride: u32,
    run_len: u32,
    run_stride: u32,
    len: u32,
    n_chunks: u32,
    q0: u32,
    j0: u32,
    nq: u32,
    nj: u32,
    win_start: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> part: array<Part>;

var<workgroup> sh: array<Part, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let w = lin_wg(wid, nwg);
    if (w >= P.nq * P.nj) {
        return;
    }
    let q = P.q0 + w / P.nj;
    let j = P.j0 + w % P.nj;
    let o = q / P.n_g;
    let g = q % P.n_g;
    let base = o * P.outer_stride + g * P.g_stride - P.win_start;
    let k0 = j * (WG * PER);
    let k1 = min(k0 + WG * PER, P.len);

    var v: array<f32, PER>;
    var cnt = 0u;
    var amax = 0.0;
    var bad = false;
    // A chunk inside one run (e.g. batch norm over NCHW with H*W >= chunk) needs no division per
    // element (u32 arithmetic wraps, so the sum is exact even when cbase "underflows").
    let r0 = k0 / P.run_len;
    let contiguous = k1 == k0 || (k1 - 1u) / P.run_len == r0;
    let cbase = base + r0 * P.run_stride - r0 * P.run_len;
    for (var k = k0 + t; k < k1; k += WG) {
        var idx = cbase + k;
        if (!contiguous) {
            let r = k / P.run_len;
            idx = base + r * P.run_stride + (k - r * P.run_len);
        }
        let val = f32(x[idx]);
        v[cnt] = val;
        cnt += 1u;
        bad = bad || is_nonfinite(val);
        amax = max(amax, abs(val));
    }

    let p = thread_part(&v, cnt, amax, bad);
    sh[t] = p;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (t < s) {
            sh[t] = merge(sh[t], sh[t + s]);
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        part[q * P.n_chunks + j] = sh[0];
    }
}
