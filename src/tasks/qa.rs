//! Extractive question answering with the `question-answering` pipeline's
//! semantics. transformers 5 dropped that pipeline; these are the rules of its last
//! release (4.57.3), each spelled out with line numbers in `models/export/README.md`
//! and checked against its goldens in `tests/qa.rs`.
//!
//! Per window: start and end logits outside the context (and `[CLS]`) are masked
//! to -10000 before two separate float32 softmaxes; a span scores
//! `p_start · p_end`; the best `2·top_k + 10` spans are widened to whole words of
//! the context; equal answers (case-insensitive) from any window add their scores.

use serde::Serialize;

use super::windows::Window;
use super::{Fields, TaskOptions};
use crate::engine::Logits;
use crate::error::{Error, Result};

/// `{"question", "context"}`, in the order the model reads them; JSON only.
pub const FIELDS: Fields = Fields {
    text: "question",
    pair: "context",
    pair_required: true,
    plain_text: false,
};

/// A question and the context to find its answer in.
pub fn check(question: &str, context: Option<&str>) -> Result<()> {
    super::non_empty(FIELDS.text, question)?;
    let context = context.ok_or(Error::MissingField { field: FIELDS.pair })?;
    super::non_empty(FIELDS.pair, context)
}

/// Window and stride: the pipeline's `max_seq_len` (default min(maximum, 384)) and
/// `doc_stride` (default min(window / 2, 128)).
pub fn sizes(options: &TaskOptions, max_length: usize) -> (usize, usize) {
    let window = options.window.unwrap_or(max_length.min(384));
    (window, options.stride.unwrap_or((window / 2).min(128)))
}

/// The pipeline's post-processing parameters (its defaults in `Default`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QaParams {
    pub top_k: usize,
    /// Longest answer, in tokens.
    pub max_answer_len: usize,
    /// Also offer the empty answer, scored by `[CLS]`.
    pub handle_impossible_answer: bool,
}

impl QaParams {
    pub fn from_options(options: &TaskOptions) -> Result<QaParams> {
        let defaults = QaParams::default();
        Ok(QaParams {
            top_k: match options.top_k {
                Some(0) => {
                    return Err(Error::InvalidRequest(
                        "top_k must be at least 1 for question answering".into(),
                    ))
                }
                Some(k) => k,
                None => defaults.top_k,
            },
            max_answer_len: match options.max_answer_len {
                Some(0) => {
                    return Err(Error::InvalidRequest(
                        "max_answer_len must be at least 1".into(),
                    ))
                }
                Some(n) => n,
                None => defaults.max_answer_len,
            },
            handle_impossible_answer: options
                .handle_impossible_answer
                .unwrap_or(defaults.handle_impossible_answer),
        })
    }
}

impl Default for QaParams {
    fn default() -> Self {
        QaParams {
            top_k: 1,
            max_answer_len: 15,
            handle_impossible_answer: false,
        }
    }
}

/// One answer: `answer` is exactly `context[start..end]` in characters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    pub score: f64,
    pub start: usize,
    pub end: usize,
    pub answer: String,
}

/// The pipeline returns a bare object when exactly one answer remains, else a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answers {
    One(Answer),
    Many(Vec<Answer>),
}

impl Answers {
    pub fn as_slice(&self) -> &[Answer] {
        match self {
            Answers::One(a) => std::slice::from_ref(a),
            Answers::Many(v) => v,
        }
    }

    /// The best answer, if any.
    pub fn best(&self) -> Option<&Answer> {
        self.as_slice().first()
    }
}

/// The logit that keeps a position out of the softmax: `exp` of it underflows to
/// exactly 0 in float32, as in the pipeline.
const MASKED: f32 = -10000.0;

