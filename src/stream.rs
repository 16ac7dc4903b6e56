//! Non-temporal ("streaming") stores for the apply step of large outputs.
//!
//! A normal store to a line that is not in cache first *reads* the line from memory (read for
//! ownership), so writing an output the size of the input costs two memory transfers per byte,
//! not one: normalizing x into y moved 3 bytes per byte of x where a copy (glibc's `memcpy`
//! streams above a size threshold) moves 2. For outputs far larger than the caches the line
//! will not be read back from cache anyway, so `y` is written around the caches with
//! `vmovntps`/`vmovntpd`. Below [`STREAM_MIN_BYTES`] the output is kept cached: the next op
//! (or the caller) is likely to read it back from L2/L3.
//!
//! The arithmetic is exactly [`crate::reduce::affine`]: f64 subtract, then one fused
//! multiply-add (by `a·w_j`, plus b), one rounding to T, so a streamed element is bitwise the
//! cached one (the tests compare layouts that take either path).

use crate::scalar::Scalar;

/// Outputs of at least this many bytes are written with streaming stores. Above the last-level
/// cache share one core can count on (32 MiB L3 shared by every tenant here) nothing is read
/// back from cache; 8 MiB keeps smaller results cached for the next op.
pub const STREAM_MIN_BYTES: usize = 8 << 20;

/// Whether an output of `bytes` bytes should be streamed. `RSNORM_STREAM_MIN_MB` (read once)
/// moves the threshold; `off` disables streaming (e.g. when the next op reads the output back
/// from a large cache).
#[inline]
pub fn worth_streaming(bytes: usize) -> bool {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let min = *MIN.get_or_init(|| match std::env::var("RSNORM_STREAM_MIN_MB") {
        Ok(v) if v.trim().eq_ignore_ascii_case("off") => usize::MAX,
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .map_or(STREAM_MIN_BYTES, |mb| mb.saturating_mul(1 << 20)),
        Err(_) => STREAM_MIN_BYTES,
    });
    bytes >= min
}

/// y_j = (x_j − m)·(a·w_j) + b_j with streaming stores, as `reduce::apply_slice`. Returns
/// false (nothing written) where no streaming kernel exists for T or this CPU; the caller
/// then uses the cached path. The calling task must end with [`stream_fence`].
pub fn apply_slice<T: Scalar>(
    xs: &[T],
    ys: &mut [T],
    m: f64,
    a: f64,
    b: f64,
    w: Option<&[f64]>,
    bias: Option<&[f64]>,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let n = xs.len().min(ys.len());
        if w.is_some_and(|w| w.len() < n) || bias.is_some_and(|v| v.len() < n) {
            return false;
        }
        let p = x86::Params {
            period: 0,
            mv: None,
            m,
            a,
            b,
            w,
            bias,
        };
        x86::run([(xs, ys)], &p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (xs, ys, m, a, b, w, bias);
        false
    }
}

/// Rows of `c` channels with streaming stores, as `reduce::apply_rows`:
/// y[r, k] = (x[r, k] − m_k)·a_k + b_k. Returns false (nothing written) where no streaming
/// kernel exists. The rows are read as one flat run (any c, any alignment; a first version
/// streamed row by row and needed 64-byte aligned rows). The calling task must end with
/// [`stream_fence`].
pub fn apply_rows<T: Scalar>(
    xs: &[T],
    ys: &mut [T],
    c: usize,
    m: &[f64],
    a: &[f64],
    b: &[f64],
) -> bool {
    apply_rows_each([(xs, ys)], c, m, a, b)
}

/// [`apply_rows`] over several (x, y) blocks of rows with the same coefficients, which are
/// prepared once: (N, C) batch norm streams one row per sample, and preparing them per row
/// took 70 % of a (16384, 1024) call. Consumes nothing when it returns false.
pub fn apply_rows_each<'s, T: Scalar>(
    pairs: impl IntoIterator<Item = (&'s [T], &'s mut [T])>,
    c: usize,
    m: &[f64],
    a: &[f64],
    b: &[f64],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if c == 0 || m.len() < c || a.len() < c || b.len() < c {
            return false;
        }
        // The rows as one flat run with per-channel arrays of period c, extended by one
        // vector so that no vector load wraps (any c, any alignment of the output).
        let ext = |v: &[f64]| -> Vec<f64> { v[..c].iter().cycle().take(c + 16).copied().collect() };
        let (me, ae, be) = (ext(m), ext(a), ext(b));
        let p = x86::Params {
            period: c,
            mv: Some(&me),
            m: 0.0,
            a: 1.0,
            b: 0.0,
            w: Some(&ae),
            bias: Some(&be),
        };
        let whole = pairs.into_iter().map(|(xs, ys)| {
            let n = xs.len().min(ys.len()) / c * c;
            (&xs[..n], &mut ys[..n])
        });
        x86::run(whole, &p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pairs.into_iter(), c, m, a, b);
        false
    }
}

