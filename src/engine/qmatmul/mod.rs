//! A fused quantized matmul: what each `DynamicQuantizeLinear → MatMulInteger →
//! Cast → Mul → (Add)` chain of a dynamically quantized model becomes when the
//! int8 weights stay int8.
//!
//! One tract op per chain, holding the weights packed once at load (shared by
//! every node that reads the same initializer, as ALBERT's repeated layers do):
//! quantize the activation rows, multiply i8×i8→i32 exactly, then
//! `f32 = (i32 + shift correction) · scale + bias` in one pass. The arithmetic is
//! onnxruntime's (see `quant`), so logits follow its int8 path, not tract's f32
//! approximation of it.
//!
//! Activations are quantized per row (one token's hidden vector) by default:
//! onnxruntime's `DynamicQuantizeLinear` takes one range for the whole tensor,
//! which makes a window's logits depend on the other windows of its batch and on
//! its padding. Per row, a message annotates the same alone or micro-batched,
//! and the range is tighter. [`ActivationRange::Tensor`] reproduces
//! onnxruntime exactly, for the parity tests.

mod act;
mod aligned;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod epilogue;
mod linalg;
#[cfg(target_arch = "x86_64")]
mod panels;
pub mod quant;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod rten;
#[cfg(target_arch = "x86_64")]
mod vnni;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::*;

use quant::Params;

/// How activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActivationRange {
    /// One range per row (token): batch- and padding-independent.
    Row,
    /// One range for the whole input tensor: onnxruntime's `DynamicQuantizeLinear`.
    Tensor,
}

/// Which int8 kernel multiplies (`models.NAME.kernel`, `--kernel`). Every kernel is
/// compiled into every x86-64 binary and chosen at run time; the ARM builds have
/// `rten` and `tract`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelKind {
    /// anotador's, `tdpbusd` on AMX tiles (`amx.rs`).
    Amx,
    /// anotador's, `vpdpbusd` on 512-bit registers (`vnni.rs`).
    Avx512Vnni,
    /// anotador's, `vpdpbusd` on 256-bit registers, for AVX-VNNI without AVX-512.
    AvxVnni,
    /// anotador's exact AVX2 kernel for x86 without VNNI (`avx2.rs`).
    Avx2,
    /// rten-gemm's u8×i8 kernel for this CPU, where it is exact.
    Rten,
    /// tract-linalg's i8×i8 kernel for this CPU (AMX, VNNI, SDOT, SMLAL, armv7 NEON).
    Tract,
}

impl KernelKind {
    pub const ALL: [KernelKind; 6] = [
        KernelKind::Amx,
        KernelKind::Avx512Vnni,
        KernelKind::AvxVnni,
        KernelKind::Avx2,
        KernelKind::Rten,
        KernelKind::Tract,
    ];

    /// The name in configurations, on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Amx => "amx",
            KernelKind::Avx512Vnni => "avx512-vnni",
            KernelKind::AvxVnni => "avx-vnni",
            KernelKind::Avx2 => "avx2",
            KernelKind::Rten => "rten",
            KernelKind::Tract => "tract",
        }
    }

    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            KernelKind::Amx => amx::available(),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512Vnni => vnni::avx512_available(),
            #[cfg(target_arch = "x86_64")]
            KernelKind::AvxVnni => vnni::avx_available(),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx2 => avx2::available(),
            #[cfg(not(target_arch = "x86_64"))]
            KernelKind::Amx | KernelKind::Avx512Vnni | KernelKind::AvxVnni | KernelKind::Avx2 => {
                false
            }
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            KernelKind::Rten => rten::kernel_name().is_some(),
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            KernelKind::Rten => false,
            KernelKind::Tract => true,
        }
    }

    /// The kernels this CPU runs.
    pub fn available_here() -> Vec<KernelKind> {
        KernelKind::ALL
            .into_iter()
            .filter(|k| k.available())
            .collect()
    }

    /// What `kernel = "auto"` runs on this CPU, measured per instruction set (docs/performance.md,
    /// "Which kernel runs where"); `None` where no int8 kernel beats fp32 (x86
    /// without AVX2), so `int8 = "auto"` dequantizes there.
    pub fn auto() -> Option<KernelKind> {
        #[cfg(target_arch = "x86_64")]
        {
            [
                KernelKind::Amx,
                KernelKind::Avx512Vnni,
                KernelKind::AvxVnni,
                KernelKind::Avx2,
            ]
            .into_iter()
            .find(|k| k.available())
        }
        // ARM: tract-linalg's kernels cover every board (SDOT on the Pi 5, SMLAL on the
        // Pi 3/4, NEON on armv7); rten-gemm's are there to compare with `anotador bench`.
        #[cfg(not(target_arch = "x86_64"))]
        {
            Some(KernelKind::Tract)
        }
    }
}

