//! Byte buffers that start on a cache line. A 64-byte AMX tile row or zmm load from
//! an address 16 bytes past a line (where glibc puts a large `Vec`: an mmap'd page
//! plus its 16-byte header) touches two lines, and the same kernel ran 1–3× slower
//! from one process to the next with where its buffers happened to fall.

/// One cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// `len` bytes from a 64-byte boundary, zero unless written.
#[derive(Default)]
pub struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

impl std::fmt::Debug for Aligned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned({} bytes)", self.len)
    }
}

// Only rten-gemm's operand uses it on aarch64, and nothing on other targets.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Aligned {
    pub fn zeroed(len: usize) -> Aligned {
        let mut a = Aligned::default();
        a.zero(len);
        a
    }

    /// Resizes to `len` bytes, all zero; keeps the allocation when it is large enough.
    pub fn zero(&mut self, len: usize) -> &mut [u8] {
        self.lines.clear();
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
        self.bytes_mut()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `lines` holds at least `len` initialised bytes, contiguous
        // (`Line` is 64 bytes with no padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }

    /// The same bytes as `i8` (the same size and alignment as `u8`).
    pub fn signed(&self) -> &[i8] {
        // SAFETY: `u8` and `i8` have the same layout, and every bit pattern is valid.
        unsafe { std::slice::from_raw_parts(self.bytes().as_ptr().cast(), self.len) }
    }

    pub fn signed_mut(&mut self) -> &mut [i8] {
        let len = self.len;
        // SAFETY: as in `signed`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.bytes_mut().as_mut_ptr().cast(), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::Aligned;

    #[test]
    fn starts_on_a_line_and_is_zero_after_reuse() {
        let mut a = Aligned::zeroed(100);
        a.bytes_mut().fill(7);
        for len in [0, 1, 63, 64, 65, 4096, 100_000, 10] {
            let b = a.zero(len);
            assert!(b.iter().all(|&x| x == 0), "{len}");
            assert_eq!(b.len(), len);
            assert_eq!(a.bytes().as_ptr() as usize % 64, 0, "{len}");
            a.signed_mut().fill(-1);
            assert!(a.bytes().iter().all(|&x| x == 255));
        }
    }
}
