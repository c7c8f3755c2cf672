//! Dynamic quantization of activations: onnxruntime's `DynamicQuantizeLinear`
//! arithmetic (uint8, asymmetric, scale and zero point from the range), so a row
//! quantized here holds the very integers onnxruntime's int8 path multiplies.
//!
//! The kernels multiply signed bytes, so the stored value is `q − 128`: it fits an
//! i8 whatever the zero point, and the constant shift comes back exactly through
//! the weight column sums (`Σ (q − zp)·w = Σ (q − 128)·w + (128 − zp)·Σ w`).

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
pub fn range(x: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was just detected.
        return unsafe { x86::range(x) };
    }
    range_scalar(x)
}

fn range_scalar(x: &[f32]) -> (f32, f32) {
    // Eight lanes so LLVM keeps the loop vectorised on every target.
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            lo[j] = if c[j] < lo[j] { c[j] } else { lo[j] };
            hi[j] = if c[j] > hi[j] { c[j] } else { hi[j] };
        }
    }
    let mut min = lo.iter().copied().fold(f32::INFINITY, f32::min);
    let mut max = hi.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

/// `q − 128` for every value: `clamp(round_half_even(x / scale) + zp, 0, 255) − 128`,
/// division and rounding as onnxruntime's `QuantizeLinear` does them.
pub fn quantize(x: &[f32], p: Params, out: &mut [i8]) {
    debug_assert!(out.len() >= x.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was just detected; `out` holds at least `x.len()`.
        unsafe { x86::quantize(x, p, out) };
        return;
    }
    quantize_scalar(x, p, out)
}

fn quantize_scalar(x: &[f32], p: Params, out: &mut [i8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        let q = ((v / p.scale).round_ties_even() as i32 + p.zero_point).clamp(0, 255);
        *o = (q - 128) as i8;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Params;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn range(x: &[f32]) -> (f32, f32) {
        let mut lo = _mm256_set1_ps(f32::INFINITY);
        let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
        let mut min = l.iter().copied().fold(f32::INFINITY, f32::min);
        let mut max = h.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &v in chunks.remainder() {
            min = min.min(v);
            max = max.max(v);
        }
        (min, max)
    }

    /// Eight values a step: divide, round to nearest even (the default MXCSR mode,
    /// which `cvtps` uses), add the zero point, saturate to 0..255, shift by 128.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize(x: &[f32], p: Params, out: &mut [i8]) {
        let scale = _mm256_set1_ps(p.scale);
        let zp = _mm256_set1_epi32(p.zero_point);
        let lo = _mm256_setzero_si256();
        let hi = _mm256_set1_epi32(255);
        let shift = _mm256_set1_epi32(128);
        let n = x.len() / 8 * 8;
        let mut i = 0;
        while i < n {
            let v = _mm256_div_ps(_mm256_loadu_ps(x.as_ptr().add(i)), scale);
            let q = _mm256_add_epi32(_mm256_cvtps_epi32(v), zp);
            let q = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(q, lo), hi), shift);
            // i32 lanes in −128..=127: two saturating packs keep them exactly.
            let w = _mm256_packs_epi32(q, q);
            let b = _mm256_packs_epi16(w, w);
            let lanes = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
            let pair = _mm256_castsi256_si128(lanes);
            std::ptr::write_unaligned(out.as_mut_ptr().add(i) as *mut i64, _mm_cvtsi128_si64(pair));
            i += 8;
        }
        super::quantize_scalar(&x[n..], p, &mut out[n..]);
    }
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
    fn vector_and_scalar_quantization_agree_to_the_bit() {
        // Values on exact .5 boundaries test the half-to-even rounding of both paths.
        let mut x: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 2001) as f32 / 97.0 - 10.0)
            .collect();
        x.extend([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0]);
        let (min, max) = range(&x);
        assert_eq!((min, max), range_scalar(&x));
        for p in [
            Params::from_range(min, max),
            Params {
                scale: 1.0,
                zero_point: 128,
            },
        ] {
            let (mut a, mut b) = (vec![0i8; x.len()], vec![0i8; x.len()]);
            quantize(&x, p, &mut a);
            quantize_scalar(&x, p, &mut b);
            assert_eq!(a, b);
        }
        let p = Params {
            scale: 1.0,
            zero_point: 128,
        };
        let mut q = vec![0i8; 6];
        quantize_scalar(&[0.5, 1.5, 2.5, -0.5, -1.5, 300.0], p, &mut q);
        assert_eq!(q, [0, 2, 2, 0, -2, 127], "half to even, saturated at 255");
    }
}