impl std::fmt::Display for KernelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KernelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<KernelKind, String> {
        KernelKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = KernelKind::ALL.iter().map(|k| k.name()).collect();
                format!("`{s}`: expected auto or one of {}", names.join(", "))
            })
    }
}

/// `kernel = "auto" | NAME` (config) and `--kernel` (command line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KernelChoice {
    /// [`KernelKind::auto`] on this CPU.
    #[default]
    Auto,
    Named(KernelKind),
}

impl KernelChoice {
    pub fn named(self) -> Option<KernelKind> {
        match self {
            KernelChoice::Auto => None,
            KernelChoice::Named(k) => Some(k),
        }
    }
}

impl std::str::FromStr for KernelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<KernelChoice, String> {
        match s {
            "auto" => Ok(KernelChoice::Auto),
            name => name.parse().map(KernelChoice::Named),
        }
    }
}

impl std::fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelChoice::Auto => f.write_str("auto"),
            KernelChoice::Named(k) => f.write_str(k.name()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for KernelChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KernelChoice, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for KernelChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Amx(panels::Panels),
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni(panels::Panels),
    #[cfg(target_arch = "x86_64")]
    AvxVnni(panels::Panels),
    #[cfg(target_arch = "x86_64")]
    Avx2(panels::Panels),
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    Rten(rten::Packed),
    Tract(linalg::Packed),
}

/// One int8 weight matrix with everything its dequantization needs.
#[derive(Debug)]
pub struct QWeights {
    k: usize,
    n: usize,
    kernel: Kernel,
    /// Per output column, padded to a multiple of 16 so kernels load whole vectors.
    colsum: Vec<i32>,
    wscale: Vec<f32>,
    bias: Vec<f32>,
}

/// What the epilogue applies after the bias: the feed-forward layer's GELU runs
/// here, on values still in registers, instead of as a pass of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    #[default]
    None,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, ALBERT's `gelu_new`.
    GeluTanh,
    /// `0.5·x·(1 + erf(x/√2))`, BERT's and DistilBERT's GELU.
    GeluErf,
}

impl Activation {
    /// The value of [`ATTR_ACTIVATION`] that stands for it.
    pub fn attribute(self) -> i64 {
        match self {
            Activation::None => 0,
            Activation::GeluTanh => 1,
            Activation::GeluErf => 2,
        }
    }
}

/// The activation bytes a kernel's sums were taken over, which decides the
/// zero-point correction added back per row (`corr · Σ w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// `q − 128` (signed bytes: AVX2, tract): `corr = 128 − zp`.
    Shifted,
    /// `q` (unsigned bytes: VNNI, rten-gemm): `corr = −zp`.
    Unsigned,
}

/// Per-row scale and zero point, with per-column sums, scales and bias.
pub struct Epilogue<'a> {
    pub colsum: &'a [i32],
    pub wscale: &'a [f32],
    pub bias: &'a [f32],
    /// One entry per row, or one for the whole tensor.
    pub rows: &'a [Params],
    pub operand: Operand,
    pub activation: Activation,
}

impl Epilogue<'_> {
    #[inline]
    pub fn row(&self, r: usize) -> (i32, f32) {
        let p = if self.rows.len() == 1 {
            self.rows[0]
        } else {
            self.rows[r]
        };
        let corr = match self.operand {
            Operand::Shifted => p.shift_correction(),
            Operand::Unsigned => -p.zero_point,
        };
        (corr, p.scale)
    }
}

