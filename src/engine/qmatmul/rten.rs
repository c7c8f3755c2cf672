//! The int8 matmul on rten-gemm's u8×i8→i32 kernels (AVX-512 VNNI on x86; dotprod,
//! i8mm or MLAL on aarch64): activations as onnxruntime's bytes `q`, weights
//! prepacked once; its output is `Σ q·w` and the epilogue subtracts `zp·Σ w`, as
//! for our VNNI kernels. (rten-gemm 0.27 also takes a zero point per activation
//! row, but applied the wrong one past the first 8 rows of a product: 2,048 of
//! 4,352 sums wrong at 17×256×256 here, none with one zero point for all rows.)
//!
//! rten-gemm splits a product across rayon's threads when the calling thread's pool
//! has more than one. Our workers are already one per core, so each runs its
//! products inside a rayon pool of one thread that is the worker thread itself
//! ([`single_threaded`]): no rayon thread is started, and nothing competes with the
//! other workers (`runs_on_the_calling_thread_alone` shows it).

use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, PackedBMatrix, QuantParams};
use rten_tensor::NdTensorView;

/// Weights `[K, N]` prepacked for this CPU's rten-gemm kernel.
pub struct Packed {
    pub n: usize,
    k: usize,
    weights: PackedBMatrix<i8>,
    zero: Vec<i8>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("rten::Packed")
            .field("k", &self.k)
            .field("n", &self.n)
            .finish()
    }
}

thread_local! {
    /// rten-gemm's executor (its kernel, picked for this CPU) is not `Send`: one
    /// per thread. Every thread picks the same kernel, so weights packed on the
    /// loading thread suit them all.
    static GEMM: GemmExecutor<u8, i8, i32> = GemmExecutor::default();
}

/// The kernel rten-gemm picks on this CPU, if it is exact: its AVX2 kernel
/// multiplies with `vpmaddubsw`, whose 16-bit pair sums saturate on full-range
/// int8 weights (rten expects 7-bit ones there), so it is not offered.
pub fn kernel_name() -> Option<String> {
    GEMM.with(|gemm| (!gemm.may_saturate()).then(|| gemm.kernel_name().to_string()))
}

impl Packed {
    pub fn new(w: &[i8], k: usize, n: usize) -> Packed {
        let weights = GEMM.with(|gemm| gemm.prepack_b(NdTensorView::from_data([k, n], w)));
        Packed {
            n,
            k,
            weights,
            zero: vec![0; n],
        }
    }

    pub fn kernel_name(&self) -> String {
        kernel_name().unwrap_or_default()
    }

    pub fn bytes(&self) -> usize {
        // rten does not say; its panels hold K × N rounded to its tile, as ours.
        self.k.next_multiple_of(4) * self.n.next_multiple_of(16)
    }

    /// `out[r, c] = Σ_k a[r, k] · w[k, c]`, `out` `rows × n`.
    pub fn matmul(&self, a: &[u8], rows: usize, out: &mut [i32]) {
        single_threaded();
        GEMM.with(|gemm| {
            gemm.gemm(
                out,
                GemmInputA::Unpacked(NdTensorView::from_data([rows, self.k], a)),
                GemmInputB::Packed(&self.weights),
                GemmOptions {
                    b_quant: Some(QuantParams {
                        zero_point: &self.zero,
                    }),
                    ..Default::default()
                },
            )
            .expect("rten-gemm operands sized by the caller")
        })
    }
}

thread_local! {
    /// A rayon pool of one thread: this one (`use_current_thread`).
    static POOL: Option<rayon::ThreadPool> = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .thread_name(|_| "anotador-rten".into())
        .build()
        .map_err(|e| log::warn!("rten-gemm: no single-thread pool ({e}); it may use rayon's"))
        .ok();
}

/// Makes the calling thread the only worker of a rayon pool of its own, once, so
/// that `rayon::current_num_threads()` is 1 here and rten-gemm stays on it.
fn single_threaded() {
    if rayon::current_thread_index().is_none() {
        POOL.with(|_| {});
    }
}

#[cfg(test)]
mod tests {
    /// A worker that runs rten-gemm is the only thread of its rayon pool: rten-gemm
    /// splits a product only when `rayon::current_num_threads() > 1` there, so no
    /// rayon thread competes with the other workers, and none is started.
    #[test]
    fn runs_on_the_calling_thread_alone() {
        std::thread::spawn(|| {
            let (k, n) = (64, 48);
            let w: Vec<i8> = (0..k * n).map(|i| (i % 251) as i8).collect();
            let packed = super::Packed::new(&w, k, n);
            let a = vec![3u8; 2 * k];
            let mut out = vec![0i32; 2 * n];
            packed.matmul(&a, 2, &mut out);
            assert_eq!(rayon::current_num_threads(), 1);
            assert_eq!(rayon::current_thread_index(), Some(0));
            let expected: i32 = (0..k).map(|i| 3 * w[i * n] as i32).sum();
            assert_eq!(out[0], expected);
        })
        .join()
        .unwrap();
    }
}
