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
/// `width`: the vector width the caller is compiled for. With one, whole vectors go through [`lanes`], written as intrinsics: inside the
/// AMX kernel LLVM's own vectorisation of [`act::gelu_tanh16`] split the sixteen
/// lanes into a zmm for fourteen and an xmm chain for two, doing the tanh
/// polynomial twice (a quarter of that kernel's samples at 8 × 64 tokens).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row(
    sums: &[i32],
    corr: i32,
    scale: f32,
    colsum: &[i32],
    wscale: &[f32],
    bias: &[f32],
    activation: Activation,
    width: Width,
    out: &mut [f32],
) {
    let n = out.len();
    // One bounds check here instead of four per element below.
    let (sums, colsum, wscale, bias) = (&sums[..n], &colsum[..n], &wscale[..n], &bias[..n]);
    // Only x86 has widths other than `Plain`.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = width;
    let dequant = |i: usize| {
        let total = sums[i].wrapping_add(corr.wrapping_mul(colsum[i]));
        total as f32 * (scale * wscale[i]) + bias[i]
    };
    #[cfg(target_arch = "x86_64")]
    if width != Width::Plain {
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
        let step = if width == Width::Zmm { 16 } else { 8 };
        let done = n - n % step;
        for c in (0..done).step_by(step) {
            // SAFETY: the caller is compiled for `width` (its promise), so these inline;
            // they read and write `step` values from `c`, and `c + step <= n`
            // where every slice holds `n`.
            unsafe {
                if width == Width::Zmm {
                    lanes_zmm(x, c)
                } else {
                    lanes_ymm(x, c)
                }
            }
        }
        for (i, o) in out.iter_mut().enumerate().skip(done) {
            *o = activation.of(dequant(i));
        }
        return;
    }
    // One loop per activation, so that nothing is decided per element.
    match activation {
        Activation::None => sixteens(out, dequant, |v| v, |v| v),
        Activation::GeluTanh => sixteens(out, dequant, act::gelu_tanh16, act::gelu_tanh),
        Activation::GeluErf => sixteens(out, dequant, act::gelu_erf16, act::gelu_erf),
    }
}

/// `out[i] = f(dequant(i))`, sixteen lanes at a time, written as fixed arrays: as a
/// plain loop LLVM vectorised the tanh polynomial's two halves against each other
/// in one xmm register and left the elements scalar (a profile on AVX-512 had the
/// epilogue's `vaddss`/`vdivss` as a fifth of the VNNI kernel), and without an
/// activation the loop stayed scalar inside the kernels (`vcvtsi2ss`, `vaddss`).
#[inline(always)]
fn sixteens(
    out: &mut [f32],
    dequant: impl Fn(usize) -> f32,
    f16: impl Fn([f32; 16]) -> [f32; 16],
    f1: impl Fn(f32) -> f32,
) {
    let done = out.len() - out.len() % 16;
    let (whole, rest) = out.split_at_mut(done);
    for (c, o) in whole.chunks_exact_mut(16).enumerate() {
        let v: [f32; 16] = std::array::from_fn(|j| dequant(c * 16 + j));
        o.copy_from_slice(&f16(v));
    }
    for (i, o) in rest.iter_mut().enumerate() {
        *o = f1(dequant(done + i));
    }
}

/// The vector width the caller of [`Epilogue::apply`] is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// None of its own: plain code, vectorised as far as the caller's target allows.
    Plain,
    /// AVX2 + FMA: eight lanes.
    #[cfg(target_arch = "x86_64")]
    Ymm,
    /// AVX-512 F: sixteen lanes.
    #[cfg(target_arch = "x86_64")]
    Zmm,
}

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
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    /// `maxps`/`minps`: the second operand wins when either is NaN.
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    /// `|self|`, by clearing the sign bit.
    unsafe fn abs(self) -> Self;
    /// `self` (non-negative) with the sign bit of `s`, as `f32::copysign`.
    unsafe fn sign_of(self, s: Self) -> Self;
}

