//! Tasks: text in, Hugging Face-shaped results out, through one code path that
//! `annotate`, `eval` and the daemon share (so the goldens that test one test all).
//!
//! tokenize → windows → engine → task post-processing (pure functions of logits
//! and offsets, in `token`, `text` and `qa`).

pub mod batch;
pub mod qa;
pub mod redact;
pub mod text;
pub mod token;
pub mod windows;

use std::sync::Arc;

use serde::Serialize;

use crate::bundle::{Aggregation, Bundle, ScoreFunction, Task};
use crate::engine::{EngineState, Logits};
use crate::error::{Error, Result};
use qa::{Answers, QaParams};
use text::LabelScore;
use token::{Entity, SubwordRule, TokenClassifier};
use windows::{Window, Windower};

/// Task options, declared once: the command line's flags (`annotate`, `eval`), the
/// TOML keys of a route's `options` and a model's section, and what
/// [`Annotator::new`] reads. `None` means "what the bundle's card says", as the
/// pipelines default from the model config; each task module owns its defaults.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TaskOptions {
    /// Token classification grouping; default: the bundle's (simple for BIO tags).
    #[arg(long, value_enum)]
    pub aggregation: Option<Aggregation>,
    /// Text classification: labels returned (0 = all); question answering: answers; default 1.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Text classification: softmax, sigmoid or none; default from the bundle's problem_type.
    #[arg(long, value_enum)]
    pub function_to_apply: Option<ScoreFunction>,
    /// Tokens per window, special tokens included (default: the model's maximum; QA: min(maximum, 384)).
    #[arg(long)]
    pub window: Option<usize>,
    /// Tokens shared by neighbouring windows (default min(window / 4, 128); QA: the pipeline's doc_stride, min(window / 2, 128)).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Windows one text may need before it is refused as `text_too_long` (default 16).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Question answering: longest answer in tokens (default 15).
    #[arg(long)]
    pub max_answer_len: Option<usize>,
    /// Question answering: also offer the empty answer, scored by [CLS] (default false).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub handle_impossible_answer: Option<bool>,
    /// Token classification: add the text with these entity groups replaced
    /// (`all`, or e.g. `PER,LOC`; `--redact` alone = all), and the replaced spans'
    /// offsets, under `redacted`.
    #[arg(long, num_args = 0..=1, default_missing_value = "all", value_name = "GROUPS")]
    pub redact: Option<redact::Groups>,
    /// What a redacted entity becomes: tag (`[PER]`, the default) or pseudonym
    /// (`PER_1`, `PER_2`…: one per distinct name within a message).
    #[arg(long, value_enum)]
    pub redact_style: Option<redact::Style>,
}

impl TaskOptions {
    /// These options, with each unset one taken from `base` (a route's over its model's).
    pub fn or(&self, base: &TaskOptions) -> TaskOptions {
        TaskOptions {
            aggregation: self.aggregation.or(base.aggregation),
            top_k: self.top_k.or(base.top_k),
            function_to_apply: self.function_to_apply.or(base.function_to_apply),
            window: self.window.or(base.window),
            stride: self.stride.or(base.stride),
            max_windows: self.max_windows.or(base.max_windows),
            max_answer_len: self.max_answer_len.or(base.max_answer_len),
            handle_impossible_answer: self
                .handle_impossible_answer
                .or(base.handle_impossible_answer),
            redact: self.redact.clone().or_else(|| base.redact.clone()),
            redact_style: self.redact_style.or(base.redact_style),
        }
    }

    /// Whether any option that shapes windows is set (they are checked against the model).
    pub fn sets_windows(&self) -> bool {
        self.window.is_some() || self.stride.is_some() || self.max_windows.is_some()
    }
}

/// Where a task's request lives in a JSON payload, and whether a payload may be
/// the text itself. Each task module declares its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    /// The text (question answering: the question).
    pub text: &'static str,
    /// The second text (`text_pair`; question answering: the context).
    pub pair: &'static str,
    /// Whether the second text must be there.
    pub pair_required: bool,
    /// Whether a payload may be the text itself.
    pub plain_text: bool,
}

/// The request fields of a task.
pub fn fields(task: Task) -> Fields {
    match task {
        Task::TokenClassification => token::FIELDS,
        Task::TextClassification => text::FIELDS,
        Task::QuestionAnswering => qa::FIELDS,
    }
}

/// Checks one request against its task: what payload parsing and
/// [`Annotator::prepare`] both run, so every entry point refuses the same things
/// with the same codes.
pub fn check(task: Task, text: &str, pair: Option<&str>) -> Result<()> {
    match task {
        Task::TokenClassification => token::check(text, pair),
        Task::TextClassification => text::check(text),
        Task::QuestionAnswering => qa::check(text, pair),
    }
}

