//! The inference engine: one tract plan per model, loaded once and shared
//! read-only by every worker; each worker owns an [`EngineState`] (tract's scratch
//! buffers), so workers never contend on a lock to run.
//!
//! The engine knows tensors, not tasks: it takes token ids and returns logits.

mod rewrite;

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::SimpleState;
use tract_onnx::tract_hir::infer::InferenceFact;

pub use rewrite::{RewriteReport, Rewrites};

use crate::error::{Error, Result};

/// The model inputs we know how to feed, by their ONNX names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

impl Input {
    fn from_name(name: &str) -> Option<Input> {
        match name {
            "input_ids" => Some(Input::InputIds),
            "attention_mask" => Some(Input::AttentionMask),
            "token_type_ids" => Some(Input::TokenTypeIds),
            _ => None,
        }
    }
}

/// What the logits tensor looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// `[batch, sequence, labels]`: token classification.
    PerToken,
    /// `[batch, labels]`: sequence classification.
    PerSequence,
    /// `start_logits` and `end_logits`, each `[batch, sequence]`: extractive QA.
    /// Returned as `[batch, sequence, 2]` (start, end).
    Span,
}

/// A padded batch of windows, row-major `[rows, seq_len]`.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
}

/// Logits, row-major: `[rows, seq_len, labels]` or `[rows, labels]`.
#[derive(Debug, Clone)]
pub struct Logits {
    pub rows: usize,
    pub seq_len: usize,
    pub labels: usize,
    pub values: Vec<f32>,
}

impl Logits {
    /// Logits of one position (per-token) or one row (per-sequence).
    pub fn at(&self, row: usize, pos: usize) -> &[f32] {
        let start = if self.seq_len == 0 {
            row * self.labels
        } else {
            (row * self.seq_len + pos) * self.labels
        };
        &self.values[start..start + self.labels]
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineInfo {
    pub output: OutputKind,
    pub labels: usize,
    pub has_token_type_ids: bool,
    pub rewrites: RewriteReport,
    /// Which kernel path runs the int8 weights.
    pub int8_path: &'static str,
}

pub struct Engine {
    plan: Arc<TypedSimplePlan>,
    inputs: Vec<Input>,
    info: EngineInfo,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish()
    }
}

const FILE: &str = "model.onnx";

impl Engine {
    /// Loads, rewrites and optimises `dir/model.onnx`. Every failure names the file
    /// and the problem: a bundle that loads is a bundle that runs.
    pub fn load(dir: &Path) -> Result<Engine> {
        Engine::load_with(dir, Rewrites::default())
    }

    pub fn load_with(dir: &Path, which: Rewrites) -> Result<Engine> {
        let path = dir.join(FILE);
        let bad = |problem: String| Error::bundle(dir, FILE, problem);
        let bytes = std::fs::read(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let onnx = tract_onnx::onnx().with_ignore_value_info(true);
        let mut proto = onnx
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| {
                bad(format!(
                    "not a readable ONNX model (truncated or corrupt?): {e}"
                ))
            })?;
        drop(bytes);
        let graph = proto
            .graph
            .as_mut()
            .ok_or_else(|| bad("the file holds no graph".into()))?;

        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let mut inputs = Vec::new();
        for input in graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
        {
            match Input::from_name(&input.name) {
                Some(kind) => inputs.push(kind),
                None => {
                    return Err(bad(format!(
                        "unexpected graph input `{}`: expected input_ids, attention_mask and optionally token_type_ids",
                        input.name
                    )))
                }
            }
        }
        for required in [Input::InputIds, Input::AttentionMask] {
            if !inputs.contains(&required) {
                let name = if required == Input::InputIds {
                    "input_ids"
                } else {
                    "attention_mask"
                };
                return Err(bad(format!("the graph has no `{name}` input")));
            }
        }
        if graph.output.is_empty() {
            return Err(bad("the graph has no output".into()));
        }
        // A QA head is recognised by its two named outputs; any other graph's first
        // output is its logits.
        let output_ix = |name: &str| graph.output.iter().position(|o| o.name == name);
        let span_outputs = output_ix("start_logits").zip(output_ix("end_logits"));

        let rewrites = rewrite::rewrite(graph, which);
        log::info!(
            "{}: dequantized {}/{} MatMulInteger ({} weights), fused {} tanh-GELU",
            path.display(),
            rewrites.matmul_integer_dequantized,
            rewrites.matmul_integer_total,
            rewrites.weights_dequantized,
            rewrites.gelu_fused
        );

        let mut model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| bad(format!("tract cannot parse the graph: {e:#}")))?;
        drop(proto);
        // Symbolic batch and sequence: one plan serves every window size.
        let batch = model.symbols.sym("B");
        let seq = model.symbols.sym("S");
        for ix in 0..inputs.len() {
            model
                .set_input_fact(
                    ix,
                    InferenceFact::dt_shape(i64::datum_type(), [batch.to_dim(), seq.to_dim()]),
                )
                .map_err(|e| bad(format!("cannot set input shape: {e:#}")))?;
        }
        // Only the logits are wanted; hidden states would be computed for nothing.
        let outlets = model
            .output_outlets()
            .map_err(|e| bad(e.to_string()))?
            .to_vec();
        let wanted = match span_outputs {
            Some((start, end)) => vec![outlets[start], outlets[end]],
            None => vec![outlets[0]],
        };
        model
            .select_output_outlets(&wanted)
            .map_err(|e| bad(e.to_string()))?;

