//! Text and text-pair classification with the `text-classification` pipeline's
//! semantics: softmax (single label) or sigmoid (multi-label / one label), then
//! all labels sorted by score, or the top `k`.
//!
//! The pipeline has no windows (it fails on long text); here the windows of a long
//! text are classified separately and their scores averaged, which keeps every
//! part of the text in the decision.

use serde::Serialize;

use super::token::softmax;
use super::{Fields, TaskOptions};
use crate::bundle::ScoreFunction;
use crate::engine::Logits;
use crate::error::Result;

/// `{"text", "text_pair"}`; a payload may be the text itself.
pub const FIELDS: Fields = Fields {
    text: "text",
    pair: "text_pair",
    pair_required: false,
    plain_text: true,
};

/// A text (and optional pair) to classify.
pub fn check(text: &str) -> Result<()> {
    super::non_empty(FIELDS.text, text)
}

/// Labels returned: `top_k` (0 = all), default 1 as in the pipeline.
pub fn top_k(options: &TaskOptions) -> Option<usize> {
    match options.top_k {
        Some(0) => None,
        Some(k) => Some(k),
        None => Some(1),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

pub fn apply(function: ScoreFunction, logits: &[f32]) -> Vec<f32> {
    match function {
        ScoreFunction::Softmax => softmax(logits),
        ScoreFunction::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
        ScoreFunction::None => logits.to_vec(),
    }
}

/// Scores per label (id order), averaged over the windows (rows) of one text.
pub fn scores(logits: &Logits, function: ScoreFunction) -> Vec<f32> {
    let mut sum = vec![0f32; logits.labels];
    for row in 0..logits.rows {
        for (s, v) in sum.iter_mut().zip(apply(function, logits.at(row, 0))) {
            *s += v;
        }
    }
    let rows = logits.rows.max(1) as f32;
    sum.into_iter().map(|s| s / rows).collect()
}

/// Labels sorted by descending score (stable: ties keep id order), cut to `top_k`.
pub fn ranked(labels: &[String], scores: &[f32], top_k: Option<usize>) -> Vec<LabelScore> {
    let mut out: Vec<LabelScore> = labels
        .iter()
        .zip(scores)
        .map(|(label, &score)| LabelScore {
            label: label.clone(),
            score,
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    if let Some(k) = top_k {
        out.truncate(k);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranked_sorts_and_cuts() {
        let labels = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let r = ranked(&labels, &[0.2, 0.5, 0.3], Some(2));
        assert_eq!(
            r.iter().map(|l| l.label.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
    }

    #[test]
    fn window_scores_are_averaged() {
        let logits = Logits {
            rows: 2,
            seq_len: 0,
            labels: 2,
            values: vec![10.0, -10.0, -10.0, 10.0],
        };
        let s = scores(&logits, ScoreFunction::Softmax);
        assert!((s[0] - 0.5).abs() < 1e-4 && (s[1] - 0.5).abs() < 1e-4);
    }
}
