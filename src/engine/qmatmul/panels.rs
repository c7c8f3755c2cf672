//! The weight layout of anotador's own x86 kernels (AVX2, AVX-VNNI, AVX-512 VNNI):
//! panels of 16 output columns; inside a panel one 64-byte block per 4 rows of K,
//! 4 consecutive K bytes per column. A 64-byte block is one 512-bit register of 16
//! columns for `vpdpbusd`, or two 256-bit halves of 8 columns for `vpdpbusd` on
//! 256-bit registers and for `vpmaddubsw` + `vpmaddwd`: one layout for all three.

use super::aligned::Aligned;

/// Output columns per panel.
pub const NR: usize = 16;

/// Weights `[K, N]` (row-major, int8) in panels.
#[derive(Debug)]
pub struct Panels {
    pub n: usize,
    /// K rounded up to a multiple of 4 (the padding is zero).
    pub kp: usize,
    /// On a cache line, so that every 64-byte block is one line.
    data: Aligned,
}

impl Panels {
    pub fn new(w: &[i8], k: usize, n: usize) -> Panels {
        Panels::padded(w, k, n, 4, 1)
    }

    /// With K padded to a multiple of `k_multiple` (itself a multiple of 4) and the
    /// panel count to a multiple of `panel_multiple`, zeros in the padding (the AMX
    /// kernel reads whole 64-byte tiles and panels in pairs).
    pub fn padded(
        w: &[i8],
        k: usize,
        n: usize,
        k_multiple: usize,
        panel_multiple: usize,
    ) -> Panels {
        debug_assert!(k_multiple.is_multiple_of(4));
        let kp = k.next_multiple_of(k_multiple);
        let panels = n.div_ceil(NR).next_multiple_of(panel_multiple);
        let mut data = Aligned::zeroed(panels * kp * NR);
        let packed = data.signed_mut();
        for (row, kk) in w.chunks_exact(n).zip(0..k) {
            for (col, &v) in row.iter().enumerate() {
                let (panel, c) = (col / NR, col % NR);
                packed[panel * kp * NR + (kk / 4) * 64 + c * 4 + kk % 4] = v;
            }
        }
        Panels { n, kp, data }
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Panels held, padding included.
    pub fn count(&self) -> usize {
        self.data.len() / (self.kp * NR)
    }

    /// The first byte of panel `p`.
    pub fn panel(&self, p: usize) -> *const i8 {
        debug_assert!(p < self.count());
        // SAFETY: in bounds for every panel index (debug-checked).
        unsafe { self.data.signed().as_ptr().add(p * self.kp * NR) }
    }
}