impl QWeights {
    /// `w` is `[K, N]` row-major int8 with zero point 0; `scale` has 1 or N values;
    /// `bias` has N. `kind` must be available on this CPU; a matrix the AVX2 kernel
    /// cannot take (a weight of −128) goes to tract-linalg.
    pub fn new(
        w: &[i8],
        k: usize,
        n: usize,
        scale: &[f32],
        bias: Option<&[f32]>,
        kind: KernelKind,
    ) -> TractResult<QWeights> {
        ensure!(
            w.len() == k * n,
            "weight has {} values, not {k}×{n}",
            w.len()
        );
        ensure!(scale.len() == 1 || scale.len() == n, "weight scale length");
        ensure!(
            kind.available(),
            "the {kind} int8 kernel does not run on this CPU"
        );
        let padded = n.div_ceil(16) * 16;
        let mut colsum = vec![0i32; padded];
        for row in w.chunks_exact(n) {
            for (s, &v) in colsum.iter_mut().zip(row) {
                *s += v as i32;
            }
        }
        let mut wscale: Vec<f32> = (0..n).map(|c| scale[c % scale.len()]).collect();
        wscale.resize(padded, 0.0);
        let mut b = bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec);
        ensure!(b.len() == n, "bias length");
        b.resize(padded, 0.0);
        let kernel = match kind {
            #[cfg(target_arch = "x86_64")]
            KernelKind::Amx => Kernel::Amx(amx::pack(w, k, n)),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512Vnni => Kernel::Avx512Vnni(panels::Panels::new(w, k, n)),
            #[cfg(target_arch = "x86_64")]
            KernelKind::AvxVnni => Kernel::AvxVnni(panels::Panels::new(w, k, n)),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx2 if !w.contains(&i8::MIN) => Kernel::Avx2(panels::Panels::new(w, k, n)),
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            KernelKind::Rten => Kernel::Rten(rten::Packed::new(w, k, n)),
            _ => Kernel::Tract(linalg::Packed::new(w, k, n)?),
        };
        Ok(QWeights {
            k,
            n,
            kernel,
            colsum,
            wscale,
            bias: b,
        })
    }

    pub fn kernel(&self) -> KernelKind {
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(_) => KernelKind::Amx,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni(_) => KernelKind::Avx512Vnni,
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni(_) => KernelKind::AvxVnni,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(_) => KernelKind::Avx2,
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Kernel::Rten(_) => KernelKind::Rten,
            Kernel::Tract(_) => KernelKind::Tract,
        }
    }

    /// Name of the kernel, for the load log and the status.
    pub fn kernel_name(&self) -> String {
        match &self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(_) => "amx (anotador, tdpbusd tiles)".into(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni(_) => "avx512-vnni (anotador, vpdpbusd zmm)".into(),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni(_) => "avx-vnni (anotador, vpdpbusd ymm)".into(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(_) => "avx2 (anotador, exact vpmaddubsw)".into(),
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Kernel::Rten(p) => format!("rten (rten-gemm {})", p.kernel_name()),
            Kernel::Tract(p) => format!("tract (tract-linalg {})", p.kernel_name()),
        }
    }

    /// Bytes of packed weights and per-column tables.
    pub fn bytes(&self) -> usize {
        let packed = match &self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(p) | Kernel::Avx512Vnni(p) | Kernel::AvxVnni(p) | Kernel::Avx2(p) => {
                p.bytes()
            }
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Kernel::Rten(p) => p.bytes(),
            Kernel::Tract(p) => p.bytes(),
        };
        packed + self.colsum.len() * 12
    }

    /// `out = dequant(quant(x) · W)` for `x` of `rows × K`, `out` of `rows × N`.
    pub fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        range: ActivationRange,
        activation: Activation,
        out: &mut [f32],
    ) -> TractResult<()> {
        let k = self.k;
        ensure!(x.len() == rows * k && out.len() == rows * self.n);
        let params: Vec<Params> = match range {
            ActivationRange::Row => x
                .chunks_exact(k)
                .map(|r| {
                    let (lo, hi) = quant::range(r);
                    Params::from_range(lo, hi)
                })
                .collect(),
            ActivationRange::Tensor => {
                let (lo, hi) = quant::range(x);
                vec![Params::from_range(lo, hi)]
            }
        };
        let param = |r: usize| params[if params.len() == 1 { 0 } else { r }];
        let ep_for = |operand| Epilogue {
            colsum: &self.colsum,
            wscale: &self.wscale,
            bias: &self.bias,
            rows: &params,
            operand,
            activation,
        };
        // `s` is unused where tract is the only kernel (armv7).
        #[cfg_attr(
            not(any(target_arch = "x86_64", target_arch = "aarch64")),
            allow(unused_variables)
        )]
        SCRATCH.with_borrow_mut(|s| match &self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx(w) => {
                let padded = rows.div_ceil(amx::MR) * amx::MR;
                let a = s.unsigned(padded * w.kp);
                for (r, (row, dst)) in x.chunks_exact(k).zip(a.chunks_exact_mut(w.kp)).enumerate() {
                    quant::quantize_unsigned(row, param(r), &mut dst[..k]);
                }
                // SAFETY: the kernel was checked available when the weights were packed
                // (by amx::pack); `a` holds `padded` rows of `kp` bytes, zero past K
                // and past `rows`.
                unsafe { amx::matmul(w, a, rows, &ep_for(Operand::Unsigned), out) };
                Ok(())
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni(w) | Kernel::AvxVnni(w) => {
                let padded = rows.div_ceil(vnni::MR) * vnni::MR;
                let a = s.unsigned(padded * w.kp);
                for (r, (row, dst)) in x.chunks_exact(k).zip(a.chunks_exact_mut(w.kp)).enumerate() {
                    quant::quantize_unsigned(row, param(r), &mut dst[..k]);
                }
                let ep = ep_for(Operand::Unsigned);
                // SAFETY: the kernel was checked available when the weights were packed;
                // `a` holds `padded` rows of `kp` bytes, zero past K and past `rows`.
                unsafe {
                    if matches!(self.kernel, Kernel::Avx512Vnni(_)) {
                        vnni::matmul_avx512(w, a, rows, &ep, out)
                    } else {
                        vnni::matmul_avx(w, a, rows, &ep, out)
                    }
                };
                Ok(())
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(w) => {
                let stride = w.kp;
                let padded = rows.div_ceil(avx2::MR) * avx2::MR * stride;
                let (q, abs, sgn) = s.avx2(k, padded);
                for (r, row) in x.chunks_exact(k).enumerate() {
                    quant::quantize(row, param(r), q);
                    let at = r * stride;
                    avx2::pack_row(q, &mut abs[at..at + k], &mut sgn[at..at + k]);
                }
                // SAFETY: AVX2 was checked when the weights were packed; the buffers
                // are sized above for `rows` rounded up to MR.
                unsafe { avx2::matmul(w, abs, sgn, rows, &ep_for(Operand::Shifted), out) };
                Ok(())
            }
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Kernel::Rten(w) => {
                let (a, c) = s.rten(rows * k, rows * self.n);
                for (r, (row, dst)) in x.chunks_exact(k).zip(a.chunks_exact_mut(k)).enumerate() {
                    quant::quantize_unsigned(row, param(r), dst);
                }
                w.matmul(a, rows, c);
                epilogue::rows(c, self.n, self.n, &ep_for(Operand::Unsigned), out);
                Ok(())
            }
            Kernel::Tract(w) => {
                let kp = w.k_padded;
                let mut a = Tensor::zero::<i8>(&[rows, kp])?;
                {
                    let mut view = a.try_as_plain_ram_mut()?;
                    let a = view.as_slice_mut::<i8>()?;
                    for (r, (row, dst)) in x.chunks_exact(k).zip(a.chunks_exact_mut(kp)).enumerate()
                    {
                        quant::quantize(row, param(r), &mut dst[..k]);
                    }
                }
                // A row stride that is a multiple of 4 KiB makes AMX stores collide in
                // the cache: pad it by 16 values.
                let ldc =
                    self.n.div_ceil(16) * 16 + if self.n.is_multiple_of(1024) { 16 } else { 0 };
                let mut c = unsafe { Tensor::uninitialized::<i32>(&[rows.max(1), ldc])? };
                w.matmul(&a, rows, &mut c, ldc)?;
                let view = c.try_as_plain_ram()?;
                let ep = ep_for(Operand::Shifted);
                epilogue::rows(view.as_slice::<i32>()?, ldc, self.n, &ep, out);
                Ok(())
            }
        })
    }
}