/// dx = r·(s·dy − μ − (x − m)·k) (`norm::grad::Coef::dx`, the same operations in the same
/// order) with streaming stores into `dx`, float32 on AVX-512 only (the backward benchmark's
/// case; elsewhere it returns false and the caller uses the cached loop). The calling task
/// must end with [`stream_fence`].
#[allow(clippy::too_many_arguments)]
pub fn grad_slices<T: Scalar>(
    dx: &mut [T],
    dy: &[T],
    x: &[T],
    m: f64,
    r: f64,
    s: f64,
    mu: f64,
    k: f64,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !can_stream() {
            return false;
        }
        let n = dx.len().min(dy.len()).min(x.len());
        let (Some(dy), Some(x)) = (as_f32(&dy[..n]), as_f32(&x[..n])) else {
            return false;
        };
        let Some(dx) = as_f32_mut(&mut dx[..n]) else {
            return false;
        };
        // SAFETY: AVX-512F was detected (`can_stream`).
        unsafe { x86::grad_f32_avx512(dx, dy, x, [m, r, s, mu, k]) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dx, dy, x, m, r, s, mu, k);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::reduce::affine;
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// `dst[..32] = src[..n]` then zeros, with masked loads and full stores (see `load_tail`),
    /// in the 8-value pieces the readers load (a store forwards only to loads it covers the
    /// same way: two 16-value stores read back as four 8-value loads stalled again).
    ///
    /// # Safety
    /// AVX2; `src` valid for n ≤ 32 reads, `dst` for 32 writes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn masked_copy_32_f32(dst: *mut f32, src: *const f32, n: usize) {
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for j in 0..4 {
            let left = i32::try_from(n.saturating_sub(8 * j).min(8)).unwrap_or(8);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), iota);
            // SAFETY: forwarded; masked-off lanes are not read (vmaskmovps does not fault on
            // them), and the pointer is formed with wrapping arithmetic.
            unsafe {
                let v = _mm256_maskload_ps(src.wrapping_add(8 * j), mask);
                _mm256_storeu_ps(dst.add(8 * j), v);
            }
        }
    }

    pub struct Params<'a> {
        /// 0, or the period c of the per-element arrays: element j then uses entry j mod c
        /// (channels-last rows read as one flat run; the arrays hold c + 16 entries, entry i
        /// being that of channel i mod c, so a vector never wraps).
        pub period: usize,
        /// Per-element means (channels-last rows), else `m` for every element.
        pub mv: Option<&'a [f64]>,
        pub m: f64,
        pub a: f64,
        pub b: f64,
        pub w: Option<&'a [f64]>,
        pub bias: Option<&'a [f64]>,
    }

    impl Params<'_> {
        /// The scalar formula, element j (heads and tails).
        #[inline(always)]
        fn one<T: crate::scalar::Scalar>(&self, x: T, j: usize) -> T {
            let j = if self.period > 0 { j % self.period } else { j };
            let m = self.mv.map_or(self.m, |v| v[j]);
            let a = self.w.map_or(self.a, |w| self.a * w[j]);
            let b = self.bias.map_or(self.b, |v| v[j]);
            affine(x, m, a, b)
        }
    }

    pub(super) fn level() -> u8 {
        use std::sync::OnceLock;
        static L: OnceLock<u8> = OnceLock::new();
        *L.get_or_init(|| {
            let detected = if is_x86_feature_detected!("avx512f") {
                2
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                1
            } else {
                0
            };
            detected.min(super::simd_cap())
        })
    }

    /// Elements before `ys` reaches `align` bytes (capped at n).
    pub(super) fn head(ptr: *const u8, elem: usize, align: usize, n: usize) -> usize {
        let mis = ptr as usize % align;
        if mis == 0 {
            0
        } else if !mis.is_multiple_of(elem) {
            n // cannot align: stream nothing (never happens for aligned T)
        } else {
            ((align - mis) / elem).min(n)
        }
    }

    /// Calls `$f::<MV, W, B>` for the Options that `$p` holds.
    macro_rules! by_flags {
        ($f:ident, $xs:expr, $ys:expr, $p:expr) => {
            match ($p.mv.is_some(), $p.w.is_some(), $p.bias.is_some()) {
                (false, false, false) => $f::<false, false, false>($xs, $ys, $p),
                (false, false, true) => $f::<false, false, true>($xs, $ys, $p),
                (false, true, false) => $f::<false, true, false>($xs, $ys, $p),
                (false, true, true) => $f::<false, true, true>($xs, $ys, $p),
                (true, false, false) => $f::<true, false, false>($xs, $ys, $p),
                (true, false, true) => $f::<true, false, true>($xs, $ys, $p),
                (true, true, false) => $f::<true, true, false>($xs, $ys, $p),
                (true, true, true) => $f::<true, true, true>($xs, $ys, $p),
            }
        };
    }

    /// Applies `p` to every (x, y) pair of slices (each at most as long as the per-element
    /// arrays). Streaming stores are weakly ordered: the task that calls this fences once with
    /// [`super::stream_fence`] before it finishes (a fence per row cost up to a third of the
    /// time).
    pub fn run<'s, T: 'static>(
        pairs: impl IntoIterator<Item = (&'s [T], &'s mut [T])>,
        p: &Params<'_>,
    ) -> bool {
        let lvl = level();
        if lvl == 0 {
            return false;
        }
        let is32 = TypeId::of::<T>() == TypeId::of::<f32>();
        if !is32 && TypeId::of::<T>() != TypeId::of::<f64>() {
            return false;
        }
        for (xs, ys) in pairs {
            let n = xs.len().min(ys.len());
            // SAFETY: T is f32 or f64 (checked above), so the slices reinterpret to
            // themselves; the features were detected at run time.
            unsafe {
                let yp = ys.as_mut_ptr();
                if is32 {
                    let xs = std::slice::from_raw_parts(xs.as_ptr().cast::<f32>(), n);
                    let ys = std::slice::from_raw_parts_mut(yp.cast::<f32>(), n);
                    if lvl == 2 {
                        by_flags!(f32_avx512_k, xs, ys, p)
                    } else {
                        by_flags!(f32_avx2_k, xs, ys, p)
                    }
                } else {
                    let xs = std::slice::from_raw_parts(xs.as_ptr().cast::<f64>(), n);
                    let ys = std::slice::from_raw_parts_mut(yp.cast::<f64>(), n);
                    if lvl == 2 {
                        by_flags!(f64_avx512_k, xs, ys, p)
                    } else {
                        by_flags!(f64_avx2_k, xs, ys, p)
                    }
                }
            }
        }
        true
    }

    /// Per-lane (m, a, b) of elements j..j+8 (512) or j..j+4 (256) as f64 vectors. `$mv`,
    /// `$w`, `$b` are const flags (one monomorphized loop per combination: a run-time test of
    /// each Option inside the loop cost a tenth of the kernel) and `$pm`, `$pw`, `$pb` the
    /// arrays' pointers.
    macro_rules! coef512 {
        ($j:expr, ($mv:expr, $w:expr, $b:expr), ($pm:expr, $pw:expr, $pb:expr), $vm:expr, $va:expr, $vb:expr) => {{
            // SAFETY (all loads): j + 8 <= n <= len of every per-element array (`apply`).
            let m = if $mv {
                _mm512_loadu_pd($pm.add($j))
            } else {
                $vm
            };
            let a = if $w {
                _mm512_mul_pd($va, _mm512_loadu_pd($pw.add($j)))
            } else {
                $va
            };
            let b = if $b {
                _mm512_loadu_pd($pb.add($j))
            } else {
                $vb
            };
            (m, a, b)
        }};
    }

    macro_rules! coef256 {
        ($j:expr, ($mv:expr, $w:expr, $b:expr), ($pm:expr, $pw:expr, $pb:expr), $vm:expr, $va:expr, $vb:expr) => {{
            let m = if $mv {
                _mm256_loadu_pd($pm.add($j))
            } else {
                $vm
            };
            let a = if $w {
                _mm256_mul_pd($va, _mm256_loadu_pd($pw.add($j)))
            } else {
                $va
            };
            let b = if $b {
                _mm256_loadu_pd($pb.add($j))
            } else {
                $vb
            };
            (m, a, b)
        }};
    }

    /// The next vector's entry in the per-element arrays (see `Params::period`).
    #[inline(always)]
    fn advance(ci: usize, v: usize, period: usize) -> usize {
        let mut ci = ci + v;
        while period > 0 && ci >= period {
            ci -= period;
        }
        ci
    }

    /// The arrays' pointers (null where absent; never read then).
    fn ptrs(p: &Params<'_>) -> (*const f64, *const f64, *const f64) {
        let ptr = |v: Option<&[f64]>| v.map_or(std::ptr::null(), <[f64]>::as_ptr);
        (ptr(p.mv), ptr(p.w), ptr(p.bias))
    }

    /// See [`super::grad_slices`]; `c` = [m, r, s, μ, k].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn grad_f32_avx512(dx: &mut [f32], dy: &[f32], x: &[f32], c: [f64; 5]) {
        let [m, r, s, mu, k] = c;
        let one = |g: f32, v: f32| -> f32 {
            let g = s * f64::from(g);
            #[allow(clippy::cast_possible_truncation)] // the one rounding to f32
            let y = (r * (g - mu - (f64::from(v) - m) * k)) as f32;
            y
        };
        let n = dx.len();
        let h = head(dx.as_ptr().cast(), 4, 64, n);
        for j in 0..h {
            dx[j] = one(dy[j], x[j]);
        }
        let (vm, vr, vs, vmu, vk) = (
            _mm512_set1_pd(m),
            _mm512_set1_pd(r),
            _mm512_set1_pd(s),
            _mm512_set1_pd(mu),
            _mm512_set1_pd(k),
        );
        let mut j = h;
        while j + 16 <= n {
            // SAFETY: j + 16 <= n for all three slices; dx + j is 64-byte aligned (head).
            unsafe {
                let g = _mm512_loadu_ps(dy.as_ptr().add(j));
                let v = _mm512_loadu_ps(x.as_ptr().add(j));
                let half = |a: __m512, hi: bool| {
                    if hi {
                        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                            _mm512_castps_pd(a),
                        )))
                    } else {
                        _mm512_cvtps_pd(_mm512_castps512_ps256(a))
                    }
                };
                let f = |gd: __m512d, vd: __m512d| {
                    let g = _mm512_mul_pd(vs, gd);
                    let t = _mm512_sub_pd(
                        _mm512_sub_pd(g, vmu),
                        _mm512_mul_pd(_mm512_sub_pd(vd, vm), vk),
                    );
                    _mm512_cvtpd_ps(_mm512_mul_pd(vr, t))
                };
                let lo = f(half(g, false), half(v, false));
                let hi = f(half(g, true), half(v, true));
                let y = _mm512_insertf64x4::<1>(
                    _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                    _mm256_castps_pd(hi),
                );
                _mm512_stream_ps(dx.as_mut_ptr().add(j), _mm512_castpd_ps(y));
            }
            j += 16;
        }
        for i in j..n {
            dx[i] = one(dy[i], x[i]);
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn f32_avx512_k<const MV: bool, const W: bool, const B: bool>(
        xs: &[f32],
        ys: &mut [f32],
        p: &Params<'_>,
    ) {
        let pp = ptrs(p);
        let n = xs.len();
        let h = head(ys.as_ptr().cast(), 4, 64, n);
        for j in 0..h {
            ys[j] = p.one(xs[j], j);
        }
        let (vm, va, vb) = (
            _mm512_set1_pd(p.m),
            _mm512_set1_pd(p.a),
            _mm512_set1_pd(p.b),
        );
        let mut j = h;
        let mut ci = if p.period > 0 { h % p.period } else { h };
        while j + 16 <= n {
            // SAFETY: j + 16 <= n; ys + j is 64-byte aligned (head).
            unsafe {
                let x = _mm512_loadu_ps(xs.as_ptr().add(j));
                let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
                let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(x),
                )));
                let (m0, a0, b0) = coef512!(ci, (MV, W, B), (pp.0, pp.1, pp.2), vm, va, vb);
                let (m1, a1, b1) = coef512!(ci + 8, (MV, W, B), (pp.0, pp.1, pp.2), vm, va, vb);
                let y0 = _mm512_fmadd_pd(_mm512_sub_pd(lo, m0), a0, b0);
                let y1 = _mm512_fmadd_pd(_mm512_sub_pd(hi, m1), a1, b1);
                let y = _mm512_insertf64x4::<1>(
                    _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(y0))),
                    _mm256_castps_pd(_mm512_cvtpd_ps(y1)),
                );
                _mm512_stream_ps(ys.as_mut_ptr().add(j), _mm512_castpd_ps(y));
            }
            j += 16;
            ci = advance(ci, 16, p.period);
        }
        for k in j..n {
            ys[k] = p.one(xs[k], k);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn f32_avx2_k<const MV: bool, const W: bool, const B: bool>(
        xs: &[f32],
        ys: &mut [f32],
        p: &Params<'_>,
    ) {
        let pp = ptrs(p);
        let n = xs.len();
        let h = head(ys.as_ptr().cast(), 4, 32, n);
        for j in 0..h {
            ys[j] = p.one(xs[j], j);
        }
        let (vm, va, vb) = (
            _mm256_set1_pd(p.m),
            _mm256_set1_pd(p.a),
            _mm256_set1_pd(p.b),
        );
        let mut j = h;
        let mut ci = if p.period > 0 { h % p.period } else { h };
        while j + 8 <= n {
            // SAFETY: j + 8 <= n; ys + j is 32-byte aligned (head).
            unsafe {
                let x = _mm256_loadu_ps(xs.as_ptr().add(j));
                let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
                let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x));
                let (m0, a0, b0) = coef256!(ci, (MV, W, B), (pp.0, pp.1, pp.2), vm, va, vb);
                let (m1, a1, b1) = coef256!(ci + 4, (MV, W, B), (pp.0, pp.1, pp.2), vm, va, vb);
                let y0 = _mm256_fmadd_pd(_mm256_sub_pd(lo, m0), a0, b0);
                let y1 = _mm256_fmadd_pd(_mm256_sub_pd(hi, m1), a1, b1);
                let y = _mm256_set_m128(_mm256_cvtpd_ps(y1), _mm256_cvtpd_ps(y0));
                _mm256_stream_ps(ys.as_mut_ptr().add(j), y);
            }
            j += 8;
            ci = advance(ci, 8, p.period);
        }
        for k in j..n {
            ys[k] = p.one(xs[k], k);
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn f64_avx512_k<const MV: bool, const W: bool, const B: bool>(
        xs: &[f64],
        ys: &mut [f64],
        p: &Params<'_>,
    ) {
        let pp = ptrs(p);
        let n = xs.len();
        let h = head(ys.as_ptr().cast(), 8, 64, n);
        for j in 0..h {
            ys[j] = p.one(xs[j], j);
        }
        let (vm, va, vb) = (
            _mm512_set1_pd(p.m),
            _mm512_set1_pd(p.a),
            _mm512_set1_pd(p.b),
        );
        let mut j = h;
        let mut ci = if p.period > 0 { h % p.period } else { h };
        while j + 8 <= n {
            // SAFETY: j + 8 <= n; ys + j is 64-byte aligned (head).
            unsafe {
                let x = _mm512_loadu_pd(xs.as_ptr().add(j));
                let (m0, a0, b0) = coef512!(ci, (MV, W, B), (pp.0, pp.1, pp.2), vm, va, vb);
                let y = _mm512_fmadd_pd(_mm512_sub_pd(x, m0), a0, b0);
                _mm512_stream_pd(ys.as_mut_ptr().add(j), y);
            }
            j += 8;
            ci = advance(ci, 8, p.period);
        }
        for k in j..n {
            ys[k] = p.one(xs[k], k);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn f64_avx2_k<const MV: bool, const W: bool, const B: bool>(
        xs: &[f64],
        ys: &mut [f64],
        p: &Params<'_>,
    ) {
        let pp = ptrs(p);
        let n = xs.len();
        let h = head(ys.as_ptr().cast(), 8, 32, n);
        for j in 0..h {
            ys[j] = p.one(xs[j], j);
        }
        let (vm, va, vb) = (
            _mm256_set1_pd(p.m),
            _mm256_set1_pd(p.a),
            _mm256_set1_pd(p.b),
        );
        let mut j = h;
        let mut ci = if p.period > 0 { h % p.period } else { h };
        while j + 4 <= n {
            // SAFETY: j + 4 <= n; ys + j is 32-byte aligned (head).
            unsafe {
                let x = _mm256_loadu_pd(xs.as_ptr().add(j));
                let (m0, a0, b0) = coef256!(ci, (MV, W, B), (pp.0, pp.1, pp.2), vm, va, vb);
                let y = _mm256_fmadd_pd(_mm256_sub_pd(x, m0), a0, b0);
                _mm256_stream_pd(ys.as_mut_ptr().add(j), y);
            }
            j += 4;
            ci = advance(ci, 4, p.period);
        }
        for k in j..n {
            ys[k] = p.one(xs[k], k);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming kernels with other formulas (MVN divides by σ + eps, Lp normalize by the norm),
// called per run by their ops, which fence once per task.
// ---------------------------------------------------------------------------------------------

/// The slice as f32 when T is f32.
#[inline]
pub fn as_f32<T: 'static>(s: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) }
    })
}

/// The mutable slice as f32 when T is f32.
#[inline]
pub fn as_f32_mut<T: 'static>(s: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) }
    })
}

