//! Dynamic quantization of activations: onnxruntime's `DynamicQuantizeLinear`
//! arithmetic (uint8, asymmetric, scale and zero point from the range), so a row
//! quantized here holds the very integers onnxruntime's int8 path multiplies.
//!
//! The kernels multiply signed bytes, so the stored value is `q − 128`: it fits an
//! i8 whatever the zero point, and the constant shift comes back exactly through
//! the weight column sums (`Σ (q − zp)·w = Σ (q − 128)·w + (128 − zp)·Σ w`).

use crate::engine::simd::multiversion;

/// Scale and zero point of one quantized range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub scale: f32,
    pub zero_point: i32,
}

impl Params {
    /// `DynamicQuantizeLinear`: the range always includes 0; `scale = (max − min) / 255`,
    /// `zp = round_half_even(clamp(−min / scale, 0, 255))`; an all-zero range gets
    /// scale 1 (onnxruntime's choice), so nothing divides by zero.
    pub fn from_range(min: f32, max: f32) -> Params {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let scale = if max == min { 1.0 } else { (max - min) / 255.0 };
        let zero_point = (-min / scale).clamp(0.0, 255.0).round_ties_even() as i32;
        Params { scale, zero_point }
    }

    /// What the kernels add back per row: `(128 − zp)` times a weight column sum.
    pub fn shift_correction(&self) -> i32 {
        128 - self.zero_point
    }
}

/// Smallest and largest value; NaN-free inputs assumed (a NaN logit is garbage
/// anyway, and the range then only loses the NaN).
#[inline(always)]
fn range_generic(x: &[f32]) -> (f32, f32) {
    // Sixteen independent lanes (one zmm, two ymm, four NEON q registers), written
    // as `minps`/`maxps` (second operand on a NaN) so that LLVM keeps them in
    // registers: with eight lanes it reversed them with shuffles every iteration
    // (8.7 % of a message in a profile on AVX-512).
    let mut lo = [f32::INFINITY; 16];
    let mut hi = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        let c: &[f32; 16] = c.try_into().expect("16 values");
        lo = std::array::from_fn(|j| if c[j] < lo[j] { c[j] } else { lo[j] });
        hi = std::array::from_fn(|j| if c[j] > hi[j] { c[j] } else { hi[j] });
    }
    let mut min = lo.iter().copied().fold(f32::INFINITY, f32::min);
    let mut max = hi.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

multiversion! {
    fn range_mv(x: &[f32]) -> (f32, f32) => range_generic
}

/// The smallest and largest value of `x` (NaNs skipped).
pub fn range(x: &[f32]) -> (f32, f32) {
    // LLVM turns the generic loop into lane reversals on every iteration when it
    // targets AVX-512 (8 % of a message in a profile): written out there.
    #[cfg(target_arch = "x86_64")]
    if crate::engine::simd::level() == crate::engine::simd::Level::Avx512 {
        // SAFETY: `level()` never exceeds what this CPU was detected to have.
        return unsafe { range_avx512(x) };
    }
    range_mv(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn range_avx512(x: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let mut lo = _mm512_set1_ps(f32::INFINITY);
    let mut hi = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        // SAFETY: 16 values.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        // `vminps v, lo` keeps `lo` where `v` is NaN, as the generic code does.
        lo = _mm512_min_ps(v, lo);
        hi = _mm512_max_ps(v, hi);
    }
    let mut min = _mm512_reduce_min_ps(lo);
    let mut max = _mm512_reduce_max_ps(hi);
    for &v in chunks.remainder() {
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

/// `clamp(round_half_even(x / scale) + zp, 0, 255)`: division and rounding as
/// onnxruntime's `QuantizeLinear` does them. Clamped as a float, then converted: the
/// same integer for every finite value (a whole number plus zp is exact below 2²⁴,
/// and anything larger clamps either way), while `as i32` first made LLVM convert
/// lane by lane (a fifth of a message in a profile on AVX-512). NaN gives 0.
#[inline(always)]
fn quantized(v: f32, p: Params) -> i32 {
    let q = (v / p.scale).round_ties_even() + p.zero_point as f32;
    // Not `clamp`: it keeps a NaN, which the conversion below must never see.
    #[allow(clippy::manual_clamp)]
    let q = q.max(0.0).min(255.0);
    // SAFETY: `max`/`min` turned a NaN into 0 and bound the value to [0, 255].
    unsafe { q.to_int_unchecked::<i32>() }
}

#[inline(always)]
fn quantize_generic(x: &[f32], p: Params, out: &mut [i8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (quantized(v, p) - 128) as i8;
    }
}

#[inline(always)]
fn quantize_unsigned_generic(x: &[f32], p: Params, out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quantized(v, p) as u8;
    }
}

multiversion! {
    /// `q − 128` for every value of `x` into `out`: the signed bytes of the AVX2 and
    /// tract-linalg kernels.
    pub fn quantize(x: &[f32], p: Params, out: &mut [i8]) => quantize_generic
}

multiversion! {
    /// `q` for every value of `x` into `out`: the unsigned bytes of the VNNI and
    /// rten-gemm kernels.
    pub fn quantize_unsigned(x: &[f32], p: Params, out: &mut [u8]) => quantize_unsigned_generic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_follow_dynamic_quantize_linear() {
        // Range [−1, 3]: scale 4/255, zero point round(255/4) = round(63.75) = 64.
        let p = Params::from_range(-1.0, 3.0);
        assert_eq!(p.scale, 4.0 / 255.0);
        assert_eq!(p.zero_point, 64);
        // All positive: the range is widened to 0, zero point 0.
        assert_eq!(Params::from_range(2.0, 5.0).zero_point, 0);
        // All negative: zero point 255.
        assert_eq!(Params::from_range(-5.0, -2.0).zero_point, 255);
        // All zero: scale 1, not a division by zero.
        assert_eq!(
            Params::from_range(0.0, 0.0),
            Params {
                scale: 1.0,
                zero_point: 0
            }
        );
    }

    #[test]
    fn every_level_quantizes_like_the_definition_to_the_bit() {
        use crate::engine::simd::{supported, with_level};
        // Values on exact .5 boundaries test the half-to-even rounding.
        let mut x: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 2001) as f32 / 97.0 - 10.0)
            .collect();
        x.extend([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0]);
        let reference_range = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        // The definition, one value at a time (IEEE f32 division is exact to the bit).
        let reference = |v: f32, p: Params| -> i32 {
            ((v / p.scale).round_ties_even() as i32 + p.zero_point).clamp(0, 255)
        };
        for level in supported() {
            with_level(level, || {
                let (min, max) = range(&x);
                assert_eq!((min, max), reference_range, "{level:?}");
                for p in [
                    Params::from_range(min, max),
                    Params {
                        scale: 1.0,
                        zero_point: 128,
                    },
                ] {
                    let (mut s, mut u) = (vec![0i8; x.len()], vec![0u8; x.len()]);
                    quantize(&x, p, &mut s);
                    quantize_unsigned(&x, p, &mut u);
                    for (i, &v) in x.iter().enumerate() {
                        let q = reference(v, p);
                        assert_eq!((s[i] as i32 + 128, u[i] as i32), (q, q), "{level:?} x={v}");
                    }
                }
                let p = Params {
                    scale: 1.0,
                    zero_point: 128,
                };
                let mut q = vec![0i8; 6];
                quantize(&[0.5, 1.5, 2.5, -0.5, -1.5, 300.0], p, &mut q);
                assert_eq!(q, [0, 2, 2, 0, -2, 127], "half to even, saturated at 255");
            });
        }
    }
}
