//! The int8 matmul on tract-linalg's own i8×i8→i32 kernels: the one tract's
//! dispatch picks for this CPU (AMX or AVX-512 VNNI on recent x86, SDOT on
//! ARMv8.2 such as the Pi 5's Cortex-A76, SMLAL on the Pi 3/4, NEON on armv7).
//! Weights are packed once, in the kernel's own format.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::tract_linalg::mmm::{
    AsInputValue, EagerPackedInput, FusedSpec, MMMInputValue, MatMatMul, OutputStoreSpec, Query,
};
use tract_onnx::tract_core::tract_linalg::MmmDispatch;

/// Weights `[K, N]` packed for one tract-linalg kernel.
#[derive(Debug)]
pub struct Packed {
    pub n: usize,
    /// K rounded up to what the kernel's formats need (64 for AMX); the rows
    /// past K are zero on both sides, so they add nothing.
    pub k_padded: usize,
    mmm: Box<dyn MatMatMul>,
    packing: usize,
    weights: Box<dyn MMMInputValue>,
}

impl Packed {
    pub fn new(w: &[i8], k: usize, n: usize) -> TractResult<Packed> {
        // tract's `m` is the weight side (output columns here), its `n` the
        // activation rows, unknown until run time.
        let query = Query {
            weight: i8::datum_type().into(),
            activation: i8::datum_type(),
            accumulators: tvec!(i32::datum_type()),
            store: Some(i32::datum_type()),
            // Weights are packed once, here: a panel extractor would run on every call.
            allow_extractor: false,
            m: Some(n),
            k: Some(k),
            n: None,
        };
        let (mmm, packing, _) = MmmDispatch::native()
            .pick(&query)
            .ok_or_else(|| anyhow::anyhow!("tract-linalg has no i8×i8→i32 kernel for this CPU"))?;
        // tract's AMX kernel loads 64 bytes of K per row of the activation tile
        // whatever K is, but packs the activations (PackedI8K4) to K only: with K
        // not a multiple of 64 it read past the buffer, and a daemon on an AMX
        // CPU died of SIGSEGV when that buffer ended a mapping (the test fixtures
        // have K = 48 and 96; ALBETO-tiny has 312). Both sides padded with zeros.
        let (wf, af) = &mmm.packings()[packing];
        let k_padded = k.next_multiple_of(wf.k_alignment().max(af.k_alignment()).max(1));
        let mut padded = w.to_vec();
        padded.resize(k_padded * n, 0);
        let weights = tract_ndarray::Array2::from_shape_vec((k_padded, n), padded)?.into_tensor();
        let weights = wf.prepare_one(&weights, 0, 1)?;
        Ok(Packed {
            n,
            k_padded,
            mmm,
            packing,
            weights,
        })
    }

    pub fn kernel_name(&self) -> &str {
        self.mmm.name()
    }

    /// Packed weight bytes (the kernel's panels, padding included).
    pub fn bytes(&self) -> usize {
        self.weights
            .downcast_ref::<EagerPackedInput>()
            .map_or(0, |p| p.packed.len())
    }

    /// `out[r, c] = Σ_k a[r, k] · w[k, c]` as i32, rows `ldc` apart; `a` is
    /// `[rows, k_padded]`, zero past K.
    pub fn matmul(&self, a: &Tensor, rows: usize, out: &mut Tensor, ldc: usize) -> TractResult<()> {
        let b_format = &self.mmm.packings()[self.packing].1;
        let activations = b_format.prepare_one(a, 1, 0)?;
        // C is [N, rows] to the kernel; stored transposed: one output row per
        // activation row, columns adjacent.
        let store = OutputStoreSpec::Strides {
            row_byte_stride: 4,
            col_byte_stride: 4 * ldc as isize,
            mr: self.mmm.mr(),
            nr: self.mmm.nr(),
        };
        unsafe {
            let store = store.wrap(&out.view_mut());
            self.mmm.run(
                self.n,
                rows,
                &[
                    FusedSpec::AddMatMul {
                        a: AsInputValue::Borrowed(&*self.weights),
                        b: AsInputValue::Owned(activations),
                        packing: self.packing,
                    },
                    FusedSpec::Store(store),
                ],
            )
        }
    }
}
