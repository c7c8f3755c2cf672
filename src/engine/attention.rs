//! Self-attention as one op: scores, scale, mask, softmax and context per head.
//!
//! Exported encoders spell attention as twelve ONNX nodes per layer: three
//! reshapes and transposes into heads, `MatMul(Q, Kᵀ)`, a scale, the mask add,
//! `Softmax`, `MatMul(P, V)`, and a transpose and reshape back. tract runs them as
//! written: on the short windows we serve (a sentence is 20–60 tokens) with small
//! heads (ALBETO-tiny: 12 × 26), packing and dispatching tract's matmul kernels,
//! its three-pass softmax and the copies between them took 44 % of a message once
//! the big matmuls ran in int8, more than those matmuls themselves.
//!
//! Here a head is two small register-tiled products over buffers laid out for them
//! (Kᵀ and V copied once per head, padded to whole vectors), the scale and mask
//! applied while looking for each row's maximum, one vectorisable `exp` pass that
//! also sums, and the division by that sum folded into the write of the context.
//! The arithmetic per element is the same as the graph's, in the same order along
//! each dot product.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::*;

/// The ONNX node type the load-time rewrite writes in place of the attention
/// subgraph. Inputs: `[q, k, v, mask]`, `q`, `k`, `v` as `[batch, seq, heads·dim]`
/// (the projections before the split into heads), `mask` the additive mask in any
/// shape that broadcasts to `[batch, heads, seq, seq]` over rank 4. Output: the
/// context in `[batch, seq, heads·dim]`, what the graph's final reshape made.
pub const ONNX_OP: &str = "AnotadorAttention";
/// Attributes: `head_dim` (int: the heads are `hidden / head_dim`, which holds
/// whether the export spelt out the number of heads or left it to be inferred) and
/// `scale` (float, multiplies `q·k`).
pub const ATTR_HEAD_DIM: &str = "head_dim";
pub const ATTR_SCALE: &str = "scale";

#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub head_dim: usize,
    pub scale: f32,
}

impl Eq for Attention {}