/// Per-thread buffers for the quantized activations and i32 sums: a worker runs
/// one matmul at a time, and re-growing them per call would be a malloc per node.
#[derive(Default)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct Scratch {
    // On cache lines: the kernels load them in 64-byte rows.
    bytes: aligned::Aligned,
    #[cfg(target_arch = "x86_64")]
    signed: Vec<i8>,
    #[cfg(target_arch = "x86_64")]
    signs: aligned::Aligned,
    sums: Vec<i32>,
}

impl Scratch {
    /// `len` zeroed bytes (K and row padding must read as zero).
    #[cfg(target_arch = "x86_64")]
    fn unsigned(&mut self, len: usize) -> &mut [u8] {
        self.bytes.zero(len)
    }

    /// rten-gemm's operands: `a` bytes and `c` sums.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn rten(&mut self, a: usize, c: usize) -> (&mut [u8], &mut [i32]) {
        self.sums.clear();
        self.sums.resize(c, 0);
        (self.bytes.zero(a), &mut self.sums)
    }

    /// The AVX2 kernel's operands: one quantized row, then magnitudes and signs of
    /// `len` bytes, zeroed.
    #[cfg(target_arch = "x86_64")]
    fn avx2(&mut self, k: usize, len: usize) -> (&mut [i8], &mut [u8], &mut [i8]) {
        self.signed.clear();
        self.signed.resize(k, 0);
        self.signs.zero(len);
        (
            &mut self.signed,
            self.bytes.zero(len),
            self.signs.signed_mut(),
        )
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The tract op: `[.., K] f32 → [.., N] f32`.
#[derive(Debug, Clone)]
pub struct QMatMul {
    pub weights: Arc<QWeights>,
    pub range: ActivationRange,
    pub activation: Activation,
}

impl PartialEq for QMatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && self.range == other.range
            && self.activation == other.activation
    }
}
impl Eq for QMatMul {}