/// Answers from the windows of one (question, context) and their start/end logits
/// (`logits.at(row, pos)` = `[start, end]`). `cls_id` stays answerable, as the
/// pipeline's `p_mask` leaves it (it carries the "no answer" score).
pub fn answers(
    context: &str,
    windows: &[Window],
    logits: &Logits,
    cls_id: Option<u32>,
    params: &QaParams,
) -> Answers {
    let chars = super::windows::CharIndex::new(context);
    let top_k = params.top_k.max(1);
    // align_to_words: the pipeline looks further than top_k, because several token
    // spans can widen to the same words.
    let pre_topk = 2 * top_k + 10;
    let mut min_null = 1_000_000f64;
    let mut found: Vec<Answer> = Vec::new();
    // Lower-cased text of each found answer, the merge key (kept, not recomputed).
    let mut keys: Vec<String> = Vec::new();
    for (row, w) in windows.iter().enumerate() {
        let n = w.ids.len();
        if n == 0 {
            continue;
        }
        let allowed: Vec<bool> = (0..n)
            .map(|t| w.sequence[t] == Some(1) || Some(w.ids[t]) == cls_id)
            .collect();
        let column = |c: usize| -> Vec<f32> {
            (0..n)
                .map(|t| {
                    if allowed[t] {
                        logits.at(row, t)[c]
                    } else {
                        MASKED
                    }
                })
                .collect()
        };
        let mut p_start = softmax_f32(&column(0));
        let mut p_end = softmax_f32(&column(1));
        if params.handle_impossible_answer {
            min_null = min_null.min((p_start[0] * p_end[0]) as f64);
        }
        p_start[0] = 0.0;
        p_end[0] = 0.0;

        let mut spans: Vec<(f32, usize, usize)> = Vec::with_capacity(n * params.max_answer_len);
        for (s, &ps) in p_start.iter().enumerate().take(n) {
            for (e, &pe) in p_end
                .iter()
                .enumerate()
                .take(n.min(s + params.max_answer_len))
                .skip(s)
            {
                spans.push((ps * pe, s, e));
            }
        }
        // Best first; equal scores by position (the pipeline leaves their order to
        // numpy's sort, so no golden depends on it).
        let order = |a: &(f32, usize, usize), b: &(f32, usize, usize)| {
            b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2)))
        };
        if spans.len() > pre_topk {
            spans.select_nth_unstable_by(pre_topk, order);
            spans.truncate(pre_topk);
        }
        spans.sort_unstable_by(order);
        for (score, s, e) in spans {
            // Dropped only after the top-k cut, as in decode_spans (which also lets
            // position 0 through).
            if !(allowed[s] || s == 0) || !(allowed[e] || e == 0) {
                continue;
            }
            let (start, end) = match (context_word(w, w.words[s]), context_word(w, w.words[e])) {
                (Some((start, _)), Some((_, end))) => (start, end),
                // A special token has no word: the pipeline falls back to offsets.
                _ => (w.offsets[s].0, w.offsets[e].1),
            };
            let text = chars.slice(context, start, end);
            let lower = text.to_lowercase();
            match keys.iter().position(|k| *k == lower) {
                Some(same) => found[same].score += score as f64,
                None => {
                    keys.push(lower);
                    found.push(Answer {
                        score: score as f64,
                        start,
                        end: end.max(start),
                        answer: text.to_string(),
                    });
                }
            }
        }
    }
    if params.handle_impossible_answer {
        found.push(Answer {
            score: min_null,
            start: 0,
            end: 0,
            answer: String::new(),
        });
    }
    // Stable: equal scores keep the order they were found in, the null answer last.
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    found.truncate(top_k);
    if found.len() == 1 {
        Answers::One(found.pop().expect("one answer"))
    } else {
        Answers::Many(found)
    }
}

/// Character span of a context word, from the tokens of this window only: a word
/// cut by the window's edge gives a cut answer, as in the pipeline.
fn context_word(w: &Window, word: Option<u32>) -> Option<(usize, usize)> {
    let word = word?;
    let mut tokens =
        (0..w.ids.len()).filter(|&t| w.sequence[t] == Some(1) && w.words[t] == Some(word));
    let first = tokens.next()?;
    let last = tokens.next_back().unwrap_or(first);
    Some((w.offsets[first].0, w.offsets[last].1))
}