impl Op for Attention {
    fn name(&self) -> StaticName {
        ONNX_OP.into()
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 4);
        let (q, k, v, mask) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
        ensure!(
            q.rank() == 3 && k.shape() == q.shape() && v.shape() == q.shape(),
            "q, k, v are not three [batch, seq, hidden] of one shape: {:?} {:?} {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
        let (batch, seq, hidden) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        ensure!(
            self.head_dim > 0 && hidden % self.head_dim == 0,
            "{hidden} is not heads of {}",
            self.head_dim
        );
        let shape = Shape {
            batch,
            seq,
            heads: hidden / self.head_dim,
            dim: self.head_dim,
        };
        let mask_layout = MaskLayout::new(mask.shape(), &shape)?;
        let mut out = unsafe { Tensor::uninitialized::<f32>(q.shape())? };
        {
            let qv = q.try_as_plain_ram()?;
            let kv = k.try_as_plain_ram()?;
            let vv = v.try_as_plain_ram()?;
            let mv = mask.try_as_plain_ram()?;
            let mut ov = out.try_as_plain_ram_mut()?;
            attend(
                &shape,
                self.scale,
                Inputs {
                    q: qv.as_slice::<f32>()?,
                    k: kv.as_slice::<f32>()?,
                    v: vv.as_slice::<f32>()?,
                    mask: mv.as_slice::<f32>()?,
                    mask_layout,
                },
                ov.as_slice_mut::<f32>()?,
            );
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        ensure!(
            inputs[3].rank() == 4,
            "the attention mask is not of rank 4: {:?}",
            inputs[3].shape
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// tract-onnx's parser for [`ONNX_OP`] nodes.
pub fn parse(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &tract_onnx::pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
    let head_dim = attr(ATTR_HEAD_DIM).map(|a| a.i).context("no `head_dim`")?;
    ensure!(head_dim > 0, "`head_dim` is {head_dim}");
    let scale = attr(ATTR_SCALE).map_or(1.0, |a| a.f);
    Ok((
        expand(Attention {
            head_dim: head_dim as usize,
            scale,
        }),
        vec![],
    ))
}

impl Expansion for Attention {
    fn name(&self) -> StaticName {
        Op::name(self)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 4)?;
        check_output_arity(outputs, 1)?;
        for input in inputs {
            s.equals(&input.datum_type, f32::datum_type())?;
        }
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        s.equals(&inputs[1].shape, &inputs[0].shape)?;
        s.equals(&inputs[2].shape, &inputs[0].shape)?;
        s.equals(&inputs[3].rank, 4)?;
        Ok(())
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

#[derive(Debug, Clone, Copy)]
struct Shape {
    batch: usize,
    seq: usize,
    heads: usize,
    dim: usize,
}

impl Shape {
    fn hidden(&self) -> usize {
        self.heads * self.dim
    }
}

/// Where the mask row for (batch, head, query) starts: each of its first three
/// axes is 1 (broadcast) or full.
#[derive(Debug, Clone, Copy)]
struct MaskLayout {
    strides: [usize; 3],
}

impl MaskLayout {
    fn new(dims: &[usize], shape: &Shape) -> TractResult<MaskLayout> {
        let full = [shape.batch, shape.heads, shape.seq];
        ensure!(
            dims.len() == 4
                && dims[3] == shape.seq
                && dims[..3].iter().zip(full).all(|(&d, f)| d == 1 || d == f),
            "the attention mask {dims:?} does not broadcast to [{}, {}, {}, {}]",
            shape.batch,
            shape.heads,
            shape.seq,
            shape.seq
        );
        let (h, q) = (dims[1], dims[2]);
        let stride = |d: usize, s: usize| if d == 1 { 0 } else { s };
        Ok(MaskLayout {
            strides: [
                stride(dims[0], h * q * shape.seq),
                stride(h, q * shape.seq),
                stride(q, shape.seq),
            ],
        })
    }

    fn row(&self, b: usize, h: usize, i: usize) -> usize {
        b * self.strides[0] + h * self.strides[1] + i * self.strides[2]
    }
}

#[derive(Clone, Copy)]
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: &'a [f32],
    mask_layout: MaskLayout,
}

/// Query rows per block: a block's scores (`ROWS × seq`) stay in L1/L2 even for
/// 512-token windows.
const ROWS: usize = 32;
/// Lanes of the running maxima and sums (8 f32 = one AVX register, two NEON).
const LANES: usize = 8;

fn attend(shape: &Shape, scale: f32, inputs: Inputs, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::Level;
        match super::simd::level() {
            // SAFETY: `level()` never exceeds what this CPU was detected to have.
            Level::Avx512 => return unsafe { attend_avx512(shape, scale, inputs, out) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { attend_avx2(shape, scale, inputs, out) },
            Level::Baseline => {}
        }
    }
    // aarch64 has fused multiply-add in every core; elsewhere `mul_add` would be a
    // libm call per element.
    attend_generic::<{ cfg!(target_arch = "aarch64") }, false>(shape, scale, inputs, out)
}

/// The same code compiled for AVX2 and FMA: the 4 × 16 accumulator tiles below
/// become eight registers and `mul_add` one instruction. (Not `multiversion!`:
/// the baseline copy differs, without FMA.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(shape: &Shape, scale: f32, inputs: Inputs, out: &mut [f32]) {
    attend_generic::<true, false>(shape, scale, inputs, out)
}

/// And for AVX-512, with tiles twice as wide where they fit ([`tile_zmm`]). The same
/// operations in the same order per element, so the same bits as AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn attend_avx512(shape: &Shape, scale: f32, inputs: Inputs, out: &mut [f32]) {
    attend_generic::<true, true>(shape, scale, inputs, out)
}

#[inline(always)]
fn attend_generic<const FMA: bool, const ZMM: bool>(
    shape: &Shape,
    scale: f32,
    x: Inputs,
    out: &mut [f32],
) {
    let Shape {
        batch,
        seq,
        heads,
        dim,
    } = *shape;
    let hidden = shape.hidden();
    let seq_p = seq.next_multiple_of(NR);
    let dim_p = dim.next_multiple_of(NR);
    // Kᵀ of one head, [dim][seq_p], and V, [seq][dim_p], zero-padded so that every
    // tile reads whole tiles; the padding columns of the scores are never used.
    let mut kt = vec![0f32; dim * seq_p];
    let mut vp = vec![0f32; seq * dim_p];
    let mut scores = vec![0f32; ROWS * seq_p];
    let mut context = vec![0f32; ROWS * dim_p];
    let mut sums = [0f32; ROWS];
    for b in 0..batch {
        let base = b * seq * hidden;
        for h in 0..heads {
            let col = base + h * dim;
            for j in 0..seq {
                let row = &x.k[col + j * hidden..][..dim];
                for (d, &val) in row.iter().enumerate() {
                    kt[d * seq_p + j] = val;
                }
                vp[j * dim_p..][..dim].copy_from_slice(&x.v[col + j * hidden..][..dim]);
            }
            for i0 in (0..seq).step_by(ROWS) {
                let rows = ROWS.min(seq - i0);
                gemm::<FMA, ZMM>(
                    rows,
                    seq_p,
                    dim,
                    &x.q[col + i0 * hidden..],
                    hidden,
                    &kt,
                    seq_p,
                    &mut scores,
                    seq_p,
                );
                for r in 0..rows {
                    let m = &x.mask[x.mask_layout.row(b, h, i0 + r)..][..seq];
                    let s = &mut scores[r * seq_p..][..seq];
                    sums[r] = softmax_unnormalised(s, m, scale);
                }
                gemm::<FMA, ZMM>(
                    rows,
                    dim_p,
                    seq,
                    &scores,
                    seq_p,
                    &vp,
                    dim_p,
                    &mut context,
                    dim_p,
                );
                for r in 0..rows {
                    let inv = 1.0 / sums[r];
                    let dst = &mut out[col + (i0 + r) * hidden..][..dim];
                    for (o, &c) in dst.iter_mut().zip(&context[r * dim_p..][..dim]) {
                        *o = c * inv;
                    }
                }
            }
        }
    }
}

/// `c[m × n] = a[m × k] · b[k × n]` with row strides `lda`, `ldb`, `ldc`; `n` a
/// multiple of [`NR`]. Tiles of [`MR`] rows by [`NR`] columns accumulate in
/// registers over the whole of `k`: eight independent sums hide the latency of the
/// multiply-add, and each loaded vector of `b` serves four rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm<const FMA: bool, const ZMM: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || k == 0 {
        return;
    }
    // Every access below is inside these bounds; checking them once keeps the
    // inner loop free of branches.
    assert!(
        n.is_multiple_of(NR)
            && a.len() >= (m - 1) * lda + k
            && b.len() >= (k - 1) * ldb + n
            && c.len() >= (m - 1) * ldc + n,
        "gemm operands too short"
    );
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut i = 0;
    while i < m {
        let mut j = 0;
        while j < n {
            // SAFETY: rows i..i+MR (or i) and columns j..j+NR (2·NR) are within the
            // bounds asserted above; `ZMM` only from AVX-512 code.
            unsafe {
                let (a, b, c) = (a.add(i * lda), b.add(j), c.add(i * ldc + j));
                #[cfg(target_arch = "x86_64")]
                if ZMM && m - i >= MR && n - j >= 2 * NR {
                    tile_zmm(k, a, lda, b, ldb, c, ldc);
                    j += 2 * NR;
                    continue;
                }
                if m - i >= MR {
                    tile::<MR, FMA>(k, a, lda, b, ldb, c, ldc)
                } else {
                    tile::<1, FMA>(k, a, lda, b, ldb, c, ldc)
                }
            }
            j += NR;
        }
        i += if m - i >= MR { MR } else { 1 };
    }
}

