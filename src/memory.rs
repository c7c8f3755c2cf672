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
