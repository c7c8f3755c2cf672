//! Activations applied in the matmul epilogue, with constants shared by the
//! scalar and vector code so every kernel gives the same bits.

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
    fn tanh_is_within_1e6_of_the_library() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((super::tanh(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst < 1e-6, "max |error| {worst}");
    }
}