/// Rows per register tile.
const MR: usize = 4;
/// Columns per register tile: two vectors of eight.
const NR: usize = 16;

/// One `R × NR` tile of `c`, from `R` rows of `a` and `NR` columns of `b`.
///
/// # Safety
/// `a[r·lda + p]`, `b[p·ldb + l]` and `c[r·ldc + l]` must be in bounds for every
/// `r < R`, `p < k`, `l < NR`.
#[inline(always)]
unsafe fn tile<const R: usize, const FMA: bool>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[0f32; NR]; R];
    for p in 0..k {
        let bv = &*(b.add(p * ldb) as *const [f32; NR]);
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = *a.add(r * lda + p);
            for l in 0..NR {
                acc[l] = if FMA {
                    av.mul_add(bv[l], acc[l])
                } else {
                    acc[l] + av * bv[l]
                };
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        std::ptr::copy_nonoverlapping(acc.as_ptr(), c.add(r * ldc), NR);
    }
}

/// A `MR × 2·NR` tile with AVX-512: eight zmm sums, as `tile::<MR, true>` has eight
/// ymm with AVX2. Written as intrinsics: LLVM did not keep a generic `4 × 32`
/// array in registers (it went through the stack element by element, 4× slower).
/// At `4 × 16` the four zmm sums were four dependent chains of multiply-adds.
/// Each sum is the same fused multiply-add chain over `p` as [`tile`]'s, so the
/// same bits.
///
/// # Safety
/// AVX-512 F; the bounds of [`tile`] with `2·NR` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_zmm(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    for p in 0..k {
        let b0 = _mm512_loadu_ps(b.add(p * ldb));
        let b1 = _mm512_loadu_ps(b.add(p * ldb + NR));
        for r in 0..MR {
            let av = _mm512_set1_ps(*a.add(r * lda + p));
            acc[2 * r] = _mm512_fmadd_ps(av, b0, acc[2 * r]);
            acc[2 * r + 1] = _mm512_fmadd_ps(av, b1, acc[2 * r + 1]);
        }
    }
    for r in 0..MR {
        _mm512_storeu_ps(c.add(r * ldc), acc[2 * r]);
        _mm512_storeu_ps(c.add(r * ldc + NR), acc[2 * r + 1]);
    }
}

