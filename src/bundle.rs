//! A model bundle: one folder holding everything a model needs on the device.
//!
//! ```text
//! model.onnx      int8 (dynamic quantization of MatMul weights)
//! tokenizer.json  Hugging Face tokenizers format
//! config.json     Hugging Face config (model_type, id2label, max_position_embeddings, problem_type)
//! README.md       model card
//! ```
//!
//! Everything is checked at load, so that a bad bundle fails when the daemon
//! starts, with the file and the problem named, not on the first message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{Engine, Int8Path, OutputKind, Rewrites};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    TokenClassification,
    TextClassification,
    QuestionAnswering,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::TokenClassification => "token-classification",
            Task::TextClassification => "text-classification",
            Task::QuestionAnswering => "question-answering",
        }
    }
}

/// How token predictions are grouped into entities (Hugging Face semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    None,
    Simple,
    First,
    Average,
    Max,
}

/// How logits become scores in text classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunction {
    Softmax,
    Sigmoid,
    None,
}

/// The parts of a Hugging Face `config.json` we read. Unknown keys are fine here:
/// this file is written by transformers, not by our users.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    id2label: Option<BTreeMap<String, String>>,
    problem_type: Option<String>,
    max_position_embeddings: Option<usize>,
    pad_token_id: Option<u32>,
    #[serde(default)]
    anotador: AnotadorMeta,
}

/// Our own section of `config.json`, written by the export tool.
#[derive(Debug, Default, Deserialize)]
struct AnotadorMeta {
    task: Option<Task>,
    aggregation_strategy: Option<Aggregation>,
    max_length: Option<usize>,
    token_type_ids_from_tokenizer: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub task: Task,
    /// Labels in id order.
    pub labels: Vec<String>,
    pub problem_type: Option<String>,
    /// Tokens per window, special tokens included.
    pub max_length: usize,
    pub default_aggregation: Aggregation,
    pub pad_token_id: Option<u32>,
    /// Feed the tokenizer's segment ids (else zeros). transformers 5 returns none for
    /// ALBERT, so its pipeline feeds zeros; the export tool records which applies.
    pub token_type_ids: bool,
}

impl ModelConfig {
    pub fn default_score_function(&self) -> ScoreFunction {
        match self.problem_type.as_deref() {
            Some("regression") => ScoreFunction::None,
            Some("multi_label_classification") => ScoreFunction::Sigmoid,
            _ if self.labels.len() == 1 => ScoreFunction::Sigmoid,
            _ => ScoreFunction::Softmax,
        }
    }

    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == name)
    }
}

const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const CARD: &str = "README.md";

pub struct Bundle {
    pub dir: PathBuf,
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: tokenizers::Tokenizer,
    pub engine: Engine,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .finish()
    }
}

impl Bundle {
    /// Reads and checks every file, then loads the engine.
    /// Loads with this CPU's choice of int8 path (`auto`).
    pub fn load(dir: impl AsRef<Path>) -> Result<Bundle> {
        Bundle::load_with(dir, Rewrites::for_path(Int8Path::Auto))
    }

    pub fn load_with(dir: impl AsRef<Path>, rewrites: Rewrites) -> Result<Bundle> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::bundle(dir, "(folder)", "is not a folder"));
        }
        for file in [CONFIG, TOKENIZER, "model.onnx"] {
            if !dir.join(file).is_file() {
                return Err(Error::bundle(dir, file, "missing"));
            }
        }
        if !dir.join(CARD).is_file() {
            log::warn!("model bundle {}: no {CARD} model card", dir.display());
        }
        let config = read_config(dir)?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join(TOKENIZER))
            .map_err(|e| Error::bundle(dir, TOKENIZER, format!("cannot load: {e}")))?;
        // Windows are cut by us; a truncation or padding left in the file would
        // silently cut text or waste compute.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::bundle(dir, TOKENIZER, e.to_string()))?;
        tokenizer.with_padding(None);

        let engine = Engine::load_with(dir, rewrites)?;
        // The proto, the dequantized weights and tract's unpacked copy are gone now.
        crate::memory::trim();
        let info = engine.info();
        let expected_output = match config.task {
            Task::TokenClassification => OutputKind::PerToken,
            Task::TextClassification => OutputKind::PerSequence,
            Task::QuestionAnswering => OutputKind::Span,
        };
        if info.output != expected_output {
            return Err(Error::bundle(
                dir,
                "model.onnx",
                format!(
                    "logits are {:?} but config.json says the task is {}",
                    info.output,
                    config.task.as_str()
                ),
            ));
        }
        // A QA head has start and end logits, whatever id2label says.
        if config.task != Task::QuestionAnswering && info.labels != config.labels.len() {
            return Err(Error::bundle(
                dir,
                CONFIG,
                format!(
                    "id2label has {} labels but model.onnx produces {} logits per prediction",
                    config.labels.len(),
                    info.labels
                ),
            ));
        }
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Bundle {
            dir: dir.to_path_buf(),
            name,
            config,
            tokenizer,
            engine,
        })
    }
}

