//! Tasks: text in, Hugging Face-shaped results out, through one code path that
//! `annotate`, `eval` and the daemon share (so the goldens that test one test all).
//!
//! tokenize → windows → engine → task post-processing (pure functions of logits
//! and offsets, in `token` and `text`).

pub mod text;
pub mod token;
pub mod windows;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::bundle::{Aggregation, Bundle, ScoreFunction, Task};
use crate::engine::{EngineState, Logits};
use crate::error::{Error, Result};
use text::LabelScore;
use token::{Entity, SubwordRule, TokenClassifier};
use windows::{Window, Windower};

/// Per-route (or per-invocation) task options. `None` means "what the bundle's
/// card says", as the pipelines default from the model config.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskOptions {
    pub aggregation: Option<Aggregation>,
    /// Labels returned by text classification; 0 = all. Default 1 (the pipeline's default).
    pub top_k: Option<usize>,
    pub function_to_apply: Option<ScoreFunction>,
    /// Tokens per window (special tokens included); at most the model's maximum.
    pub window: Option<usize>,
    /// Tokens shared by neighbouring windows.
    pub stride: Option<usize>,
    /// Windows one text may need before it is refused as `text_too_long`.
    pub max_windows: Option<usize>,
}

pub const DEFAULT_MAX_WINDOWS: usize = 16;
/// Windows run through the model together; bounds the activation memory of a long text.
const WINDOWS_PER_RUN: usize = 8;

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Output {
    Entities(Vec<Entity>),
    Labels(Vec<LabelScore>),
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub tokenize_ms: f64,
    pub inference_ms: f64,
    pub postprocess_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Annotation {
    pub result: Output,
    /// Windows the text was cut into (1 when it fits the model).
    pub windows: usize,
    pub tokens: usize,
    pub timings: Timings,
}

#[derive(Clone)]
pub struct Annotator {
    bundle: Arc<Bundle>,
    windower: Windower,
    aggregation: Aggregation,
    top_k: Option<usize>,
    function: ScoreFunction,
    rule: SubwordRule,
    unk_id: Option<u32>,
}

impl Annotator {
    pub fn new(bundle: Arc<Bundle>, options: &TaskOptions) -> Result<Annotator> {
        let config = &bundle.config;
        let window = options.window.unwrap_or(config.max_length);
        if window > config.max_length {
            return Err(Error::InvalidRequest(format!(
                "window {window} is larger than the model's maximum of {} tokens",
                config.max_length
            )));
        }
        let stride = options.stride.unwrap_or((window / 4).min(128));
        let tokenizer = &bundle.tokenizer;
        let pad_id = config
            .pad_token_id
            .or_else(|| tokenizer.get_padding().map(|p| p.pad_id))
            .or_else(|| {
                ["[PAD]", "<pad>"]
                    .iter()
                    .find_map(|t| tokenizer.token_to_id(t))
            })
            .unwrap_or(0);
        let windower = Windower::new(
            tokenizer,
            window,
            stride,
            options.max_windows.unwrap_or(DEFAULT_MAX_WINDOWS),
            pad_id,
            config.token_type_ids,
        )?;
        let unk_id = unk_token(tokenizer).and_then(|t| tokenizer.token_to_id(&t));
        Ok(Annotator {
            rule: SubwordRule::for_tokenizer(tokenizer),
            unk_id,
            aggregation: options.aggregation.unwrap_or(config.default_aggregation),
            top_k: match options.top_k {
                Some(0) => None,
                Some(k) => Some(k),
                None => Some(1),
            },
            function: options
                .function_to_apply
                .unwrap_or_else(|| config.default_score_function()),
            windower,
            bundle,
        })
    }

    pub fn bundle(&self) -> &Arc<Bundle> {
        &self.bundle
    }

    pub fn task(&self) -> Task {
        self.bundle.config.task
    }

    pub fn windower(&self) -> &Windower {
        &self.windower
    }

    /// Windows of a text and their logits: the raw material of every task.
    pub fn infer(
        &self,
        state: &mut EngineState,
        text: &str,
        pair: Option<&str>,
    ) -> Result<(Vec<Window>, Logits)> {
        let windows = self.windower.encode(text, pair)?;
        let logits = self.run(state, &windows)?;
        Ok((windows, logits))
    }

    /// Task results from the logits of a text's windows: pure, no model involved.
    pub fn postprocess(&self, text: &str, windows: &[Window], logits: &Logits) -> Output {
        match self.task() {
            Task::TokenClassification => Output::Entities(
                TokenClassifier {
                    labels: &self.bundle.config.labels,
                    tokenizer: self.windower.tokenizer(),
                    rule: self.rule,
                    unk_id: self.unk_id,
                }
                .entities(text, windows, logits, self.aggregation),
            ),
            Task::TextClassification => {
                let scores = text::scores(logits, self.function);
                Output::Labels(text::ranked(
                    &self.bundle.config.labels,
                    &scores,
                    self.top_k,
                ))
            }
        }
    }

    fn run(&self, state: &mut EngineState, windows: &[Window]) -> Result<Logits> {
        // Every chunk is padded to the longest window, so chunks concatenate as rows.
        let seq_len = windows.iter().map(|w| w.ids.len()).max().unwrap_or(0);
        let mut all: Option<Logits> = None;
        for chunk in windows.chunks(WINDOWS_PER_RUN) {
            let logits = state.run(&self.windower.batch(chunk, seq_len))?;
            match &mut all {
                None => all = Some(logits),
                Some(acc) => {
                    acc.values.extend(logits.values);
                    acc.rows += logits.rows;
                }
            }
        }
        all.ok_or_else(|| Error::Inference("no windows".into()))
    }

    pub fn annotate(
        &self,
        state: &mut EngineState,
        text: &str,
        pair: Option<&str>,
    ) -> Result<Annotation> {
        if text.trim().is_empty() {
            return Err(Error::EmptyText);
        }
        let task = self.task();
        if pair.is_some() && task == Task::TokenClassification {
            return Err(Error::InvalidRequest(
                "text_pair is only for text classification".into(),
            ));
        }
        let t0 = Instant::now();
        let windows = self.windower.encode(text, pair)?;
        let t1 = Instant::now();
        let logits = self.run(state, &windows)?;
        let t2 = Instant::now();
        let result = self.postprocess(text, &windows, &logits);
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        Ok(Annotation {
            result,
            windows: windows.len(),
            tokens: windows.iter().map(|w| w.ids.len()).sum(),
            timings: Timings {
                tokenize_ms: ms(t0, t1),
                inference_ms: ms(t1, t2),
                postprocess_ms: ms(t2, t3),
            },
        })
    }
}

/// The unknown token's text, from the tokenizer model.
fn unk_token(tokenizer: &tokenizers::Tokenizer) -> Option<String> {
    use tokenizers::models::ModelWrapper;
    match tokenizer.get_model() {
        ModelWrapper::WordPiece(wp) => Some(wp.unk_token.clone()),
        ModelWrapper::BPE(bpe) => bpe.unk_token.clone(),
        ModelWrapper::WordLevel(wl) => Some(wl.unk_token.clone()),
        // Unigram keeps its unk id private; SentencePiece models name it `<unk>`.
        ModelWrapper::Unigram(_) => ["<unk>", "[UNK]"]
            .iter()
            .find(|t| tokenizer.token_to_id(t).is_some())
            .map(|t| t.to_string()),
    }
}