impl Op for QMatMul {
    fn name(&self) -> StaticName {
        "AnotadorQMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}×{} int8, {}, {:?} activation range, then {:?}",
            self.weights.k,
            self.weights.n,
            self.weights.kernel_name(),
            self.range,
            self.activation
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            shape.last() == Some(&self.weights.k),
            "input {shape:?}, expected last axis {}",
            self.weights.k
        );
        let rows = x.len() / self.weights.k;
        let mut out_shape: TVec<usize> = shape.into();
        *out_shape.last_mut().unwrap() = self.weights.n;
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let xv = x.try_as_plain_ram()?;
            let mut ov = out.try_as_plain_ram_mut()?;
            self.weights.matmul(
                xv.as_slice::<f32>()?,
                rows,
                self.range,
                self.activation,
                ov.as_slice_mut::<f32>()?,
            )?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        let mut shape = inputs[0].shape.to_tvec();
        let last = shape.last_mut().context("rank-0 input")?;
        ensure!(
            last.to_usize().is_ok_and(|k| k == self.weights.k),
            "input last axis {last}, expected {}",
            self.weights.k
        );
        *last = self.weights.n.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0].shape.iter().rev().skip(1).product();
        Ok(tvec!((
            Cost::FMA(i32::datum_type()),
            rows * (self.weights.k * self.weights.n)
        )))
    }

    as_op!();
}

/// The ONNX node type the load-time rewrite writes in place of a chain.
pub const ONNX_OP: &str = "AnotadorQMatMul";
/// Its attributes: the weights' key in [`Registry`], the activation range and
/// the function applied after the bias ([`Activation::attribute`]).
pub const ATTR_KEY: &str = "weights";
pub const ATTR_RANGE: &str = "per_tensor";
pub const ATTR_ACTIVATION: &str = "activation";

/// Packed weights on their way from the rewrite (which has the initializers) to
/// tract's ONNX parser (a plain function that sees one node at a time). Entries
/// live only while one model loads: [`Registry::hold`] removes them on drop,
/// error or not.
static REGISTRY: Mutex<Option<HashMap<i64, Arc<QWeights>>>> = Mutex::new(None);
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

