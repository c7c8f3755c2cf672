//! anotador's int8 kernels for x86 CPUs with VNNI. `vpdpbusd` multiplies unsigned
//! activation bytes by signed weight bytes and adds each group of four products into
//! an i32 lane, exactly: no 16-bit intermediate to saturate (as `vpmaddubsw` does,
//! hence the sign trick of `avx2.rs`), so the activations go in as onnxruntime's
//! quantized bytes `q` and the zero point comes back through the weight column sums
//! (`Σ (q − zp)·w = Σ q·w − zp·Σ w`).
//!
//! One kernel body over [`Width`], compiled twice: on 512-bit registers for AVX-512
//! VNNI (Ice Lake and Sapphire Rapids Xeons, Zen 4 and 5) and on 256-bit ones for
//! AVX-VNNI (Alder Lake and later desktops, which have no AVX-512). Weights are in
//! the 16-column panels of `panels.rs`; a tile is [`MR`] activation rows by `ACC`
//! registers of columns, accumulated over all of K in registers, then written to a
//! small buffer that the shared epilogue turns into f32 while it is in L1.

use std::arch::x86_64::*;

use super::panels::{Panels, NR};
use super::{epilogue, Epilogue};

/// Activation rows per tile.
pub const MR: usize = 4;

/// Whether this CPU can run the 512-bit kernel.
pub fn avx512_available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
}

/// Whether this CPU can run the 256-bit kernel.
pub fn avx_available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma") && has!("avxvnni")
}

/// The register operations of the kernel at one width. Implementations are
/// `#[inline(always)]` and only called from the `#[target_feature]` functions
/// below, where their intrinsics compile to single instructions.
trait Width {
    type V: Copy;
    /// i32 lanes (output columns) per register.
    const LANES: usize;
    /// The epilogue's vector width.
    const EPILOGUE: epilogue::Width;
    unsafe fn zero() -> Self::V;
    /// The same four activation bytes in every lane.
    unsafe fn splat(four: i32) -> Self::V;
    unsafe fn load(p: *const i8) -> Self::V;
    unsafe fn dpbusd(acc: Self::V, a: Self::V, w: Self::V) -> Self::V;
    unsafe fn store(p: *mut i32, v: Self::V);
}

struct Zmm;

impl Width for Zmm {
    type V = __m512i;
    const LANES: usize = 16;
    const EPILOGUE: epilogue::Width = epilogue::Width::Zmm;
    #[inline(always)]
    unsafe fn zero() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn splat(four: i32) -> __m512i {
        _mm512_set1_epi32(four)
    }
    #[inline(always)]
    unsafe fn load(p: *const i8) -> __m512i {
        _mm512_loadu_si512(p as *const __m512i)
    }
    #[inline(always)]
    unsafe fn dpbusd(acc: __m512i, a: __m512i, w: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, a, w)
    }
    #[inline(always)]
    unsafe fn store(p: *mut i32, v: __m512i) {
        _mm512_storeu_si512(p as *mut __m512i, v)
    }
}

struct Ymm;

impl Width for Ymm {
    type V = __m256i;
    const LANES: usize = 8;
    const EPILOGUE: epilogue::Width = epilogue::Width::Ymm;
    #[inline(always)]
    unsafe fn zero() -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn splat(four: i32) -> __m256i {
        _mm256_set1_epi32(four)
    }
    #[inline(always)]
    unsafe fn load(p: *const i8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, a: __m256i, w: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, a, w)
    }
    #[inline(always)]
    unsafe fn store(p: *mut i32, v: __m256i) {
        _mm256_storeu_si256(p as *mut __m256i, v)
    }
}

