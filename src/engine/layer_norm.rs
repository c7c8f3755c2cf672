//! Layer normalization as one op, optionally with the residual add before it.
//!
//! tract decomposes ONNX's `LayerNormalization` into a mean, a subtraction, an RMS
//! norm, a multiply and an add: five passes over the hidden states and four
//! intermediate tensors, with the transformer's residual `Add` as a sixth. Here it
//! is two passes over each row (its sum, then the squared deviations) and a third
//! that writes the result, with `a + b` folded into the first: on the default
//! model that took a fifth of the time outside the matmuls.

use tract_onnx::prelude::*;

use super::simd::multiversion;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::*;

/// The ONNX node type the load-time rewrite writes for a `LayerNormalization`
/// (over the last axis) and, when it is the only reader, the `Add` before it.
pub const ONNX_OP: &str = "AnotadorLayerNorm";
/// Attributes: `epsilon` (float) and `residual` (int: the first two inputs are
/// added first).
pub const ATTR_EPSILON: &str = "epsilon";
pub const ATTR_RESIDUAL: &str = "residual";

/// `y = (x − mean) / √(var + ε) · scale + bias` over the last axis, where
/// `x = a + b` when `residual`. Inputs: `[a, (b,) scale, bias]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    pub epsilon: f32,
    pub residual: bool,
}

impl Eq for LayerNorm {}

impl Op for LayerNorm {
    fn name(&self) -> StaticName {
        if self.residual {
            "AnotadorAddLayerNorm".into()
        } else {
            "AnotadorLayerNorm".into()
        }
    }

    op_as_typed_op!();
}

impl EvalOp for LayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, b, scale, bias) = if self.residual {
            ensure!(inputs.len() == 4);
            (&inputs[0], Some(&inputs[1]), &inputs[2], &inputs[3])
        } else {
            ensure!(inputs.len() == 3);
            (&inputs[0], None, &inputs[1], &inputs[2])
        };
        let h = *x.shape().last().context("rank-0 input")?;
        ensure!(
            scale.len() == h && bias.len() == h,
            "scale/bias are not [{h}]"
        );
        let mut out = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
        {
            let xv = x.try_as_plain_ram()?;
            let sv = scale.try_as_plain_ram()?;
            let bv = bias.try_as_plain_ram()?;
            let mut ov = out.try_as_plain_ram_mut()?;
            let o = ov.as_slice_mut::<f32>()?;
            o.copy_from_slice(xv.as_slice::<f32>()?);
            if let Some(b) = b {
                ensure!(b.shape() == x.shape(), "residual shapes differ");
                let bv = b.try_as_plain_ram()?;
                add_in_place(o, bv.as_slice::<f32>()?);
            }
            normalize(
                o,
                h,
                self.epsilon,
                sv.as_slice::<f32>()?,
                bv.as_slice::<f32>()?,
            );
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for LayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
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
    let epsilon = attr(ATTR_EPSILON).map_or(1e-5, |a| a.f);
    let residual = attr(ATTR_RESIDUAL).is_some_and(|a| a.i != 0);
    Ok((expand(LayerNorm { epsilon, residual }), vec![]))
}

impl Expansion for LayerNorm {
    fn name(&self) -> StaticName {
        Op::name(self)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, if self.residual { 4 } else { 3 })?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        // The fused add needs equal shapes; anything else (a broadcast) adds first
        // with tract's own op.
        if self.residual
            && model.outlet_fact(inputs[0])?.shape != model.outlet_fact(inputs[1])?.shape
        {
            let sum = tract_onnx::tract_hir::ops::logic::wire_with_rank_broadcast(
                format!("{prefix}.add"),
                model,
                tract_onnx::tract_core::ops::math::add(),
                &[inputs[0], inputs[1]],
            )?[0];
            let op = LayerNorm {
                epsilon: self.epsilon,
                residual: false,
            };
            return model.wire_node(prefix, op, &[sum, inputs[2], inputs[3]]);
        }
        model.wire_node(prefix, self.clone(), inputs)
    }
}

#[inline(always)]
fn add_rows(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

multiversion! {
    /// `a += b`, the residual add before the norm.
    fn add_in_place(a: &mut [f32], b: &[f32]) => add_rows
}

multiversion! {
    /// Each row of `h` values normalised in place; the eight-lane sums below are one
    /// register at AVX2, and the per-element pass two or one at AVX-512.
    fn normalize(x: &mut [f32], h: usize, epsilon: f32, scale: &[f32], bias: &[f32]) => normalize_rows
}

#[inline(always)]
fn normalize_rows(x: &mut [f32], h: usize, epsilon: f32, scale: &[f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(h) {
        let mean = sum8(row, |v| v) / h as f32;
        let var = sum8(row, |v| (v - mean) * (v - mean)) / h as f32;
        let inv = 1.0 / (var + epsilon).sqrt();
        for ((v, s), b) in row.iter_mut().zip(scale).zip(bias) {
            *v = (*v - mean) * inv * s + b;
        }
    }
}

/// A sum in eight independent lanes: f32 addition is not associative, so a plain
/// fold stays sequential; this is the order a vector register would use.
#[inline(always)]
fn sum8(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            lanes[j] += f(c[j]);
        }
    }
    let mut total = lanes.iter().sum::<f32>();
    for &v in chunks.remainder() {
        total += f(v);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_each_row_like_the_definition() {
        let h = 37;
        let x: Vec<f32> = (0..3 * h)
            .map(|i| ((i * 7919) % 101) as f32 / 9.0 - 4.0)
            .collect();
        let scale: Vec<f32> = (0..h).map(|i| 0.5 + i as f32 / 50.0).collect();
        let bias: Vec<f32> = (0..h).map(|i| i as f32 / 100.0 - 0.1).collect();
        // Every SIMD level this CPU has, the same bits at each.
        let mut levels: Vec<Vec<f32>> = Vec::new();
        for level in crate::engine::simd::supported() {
            let mut ours = x.clone();
            crate::engine::simd::with_level(level, || normalize(&mut ours, h, 1e-5, &scale, &bias));
            for (row, got) in x.chunks(h).zip(ours.chunks(h)) {
                let n = h as f64;
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                for (i, (&v, &g)) in row.iter().zip(got).enumerate() {
                    let want =
                        (v as f64 - mean) / (var + 1e-5).sqrt() * scale[i] as f64 + bias[i] as f64;
                    assert!((want - g as f64).abs() < 1e-5, "{level:?}: {want} vs {g}");
                }
            }
            levels.push(ours);
        }
        assert!(levels.windows(2).all(|w| w[0] == w[1]), "levels differ");
    }
}
