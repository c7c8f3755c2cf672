//! An exact int8 matmul for x86 CPUs with AVX2 but no VNNI.
//!
//! tract-linalg's AVX2 int8 kernel widens every byte to 16 bits and multiplies one
//! broadcast byte at a time, which makes it slower than its own f32 kernel. The
//! usual AVX2 int8 recipe (`vpmaddubsw` then `vpmaddwd`, as onnxruntime's MLAS
//! does) multiplies unsigned by signed bytes and saturates its 16-bit pair sums
//! when both products are large: 2 × 255 × 127 does not fit an i16. Here the
//! activation `a = q − 128` goes in as `|a|` (≤ 128, unsigned) and its sign moves
//! onto the weight (`vpsignb`), so a pair sum is at most 2 × 128 × 127 = 32,512 and
//! never saturates: the i32 sums are exact, the same integers onnxruntime's VNNI
//! and AMX paths compute. The price is that weights must lie in −127..=127, which
//! onnxruntime's symmetric int8 weight quantization guarantees; a weight of −128
//! sends the matrix to tract-linalg instead.
//!
//! Weights in the 16-column panels of `panels.rs`.

use std::arch::x86_64::*;

use super::panels::{Panels, NR};
use super::{epilogue, Epilogue};

/// Activation rows per micro-kernel call.
pub const MR: usize = 4;

/// Whether this CPU can run the kernel (AVX2, with FMA for the epilogue's code).
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Splits one quantized row (`q − 128`) into the kernel's two operands: magnitudes
/// and signs. `abs` and `sgn` are `row_stride` long; K padding stays zero.
pub fn pack_row(a: &[i8], abs: &mut [u8], sgn: &mut [i8]) {
    for ((m, s), &v) in abs.iter_mut().zip(sgn.iter_mut()).zip(a) {
        *m = v.unsigned_abs();
        *s = v;
    }
}

/// `out[r, c] = epilogue(Σ_k a[r, k] · w[k, c])` for `rows` rows of packed
/// activations (`abs`/`sgn`, `rows` rounded up to [`MR`] with zero rows).
///
/// # Safety
/// The CPU has AVX2 and FMA; `abs`/`sgn` hold `rows.div_ceil(MR) * MR` rows of
/// `w.kp` bytes; `out` holds `rows × w.n` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul(
    w: &Panels,
    abs: &[u8],
    sgn: &[i8],
    rows: usize,
    ep: &Epilogue,
    out: &mut [f32],
) {
    debug_assert!(abs.len() >= rows.div_ceil(MR) * MR * w.kp);
    debug_assert!(out.len() >= rows * w.n);
    // Panel-outer: one panel (kp × 16 bytes) stays in L1 while every row block
    // streams past it; the activations (rows × kp × 2 bytes) are small.
    let mut tile = [[0i32; NR]; MR];
    for panel in 0..w.n.div_ceil(NR) {
        let wp = w.panel(panel);
        let col0 = panel * NR;
        let cols = (w.n - col0).min(NR);
        for r0 in (0..rows).step_by(MR) {
            let acc = tile_sums(
                w.kp,
                abs.as_ptr().add(r0 * w.kp),
                sgn.as_ptr().add(r0 * w.kp),
                wp,
            );
            for r in 0..(rows - r0).min(MR) {
                _mm256_storeu_si256(tile[r].as_mut_ptr() as *mut __m256i, acc[r][0]);
                _mm256_storeu_si256(tile[r].as_mut_ptr().add(8) as *mut __m256i, acc[r][1]);
                ep.apply(
                    epilogue::Width::Ymm,
                    &tile[r],
                    r0 + r,
                    col0,
                    &mut out[(r0 + r) * w.n + col0..][..cols],
                );
            }
        }
    }
}

/// The micro-kernel: 4 rows × 16 columns of i32 sums over all of K.
#[inline(always)]
unsafe fn tile_sums(kp: usize, abs: *const u8, sgn: *const i8, w: *const i8) -> [[__m256i; 2]; MR] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    let mut wp = w;
    for kb in (0..kp).step_by(4) {
        let b0 = _mm256_loadu_si256(wp as *const __m256i);
        let b1 = _mm256_loadu_si256(wp.add(32) as *const __m256i);
        wp = wp.add(64);
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = _mm256_set1_epi32((abs.add(r * kp + kb) as *const i32).read_unaligned());
            let s = _mm256_set1_epi32((sgn.add(r * kp + kb) as *const i32).read_unaligned());
            let p0 = _mm256_maddubs_epi16(a, _mm256_sign_epi8(b0, s));
            let p1 = _mm256_maddubs_epi16(a, _mm256_sign_epi8(b1, s));
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(p0, ones));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(p1, ones));
        }
    }
    acc
}
