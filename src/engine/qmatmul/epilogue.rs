//! The dequantization every int8 kernel ends with, written once: exact i32 sums in,
//! `((sum + corr·colsum) as f32) · (scale·wscale) + bias` out, then the activation —
//! onnxruntime's `MatMulInteger → Cast → Mul → Add` in the same order of rounding.
//! Our own kernels call [`Epilogue::apply`] on a tile still in L1 from inside their
//! `#[target_feature]` code; the i32 matrices of tract-linalg and rten-gemm go
//! through [`rows`], compiled for this CPU by `multiversion!` (as baseline SSE2 it
//! was a third of a message on an AVX-512 server).

use super::{act, Activation, Epilogue};
use crate::engine::simd::multiversion;

/// One output row. `sums`, `colsum`, `wscale` and `bias` hold at least `out.len()`
/// values; `corr` is the row's zero-point correction, `scale` its activation scale.
///
/// `W`: the vector width the caller is compiled for ([`NONE`], [`YMM`], [`ZMM`]).
/// With one, whole vectors go through [`lanes`], written as intrinsics: inside the
/// AMX kernel LLVM's own vectorisation of [`act::gelu_tanh16`] split the sixteen
/// lanes into a zmm for fourteen and an xmm chain for two, doing the tanh
/// polynomial twice (a quarter of that kernel's samples at 8 × 64 tokens).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row<const W: u8>(
    sums: &[i32],
    corr: i32,
    scale: f32,
    colsum: &[i32],
    wscale: &[f32],
    bias: &[f32],
    activation: Activation,
    out: &mut [f32],
) {
    let n = out.len();
    // One bounds check here instead of four per element below.
    let (sums, colsum, wscale, bias) = (&sums[..n], &colsum[..n], &wscale[..n], &bias[..n]);
    let dequant = |i: usize| {
        let total = sums[i].wrapping_add(corr.wrapping_mul(colsum[i]));
        total as f32 * (scale * wscale[i]) + bias[i]
    };
    #[cfg(target_arch = "x86_64")]
    if W != NONE {
        let x = At {
            sums: sums.as_ptr(),
            colsum: colsum.as_ptr(),
            wscale: wscale.as_ptr(),
            bias: bias.as_ptr(),
            out: out.as_mut_ptr(),
            corr,
            scale,
            activation,
        };
        let step = if W == ZMM { 16 } else { 8 };
        let done = n - n % step;
        for c in (0..done).step_by(step) {
            // SAFETY: the caller is compiled for `W` (its promise), so these inline;
            // they read and write `step` values from `c`, and `c + step <= n`
            // where every slice holds `n`.
            unsafe {
                if W == ZMM {
                    lanes_zmm(x, c)
                } else {
                    lanes_ymm(x, c)
                }
            }
        }
        for (i, o) in out.iter_mut().enumerate().skip(done) {
            *o = match activation {
                Activation::None => dequant(i),
                Activation::GeluTanh => act::gelu_tanh(dequant(i)),
            };
        }
        return;
    }
    match activation {
        Activation::None => {
            // In sixteens for the same reason as below: as a plain loop inside the
            // kernels it stayed scalar (`vcvtsi2ss`, `vaddss`).
            let done = n - n % 16;
            let (whole, rest) = out.split_at_mut(done);
            for (c, o) in whole.chunks_exact_mut(16).enumerate() {
                let v: [f32; 16] = std::array::from_fn(|j| dequant(c * 16 + j));
                o.copy_from_slice(&v);
            }
            for (i, o) in rest.iter_mut().enumerate() {
                *o = dequant(done + i);
            }
        }
        Activation::GeluTanh => {
            // Sixteen lanes at a time, written as fixed arrays: as a plain loop LLVM
            // vectorised the tanh polynomial's two halves against each other in one
            // xmm register and left the elements scalar (a profile on AVX-512 had
            // the epilogue's `vaddss`/`vdivss` as a fifth of the VNNI kernel).
            let done = n - n % 16;
            let (whole, rest) = out.split_at_mut(done);
            for (c, o) in whole.chunks_exact_mut(16).enumerate() {
                let v: [f32; 16] = std::array::from_fn(|j| dequant(c * 16 + j));
                o.copy_from_slice(&act::gelu_tanh16(v));
            }
            for (i, o) in rest.iter_mut().enumerate() {
                *o = act::gelu_tanh(dequant(done + i));
            }
        }
    }
}

/// Compiled for no vector width of its own (the caller's code decides).
pub const NONE: u8 = 0;
/// AVX2 + FMA: eight lanes.
#[cfg(target_arch = "x86_64")]
pub const YMM: u8 = 1;
/// AVX-512 F: sixteen lanes.
#[cfg(target_arch = "x86_64")]
pub const ZMM: u8 = 2;

/// One row's operands for [`lanes`].
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct At {
    sums: *const i32,
    colsum: *const i32,
    wscale: *const f32,
    bias: *const f32,
    out: *mut f32,
    corr: i32,
    scale: f32,
    activation: Activation,
}