/// Float32 softmax as numpy computes it (`exp(x - max) / sum`); the sum is taken in
/// f64, within an ulp of numpy's pairwise float32 sum.
fn softmax_f32(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = x.iter().map(|&v| (v - max).exp()).collect();
    let sum = exps.iter().map(|&v| v as f64).sum::<f64>() as f32;
    exps.into_iter().map(|v| v / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[CLS] q [SEP] c0 c1 c2 [SEP]`, context "Ana vive aquí" (words 0, 1, 2).
    fn window() -> Window {
        Window {
            ids: vec![2, 50, 3, 60, 61, 62, 3],
            type_ids: vec![0, 0, 0, 1, 1, 1, 1],
            special: vec![true, false, true, false, false, false, true],
            offsets: vec![(0, 0), (0, 5), (0, 0), (0, 3), (4, 8), (9, 13), (0, 0)],
            sequence: vec![None, Some(0), None, Some(1), Some(1), Some(1), None],
            words: vec![None, Some(0), None, Some(0), Some(1), Some(2), None],
        }
    }

    fn logits(start: &[f32], end: &[f32]) -> Logits {
        Logits {
            rows: 1,
            seq_len: start.len(),
            labels: 2,
            values: start.iter().zip(end).flat_map(|(&s, &e)| [s, e]).collect(),
        }
    }

    const CONTEXT: &str = "Ana vive aquí";

    #[test]
    fn best_span_is_widened_to_words_and_sliced_from_the_context() {
        // The question token (index 1) has the largest logits but is masked out.
        let l = logits(
            &[0.0, 50.0, 0.0, 1.0, 8.0, 0.0, 0.0],
            &[0.0, 50.0, 0.0, 0.0, 1.0, 9.0, 0.0],
        );
        let a = answers(CONTEXT, &[window()], &l, Some(2), &QaParams::default());
        let Answers::One(a) = a else { panic!("{a:?}") };
        assert_eq!((a.start, a.end, a.answer.as_str()), (4, 13, "vive aquí"));
        assert!(a.score > 0.9 && a.score < 1.0, "{}", a.score);
    }

    #[test]
    fn max_answer_len_bounds_the_span() {
        let l = logits(
            &[0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0],
            &[0.0, 0.0, 0.0, 0.0, 3.0, 9.0, 0.0],
        );
        // Unbounded, "Ana vive aquí" (3..5) would win; two tokens stop at "vive".
        assert_eq!(
            answers(CONTEXT, &[window()], &l, Some(2), &QaParams::default())
                .best()
                .unwrap()
                .answer,
            "Ana vive aquí"
        );
        let params = QaParams {
            max_answer_len: 2,
            ..QaParams::default()
        };
        let a = answers(CONTEXT, &[window()], &l, Some(2), &params);
        assert_eq!(a.best().unwrap().answer, "Ana vive");
    }

    #[test]
    fn null_answer_and_lists() {
        // [CLS] dominates: with handle_impossible_answer the empty answer wins.
        let l = logits(
            &[20.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            &[20.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        );
        let params = QaParams {
            top_k: 2,
            handle_impossible_answer: true,
            ..QaParams::default()
        };
        let Answers::Many(list) = answers(CONTEXT, &[window()], &l, Some(2), &params) else {
            panic!("top_k 2 gives a list")
        };
        assert_eq!(list.len(), 2);
        assert_eq!(
            (list[0].answer.as_str(), list[0].start, list[0].end),
            ("", 0, 0)
        );
        assert!(list[0].score > list[1].score);
    }

    #[test]
    fn equal_answers_from_two_windows_add_up() {
        let l = Logits {
            rows: 2,
            ..logits(
                &[0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0],
                &[0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0],
            )
        };
        let mut values = l.values.clone();
        values.extend(&l.values);
        let l = Logits { values, ..l };
        let one = answers(CONTEXT, &[window()], &l, Some(2), &QaParams::default());
        let two = answers(
            CONTEXT,
            &[window(), window()],
            &l,
            Some(2),
            &QaParams::default(),
        );
        let (one, two) = (one.best().unwrap(), two.best().unwrap());
        assert_eq!(one.answer, "Ana");
        assert!((two.score - 2.0 * one.score).abs() < 1e-9);
    }
}