/// The same operations at each width, from that width's intrinsics.
#[cfg(target_arch = "x86_64")]
macro_rules! vector {
    ($v:ty, $i:ty, $set1:ident, $load:ident, $store:ident, $load_i:ident, $set1_i:ident,
     $mullo:ident, $add_i:ident, $cvt:ident, $add:ident, $sub:ident, $mul:ident, $div:ident,
     $max:ident, $min:ident, $and_i:ident, $or_i:ident, $to_i:ident, $to_f:ident) => {
        impl Vector for $v {
            type I = $i;
            #[inline(always)]
            unsafe fn k(v: f32) -> Self {
                $set1(v)
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                $load(p)
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                $store(p, self)
            }
            #[inline(always)]
            unsafe fn load_i(p: *const i32) -> $i {
                $load_i(p.cast())
            }
            #[inline(always)]
            unsafe fn corrected(sums: $i, corr: i32, colsum: $i) -> Self {
                $cvt($add_i(sums, $mullo($set1_i(corr), colsum)))
            }
            #[inline(always)]
            unsafe fn add(self, o: Self) -> Self {
                $add(self, o)
            }
            #[inline(always)]
            unsafe fn sub(self, o: Self) -> Self {
                $sub(self, o)
            }
            #[inline(always)]
            unsafe fn mul(self, o: Self) -> Self {
                $mul(self, o)
            }
            #[inline(always)]
            unsafe fn div(self, o: Self) -> Self {
                $div(self, o)
            }
            #[inline(always)]
            unsafe fn max(self, o: Self) -> Self {
                $max(self, o)
            }
            #[inline(always)]
            unsafe fn min(self, o: Self) -> Self {
                $min(self, o)
            }
            #[inline(always)]
            unsafe fn abs(self) -> Self {
                $to_f($and_i($to_i(self), $set1_i(i32::MAX)))
            }
            #[inline(always)]
            unsafe fn sign_of(self, s: Self) -> Self {
                let sign = $and_i($to_i(s), $set1_i(i32::MIN));
                $to_f($or_i($to_i(self), sign))
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod vector {
    use super::Vector;
    use std::arch::x86_64::*;

    vector!(
        __m512,
        __m512i,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_loadu_si512,
        _mm512_set1_epi32,
        _mm512_mullo_epi32,
        _mm512_add_epi32,
        _mm512_cvtepi32_ps,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps,
        _mm512_div_ps,
        _mm512_max_ps,
        _mm512_min_ps,
        _mm512_and_si512,
        _mm512_or_si512,
        _mm512_castps_si512,
        _mm512_castsi512_ps
    );
    vector!(
        __m256,
        __m256i,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_loadu_si256,
        _mm256_set1_epi32,
        _mm256_mullo_epi32,
        _mm256_add_epi32,
        _mm256_cvtepi32_ps,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps,
        _mm256_div_ps,
        _mm256_max_ps,
        _mm256_min_ps,
        _mm256_and_si256,
        _mm256_or_si256,
        _mm256_castps_si256,
        _mm256_castsi256_ps
    );
}

/// One register of [`row`] from column `c`: the same operations in the same order
/// as `dequant` and [`act::gelu_tanh`] or [`act::gelu_erf`] (no fused
/// multiply-add), so the same bits.
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
        Activation::GeluErf => {
            let z = v.mul(k(std::f32::consts::FRAC_1_SQRT_2));
            let a = z.abs();
            let mut p = k(act::ERF[5]).mul(a);
            for &c in act::ERF[..5].iter().rev() {
                p = k(c).add(p).mul(a);
            }
            let p = p.add(k(1.0));
            let p = p.mul(p);
            let p = p.mul(p);
            let p = p.mul(p);
            let p = p.mul(p);
            let e = k(1.0).sub(k(1.0).div(p));
            v.mul(k(0.5)).mul(e.sign_of(z).add(k(1.0)))
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
    /// as `out` holds): [`row`] with this row's correction and scale. `width`: the
    /// vector width the caller is compiled for ([`Width::Plain`] where unknown).
    ///
    /// # Safety
    /// With a `width` other than [`Width::Plain`], the CPU has its instructions.
    #[inline(always)]
    pub unsafe fn apply(&self, width: Width, sums: &[i32], r: usize, col0: usize, out: &mut [f32]) {
        let (corr, scale) = self.row(r);
        row(
            sums,
            corr,
            scale,
            &self.colsum[col0..],
            &self.wscale[col0..],
            &self.bias[col0..],
            self.activation,
            width,
            out,
        );
    }
}

#[inline(always)]
fn rows_generic(c: &[i32], ldc: usize, n: usize, ep: &Epilogue, out: &mut [f32]) {
    for (r, dst) in out.chunks_exact_mut(n).enumerate() {
        // SAFETY: `Plain` asks for no instructions beyond the caller's.
        unsafe { ep.apply(Width::Plain, &c[r * ldc..], r, 0, dst) };
    }
}

multiversion! {
    /// Every row of an i32 matrix `c` (rows `ldc` apart) into `out` (`n` per row).
    pub fn rows(c: &[i32], ldc: usize, n: usize, ep: &Epilogue, out: &mut [f32]) => rows_generic
}