/// `RSNORM_SIMD` (read once): `avx2` or `baseline` caps the hand-written x86 kernels of this
/// module and of `reduce::sum_slice_add` at that level — how their AVX2 versions are tested on
/// an AVX-512 machine (`tests/simd_cap.rs`), and a way out should one misbehave on some CPU.
/// The compiler-generated kernels (`multiversion`) dispatch on the CPU alone; both give bitwise
/// the same results.
#[cfg(target_arch = "x86_64")]
fn simd_cap() -> u8 {
    match std::env::var("RSNORM_SIMD") {
        Ok(v) if v.trim().eq_ignore_ascii_case("avx2") => 1,
        Ok(v) if v.trim().eq_ignore_ascii_case("baseline") => 0,
        _ => 2,
    }
}

/// The vector instructions the x86 kernels may use: 2 AVX-512F, 1 AVX2 + FMA, 0 neither
/// (capped by `RSNORM_SIMD`).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn simd_level() -> u8 {
    x86::level()
}

/// `s` as `&[f64]` when T is f64.
#[inline]
pub fn as_f64<T: 'static>(s: &[T]) -> Option<&[f64]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f64>()).then(|| {
        // SAFETY: T is f64.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f64>(), s.len()) }
    })
}

/// Can the streaming f32 kernels run here?
#[inline]
pub fn can_stream() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::level() == 2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Copies `src` (at most 32 values) to the front of `dst`. For f32 on AVX2 CPUs with masked
/// vector loads and full vector stores, so that reading `dst` back as vectors
/// forwards from the stores (a `memcpy` of a few values writes it piecewise, and the vector
/// reads that follow stall).
#[inline]
pub fn load_tail<T: Copy + 'static>(dst: &mut [T; 32], src: &[T]) {
    let n = src.len().min(32);
    #[cfg(target_arch = "x86_64")]
    if let (Some(s), true) = (as_f32(src), x86::level() >= 1) {
        // SAFETY: AVX2 is present (level ≥ 1); the masked loads touch only src[..n]
        // (masked-off lanes never fault), the stores write dst's 32 values; T is f32.
        unsafe { x86::masked_copy_32_f32(dst.as_mut_ptr().cast::<f32>(), s.as_ptr(), n) };
        return;
    }
    dst[..n].copy_from_slice(&src[..n]);
}

