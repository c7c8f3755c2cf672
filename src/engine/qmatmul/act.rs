//! Activations applied in the matmul epilogue, with constants shared by the
//! scalar and vector code so every kernel gives the same bits.

use super::Activation;

impl Activation {
    /// This activation of one value: the scalar definition every vector path
    /// reproduces bit for bit.
    #[inline(always)]
    pub fn of(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::GeluTanh => gelu_tanh(v),
            Activation::GeluErf => gelu_erf(v),
        }
    }
}

pub const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// Beyond ±7.9, tanh is ±1 in f32.
pub const TANH_CLAMP: f32 = 7.905_311;
/// A rational approximation of tanh (odd numerator of degree 13, even
/// denominator of degree 6), highest power first; Eigen's float tanh uses the
/// same one. Absolute error below 1e-6 over the whole range (see the test).
pub const ALPHA: [f32; 7] = [
    -2.760_768_5e-16,
    2.000_188e-13,
    -8.604_672e-11,
    5.122_297e-8,
    1.485_722_4e-5,
    6.372_619_3e-4,
    4.893_524_6e-3,
];
pub const BETA: [f32; 4] = [1.198_258_4e-6, 1.185_347_1e-4, 2.268_434_6e-3, 4.893_525e-3];

#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let y = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let y2 = y * y;
    let mut p = ALPHA[0];
    for &a in &ALPHA[1..] {
        p = p * y2 + a;
    }
    p *= y;
    let mut q = BETA[0];
    for &b in &BETA[1..] {
        q = q * y2 + b;
    }
    p / q
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, in the order the AVX2 code
/// computes it.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * (x + 0.044715 * (x * (x * x)));
    0.5 * x * (1.0 + tanh(inner))
}

/// [`gelu_tanh`] on sixteen values, each step over all lanes so that LLVM keeps
/// the lanes in one vector register (or two, four): the same operations in the
/// same order per value, so the same bits.
#[inline(always)]
pub fn gelu_tanh16(x: [f32; 16]) -> [f32; 16] {
    let inner = x.map(|x| SQRT_2_OVER_PI * (x + 0.044715 * (x * (x * x))));
    let y = inner.map(|v| v.clamp(-TANH_CLAMP, TANH_CLAMP));
    let y2 = y.map(|y| y * y);
    let mut p = [ALPHA[0]; 16];
    for &a in &ALPHA[1..] {
        p = std::array::from_fn(|j| p[j] * y2[j] + a);
    }
    let p: [f32; 16] = std::array::from_fn(|j| p[j] * y[j]);
    let mut q = [BETA[0]; 16];
    for &b in &BETA[1..] {
        q = std::array::from_fn(|j| q[j] * y2[j] + b);
    }
    std::array::from_fn(|j| 0.5 * x[j] * (1.0 + p[j] / q[j]))
}

/// A&S 7.1.28 (the form tract-linalg's erf uses): `erf(a) = 1 − 1/(1 + Σ cᵢ·aⁱ)¹⁶`
/// for `a ≥ 0`, odd in `x`. Its error is 3e-7 in exact arithmetic; in f32 the
/// rounding of the 16th power adds up to 1.6e-6 near 0, where 1/p¹⁶ is close to 1
/// (see the test): 1e-8 of GELU there, far below the int8 rounding before it. No
/// `exp`, so it vectorises as a short Horner chain, four squarings and a division.
pub const ERF: [f32; 6] = [
    0.070_523_08,
    0.042_282_01,
    0.009_270_527,
    0.000_152_014_3,
    0.000_276_567_2,
    0.000_043_063_8,
];

/// `erf(x)` by [`ERF`], in the order the vector code computes it.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let mut p = ERF[5] * a;
    for &c in ERF[..5].iter().rev() {
        p = (c + p) * a;
    }
    let p = p + 1.0;
    let p2 = p * p;
    let p4 = p2 * p2;
    let p8 = p4 * p4;
    (1.0 - 1.0 / (p8 * p8)).copysign(x)
}

/// `0.5·x·(1 + erf(x/√2))`, BERT's and DistilBERT's exact GELU, in the order the
/// vector code computes it (`x·(1/√2)` where the export divides by √2: one
/// rounding of difference at most, far inside the int8 error).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    (x * 0.5) * (erf(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
}

/// [`gelu_erf`] on sixteen values, step by step over all lanes for the reason
/// given at [`gelu_tanh16`].
#[inline(always)]
pub fn gelu_erf16(x: [f32; 16]) -> [f32; 16] {
    let z = x.map(|x| x * std::f32::consts::FRAC_1_SQRT_2);
    let a = z.map(f32::abs);
    let mut p: [f32; 16] = std::array::from_fn(|j| ERF[5] * a[j]);
    for &c in ERF[..5].iter().rev() {
        p = std::array::from_fn(|j| (c + p[j]) * a[j]);
    }
    let p = p.map(|p| p + 1.0);
    let p = p.map(|p| p * p);
    let p = p.map(|p| p * p);
    let p = p.map(|p| p * p);
    let p = p.map(|p| p * p);
    std::array::from_fn(|j| (x[j] * 0.5) * ((1.0 - 1.0 / p[j]).copysign(z[j]) + 1.0))
}

/// erf in f64 for tests: its Maclaurin series on |x| ≤ 4.5 (cancellation leaves
/// ~1e-8 there), ±1 beyond (erfc(4.5) = 2e-10).
#[cfg(test)]
pub(crate) fn erf_f64(x: f64) -> f64 {
    if x.abs() > 4.5 {
        return x.signum();
    }
    // 2/√π · Σ (−1)ⁿ x²ⁿ⁺¹ / (n! (2n+1))
    let (mut term, mut sum) = (x, x);
    for n in 1..200 {
        term *= -x * x / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sixteen_lanes_give_the_bits_of_one() {
        let x: [f32; 16] = std::array::from_fn(|j| (j as f32 - 7.5) * 1.37);
        let g = super::gelu_tanh16(x);
        for j in 0..16 {
            assert_eq!(
                g[j].to_bits(),
                super::gelu_tanh(x[j]).to_bits(),
                "x={}",
                x[j]
            );
        }
    }

    #[test]
    fn sixteen_erf_lanes_give_the_bits_of_one() {
        let x: [f32; 16] = std::array::from_fn(|j| (j as f32 - 7.5) * 0.91);
        let mut x = x;
        x[3] = -0.0;
        x[4] = 0.0;
        x[5] = -40.0;
        x[6] = 1e30;
        let g = super::gelu_erf16(x);
        for j in 0..16 {
            assert_eq!(
                g[j].to_bits(),
                super::gelu_erf(x[j]).to_bits(),
                "x={}",
                x[j]
            );
        }
    }

    #[test]
    fn erf_is_within_2e6_of_its_series() {
        let series = super::erf_f64;
        let mut worst = 0f64;
        for i in -40_000..=40_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((super::erf(x) as f64 - series(x as f64)).abs());
        }
        for x in [4.5f32, 6.0, 10.0, 100.0, 1e6, f32::MAX, f32::INFINITY] {
            assert!((super::erf(x) - 1.0).abs() < 3e-7, "{x}");
            assert!((super::erf(-x) + 1.0).abs() < 3e-7, "{x}");
        }
        assert!(worst < 2e-6, "max |error| {worst}");
        assert!(super::gelu_erf(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_is_within_1e6_of_the_library() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((super::tanh(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst < 1e-6, "max |error| {worst}");
    }
}
