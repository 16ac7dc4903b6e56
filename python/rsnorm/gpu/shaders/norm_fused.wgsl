// norm_fused.wgsl -- statistics and apply in one kernel for groups of at most FUSED_CHUNKS chunks
// (4 x 4096 elements: layer/RMS rows up to 16384, most group/instance/FRN groups): x is read from
// memory once for the statistics and re-read for the apply while it is still in cache, y is
// written once (2N memory traffic instead of 3N for the two-pass path).
//
// Bindings (group 0):
//   0  uniform              P        : Params
//   1  storage, read        x        : array<T>    window; x[0] is global element P.win_start
//   2  storage, read_write  y        : array<T>    same window as x
//   3  storage, read        w        : array<f32>  C (HAS_W == 1)
//   4  storage, read        b        : array<f32>  C (HAS_B == 1)
//   5  storage, read        tau      : array<f32>  C (HAS_TAU == 1)
//   6  storage, read_write  mean_out : array<f32>  n_groups (NaN for MODE 1)
//   7  storage, read_write  rstd_out : array<f32>  n_groups
// Dispatch: one workgroup of WG invocations per group q in [q0, q0 + nq), 2-D grid (linear id =
//   wid.y * nwg.x + wid.x); ids >= nq return before any barrier.
// Bitwise the same result as stats_partial + stats_finalize + norm_apply: the group's elements
//   (group q = o * n_g + g at o * outer_stride + g * g_stride, k-th element at
//   base + (k / run_len) * run_stride + k % run_len) are taken chunk by chunk (WG * PER elements,
//   invocation t holding k = t, t + WG, ...), each chunk goes through thread_part and the same
//   pairwise tree, the chunk partials are merged left to right, then finalize and
//   normalize_affine. Channel of global element i: (i / I) % C, for the per-channel affine.
//   MODE 0 centred, MODE 1 mean square (RMS, FRN).

override WG: u32 = 256u;
override MODE: u32 = 0u;
override HAS_W: u32 = 0u;
override HAS_B: u32 = 0u;
override HAS_TAU: u32 = 0u;
// 1: a one-chunk group keeps its values in registers for the apply instead of re-reading x
// (an experiment for the GPU benchmark's --variant keep_x=1; same bits either way).
override KEEP_X: u32 = 0u;

struct Params {
    n_g: u32,
    outer_stride: u32,
    g_stride: u32,
    run_len: u32,
    run_stride: u32,
    len: u32,
    q0: u32,
    nq: u32,
    win_start: u32,
    I: u32,
    C: u32,
    eps: f32,
    n_chunks: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> b: array<f32>;
@group(0) @binding(5) var<storage, read> tau: array<f32>;
@group(0) @binding(6) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> rstd_out: array<f32>;

var<workgroup> sh: array<Part, WG>;

// Global index of the k-th element of the group at base; one contiguous run needs no division.
fn index_of(base: u32, k: u32) -> u32 {
    if (P.run_len >= P.len) {
        return base + k;
    }
    let r = k / P.run_len;
    return base + r * P.run_stride + (k - r * P.run_len);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let wl = lin_wg(wid, nwg);
    if (wl >= P.nq) {
        return;
    }
    let q = P.q0 + wl;
    let o = q / P.n_g;
    let g = q % P.n_g;
    let base = o * P.outer_stride + g * P.g_stride;

    var acc: Part;
    let keep = KEEP_X == 1u && P.n_chunks == 1u;
    var xs: array<f32, PER>;
    for (var j = 0u; j < P.n_chunks; j += 1u) {
        var v: array<f32, PER>;
        var cnt = 0u;
        var amax = 0.0;
        var bad = false;
        let k1 = min((j + 1u) * WG * PER, P.len);
        for (var k = j * WG * PER + t; k < k1; k += WG) {
            let val = f32(x[index_of(base, k) - P.win_start]);
            v[cnt] = val;
            cnt += 1u;
            bad = bad || is_nonfinite(val);
            amax = max(amax, abs(val));
        }
        if (keep) {
            xs = v;
        }
        sh[t] = thread_part(&v, cnt, amax, bad);
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s = s / 2u) {
            if (t < s) {
                sh[t] = merge(sh[t], sh[t + s]);
            }
            workgroupBarrier();
        }
        if (j == 0u) {
            acc = sh[0];
        } else {
            acc = merge(acc, sh[0]);
        }
        // Everyone has read sh[0] before the next chunk overwrites it.
        workgroupBarrier();
    }
    let gs = finalize(acc, P.eps, MODE);
    if (t == 0u) {
        if (MODE == 1u) {
            mean_out[q] = nan_f32();
        } else {
            mean_out[q] = gs.mean;
        }
        rstd_out[q] = gs.rstd;
    }
    // Layer/RMS norm rows: the affine index is k itself.
    let c_is_k = P.I == 1u && P.C == P.len && P.run_len >= P.len;
    if (keep) {
        // Invocation t held k = t + m * WG in xs[m] (the load loop's order).
        for (var m = 0u; m < PER; m += 1u) {
            let k = t + m * WG;
            if (k < P.len) {
                store_y(base, k, xs[m], gs, c_is_k);
            }
        }
        return;
    }
    for (var k = t; k < P.len; k += WG) {
        store_y(base, k, f32(x[index_of(base, k) - P.win_start]), gs, c_is_k);
    }
}

// y of the k-th element of the group at base, whose value is xv.
fn store_y(base: u32, k: u32, xv: f32, gs: GStat, c_is_k: bool) {
    let i = index_of(base, k);
    var c = k;
    if (!c_is_k) {
        c = (i / P.I) % P.C;
    }
    var wv = 1.0;
    if (HAS_W == 1u) {
        wv = w[c];
    }
    var bv = 0.0;
    if (HAS_B == 1u) {
        bv = b[c];
    }
    var yv = normalize_affine(xv, gs, MODE, wv, bv, HAS_W == 1u, HAS_B == 1u);
    if (HAS_TAU == 1u) {
        yv = select(max(yv, tau[c]), yv, is_nan(yv));
    }
    y[i - P.win_start] = to_t(yv);
}
