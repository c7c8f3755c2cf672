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
//! Layout: weights in panels of 16 output columns; inside a panel, one 64-byte
//! block per 4 rows of K (two 32-byte halves of 8 columns, 4 consecutive K bytes
//! per column), the layout `vpmaddubsw` + `vpmaddwd` reduce in place.

use std::arch::x86_64::*;

use super::{act, Activation, Epilogue};

/// Output columns per panel.
pub const NR: usize = 16;
/// Activation rows per micro-kernel call.
pub const MR: usize = 4;

/// Whether this CPU can run the kernel.
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Weights `[K, N]` (row-major, int8) packed for [`matmul`].
#[derive(Debug)]
pub struct Packed {
    pub n: usize,
    /// K rounded up to a multiple of 4.
    kp: usize,
    data: Vec<i8>,
}

impl Packed {
    /// `None` when a weight is −128 (see the module comment).
    pub fn new(w: &[i8], k: usize, n: usize) -> Option<Packed> {
        if w.contains(&i8::MIN) {
            return None;
        }
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(NR);
        let mut data = vec![0i8; panels * kp * NR];
        for (row, kk) in w.chunks_exact(n).zip(0..k) {
            for (col, &v) in row.iter().enumerate() {
                let (panel, c) = (col / NR, col % NR);
                data[panel * kp * NR + (kk / 4) * 64 + (c / 8) * 32 + (c % 8) * 4 + kk % 4] = v;
            }
        }
        Some(Packed { n, kp, data })
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes per activation row in the layout [`pack_row`] writes.
    pub fn row_stride(&self) -> usize {
        self.kp
    }
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
/// The CPU has AVX2; `abs`/`sgn` hold `rows.div_ceil(MR) * MR` rows of
/// `w.row_stride()` bytes; `out` holds `rows × w.n` values.
#[target_feature(enable = "avx2")]
pub unsafe fn matmul(
    w: &Packed,
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
    for panel in 0..w.n.div_ceil(NR) {
        let wp = w.data.as_ptr().add(panel * w.kp * NR);
        let col0 = panel * NR;
        let cols = (w.n - col0).min(NR);
        for r0 in (0..rows).step_by(MR) {
            let acc = tile(
                w.kp,
                abs.as_ptr().add(r0 * w.kp),
                sgn.as_ptr().add(r0 * w.kp),
                wp,
            );
            store(&acc, ep, r0, (rows - r0).min(MR), col0, cols, w.n, out);
        }
    }
}

/// The micro-kernel: 4 rows × 16 columns of i32 sums over all of K.
#[target_feature(enable = "avx2")]
unsafe fn tile(kp: usize, abs: *const u8, sgn: *const i8, w: *const i8) -> [[__m256i; 2]; MR] {
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

/// `((sum + corr_r · colsum_c) as f32) · (scale_r · wscale_c) + bias_c`, the
/// dequantization onnxruntime applies after `MatMulInteger` (`Cast`, `Mul`, `Add`),
/// in the same order of rounding.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
unsafe fn store(
    acc: &[[__m256i; 2]; MR],
    ep: &Epilogue,
    r0: usize,
    rows: usize,
    col0: usize,
    cols: usize,
    n: usize,
    out: &mut [f32],
) {
    let mut tmp = [0f32; NR];
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let (corr, scale) = ep.row(r0 + r);
        let corr = _mm256_set1_epi32(corr);
        let scale = _mm256_set1_ps(scale);
        let dst = if cols == NR {
            out.as_mut_ptr().add((r0 + r) * n + col0)
        } else {
            tmp.as_mut_ptr()
        };
        for (half, &sum) in acc.iter().enumerate() {
            let c = col0 + half * 8;
            let colsum = _mm256_loadu_si256(ep.colsum.as_ptr().add(c) as *const __m256i);
            let total = _mm256_add_epi32(sum, _mm256_mullo_epi32(corr, colsum));
            let s = _mm256_mul_ps(scale, _mm256_loadu_ps(ep.wscale.as_ptr().add(c)));
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(total), s);
            let v = _mm256_add_ps(v, _mm256_loadu_ps(ep.bias.as_ptr().add(c)));
            let v = match ep.activation {
                Activation::None => v,
                Activation::GeluTanh => gelu_tanh(v),
            };
            _mm256_storeu_ps(dst.add(half * 8), v);
        }
        if cols < NR {
            let row = (r0 + r) * n + col0;
            out[row..row + cols].copy_from_slice(&tmp[..cols]);
        }
    }
}

/// [`act::gelu_tanh`] on eight lanes, with the same operations in the same order.
#[target_feature(enable = "avx2")]
unsafe fn gelu_tanh(x: __m256) -> __m256 {
    let c = _mm256_set1_ps;
    let inner = _mm256_mul_ps(
        c(act::SQRT_2_OVER_PI),
        _mm256_add_ps(
            x,
            _mm256_mul_ps(c(0.044715), _mm256_mul_ps(x, _mm256_mul_ps(x, x))),
        ),
    );
    let y = _mm256_min_ps(
        _mm256_max_ps(inner, c(-act::TANH_CLAMP)),
        c(act::TANH_CLAMP),
    );
    let y2 = _mm256_mul_ps(y, y);
    let mut p = c(act::ALPHA[0]);
    for &a in &act::ALPHA[1..] {
        p = _mm256_add_ps(_mm256_mul_ps(p, y2), c(a));
    }
    p = _mm256_mul_ps(p, y);
    let mut q = c(act::BETA[0]);
    for &b in &act::BETA[1..] {
        q = _mm256_add_ps(_mm256_mul_ps(q, y2), c(b));
    }
    let tanh = _mm256_div_ps(p, q);
    _mm256_mul_ps(_mm256_mul_ps(c(0.5), x), _mm256_add_ps(c(1.0), tanh))
}