pub struct Registry {
    keys: Vec<i64>,
}

impl Registry {
    pub fn hold() -> Registry {
        Registry { keys: Vec::new() }
    }

    /// Registers weights for the parser; the key goes into the node's attribute.
    pub fn insert(&mut self, weights: Arc<QWeights>) -> i64 {
        let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed) as i64;
        REGISTRY
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(key, weights);
        self.keys.push(key);
        key
    }

    fn get(key: i64) -> Option<Arc<QWeights>> {
        REGISTRY.lock().unwrap().as_ref()?.get(&key).cloned()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(map) = REGISTRY.lock().unwrap().as_mut() {
            for key in &self.keys {
                map.remove(key);
            }
        }
    }
}

/// tract-onnx's parser for [`ONNX_OP`] nodes.
pub fn parse(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &tract_onnx::pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let key = node
        .attribute
        .iter()
        .find(|a| a.name == ATTR_KEY)
        .map(|a| a.i)
        .context("AnotadorQMatMul without its weights")?;
    let per_tensor = node
        .attribute
        .iter()
        .any(|a| a.name == ATTR_RANGE && a.i != 0);
    let code = node
        .attribute
        .iter()
        .find(|a| a.name == ATTR_ACTIVATION)
        .map_or(0, |a| a.i);
    let activation = [Activation::None, Activation::GeluTanh, Activation::GeluErf]
        .into_iter()
        .find(|a| a.attribute() == code)
        .with_context(|| format!("AnotadorQMatMul: unknown activation {code}"))?;
    let weights = Registry::get(key).context("AnotadorQMatMul weights not registered")?;
    let op = QMatMul {
        weights,
        range: if per_tensor {
            ActivationRange::Tensor
        } else {
            ActivationRange::Row
        },
        activation,
    };
    Ok((expand(op), vec![]))
}

