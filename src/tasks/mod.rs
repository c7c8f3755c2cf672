//! Tasks: text in, Hugging Face-shaped results out, through one code path that
//! `annotate`, `eval` and the daemon share (so the goldens that test one test all).
//!
//! tokenize → windows → engine → task post-processing (pure functions of logits
//! and offsets, in `token`, `text` and `qa`).

pub mod batch;
pub mod qa;
pub mod text;
pub mod token;
pub mod windows;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::bundle::{Aggregation, Bundle, ScoreFunction, Task};
use crate::engine::{EngineState, Logits};
use crate::error::{Error, Result};
use qa::{Answers, QaParams};
use text::LabelScore;
use token::{Entity, SubwordRule, TokenClassifier};
use windows::{Window, Windower};

/// Per-route (or per-invocation) task options. `None` means "what the bundle's
/// card says", as the pipelines default from the model config.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskOptions {
    pub aggregation: Option<Aggregation>,
    /// Labels returned by text classification (0 = all), answers by question
    /// answering. Default 1 (the pipelines' default).
    pub top_k: Option<usize>,
    pub function_to_apply: Option<ScoreFunction>,
    /// Tokens per window (special tokens included); at most the model's maximum.
    /// Question answering: the pipeline's `max_seq_len` (default min(maximum, 384)).
    pub window: Option<usize>,
    /// Tokens shared by neighbouring windows. Question answering: the pipeline's
    /// `doc_stride` (default min(window / 2, 128)).
    pub stride: Option<usize>,
    /// Windows one text may need before it is refused as `text_too_long`.
    pub max_windows: Option<usize>,
    /// Question answering: longest answer in tokens (default 15).
    pub max_answer_len: Option<usize>,
    /// Question answering: also offer the empty answer (default false).
    pub handle_impossible_answer: Option<bool>,
}

pub const DEFAULT_MAX_WINDOWS: usize = 16;
/// At most this many windows run through the model together.
pub const WINDOWS_PER_RUN: usize = 8;
/// And at most this many (padded) tokens: batching pays for short windows (one
/// 8×64 run costs less than eight 1×64 runs) but not for long ones, where attention
/// is quadratic and an 8×512 run is slower and far bigger than eight 1×512 runs
/// (measured with `cargo bench --bench compare`). Bounds activation memory too.
pub const TOKENS_PER_RUN: usize = 512;