        let typed = model.into_optimized().map_err(|e| {
            bad(format!(
                "tract cannot run this graph (unsupported op or shape?): {e:#}"
            ))
        })?;
        let fact = typed
            .output_fact(0)
            .map_err(|e| bad(e.to_string()))?
            .clone();
        let dims = fact.shape.dims();
        let (output, labels) = match (span_outputs, dims.len()) {
            // [batch, sequence] each: the sequence axis is symbolic, not a label count.
            (Some(_), 2) if dims[1].to_i64().is_err() => (OutputKind::Span, Some(2)),
            (Some(_), _) => (OutputKind::Span, None),
            (None, 3) => (OutputKind::PerToken, dims[2].to_i64().ok()),
            (None, 2) => (OutputKind::PerSequence, dims[1].to_i64().ok()),
            _ => (OutputKind::PerToken, None),
        };
        let labels = labels.filter(|&l| l > 0).ok_or_else(|| {
            bad(format!(
                "output shape {:?} is not [batch, (sequence,) labels] (or [batch, sequence] start/end logits)",
                fact.shape
            ))
        })? as usize;
        if fact.datum_type != f32::datum_type() {
            return Err(bad(format!(
                "output is {:?}, expected f32 logits",
                fact.datum_type
            )));
        }
        let int8_path = if rewrites.matmul_integer_total == 0 {
            "fp32"
        } else if rewrites.matmul_integer_dequantized == rewrites.matmul_integer_total {
            "dequantized-at-load"
        } else {
            "mixed-native-int8"
        };
        let plan = typed
            .into_runnable()
            .map_err(|e| bad(format!("tract cannot plan this graph: {e:#}")))?;
        Ok(Engine {
            plan,
            info: EngineInfo {
                output,
                labels,
                has_token_type_ids: inputs.contains(&Input::TokenTypeIds),
                rewrites,
                int8_path,
            },
            inputs,
        })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Per-worker scratch state.
    pub fn state(&self) -> Result<EngineState> {
        let state = SimpleState::new(&self.plan).map_err(|e| Error::Inference(format!("{e:#}")))?;
        Ok(EngineState {
            state,
            inputs: self.inputs.clone(),
            info: self.info.clone(),
        })
    }
}

pub struct EngineState {
    state: TypedSimpleState,
    inputs: Vec<Input>,
    info: EngineInfo,
}

impl EngineState {
    pub fn run(&mut self, batch: &Batch) -> Result<Logits> {
        let shape = [batch.rows, batch.seq_len];
        let tensor = |data: &[i64]| -> Result<TValue> {
            Ok(tract_ndarray::Array2::from_shape_vec(shape, data.to_vec())
                .map_err(|e| Error::Inference(e.to_string()))?
                .into_tensor()
                .into())
        };
        let mut inputs = TVec::new();
        for input in &self.inputs {
            inputs.push(match input {
                Input::InputIds => tensor(&batch.input_ids)?,
                Input::AttentionMask => tensor(&batch.attention_mask)?,
                Input::TokenTypeIds => tensor(&batch.token_type_ids)?,
            });
        }
        let outputs = self
            .state
            .run(inputs)
            .map_err(|e| Error::Inference(format!("{e:#}")))?;
        if self.info.output == OutputKind::Span {
            return span_logits(&outputs, batch);
        }
        let logits = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| Error::Inference(e.to_string()))?;
        let expected: Vec<usize> = match self.info.output {
            OutputKind::PerToken => vec![batch.rows, batch.seq_len, self.info.labels],
            OutputKind::PerSequence => vec![batch.rows, self.info.labels],
            OutputKind::Span => unreachable!("handled above"),
        };
        if logits.shape() != expected.as_slice() {
            return Err(Error::Inference(format!(
                "logits shape {:?}, expected {:?}",
                logits.shape(),
                expected
            )));
        }
        Ok(Logits {
            rows: batch.rows,
            seq_len: if self.info.output == OutputKind::PerToken {
                batch.seq_len
            } else {
                0
            },
            labels: self.info.labels,
            values: logits.iter().copied().collect(),
        })
    }
}

/// Start and end logits interleaved as `[rows, seq_len, 2]`, so QA windows travel
/// through the same batching and chunking as per-token logits.
fn span_logits(outputs: &[TValue], batch: &Batch) -> Result<Logits> {
    let view = |ix: usize| -> Result<tract_ndarray::ArrayViewD<'_, f32>> {
        let v = outputs[ix]
            .to_plain_array_view::<f32>()
            .map_err(|e| Error::Inference(e.to_string()))?;
        if v.shape() != [batch.rows, batch.seq_len] {
            return Err(Error::Inference(format!(
                "span logits shape {:?}, expected {:?}",
                v.shape(),
                [batch.rows, batch.seq_len]
            )));
        }
        Ok(v)
    };
    let (start, end) = (view(0)?, view(1)?);
    let mut values = Vec::with_capacity(2 * start.len());
    for (s, e) in start.iter().zip(end.iter()) {
        values.push(*s);
        values.push(*e);
    }
    Ok(Logits {
        rows: batch.rows,
        seq_len: batch.seq_len,
        labels: 2,
        values,
    })
}
