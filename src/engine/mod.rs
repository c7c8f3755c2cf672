//! The inference engine: one tract plan per model, loaded once and shared
//! read-only by every worker; each worker owns an [`EngineState`] (tract's scratch
//! buffers), so workers never contend on a lock to run.
//!
//! The engine knows tensors, not tasks: it takes token ids and returns logits.

mod attention;
mod layer_norm;
pub mod qmatmul;
mod rewrite;
pub mod simd;

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::SimpleState;
use tract_onnx::tract_hir::infer::InferenceFact;

pub use qmatmul::{ActivationRange, KernelChoice, KernelKind};
pub use rewrite::{Int8Rewrite, RewriteReport, Rewrites};

use crate::error::{Error, Result};

/// The model inputs we know how to feed, by their ONNX names (hence `Input`
/// in the variants' names: they are the graph's `input_ids`, …).
#[allow(clippy::enum_variant_names)]
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
    /// Which kernel path runs the int8 weights: `native-int8`,
    /// `dequantized-at-load`, `mixed`, `tract-matmul-integer` (rewrite off) or
    /// `fp32` (no quantized matmul).
    pub int8_path: &'static str,
}

/// How a model's int8 weights run (`models.NAME.int8`, `--int8`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Int8Path {
    /// Native where this CPU has an int8 kernel that beats fp32, else dequantized.
    #[default]
    Auto,
    /// Int8 weights and int8 kernels: a quarter of the weight memory.
    Native,
    /// Weights expanded to fp32 at load, fp32 kernels.
    Dequantize,
}

impl std::str::FromStr for Int8Path {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Int8Path, String> {
        match s {
            "auto" => Ok(Int8Path::Auto),
            "native" => Ok(Int8Path::Native),
            "dequantize" => Ok(Int8Path::Dequantize),
            other => Err(format!("`{other}`: expected auto, native or dequantize")),
        }
    }
}