/// SHA-256 of a bundle's `model.onnx`, lower-case hex.
pub fn model_sha256(dir: &Path) -> Result<String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(dir.join("model.onnx"))
        .map_err(|e| Error::bundle(dir, "model.onnx", format!("cannot read: {e}")))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|e| Error::bundle(dir, "model.onnx", format!("cannot read: {e}")))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Refuses a `model.onnx` whose SHA-256 is not `expected` (checked before parsing,
/// so an altered file never reaches the ONNX parser).
pub fn verify_sha256(dir: &Path, expected: &str) -> Result<()> {
    let actual = model_sha256(dir)?;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(Error::bundle(
            dir,
            "model.onnx",
            format!("SHA-256 is {actual}, the configuration expects {expected}: truncated, altered or another model"),
        ));
    }
    Ok(())
}

fn read_config(dir: &Path) -> Result<ModelConfig> {
    let bad = |problem: String| Error::bundle(dir, CONFIG, problem);
    let text =
        std::fs::read_to_string(dir.join(CONFIG)).map_err(|e| bad(format!("cannot read: {e}")))?;
    let hf: HfConfig =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let model_type = hf.model_type.ok_or_else(|| bad("no `model_type`".into()))?;
    let task = match hf.anotador.task {
        Some(task) => task,
        None => hf
            .architectures
            .iter()
            .find_map(|a| {
                if a.ends_with("ForTokenClassification") {
                    Some(Task::TokenClassification)
                } else if a.ends_with("ForSequenceClassification") {
                    Some(Task::TextClassification)
                } else if a.ends_with("ForQuestionAnswering") {
                    Some(Task::QuestionAnswering)
                } else {
                    None
                }
            })
            .ok_or_else(|| bad("cannot tell the task: no `anotador.task` and no *For{Token,Sequence}Classification or *ForQuestionAnswering architecture".into()))?,
    };
    // QA heads have no labels; transformers writes a default id2label anyway.
    let id2label = match hf.id2label {
        Some(map) => map,
        None if task == Task::QuestionAnswering => BTreeMap::new(),
        None => return Err(bad("no `id2label`".into())),
    };
    let mut indexed: Vec<(usize, String)> = Vec::with_capacity(id2label.len());
    for (k, v) in id2label {
        let ix = k
            .parse::<usize>()
            .map_err(|_| bad(format!("id2label key `{k}` is not an integer")))?;
        indexed.push((ix, v));
    }
    indexed.sort();
    if indexed.iter().enumerate().any(|(i, (ix, _))| i != *ix) {
        return Err(bad("id2label keys are not 0..n-1".into()));
    }
    let labels: Vec<String> = indexed.into_iter().map(|(_, v)| v).collect();
    if labels.is_empty() && task != Task::QuestionAnswering {
        return Err(bad("id2label is empty".into()));
    }
    let max_positions = hf.max_position_embeddings.unwrap_or(512);
    let max_length = hf
        .anotador
        .max_length
        .unwrap_or(max_positions)
        .min(max_positions);
    if max_length < 8 {
        return Err(bad(format!(
            "max length {max_length} is too small to hold a window"
        )));
    }
    let bio = labels
        .iter()
        .any(|l| l.starts_with("B-") || l.starts_with("I-"));
    let default_aggregation = hf.anotador.aggregation_strategy.unwrap_or(if bio {
        Aggregation::Simple
    } else {
        Aggregation::None
    });
    Ok(ModelConfig {
        model_type,
        task,
        labels,
        problem_type: hf.problem_type,
        max_length,
        default_aggregation,
        pad_token_id: hf.pad_token_id,
        token_type_ids: hf.anotador.token_type_ids_from_tokenizer.unwrap_or(true),
    })
}