/// Writes 32 f32 values to `dst` with non-temporal stores (two full cache lines).
///
/// # Safety
/// The CPU must support AVX-512F; `dst` must be 64-byte aligned and valid for 32 writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn stream_32_f32(dst: *mut f32, src: &[f32; 32]) {
    use std::arch::x86_64::*;
    // SAFETY: forwarded from the caller; `src` holds 32 values.
    unsafe {
        let a = _mm512_loadu_ps(src.as_ptr());
        let b = _mm512_loadu_ps(src.as_ptr().add(16));
        _mm512_stream_ps(dst, a);
        _mm512_stream_ps(dst.add(16), b);
    }
}

/// What a streaming f32 kernel computes, in f64, rounded once to f32.
#[derive(Clone, Copy)]
pub enum StreamOp<'a> {
    /// y = (x − mean)/den (MVN).
    Center { mean: f64, den: f64 },
    /// y_i = x_i/d_i (Lp normalize); `d` as long as x.
    Divide(&'a [f64]),
}

/// The f32 kernel for `op` with non-temporal stores into the 64-byte aligned middle of `ys`
/// (the same correctly rounded operations as the scalar formulas: bitwise their results).
/// The caller fences with [`stream_fence`] before its task ends.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn stream_f32(xs: &[f32], ys: &mut [f32], op: StreamOp<'_>) {
    use std::arch::x86_64::*;
    let n = match op {
        StreamOp::Center { .. } => xs.len().min(ys.len()),
        StreamOp::Divide(d) => xs.len().min(ys.len()).min(d.len()),
    };
    let scalar = |v: f32, i: usize| -> f32 {
        let v = f64::from(v);
        f32::from_f64(match op {
            StreamOp::Center { mean, den } => (v - mean) / den,
            StreamOp::Divide(d) => v / d[i],
        })
    };
    let head = x86::head(ys.as_ptr().cast(), 4, 64, n);
    for i in 0..head {
        ys[i] = scalar(xs[i], i);
    }
    let mut i = head;
    let (px, py) = (xs.as_ptr(), ys.as_mut_ptr());
    match op {
        StreamOp::Center { mean, den } => {
            let (vm, vd) = (_mm512_set1_pd(mean), _mm512_set1_pd(den));
            while i + 16 <= n {
                // SAFETY: i + 16 ≤ n; py + i is 64-byte aligned.
                unsafe {
                    let lo = _mm512_cvtps_pd(_mm256_loadu_ps(px.add(i)));
                    let hi = _mm512_cvtps_pd(_mm256_loadu_ps(px.add(i + 8)));
                    let lo = _mm512_cvtpd_ps(_mm512_div_pd(_mm512_sub_pd(lo, vm), vd));
                    let hi = _mm512_cvtpd_ps(_mm512_div_pd(_mm512_sub_pd(hi, vm), vd));
                    _mm256_stream_ps(py.add(i), lo);
                    _mm256_stream_ps(py.add(i + 8), hi);
                }
                i += 16;
            }
        }
        StreamOp::Divide(d) => {
            let pd = d.as_ptr();
            while i + 16 <= n {
                // SAFETY: i + 16 ≤ n ≤ d.len(); py + i is 64-byte aligned.
                unsafe {
                    let lo = _mm512_cvtps_pd(_mm256_loadu_ps(px.add(i)));
                    let hi = _mm512_cvtps_pd(_mm256_loadu_ps(px.add(i + 8)));
                    let lo = _mm512_cvtpd_ps(_mm512_div_pd(lo, _mm512_loadu_pd(pd.add(i))));
                    let hi = _mm512_cvtpd_ps(_mm512_div_pd(hi, _mm512_loadu_pd(pd.add(i + 8))));
                    _mm256_stream_ps(py.add(i), lo);
                    _mm256_stream_ps(py.add(i + 8), hi);
                }
                i += 16;
            }
        }
    }
    for j in i..n {
        ys[j] = scalar(xs[j], j);
    }
}

