//! What this CPU can run, and the one way the engine compiles a hot loop for it.
//!
//! A release build targets baseline x86-64 (SSE2) so that one binary runs on every
//! PC, and armv7 builds add NEON (cross/README.md); without more, a loop written in
//! plain Rust runs as SSE2 even on a CPU with AVX-512 — the int8 matmul's epilogue
//! did, and took a third of a message. Each hot loop is written once, as plain
//! `#[inline(always)]` Rust shaped for vectorisation, and [`multiversion!`] compiles
//! it again inside `#[target_feature]` wrappers for AVX-512 and for AVX2 + FMA,
//! picking one per call from the detected [`Level`]. Every copy performs the same
//! operations in the same order (no fused multiply-add unless the code says
//! `mul_add`), so they give the same bits; only the vector width differs.
//!
//! On aarch64, NEON is the baseline and the plain build already uses it.

use std::cell::Cell;

/// The widest instruction set the f32 loops are compiled for, on x86-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// What the target guarantees: SSE2 on x86-64, NEON on aarch64 (and on armv7
    /// as built here), nothing more.
    Baseline,
    /// AVX2 and FMA (Haswell, Zen 1 and later).
    Avx2,
    /// AVX-512 F, BW, DQ and VL, with AVX2 and FMA (Skylake-SP, Ice Lake, Zen 4 and
    /// later).
    Avx512,
}

thread_local! {
    /// A ceiling set by [`with_level`] (tests, benchmarks): `level()` never
    /// returns more.
    static CEILING: Cell<Level> = const { Cell::new(Level::Avx512) };
}

/// The widest level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
            return Level::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// The level hot loops run at on this thread: [`detected`], capped by [`with_level`].
#[inline]
pub fn level() -> Level {
    detected().min(CEILING.with(Cell::get))
}

/// Runs `f` with the loops of this thread capped at `ceiling` (restored after), so
/// that a test or a benchmark can run every level this CPU has.
pub fn with_level<R>(ceiling: Level, f: impl FnOnce() -> R) -> R {
    let before = CEILING.with(|c| c.replace(ceiling));
    struct Restore(Level);
    impl Drop for Restore {
        fn drop(&mut self) {
            CEILING.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Every level this CPU supports, lowest first.
pub fn supported() -> Vec<Level> {
    [Level::Baseline, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|l| *l <= detected())
        .collect()
}

/// Defines `fn $name(args) -> ret` that runs `$generic(args)` compiled for the
/// widest [`Level`] of this thread (see the module comment). `$generic` must be
/// `#[inline(always)]`, or LLVM calls one shared baseline copy from every wrapper.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $generic:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                match $crate::engine::simd::level() {
                    // SAFETY: `level()` never exceeds what this CPU was detected to have.
                    $crate::engine::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::engine::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::engine::simd::Level::Baseline => {}
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// The CPU as a line for logs and benchmark tables: model name, architecture and
/// the features that decide which kernels run.
pub fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // x86 says "model name"; ARM boards "Model" (the board) or "CPU part".
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name")
        .or_else(|| field("Model"))
        .or_else(|| field("CPU part").map(|p| format!("CPU part {p}")))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{model}, {} ({cores} cores): {}",
        std::env::consts::ARCH,
        features().join(" ")
    )
}

/// The instruction-set features the engine's choices depend on, as this CPU has them.
pub fn features() -> Vec<&'static str> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        for (name, present) in [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vnni", has!("avx512vnni")),
            ("avxvnni", has!("avxvnni")),
        ] {
            if present {
                found.push(name);
            }
        }
        // std cannot detect AMX on stable Rust; the kernel's flag says it.
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if flags.split_whitespace().any(|f| f == "amx_int8") {
            found.push("amx-int8");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        found.push("neon");
        for (name, present) in [
            ("dotprod", has!("dotprod")),
            ("i8mm", has!("i8mm")),
            ("fp16", has!("fp16")),
            ("sve", has!("sve")),
        ] {
            if present {
                found.push(name);
            }
        }
    }
    // armv7: the build enables NEON (.cargo/config.toml), and std cannot detect
    // features there on stable Rust.
    #[cfg(target_arch = "arm")]
    found.push("neon (build)");
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ceiling_caps_the_level_and_is_restored() {
        let top = level();
        assert_eq!(top, detected());
        with_level(Level::Baseline, || {
            assert_eq!(level(), Level::Baseline);
            with_level(Level::Avx512, || assert_eq!(level(), detected()));
            assert_eq!(level(), Level::Baseline);
        });
        assert_eq!(level(), top);
        assert_eq!(supported().last(), Some(&detected()));
    }
}
