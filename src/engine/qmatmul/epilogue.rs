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
    out: &mut [f32],
) {
    let n = out.len();
    // One bounds check here instead of four per element below.
    let (sums, colsum, wscale, bias) = (&sums[..n], &colsum[..n], &wscale[..n], &bias[..n]);
    let dequant = |i: usize| {
        let total = sums[i].wrapping_add(corr.wrapping_mul(colsum[i]));
        total as f32 * (scale * wscale[i]) + bias[i]
    };
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

impl Epilogue<'_> {
    /// Row `r`'s sums for the columns starting at `col0` into `out` (as many columns
    /// as `out` holds): [`row`] with this row's correction and scale.
    #[inline(always)]
    pub fn apply(&self, sums: &[i32], r: usize, col0: usize, out: &mut [f32]) {
        let (corr, scale) = self.row(r);
        row(
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
        ep.apply(&c[r * ldc..], r, 0, dst);
    }
}

multiversion! {
    /// Every row of an i32 matrix `c` (rows `ldc` apart) into `out` (`n` per row).
    pub fn rows(c: &[i32], ldc: usize, n: usize, ep: &Epilogue, out: &mut [f32]) => rows_generic
}