impl Expansion for QMatMul {
    fn name(&self) -> StaticName {
        "AnotadorQMatMul".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        let n = self.weights.n;
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for axis in 0..rank - 1 {
                s.equals(&inputs[0].shape[axis], &outputs[0].shape[axis])?;
            }
            s.equals(&outputs[0].shape[rank - 1], n.to_dim())
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The definition, spelled out argument by argument on purpose.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        rows: usize,
        w: &[i8],
        k: usize,
        n: usize,
        scale: f32,
        bias: &[f32],
        range: ActivationRange,
    ) -> Vec<f32> {
        let tensor = quant::range(x);
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            let row = &x[r * k..(r + 1) * k];
            let (lo, hi) = match range {
                ActivationRange::Row => quant::range(row),
                ActivationRange::Tensor => tensor,
            };
            let p = Params::from_range(lo, hi);
            let mut q = vec![0i8; k];
            quant::quantize(row, p, &mut q);
            for c in 0..n {
                // Σ (q − zp)·w, the way MatMulInteger states it.
                let acc: i32 = (0..k)
                    .map(|kk| (q[kk] as i32 + 128 - p.zero_point) * w[kk * n + c] as i32)
                    .sum();
                out[r * n + c] = acc as f32 * (p.scale * scale) + bias[c];
            }
        }
        out
    }

    fn data(rows: usize, k: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<i8>, Vec<f32>) {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let x = (0..rows * k)
            .map(|_| (next() % 2000) as f32 / 300.0 - 2.5)
            .collect();
        let w = (0..k * n)
            .map(|_| ((next() % 255) as i32 - 127) as i8)
            .collect();
        let b = (0..n).map(|_| (next() % 100) as f32 / 50.0 - 1.0).collect();
        (x, w, b)
    }

    /// Every kernel this CPU runs, at every SIMD level it has, gives the integer
    /// arithmetic exactly and the same f32 bits as the definition, on shapes with
    /// ragged rows, columns and K (partial tiles, partial column blocks, K not a
    /// multiple of 4 or 64), and weights across the whole int8 range.
    #[test]
    fn kernels_match_the_definition() {
        use crate::engine::simd::{supported, with_level};
        let kinds = KernelKind::available_here();
        println!("kernels here: {kinds:?}, levels: {:?}", supported());
        let mut checked = 0;
        for (rows, k, n) in [
            (1, 4, 16),
            (3, 7, 9),
            (5, 128, 33),
            (6, 64, 100),
            (9, 300, 80),
            (17, 256, 256),
            (2, 1030, 40),
            (33, 96, 130),
        ] {
            let (x, w, b) = data(rows, k, n, (rows * 1000 + k * 10 + n) as u64);
            for kind in &kinds {
                let q = QWeights::new(&w, k, n, &[0.01], Some(&b), *kind).unwrap();
                assert_eq!(q.kernel(), *kind);
                for level in supported() {
                    for range in [ActivationRange::Row, ActivationRange::Tensor] {
                        let expected = naive(&x, rows, &w, k, n, 0.01, &b, range);
                        for activation in
                            [Activation::None, Activation::GeluTanh, Activation::GeluErf]
                        {
                            let mut out = vec![0f32; rows * n];
                            with_level(level, || {
                                q.matmul(&x, rows, range, activation, &mut out).unwrap()
                            });
                            let expected: Vec<f32> =
                                expected.iter().map(|&v| activation.of(v)).collect();
                            assert_eq!(
                                out, expected,
                                "{kind} {level:?} {range:?} {activation:?} {rows}×{k}×{n}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked >= 8 * 2 * 3 * kinds.len());
    }

    /// The fused GELUs are close to their definitions in f64.
    #[test]
    fn gelu_epilogue_matches_the_definition() {
        let (rows, k, n) = (5, 64, 40);
        let (x, w, b) = data(rows, k, n, 99);
        let plain = naive(&x, rows, &w, k, n, 0.01, &b, ActivationRange::Row);
        let tanh = |v: f64| {
            0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
        };
        let erf = |v: f64| 0.5 * v * (1.0 + act::erf_f64(v / 2f64.sqrt()));
        let defined: [(Activation, &dyn Fn(f64) -> f64); 2] =
            [(Activation::GeluTanh, &tanh), (Activation::GeluErf, &erf)];
        for (activation, f) in defined {
            let expected: Vec<f32> = plain.iter().map(|&v| f(v as f64) as f32).collect();
            for kind in KernelKind::available_here() {
                let q = QWeights::new(&w, k, n, &[0.01], Some(&b), kind).unwrap();
                let mut out = vec![0f32; rows * n];
                q.matmul(&x, rows, ActivationRange::Row, activation, &mut out)
                    .unwrap();
                for (o, e) in out.iter().zip(&expected) {
                    assert!(
                        (o - e).abs() <= 1e-5 * e.abs().max(1.0),
                        "{kind} {activation:?}: {o} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_weight_of_minus_128_leaves_avx2_for_tract() {
        if !KernelKind::Avx2.available() {
            return;
        }
        let (x, mut w, b) = data(3, 8, 16, 7);
        w[5] = i8::MIN;
        let q = QWeights::new(&w, 8, 16, &[0.5], Some(&b), KernelKind::Avx2).unwrap();
        assert_eq!(q.kernel(), KernelKind::Tract);
        let mut out = vec![0f32; 3 * 16];
        q.matmul(&x, 3, ActivationRange::Row, Activation::None, &mut out)
            .unwrap();
        assert_eq!(out, naive(&x, 3, &w, 8, 16, 0.5, &b, ActivationRange::Row));
    }

    #[test]
    fn kernel_names_parse_and_auto_is_available() {
        for k in KernelKind::ALL {
            assert_eq!(k.name().parse::<KernelKind>(), Ok(k));
            assert_eq!(k.name().parse::<KernelChoice>(), Ok(KernelChoice::Named(k)));
        }
        assert_eq!("auto".parse::<KernelChoice>(), Ok(KernelChoice::Auto));
        let err = "avx1024".parse::<KernelChoice>().unwrap_err();
        assert!(
            err.contains("avx512-vnni") && err.contains("tract"),
            "{err}"
        );
        if let Some(k) = KernelKind::auto() {
            assert!(k.available(), "{k}");
        }
        assert!(KernelKind::Tract.available());
    }
}
