//! anotador's int8 kernel for x86 CPUs with AMX (Sapphire Rapids Xeons and later).
//! `tdpbusd` multiplies a 16 × 64 tile of unsigned activation bytes by a 16 × 64
//! tile of signed weight bytes into 16 × 16 i32 sums, exactly as `vpdpbusd` does
//! lane by lane (`vnni.rs`): same operands, same sums, 16 times the work per
//! instruction. onnxruntime's MLAS runs its int8 GEMM on AMX on these CPUs; with
//! the VNNI kernel we measured 1.4–2.9× its time per message here.
//!
//! Weights are the panels of `panels.rs` (16 columns, one 64-byte row per 4 K),
//! which is already the tile layout `tdpbusd` reads for its second operand: a tile
//! is 16 consecutive rows of a panel. K is padded to 64 (a whole tile) and the
//! panel count to even; activation rows to 16 (zero). A block is 32 rows × 32
//! columns in four accumulator tiles (2 row tiles × 2 panels), or 16 × 32 for the
//! last 16 rows; the sums go through a 4 KiB buffer to the shared epilogue.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly,
//! each naming its tile registers: no compiled code of ours uses them otherwise.
//! Linux hands out the 8 KiB tile state only on request (`arch_prctl`), once per
//! process; each call configures the tiles (another AMX user on the thread, such as
//! tract-linalg's kernel, may have left its own shapes).

use std::arch::asm;
use std::sync::OnceLock;

use super::panels::{Panels, NR};
use super::{epilogue, Epilogue};

/// Activation rows per tile.
pub const MR: usize = 16;
/// K bytes per tile row (the weight panels' K is padded to this).
pub const KB: usize = 64;

/// Whether this CPU and kernel run the AMX kernel: the CPU says AMX-TILE and
/// AMX-INT8, and Linux granted this process the tile state.
pub fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| cpu_has_amx_int8() && request_tile_state())
}

fn cpu_has_amx_int8() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // Leaf 7 only where the CPU has it.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    // AMX-TILE (bit 24) and AMX-INT8 (bit 25); AVX-512 for the epilogue's level.
    edx & (1 << 24) != 0 && edx & (1 << 25) != 0 && std::arch::is_x86_feature_detected!("avx512f")
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it the first tile
/// instruction kills the process (SIGILL).
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    const SYS_ARCH_PRCTL: usize = 158;
    let ret: isize;
    // SAFETY: a plain syscall with two integer arguments; it touches no memory of ours.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack, preserves_flags),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static TILES: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        // colsb[t]: u16 (little-endian) at 16 + 2t; rows[t]: u8 at 48 + t.
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// Weights for this kernel: panels with K padded to [`KB`] and an even panel count.
pub fn pack(w: &[i8], k: usize, n: usize) -> Panels {
    Panels::padded(w, k, n, KB, 2)
}

macro_rules! tileloadd {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        asm!(
            concat!("tileloadd ", $tmm, ", [{p} + {s}*1]"),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, readonly, preserves_flags)
        )
    };
}

macro_rules! tilestored {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        asm!(
            concat!("tilestored [{p} + {s}*1], ", $tmm),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, preserves_flags)
        )
    };
}

macro_rules! tdpbusd {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbusd ", $c, ", ", $a, ", ", $b),
            options(nostack, nomem, preserves_flags)
        )
    };
}

/// `out[r, c] = epilogue(Σ_k q[r, k] · w[k, c])`.
///
/// # Safety
/// [`available`]; `w` from [`pack`]; `a` holds `rows.div_ceil(MR) * MR` rows of
/// `w.kp` bytes (padding zero); `out` holds `rows × w.n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub unsafe fn matmul(w: &Panels, a: &[u8], rows: usize, ep: &Epilogue, out: &mut [f32]) {
    let kp = w.kp;
    debug_assert!(kp.is_multiple_of(KB));
    let row_tiles = rows.div_ceil(MR);
    debug_assert!(a.len() >= row_tiles * MR * kp);
    debug_assert!(out.len() >= rows * w.n);
    let panels = w.count();
    debug_assert!(panels.is_multiple_of(2));
    asm!("ldtilecfg [{}]", in(reg) TILES.0.as_ptr(), options(nostack, readonly, preserves_flags));
    // 32 rows × 32 columns of sums, rows 128 bytes apart, on cache lines.
    #[repr(align(64))]
    struct Sums([i32; 2 * MR * 2 * NR]);
    let mut sums = Sums([0; 2 * MR * 2 * NR]);
    let sums = &mut sums.0;
    let c = sums.as_mut_ptr();
    const LDC: usize = 2 * NR * 4;
    let chunks = kp / KB;
    let b_stride = NR * 4;
    // Panel pairs outer: their weights (2 × 16 columns × K bytes, 24 KiB at K = 768)
    // stay in L1 while every row tile streams past them. Rows outer read each
    // matrix's weights once per 32 rows: for BETO's 2.3 MiB FFN matrices, from
    // beyond L2 four times per 128-token window.
    for p in (0..panels).step_by(2) {
        let b0 = w.panel(p);
        let b1 = b0.add(kp * NR);
        let cols0 = p * NR;
        let mut t = 0;
        while t < row_tiles {
            let two = row_tiles - t >= 2;
            let a0 = a.as_ptr().add(t * MR * kp);
            let a1 = a0.add(MR * kp);
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                options(nostack, nomem, preserves_flags)
            );
            if two {
                asm!(
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem, preserves_flags)
                );
            }
            for ch in 0..chunks {
                // 16 rows of activations × 64 K bytes; 16 K-groups × 16 columns.
                tileloadd!("tmm4", a0.add(ch * KB), kp);
                tileloadd!("tmm6", b0.add(ch * KB * NR), b_stride);
                tileloadd!("tmm7", b1.add(ch * KB * NR), b_stride);
                tdpbusd!("tmm0", "tmm4", "tmm6");
                tdpbusd!("tmm1", "tmm4", "tmm7");
                if two {
                    tileloadd!("tmm5", a1.add(ch * KB), kp);
                    tdpbusd!("tmm2", "tmm5", "tmm6");
                    tdpbusd!("tmm3", "tmm5", "tmm7");
                }
            }
            tilestored!("tmm0", c, LDC);
            tilestored!("tmm1", c.add(NR), LDC);
            if two {
                tilestored!("tmm2", c.add(MR * 2 * NR), LDC);
                tilestored!("tmm3", c.add(MR * 2 * NR + NR), LDC);
            }
            if cols0 < w.n {
                let cols = (2 * NR).min(w.n - cols0);
                let last = rows.min((t + if two { 2 } else { 1 }) * MR);
                for r in t * MR..last {
                    let at = (r - t * MR) * 2 * NR;
                    ep.apply(
                        epilogue::Width::Zmm,
                        &sums[at..at + 2 * NR],
                        r,
                        cols0,
                        &mut out[r * w.n + cols0..][..cols],
                    );
                }
            }
            t += if two { 2 } else { 1 };
        }
    }
    // No `tilerelease` here: per call it cost 5–20 % of a short sentence's time
    // (1,915 CoNLL lines: 4.3–5.0 s without, 4.6–6.2 s with). The next call, ours or
    // tract-linalg's, loads its own configuration first, and Linux (5.19 and later)
    // releases a thread's tile state itself before the core idles.
}