/// `out[r, c] = epilogue(Σ_k q[r, k] · w[k, c])` with the 512-bit kernel.
///
/// # Safety
/// [`avx512_available`]; `a` holds `rows.div_ceil(MR) * MR` rows of `w.kp` bytes
/// (padding zero); `out` holds `rows × w.n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")]
pub unsafe fn matmul_avx512(w: &Panels, a: &[u8], rows: usize, ep: &Epilogue, out: &mut [f32]) {
    // Four registers of 16 columns per row: 16 accumulators, 4 weight loads and 4
    // broadcasts per 16 multiply-adds.
    matmul::<Zmm, 4, 1>(w, a, rows, ep, out)
}

/// The same with the 256-bit kernel.
///
/// # Safety
/// [`avx_available`]; the buffers as for [`matmul_avx512`].
#[target_feature(enable = "avx2,fma,avxvnni")]
pub unsafe fn matmul_avx(w: &Panels, a: &[u8], rows: usize, ep: &Epilogue, out: &mut [f32]) {
    // Two registers of 8 columns (one panel) per row: 8 accumulators of 16 ymm.
    matmul::<Ymm, 2, 2>(w, a, rows, ep, out)
}

/// `REGS` registers of columns per tile row; `ONE`: the registers of one panel, for
/// the panels left over at the end.
#[inline(always)]
unsafe fn matmul<W: Width, const REGS: usize, const ONE: usize>(
    w: &Panels,
    a: &[u8],
    rows: usize,
    ep: &Epilogue,
    out: &mut [f32],
) {
    let kp = w.kp;
    debug_assert!(a.len() >= rows.div_ceil(MR) * MR * kp);
    debug_assert!(out.len() >= rows * w.n);
    let block_panels = REGS * W::LANES / NR;
    let panels = w.n.div_ceil(NR);
    // Column blocks outer: a block of weights (K × 64 bytes per panel) stays in
    // cache while every row block streams past it.
    let mut p0 = 0;
    while p0 < panels {
        if panels - p0 >= block_panels {
            block::<W, REGS>(w, p0, a, rows, ep, out);
            p0 += block_panels;
        } else {
            // The last panels, one at a time.
            block::<W, ONE>(w, p0, a, rows, ep, out);
            p0 += 1;
        }
    }
}

/// Every row block against `REGS` registers of columns from panel `p0` on.
#[inline(always)]
unsafe fn block<W: Width, const REGS: usize>(
    w: &Panels,
    p0: usize,
    a: &[u8],
    rows: usize,
    ep: &Epilogue,
    out: &mut [f32],
) {
    let kp = w.kp;
    let cols0 = p0 * NR;
    let cols = (REGS * W::LANES).min(w.n - cols0);
    // Register j reads `W::LANES` columns: panel j / per_panel, that part of it.
    let per_panel = NR / W::LANES;
    let mut wp = [std::ptr::null::<i8>(); REGS];
    for (j, p) in wp.iter_mut().enumerate() {
        *p = w
            .panel(p0 + j / per_panel)
            .add((j % per_panel) * W::LANES * 4);
    }
    let mut tile = [[0i32; 64]; MR];
    for r0 in (0..rows).step_by(MR) {
        let mut acc = [[W::zero(); REGS]; MR];
        let ar = a.as_ptr().add(r0 * kp);
        for kb in (0..kp).step_by(4) {
            let mut wv = [W::zero(); REGS];
            for (v, p) in wv.iter_mut().zip(&wp) {
                *v = W::load(p.add(kb * NR));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let four = (ar.add(r * kp + kb) as *const i32).read_unaligned();
                let av = W::splat(four);
                for (acc, &wv) in acc.iter_mut().zip(&wv) {
                    *acc = W::dpbusd(*acc, av, wv);
                }
            }
        }
        let valid = (rows - r0).min(MR);
        for r in 0..valid {
            for (j, &v) in acc[r].iter().enumerate() {
                W::store(tile[r].as_mut_ptr().add(j * W::LANES), v);
            }
            let dst = &mut out[(r0 + r) * w.n + cols0..][..cols];
            ep.apply(W::EPILOGUE, &tile[r], r0 + r, cols0, dst);
        }
    }
}