/// Orders this thread's non-temporal stores before anything it does next: every task that
/// called [`stream_f32`] calls this before it finishes (one fence per task, not per run: a
/// fence waits for the write-combining buffers to drain).
#[inline]
pub fn stream_fence(stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if stream {
        // SAFETY: SSE is part of x86_64.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    let _ = stream;
}

/// Asks for the cache lines of `len` bytes at `p` (a hint: never faults).
#[inline(always)]
pub fn prefetch_bytes(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut o = 0;
        while o < len {
            // SAFETY: prefetching is a hint; an address outside any mapping is ignored.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.wrapping_add(o).cast::<i8>(),
                )
            };
            o += 64;
        }
    }
    let _ = (p, len);
}

#[cfg(test)]
mod tail_tests {
    use super::load_tail;

    /// `load_tail` copies exactly the tail and leaves zeros after it, for every length.
    #[test]
    fn tails_of_every_length() {
        let src32: Vec<f32> = (1..=32).map(|i| i as f32).collect();
        let src64: Vec<f64> = (1..=32).map(f64::from).collect();
        for n in 0..=32 {
            let mut d32 = [0.0f32; 32];
            load_tail(&mut d32, &src32[..n]);
            assert_eq!(&d32[..n], &src32[..n]);
            assert!(d32[n..].iter().all(|&v| v == 0.0));
            let mut d64 = [0.0f64; 32];
            load_tail(&mut d64, &src64[..n]);
            assert_eq!(&d64[..n], &src64[..n]);
            assert!(d64[n..].iter().all(|&v| v == 0.0));
        }
    }
}