/// A field that must hold more than white space.
fn non_empty(field: &'static str, value: &str) -> Result<()> {
    if !value.trim().is_empty() {
        Ok(())
    } else if field == "text" {
        Err(Error::EmptyText)
    } else {
        Err(Error::EmptyField { field })
    }
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
    /// The text with the chosen entity groups replaced, when redaction is on.
    pub redaction: Option<redact::Redaction>,
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
    redactor: Option<redact::Redactor>,
}

impl Annotator {
    pub fn new(bundle: Arc<Bundle>, options: &TaskOptions) -> Result<Annotator> {
        let config = &bundle.config;
        let task = config.task;
        let (window, stride) = match task {
            Task::QuestionAnswering => qa::sizes(options, config.max_length),
            _ => windows::sizes(options, config.max_length),
        };
        if window > config.max_length {
            return Err(Error::InvalidRequest(format!(
                "window {window} is larger than the model's maximum of {} tokens",
                config.max_length
            )));
        }
        let qa = match task {
            Task::QuestionAnswering => QaParams::from_options(options)?,
            _ => QaParams::default(),
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
        let aggregation = options.aggregation.unwrap_or(config.default_aggregation);
        let redactor = redactor(&bundle, options, aggregation)?;
        let unk_id = unk_token(tokenizer).and_then(|t| tokenizer.token_to_id(&t));
        let cls_id = ["[CLS]", "<cls>", "<s>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t));
        Ok(Annotator {
            qa,
            cls_id,
            rule: SubwordRule::for_tokenizer(tokenizer),
            unk_id,
            aggregation,
            redactor,
            top_k: text::top_k(options),
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
    /// Question answering: `text` is the question, `pair` the context. The batch
    /// path with one item.
    pub fn infer(
        &self,
        state: &mut EngineState,
        text: &str,
        pair: Option<&str>,
    ) -> Result<(Vec<Window>, Logits)> {
        let item = batch::Item {
            annotator: self,
            text,
            pair,
        };
        let inferred = batch::infer_batch(state, std::slice::from_ref(&item));
        let one = inferred
            .into_iter()
            .next()
            .expect("one item, one outcome")?;
        Ok((one.windows, one.logits))
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

    /// The text with the chosen entity groups replaced, when redaction is on.
    pub fn redact(&self, text: &str, output: &Output) -> Option<redact::Redaction> {
        match (&self.redactor, output) {
            (Some(redactor), Output::Entities(entities)) => Some(redactor.apply(text, entities)),
            _ => None,
        }
    }

    /// The model inputs the batch path runs for one text's windows. Public so that
    /// benchmarks can feed other engines exactly the same tensors.
    pub fn batches(&self, windows: &[Window]) -> Vec<crate::engine::Batch> {
        let prepared = [Ok(windows.to_vec())];
        batch::runs_of(&self.windower, &prepared)
            .into_iter()
            .map(|(batch, _)| batch)
            .collect()
    }

    /// One text through the whole task path: the batch path with one item, so a
    /// message gets the same result alone as in a micro-batch.
    pub fn annotate(
        &self,
        state: &mut EngineState,
        text: &str,
        pair: Option<&str>,
    ) -> Result<Annotation> {
        let item = batch::Item {
            annotator: self,
            text,
            pair,
        };
        batch::annotate_batch(state, std::slice::from_ref(&item))
            .into_iter()
            .next()
            .expect("one item, one outcome")
    }

    /// Checks a request against the task and cuts it into windows.
    pub fn prepare(&self, text: &str, pair: Option<&str>) -> Result<Vec<Window>> {
        check(self.task(), text, pair)?;
        match (self.task(), pair) {
            (Task::QuestionAnswering, Some(context)) => self.windower.encode_qa(text, context),
            (_, pair) => self.windower.encode(text, pair),
        }
    }
}

/// The redaction setting, checked against the model: only token classification
/// finds spans to replace, so any other task is refused at start, where a route or
/// a command line that asks for it is written, not on every message.
fn redactor(
    bundle: &Bundle,
    options: &TaskOptions,
    aggregation: Aggregation,
) -> Result<Option<redact::Redactor>> {
    let task = bundle.config.task;
    match (&options.redact, options.redact_style) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Error::InvalidRequest(
            "redact_style without redact: say which entity groups to redact".into(),
        )),
        (Some(_), _) if task != Task::TokenClassification => Err(Error::InvalidRequest(format!(
            "redact: only token-classification models find entities to redact; {} is {}",
            bundle.name,
            task.as_str()
        ))),
        (Some(groups), style) => Ok(Some(redact::Redactor::new(
            groups,
            style.unwrap_or_default(),
            &bundle.config.labels,
            aggregation,
        )?)),
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