/// Splits windows of the given lengths, in order, into runs within both limits;
/// returns the number of windows of each run.
pub fn runs(lengths: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut runs = Vec::new();
    let (mut rows, mut longest) = (0usize, 0usize);
    for len in lengths {
        let padded = (rows + 1) * longest.max(len);
        if rows > 0 && (rows == WINDOWS_PER_RUN || padded > TOKENS_PER_RUN) {
            runs.push(rows);
            (rows, longest) = (0, 0);
        }
        rows += 1;
        longest = longest.max(len);
    }
    if rows > 0 {
        runs.push(rows);
    }
    runs
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Output {
    Entities(Vec<Entity>),
    Labels(Vec<LabelScore>),
    Answers(Answers),
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
    qa: QaParams,
    /// Stays answerable in QA: it carries the "no answer" score.
    cls_id: Option<u32>,
}

impl Annotator {
    pub fn new(bundle: Arc<Bundle>, options: &TaskOptions) -> Result<Annotator> {
        let config = &bundle.config;
        let qa_task = config.task == Task::QuestionAnswering;
        let window = options.window.unwrap_or(if qa_task {
            config.max_length.min(384)
        } else {
            config.max_length
        });
        if window > config.max_length {
            return Err(Error::InvalidRequest(format!(
                "window {window} is larger than the model's maximum of {} tokens",
                config.max_length
            )));
        }
        let stride = options.stride.unwrap_or(if qa_task {
            (window / 2).min(128)
        } else {
            (window / 4).min(128)
        });
        let qa = QaParams {
            top_k: match options.top_k {
                Some(0) if qa_task => {
                    return Err(Error::InvalidRequest(
                        "top_k must be at least 1 for question answering".into(),
                    ))
                }
                Some(k) => k,
                None => 1,
            },
            max_answer_len: match options.max_answer_len {
                Some(0) => {
                    return Err(Error::InvalidRequest(
                        "max_answer_len must be at least 1".into(),
                    ))
                }
                Some(n) => n,
                None => QaParams::default().max_answer_len,
            },
            handle_impossible_answer: options.handle_impossible_answer.unwrap_or(false),
        };
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
        let cls_id = ["[CLS]", "<cls>", "<s>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t));
        Ok(Annotator {
            qa,
            cls_id,
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
    /// Question answering: `text` is the question, `pair` the context.
    pub fn infer(
        &self,
        state: &mut EngineState,
        text: &str,
        pair: Option<&str>,
    ) -> Result<(Vec<Window>, Logits)> {
        let windows = self.encode(text, pair)?;
        let logits = self.run(state, &windows)?;
        Ok((windows, logits))
    }

    fn encode(&self, text: &str, pair: Option<&str>) -> Result<Vec<Window>> {
        match (self.task(), pair) {
            (Task::QuestionAnswering, Some(context)) => self.windower.encode_qa(text, context),
            (Task::QuestionAnswering, None) => Err(Error::MissingField { field: "context" }),
            (_, pair) => self.windower.encode(text, pair),
        }
    }

    /// Task results from the logits of a text's windows: pure, no model involved.
    pub fn postprocess(
        &self,
        text: &str,
        pair: Option<&str>,
        windows: &[Window],
        logits: &Logits,
    ) -> Output {
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
            Task::QuestionAnswering => Output::Answers(qa::answers(
                pair.unwrap_or_default(),
                windows,
                logits,
                self.cls_id,
                &self.qa,
            )),
        }
    }

    /// The model inputs of a text's windows: runs within `WINDOWS_PER_RUN` and
    /// `TOKENS_PER_RUN`, every one padded to the longest window, so their logits
    /// concatenate as rows. Public so that benchmarks can feed other engines exactly
    /// the same tensors.
    pub fn batches(&self, windows: &[Window]) -> Vec<crate::engine::Batch> {
        let seq_len = windows.iter().map(|w| w.ids.len()).max().unwrap_or(0);
        let mut rest = windows;
        runs(windows.iter().map(|_| seq_len))
            .into_iter()
            .map(|n| {
                let (run, tail) = rest.split_at(n);
                rest = tail;
                self.windower.batch(run, seq_len)
            })
            .collect()
    }

    fn run(&self, state: &mut EngineState, windows: &[Window]) -> Result<Logits> {
        let mut all: Option<Logits> = None;
        for batch in self.batches(windows) {
            let logits = state.run(&batch)?;
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
        let t0 = Instant::now();
        let windows = self.prepare(text, pair)?;
        let t1 = Instant::now();
        let logits = self.run(state, &windows)?;
        let t2 = Instant::now();
        let result = self.postprocess(text, pair, &windows, &logits);
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

    /// Checks a request against the task and cuts it into windows.
    pub fn prepare(&self, text: &str, pair: Option<&str>) -> Result<Vec<Window>> {
        let task = self.task();
        if text.trim().is_empty() {
            return Err(match task {
                Task::QuestionAnswering => Error::EmptyField { field: "question" },
                _ => Error::EmptyText,
            });
        }
        match (task, pair) {
            (Task::TokenClassification, Some(_)) => {
                return Err(Error::InvalidRequest(
                    "text_pair is only for text classification".into(),
                ))
            }
            (Task::QuestionAnswering, None) => {
                return Err(Error::MissingField { field: "context" })
            }
            (Task::QuestionAnswering, Some(c)) if c.trim().is_empty() => {
                return Err(Error::EmptyField { field: "context" })
            }
            _ => {}
        }
        self.encode(text, pair)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_respect_both_limits() {
        assert_eq!(super::runs([64; 10]), [8, 2]);
        assert_eq!(super::runs([512, 512, 100]), [1, 1, 1]);
        assert_eq!(super::runs([10, 20, 100, 200, 300]), [3, 1, 1]);
        assert_eq!(super::runs([600]), [1]);
        assert!(super::runs([]).is_empty());
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