/// The f32 and i32 register operations [`lanes`] needs, at one width.
#[cfg(target_arch = "x86_64")]
trait Vector: Copy {
    type I: Copy;
    unsafe fn k(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn load_i(p: *const i32) -> Self::I;
    /// `sums + corr · colsum` in wrapping i32, as f32.
    unsafe fn corrected(sums: Self::I, corr: i32, colsum: Self::I) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    /// `maxps`/`minps`: the second operand wins when either is NaN.
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
}

#[cfg(target_arch = "x86_64")]
mod vector {
    use std::arch::x86_64::*;

    impl super::Vector for __m512 {
        type I = __m512i;
        #[inline(always)]
        unsafe fn k(v: f32) -> Self {
            _mm512_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self)
        }
        #[inline(always)]
        unsafe fn load_i(p: *const i32) -> __m512i {
            _mm512_loadu_si512(p.cast())
        }
        #[inline(always)]
        unsafe fn corrected(sums: __m512i, corr: i32, colsum: __m512i) -> Self {
            _mm512_cvtepi32_ps(_mm512_add_epi32(
                sums,
                _mm512_mullo_epi32(_mm512_set1_epi32(corr), colsum),
            ))
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            _mm512_add_ps(self, o)
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            _mm512_mul_ps(self, o)
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            _mm512_div_ps(self, o)
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            _mm512_max_ps(self, o)
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            _mm512_min_ps(self, o)
        }
    }

    impl super::Vector for __m256 {
        type I = __m256i;
        #[inline(always)]
        unsafe fn k(v: f32) -> Self {
            _mm256_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self)
        }
        #[inline(always)]
        unsafe fn load_i(p: *const i32) -> __m256i {
            _mm256_loadu_si256(p.cast())
        }
        #[inline(always)]
        unsafe fn corrected(sums: __m256i, corr: i32, colsum: __m256i) -> Self {
            _mm256_cvtepi32_ps(_mm256_add_epi32(
                sums,
                _mm256_mullo_epi32(_mm256_set1_epi32(corr), colsum),
            ))
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            _mm256_add_ps(self, o)
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            _mm256_mul_ps(self, o)
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            _mm256_div_ps(self, o)
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            _mm256_max_ps(self, o)
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            _mm256_min_ps(self, o)
        }
    }
}

/// One register of [`row`] from column `c`: the same operations in the same order
/// as `dequant` and [`act::gelu_tanh`] (no fused multiply-add), so the same bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes<V: Vector>(x: At, c: usize) {
    let k = |v| V::k(v);
    let total = V::corrected(V::load_i(x.sums.add(c)), x.corr, V::load_i(x.colsum.add(c)));
    let v = total
        .mul(k(x.scale).mul(V::load(x.wscale.add(c))))
        .add(V::load(x.bias.add(c)));
    let y = match x.activation {
        Activation::None => v,
        Activation::GeluTanh => {
            let cube = v.mul(v.mul(v));
            let inner = k(act::SQRT_2_OVER_PI).mul(v.add(k(0.044715).mul(cube)));
            // `f32::clamp`: with the bound first, a NaN passes through as it does.
            let y = k(act::TANH_CLAMP).min(k(-act::TANH_CLAMP).max(inner));
            let y2 = y.mul(y);
            let mut p = k(act::ALPHA[0]);
            for &a in &act::ALPHA[1..] {
                p = p.mul(y2).add(k(a));
            }
            let p = p.mul(y);
            let mut q = k(act::BETA[0]);
            for &b in &act::BETA[1..] {
                q = q.mul(y2).add(k(b));
            }
            k(0.5).mul(v).mul(k(1.0).add(p.div(q)))
        }
    };
    y.store(x.out.add(c));
}

/// [`lanes`] at sixteen.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn lanes_zmm(x: At, c: usize) {
    lanes::<std::arch::x86_64::__m512>(x, c)
}

/// [`lanes`] at eight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn lanes_ymm(x: At, c: usize) {
    lanes::<std::arch::x86_64::__m256>(x, c)
}

impl Epilogue<'_> {
    /// Row `r`'s sums for the columns starting at `col0` into `out` (as many columns
    /// as `out` holds): [`row`] with this row's correction and scale. `W`: the
    /// vector width the caller is compiled for ([`NONE`] where unknown).
    ///
    /// # Safety
    /// With `W` other than [`NONE`], the CPU has that width's instructions.
    #[inline(always)]
    pub unsafe fn apply<const W: u8>(&self, sums: &[i32], r: usize, col0: usize, out: &mut [f32]) {
        let (corr, scale) = self.row(r);
        row::<W>(
            sums,
            corr,
            scale,
            &self.colsum[col0..],
            &self.wscale[col0..],
            &self.bias[col0..],
            self.activation,
            out,
        );
    }
}

#[inline(always)]
fn rows_generic(c: &[i32], ldc: usize, n: usize, ep: &Epilogue, out: &mut [f32]) {
    for (r, dst) in out.chunks_exact_mut(n).enumerate() {
        // SAFETY: `NONE` asks for no instructions beyond the caller's.
        unsafe { ep.apply::<NONE>(&c[r * ldc..], r, 0, dst) };
    }
}

multiversion! {
    /// Every row of an i32 matrix `c` (rows `ldc` apart) into `out` (`n` per row).
    pub fn rows(c: &[i32], ldc: usize, n: usize, ep: &Epilogue, out: &mut [f32]) => rows_generic
}
