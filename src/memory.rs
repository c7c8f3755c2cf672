//! Handing freed heap back to the kernel.
//!
//! Loading a model allocates and frees several times its final size (the ONNX
//! bytes, dequantized weights, tract's parsed copy before it packs them). glibc
//! keeps freed blocks in the heap they came from, so without a trim the daemon
//! carries its own load transients in its RSS for its whole life (12 MiB of the
//! default model's 50). musl gives large blocks back by itself.

/// Return free heap pages to the kernel. Cheap once at load; not per message
/// (the next run would fault the pages back in).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; no Rust object is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size from /proc (Linux); None elsewhere. `VmRSS` is in kB
/// whatever the page size (4 KiB on most, 16 KiB on a Raspberry Pi 5 kernel).
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// The highest resident set size this process has had (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}