impl Int8Path {
    /// The rewrite this choice means on this CPU, with `kernel` (`None`: auto) for
    /// the native path. A kernel this CPU cannot run, or one named with
    /// `dequantize`, is refused with the kernels that would do.
    pub fn rewrite(self, kernel: Option<KernelKind>) -> std::result::Result<Int8Rewrite, String> {
        let native = |kernel: KernelKind| Int8Rewrite::Fused {
            kernel,
            range: ActivationRange::Row,
        };
        match (self, kernel) {
            (Int8Path::Dequantize, None) => Ok(Int8Rewrite::Dequantize),
            (Int8Path::Dequantize, Some(k)) => Err(format!(
                "the {k} kernel multiplies int8 weights; with int8 = \"dequantize\" there are none (use kernel = \"auto\")"
            )),
            (_, Some(k)) if !k.available() => {
                let here: Vec<&str> = KernelKind::available_here()
                    .iter()
                    .map(|k| k.name())
                    .collect();
                Err(format!(
                    "the {k} kernel does not run on this CPU ({}); it has: {}",
                    simd::features().join(" "),
                    here.join(", ")
                ))
            }
            (_, Some(k)) => Ok(native(k)),
            (Int8Path::Native, None) => Ok(native(KernelKind::auto().unwrap_or(KernelKind::Tract))),
            (Int8Path::Auto, None) => Ok(KernelKind::auto().map_or(Int8Rewrite::Dequantize, native)),
        }
    }
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
        Engine::load_int8(dir, Int8Path::Auto)
    }

    pub fn load_int8(dir: &Path, int8: Int8Path) -> Result<Engine> {
        Engine::load_with(dir, Rewrites::for_path(int8))
    }

    pub fn load_with(dir: &Path, which: Rewrites) -> Result<Engine> {
        let path = dir.join(FILE);
        let bad = |problem: String| Error::bundle(dir, FILE, problem);
        let mut onnx = tract_onnx::onnx().with_ignore_value_info(true);
        onnx.op_register.insert(qmatmul::ONNX_OP, qmatmul::parse);
        onnx.op_register
            .insert(layer_norm::ONNX_OP, layer_norm::parse);
        onnx.op_register
            .insert(attention::ONNX_OP, attention::parse);
        // Decoded from a read-only map of the file: reading it into memory first
        // held the bytes, tract's copy of them and the decoded protobuf at once
        // (3 × the file; BERT-base: 545 MiB at peak for a 182 MB bundle).
        if let Err(e) = std::fs::File::open(&path) {
            return Err(bad(format!("cannot read: {e}")));
        }
        let mut proto = onnx.proto_model_for_path(&path).map_err(|e| {
            bad(format!(
                "not a readable ONNX model (truncated or corrupt?): {e}"
            ))
        })?;
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

        // Packed int8 weights wait here for tract's parser; the guard drops the
        // registry's references when the load ends, the nodes keep theirs.
        let mut registry = qmatmul::Registry::hold();
        let rewrites = rewrite::rewrite(graph, which, &mut registry);
        log::info!(
            "{}: {}/{} MatMulInteger int8 ({} weights, {:.1} MiB packed, kernels {:?}), {} dequantized ({} weights), fused {} GELU ({} into the matmul before), {} layer norms ({} with their residual add), {} self-attentions",
            path.display(),
            rewrites.matmul_integer_fused,
            rewrites.matmul_integer_total,
            rewrites.weights_packed,
            rewrites.packed_weight_bytes as f64 / (1 << 20) as f64,
            rewrites.int8_kernels,
            rewrites.matmul_integer_dequantized,
            rewrites.weights_dequantized,
            rewrites.gelu_fused,
            rewrites.gelu_into_matmul,
            rewrites.layer_norm_fused,
            rewrites.residual_add_fused,
            rewrites.attention_fused
        );

        let mut model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| bad(format!("tract cannot parse the graph: {e:#}")))?;
        drop(proto);
        drop(registry);
        // Windows of one length per run, batch and length symbolic: one plan serves
        // every group. `S >= 1` and `B >= 1` tell tract the tensors are not empty.
        // (When tract itself ran the attention heads' reshapes and transposes, a
        // symbolic batch left them as generic copies; our Attention op reads the
        // heads in place, and a 64-token window measured the same with a batch
        // axis of B or 1, alternated in one process: the default model 1.45 / 1.39
        // and 1.23 / 1.20 ms (within noise), DistilBETO 9.0 / 9.0 ms.)
        let seq = model.symbols.sym("S");
        let rows = model.symbols.sym("B");
        for assertion in ["S >= 1", "B >= 1"] {
            model
                .symbols
                .add_assertion(assertion)
                .map_err(|e| bad(format!("{e:#}")))?;
        }
        for ix in 0..inputs.len() {
            model
                .set_input_fact(
                    ix,
                    InferenceFact::dt_shape(i64::datum_type(), [rows.to_dim(), seq.to_dim()]),
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
        if log::log_enabled!(log::Level::Debug) {
            // What tract kept generic is where speed is lost: the op census says it.
            let mut census = std::collections::BTreeMap::<String, usize>::new();
            for node in typed.nodes() {
                *census.entry(node.op.name().to_string()).or_default() += 1;
            }
            log::debug!("{}: optimised graph ops {census:?}", path.display());
            for node in typed.nodes() {
                log::trace!(
                    "node {} {} {:?} <- {:?}",
                    node.id,
                    node.op.name(),
                    node.outputs
                        .iter()
                        .map(|o| format!("{:?}", o.fact.shape))
                        .collect::<Vec<_>>(),
                    node.inputs
                );
            }
        }
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
        } else if rewrites.matmul_integer_fused == rewrites.matmul_integer_total {
            "native-int8"
        } else if rewrites.matmul_integer_dequantized == rewrites.matmul_integer_total {
            "dequantized-at-load"
        } else if rewrites.matmul_integer_fused + rewrites.matmul_integer_dequantized == 0 {
            "tract-matmul-integer"
        } else {
            "mixed"
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

/// Tokens per run when windows of one length run together. A single window of
/// the usual 512 already takes more, so grouping never raises peak memory above
/// what one long window needs; at 256 rows each weight byte serves 256 products,
/// past the point where the int8 kernels wait on memory.
pub const GROUP_TOKENS: usize = 256;

pub struct EngineState {
    state: TypedSimpleState,
    inputs: Vec<Input>,
    info: EngineInfo,
}

impl EngineState {
    /// Runs every row of the batch, each cut to its real length (right padding
    /// costs nothing, and the logits of padded positions are 0). Rows of the same
    /// length run together, up to [`GROUP_TOKENS`] tokens a run: every weight
    /// matrix is then read once per group instead of once per window, which is
    /// what a window of BETO (82 MiB of int8 weights, far beyond L2) mostly waits
    /// on. Every op computes each row on its own (activation ranges, layer norm
    /// and attention are per row), so a row's logits are the same bits alone or
    /// grouped.
    pub fn run(&mut self, batch: &Batch) -> Result<Logits> {
        let (rows, seq) = (batch.rows, batch.seq_len);
        let per_pos = match self.info.output {
            OutputKind::PerToken => self.info.labels,
            OutputKind::Span => 2,
            OutputKind::PerSequence => 0,
        };
        let width = if per_pos == 0 {
            self.info.labels
        } else {
            seq * per_pos
        };
        let mut values = vec![0f32; rows * width];
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for row in 0..rows {
            let mask = &batch.attention_mask[row * seq..(row + 1) * seq];
            let real = mask.iter().take_while(|&&m| m != 0).count();
            // Trimmed only when the padding is all at the end.
            let len = if mask[real..].iter().all(|&m| m == 0) && real > 0 {
                real
            } else {
                seq
            };
            by_len.entry(len).or_default().push(row);
        }
        for (len, same) in by_len {
            let n = if per_pos == 0 { width } else { len * per_pos };
            for group in same.chunks((GROUP_TOKENS / len).max(1)) {
                let out = self.run_group(batch, group, len)?;
                if out.len() != n * group.len() {
                    return Err(Error::Inference(format!(
                        "{} logits for {} windows of {len} tokens, expected {n} each",
                        out.len(),
                        group.len()
                    )));
                }
                for (&row, logits) in group.iter().zip(out.chunks_exact(n)) {
                    values[row * width..][..n].copy_from_slice(logits);
                }
            }
        }
        Ok(Logits {
            rows,
            seq_len: if per_pos == 0 { 0 } else { seq },
            labels: if per_pos == 0 {
                self.info.labels
            } else {
                per_pos
            },
            values,
        })
    }

    /// The first `len` tokens of each of `rows`: logits `[len, labels]`,
    /// `[labels]` or `[len, 2]` (start, end) per row, one row after the other.
    fn run_group(&mut self, batch: &Batch, rows: &[usize], len: usize) -> Result<Vec<f32>> {
        let n = rows.len();
        let tensor = |data: &[i64]| -> Result<TValue> {
            let cut = rows
                .iter()
                .flat_map(|&r| &data[r * batch.seq_len..][..len])
                .copied()
                .collect();
            Ok(tract_ndarray::Array2::from_shape_vec([n, len], cut)
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
        let view = |ix: usize, expected: &[usize]| -> Result<tract_ndarray::ArrayViewD<'_, f32>> {
            let v = outputs[ix]
                .to_plain_array_view::<f32>()
                .map_err(|e| Error::Inference(e.to_string()))?;
            if v.shape() != expected {
                return Err(Error::Inference(format!(
                    "logits shape {:?}, expected {expected:?}",
                    v.shape()
                )));
            }
            Ok(v)
        };
        Ok(match self.info.output {
            OutputKind::PerToken => view(0, &[n, len, self.info.labels])?
                .iter()
                .copied()
                .collect(),
            OutputKind::PerSequence => view(0, &[n, self.info.labels])?.iter().copied().collect(),
            // Start and end logits interleaved as `[len, 2]`, so QA windows travel
            // through the same batching and chunking as per-token logits.
            OutputKind::Span => {
                let (start, end) = (view(0, &[n, len])?, view(1, &[n, len])?);
                start
                    .iter()
                    .zip(end.iter())
                    .flat_map(|(s, e)| [*s, *e])
                    .collect()
            }
        })
    }
}