/// `s ← exp(s·scale + mask − max)` in place; returns the sum (the caller divides
/// by it once per output element instead of once per score).
#[inline(always)]
fn softmax_unnormalised(s: &mut [f32], mask: &[f32], scale: f32) -> f32 {
    // Eight running maxima and sums, one per lane: `+` is not associative in f32,
    // so a plain fold would stay scalar.
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    let mut masks = mask.chunks_exact(LANES);
    for (sv, mv) in (&mut chunks).zip(&mut masks) {
        // As arrays: over the slices LLVM left this loop scalar, unrolled.
        let sv: &mut [f32; LANES] = sv.try_into().unwrap();
        let mv: &[f32; LANES] = mv.try_into().unwrap();
        let v: [f32; LANES] = std::array::from_fn(|l| sv[l] * scale + mv[l]);
        *sv = v;
        // `maxps`'s own semantics (`f32::max`'s NaN rule keeps it scalar).
        lanes = std::array::from_fn(|l| if v[l] > lanes[l] { v[l] } else { lanes[l] });
    }
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (sv, mv) in chunks.into_remainder().iter_mut().zip(masks.remainder()) {
        *sv = *sv * scale + mv;
        max = max.max(*sv);
    }
    // The exponentials first, as one loop of their own: each is elementwise, so
    // LLVM may take the widest vector (zmm with AVX-512) and the bits stay those of
    // every other width. In the same loop as the eight-lane sums below they stayed
    // at eight lanes (ymm): a sixth of attention's samples at 512 tokens.
    for v in s.iter_mut() {
        *v = exp_nonpositive(*v - max);
    }
    let mut sum = [0f32; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for sv in &mut chunks {
        let sv: &[f32; LANES] = sv.try_into().unwrap();
        for l in 0..LANES {
            sum[l] += sv[l];
        }
    }
    let mut total: f32 = sum.iter().sum();
    for v in chunks.remainder() {
        total += *v;
    }
    total
}

/// `eᵡ` for `x ≤ 0` within 2 ulp (Cephes' `expf` polynomial), written so that
/// LLVM vectorises it: `f32::exp` is a libm call per score. Below −87 it returns
/// ~1e-38 where libm returns a denormal or 0; beside a row maximum of 1 neither
/// counts.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let e = (t.to_bits() as i32 - ROUND.to_bits() as i32) + 127;
    y * f32::from_bits((e as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::simd::{supported, with_level, Level};

    /// The graph's attention in f64, head by head, from the definition.
    fn reference(shape: &Shape, scale: f32, x: &Inputs) -> Vec<f64> {
        let Shape {
            batch,
            seq,
            heads,
            dim,
        } = *shape;
        let hidden = shape.hidden();
        let mut out = vec![0f64; batch * seq * hidden];
        for b in 0..batch {
            for h in 0..heads {
                let at = |t: &[f32], j: usize, d: usize| t[(b * seq + j) * hidden + h * dim + d];
                for i in 0..seq {
                    let m = &x.mask[x.mask_layout.row(b, h, i)..][..seq];
                    let s: Vec<f64> = (0..seq)
                        .map(|j| {
                            let dot: f64 = (0..dim)
                                .map(|d| at(x.q, i, d) as f64 * at(x.k, j, d) as f64)
                                .sum();
                            dot * scale as f64 + m[j] as f64
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..dim {
                        let c: f64 = (0..seq).map(|j| e[j] * at(x.v, j, d) as f64).sum();
                        out[(b * seq + i) * hidden + h * dim + d] = c / sum;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 + seed * 31) % 211) as f32 / 40.0 - 2.6)
            .collect()
    }

    #[test]
    fn matches_the_definition_on_odd_shapes_with_masked_keys() {
        // Heads narrower and wider than a vector, windows shorter than a tile,
        // longer than a block, and not a multiple of either.
        for (batch, seq, heads, dim) in [(1, 1, 2, 3), (1, 7, 3, 26), (2, 37, 2, 64), (1, 70, 1, 9)]
        {
            let shape = Shape {
                batch,
                seq,
                heads,
                dim,
            };
            let n = batch * seq * shape.hidden();
            let (q, k, v) = (values(n, 1), values(n, 2), values(n, 3));
            // The exported form: 0 where the key is real, f32::MIN on padding,
            // here the last two keys of every batch row but the first.
            let mask: Vec<f32> = (0..batch * seq)
                .map(|ix| {
                    let (b, j) = (ix / seq, ix % seq);
                    if b > 0 && j + 2 >= seq && j > 0 {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask_layout = MaskLayout::new(&[batch, 1, 1, seq], &shape).unwrap();
            let inputs = Inputs {
                q: &q,
                k: &k,
                v: &v,
                mask: &mask,
                mask_layout,
            };
            let want = reference(&shape, 0.2, &inputs);
            // Every SIMD level this CPU has; those with FMA agree to the bit.
            let mut fused: Vec<Vec<f32>> = Vec::new();
            for level in supported() {
                let mut got = vec![f32::NAN; n];
                with_level(level, || attend(&shape, 0.2, inputs, &mut got));
                let worst = want
                    .iter()
                    .zip(&got)
                    .map(|(w, &g)| (w - g as f64).abs())
                    .fold(0.0, f64::max);
                // Scores reach ~90 here (64 products of values up to 2.6): f32 holds
                // them to ~1e-5, and outputs of magnitude ~2.6 inherit that.
                assert!(worst < 5e-5, "{shape:?} {level:?}: off by {worst}");
                if level >= Level::Avx2 {
                    fused.push(got);
                }
            }
            assert!(
                fused.windows(2).all(|w| w[0] == w[1]),
                "{shape:?}: levels differ"
            );
        }
    }

    #[test]
    fn a_mask_per_query_row_and_head_is_read_where_it_says() {
        let shape = Shape {
            batch: 1,
            seq: 5,
            heads: 2,
            dim: 4,
        };
        let n = shape.seq * shape.hidden();
        let (q, k, v) = (values(n, 4), values(n, 5), values(n, 6));
        // [1, heads, seq, seq]: each head and query row hides a different key.
        let mask: Vec<f32> = (0..2 * 5 * 5)
            .map(|ix| if ix % 7 == 0 { -1e9 } else { 0.0 })
            .collect();
        let mask_layout = MaskLayout::new(&[1, 2, 5, 5], &shape).unwrap();
        let inputs = Inputs {
            q: &q,
            k: &k,
            v: &v,
            mask: &mask,
            mask_layout,
        };
        let want = reference(&shape, 0.5, &inputs);
        let mut got = vec![0f32; n];
        attend(&shape, 0.5, inputs, &mut got);
        for (w, g) in want.iter().zip(&got) {
            assert!((w - *g as f64).abs() < 1e-5, "{w} vs {g}");
        }
        assert!(
            MaskLayout::new(&[1, 3, 5, 5], &shape).is_err(),
            "3 heads of mask for 2"
        );
        assert!(
            MaskLayout::new(&[1, 1, 1, 4], &shape).is_err(),
            "4 keys for 5"
        );
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_where_it_matters() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            let ulp = (ours.to_bits() as i64 - libm.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {ours}, libm {libm}");
            x -= 0.0137;
        }
        assert!(exp_nonpositive(f32::MIN) < 1e-37);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
