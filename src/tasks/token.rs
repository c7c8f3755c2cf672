//! Token classification (NER, POS) with the Hugging Face pipeline's semantics:
//! aggregation `none`, `simple`, `first`, `average` and `max`, `O` filtered out,
//! overlapping windows merged keeping the longest (then best-scored) entity.
//!
//! One deliberate difference: `word` is always the exact slice of the input at
//! `start..end` (the pipeline returns the detokenized pieces, which for uncased
//! models is lowercased and loses accents). Offsets are identical.

use serde::Serialize;

use super::windows::{CharIndex, Window};
use super::Fields;
use crate::bundle::Aggregation;
use crate::engine::Logits;
use crate::error::{Error, Result};

/// `{"text"}`; a payload may be the text itself.
pub const FIELDS: Fields = Fields {
    text: "text",
    pair: "text_pair",
    pair_required: false,
    plain_text: true,
};

/// One text to tag; a pair has no meaning here.
pub fn check(text: &str, pair: Option<&str>) -> Result<()> {
    super::non_empty(FIELDS.text, text)?;
    match pair {
        Some(_) => Err(Error::InvalidRequest(
            "text_pair is only for text classification".into(),
        )),
        None => Ok(()),
    }
}

/// How to tell word continuations apart, mirroring the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubwordRule {
    /// WordPiece / BPE with a continuing-subword prefix ("##"): a token is a
    /// continuation when its text differs in length from the input slice.
    Prefix,
    /// SentencePiece and other word-unaware models: a continuation is a token
    /// that does not start the text and has no space right before or at its start.
    NoSpaceBefore,
}

impl SubwordRule {
    pub fn for_tokenizer(tokenizer: &tokenizers::Tokenizer) -> SubwordRule {
        use tokenizers::models::ModelWrapper;
        let prefix = match tokenizer.get_model() {
            ModelWrapper::WordPiece(wp) => Some(wp.continuing_subword_prefix.clone()),
            ModelWrapper::BPE(bpe) => bpe.continuing_subword_prefix.clone(),
            _ => None,
        };
        if prefix.is_some_and(|p| !p.is_empty()) {
            SubwordRule::Prefix
        } else {
            SubwordRule::NoSpaceBefore
        }
    }
}

/// One entity (grouped) or one token (`aggregation = none`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Entity {
    Group {
        entity_group: String,
        score: f32,
        word: String,
        start: usize,
        end: usize,
    },
    Token {
        entity: String,
        score: f32,
        index: usize,
        word: String,
        start: usize,
        end: usize,
    },
}

impl Entity {
    pub fn span(&self) -> (usize, usize) {
        match self {
            Entity::Group { start, end, .. } | Entity::Token { start, end, .. } => (*start, *end),
        }
    }

    pub fn score(&self) -> f32 {
        match self {
            Entity::Group { score, .. } | Entity::Token { score, .. } => *score,
        }
    }

    pub fn label(&self) -> &str {
        match self {
            Entity::Group { entity_group, .. } => entity_group,
            Entity::Token { entity, .. } => entity,
        }
    }
}

/// A scored token or word, before grouping.
struct Scored {
    label: usize,
    score: f32,
    index: usize,
    start: usize,
    end: usize,
}

struct PreEntity {
    scores: Vec<f32>,
    index: usize,
    start: usize,
    end: usize,
    is_subword: bool,
}

pub struct TokenClassifier<'a> {
    pub labels: &'a [String],
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub rule: SubwordRule,
    pub unk_id: Option<u32>,
}

/// Softmax in f32, as the pipeline computes it (numpy on float32 logits).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// First index of the maximum, as numpy's argmax.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

impl TokenClassifier<'_> {
    /// Entities for one text, from the logits of its windows (row `i` = window `i`).
    pub fn entities(
        &self,
        text: &str,
        windows: &[Window],
        logits: &Logits,
        strategy: Aggregation,
    ) -> Vec<Entity> {
        let chars = CharIndex::new(text);
        let mut all = Vec::new();
        for (row, window) in windows.iter().enumerate() {
            let pre = self.pre_entities(text, &chars, window, logits, row);
            let scored = match strategy {
                Aggregation::None | Aggregation::Simple => pre
                    .iter()
                    .map(|p| {
                        let label = argmax(&p.scores);
                        Scored {
                            label,
                            score: p.scores[label],
                            index: p.index,
                            start: p.start,
                            end: p.end,
                        }
                    })
                    .collect(),
                _ => aggregate_words(&pre, strategy),
            };
            let entities = if strategy == Aggregation::None {
                scored
                    .into_iter()
                    .map(|s| Entity::Token {
                        entity: self.labels[s.label].clone(),
                        score: s.score,
                        index: s.index,
                        word: chars.slice(text, s.start, s.end).to_string(),
                        start: s.start,
                        end: s.end,
                    })
                    .collect()
            } else {
                self.group(&scored, text, &chars)
            };
            all.extend(entities.into_iter().filter(|e| e.label() != "O"));
        }
        if windows.len() > 1 {
            merge_overlapping(all)
        } else {
            all
        }
    }

    fn pre_entities(
        &self,
        text: &str,
        chars: &CharIndex,
        window: &Window,
        logits: &Logits,
        row: usize,
    ) -> Vec<PreEntity> {
        let mut out = Vec::with_capacity(window.ids.len());
        for (idx, &id) in window.ids.iter().enumerate() {
            if window.special[idx] {
                continue;
            }
            let (start, end) = window.offsets[idx];
            let is_unk = Some(id) == self.unk_id;
            let is_subword = !is_unk
                && match self.rule {
                    SubwordRule::Prefix => {
                        let token_len = self
                            .tokenizer
                            .id_to_token(id)
                            .map_or(0, |t| t.chars().count());
                        token_len != end.saturating_sub(start)
                    }
                    SubwordRule::NoSpaceBefore => {
                        start > 0 && !chars.slice(text, start - 1, start + 1).contains(' ')
                    }
                };
            out.push(PreEntity {
                scores: softmax(logits.at(row, idx)),
                index: idx,
                start,
                end,
                is_subword,
            });
        }
        out
    }

    /// Groups adjacent tokens/words of the same type; `B-` always starts a group.
    fn group(&self, scored: &[Scored], text: &str, chars: &CharIndex) -> Vec<Entity> {
        let mut groups = Vec::new();
        let mut current: Vec<&Scored> = Vec::new();
        for s in scored {
            if let Some(last) = current.last() {
                let (bi, tag) = bio(&self.labels[s.label]);
                let (_, last_tag) = bio(&self.labels[last.label]);
                if !(tag == last_tag && bi != 'B') {
                    groups.push(self.close_group(&current, text, chars));
                    current.clear();
                }
            }
            current.push(s);
        }
        if !current.is_empty() {
            groups.push(self.close_group(&current, text, chars));
        }
        groups
    }

    fn close_group(&self, members: &[&Scored], text: &str, chars: &CharIndex) -> Entity {
        let first = &self.labels[members[0].label];
        let entity_group = first
            .split_once('-')
            .map_or(first.as_str(), |(_, t)| t)
            .to_string();
        let score = mean(members.iter().map(|m| m.score));
        let (start, end) = (members[0].start, members[members.len() - 1].end);
        Entity::Group {
            entity_group,
            score,
            word: chars.slice(text, start, end).to_string(),
            start,
            end,
        }
    }
}

/// `B-PER` → ('B', "PER"); anything without a B-/I- prefix counts as `I`.
pub(crate) fn bio(label: &str) -> (char, &str) {
    if let Some(tag) = label.strip_prefix("B-") {
        ('B', tag)
    } else if let Some(tag) = label.strip_prefix("I-") {
        ('I', tag)
    } else {
        ('I', label)
    }
}

/// Mean ignoring NaN, accumulated in f64 as numpy's nanmean does for the group score.
fn mean(values: impl Iterator<Item = f32>) -> f32 {
    let (sum, n) = values
        .filter(|v| !v.is_nan())
        .fold((0f64, 0usize), |(s, n), v| (s + v as f64, n + 1));
    if n == 0 {
        f32::NAN
    } else {
        (sum / n as f64) as f32
    }
}

/// Forces one label per word (`first`, `average`, `max`).
fn aggregate_words(pre: &[PreEntity], strategy: Aggregation) -> Vec<Scored> {
    let mut words = Vec::new();
    let mut start = 0;
    for i in 1..=pre.len() {
        if i == pre.len() || !pre[i].is_subword {
            if i > start {
                words.push(aggregate_word(&pre[start..i], strategy));
            }
            start = i;
        }
    }
    words
}

fn aggregate_word(tokens: &[PreEntity], strategy: Aggregation) -> Scored {
    let scores: Vec<f32> = match strategy {
        Aggregation::Max => {
            let mut best = &tokens[0];
            let mut best_max = best
                .scores
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            for t in &tokens[1..] {
                let m = t.scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if m > best_max {
                    best = t;
                    best_max = m;
                }
            }
            best.scores.clone()
        }
        Aggregation::Average => (0..tokens[0].scores.len())
            .map(|j| mean(tokens.iter().map(|t| t.scores[j])))
            .collect(),
        _ => tokens[0].scores.clone(),
    };
    let label = argmax(&scores);
    Scored {
        label,
        score: scores[label],
        index: tokens[0].index,
        start: tokens[0].start,
        end: tokens[tokens.len() - 1].end,
    }
}

/// Windows overlap, so an entity can be found twice: sorted by start, an entity
/// that starts inside the previous one replaces it only if longer (or as long and
/// better scored). The pipeline's `aggregate_overlapping_entities`.
pub fn merge_overlapping(mut entities: Vec<Entity>) -> Vec<Entity> {
    if entities.is_empty() {
        return entities;
    }
    entities.sort_by_key(|e| e.span().0);
    let mut out = Vec::with_capacity(entities.len());
    let mut iter = entities.into_iter();
    let mut previous = iter.next().unwrap();
    for entity in iter {
        let (ps, pe) = previous.span();
        let (s, e) = entity.span();
        if ps <= s && s < pe {
            let (len, plen) = (e - s, pe - ps);
            if len > plen || (len == plen && entity.score() > previous.score()) {
                previous = entity;
            }
        } else {
            out.push(std::mem::replace(&mut previous, entity));
        }
    }
    out.push(previous);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(label: &str, start: usize, end: usize, score: f32) -> Entity {
        Entity::Group {
            entity_group: label.into(),
            score,
            word: String::new(),
            start,
            end,
        }
    }

    #[test]
    fn overlapping_windows_keep_the_longer_then_better_entity() {
        let merged = merge_overlapping(vec![
            group("LOC", 10, 16, 0.9),
            group("PER", 0, 5, 0.8),
            group("LOC", 10, 22, 0.7),
            group("PER", 0, 5, 0.95),
            group("ORG", 30, 33, 0.5),
        ]);
        assert_eq!(
            merged,
            vec![
                group("PER", 0, 5, 0.95),
                group("LOC", 10, 22, 0.7),
                group("ORG", 30, 33, 0.5)
            ]
        );
    }

    #[test]
    fn bio_prefixes() {
        assert_eq!(bio("B-PER"), ('B', "PER"));
        assert_eq!(bio("I-LOC"), ('I', "LOC"));
        assert_eq!(bio("NOUN"), ('I', "NOUN"));
    }

    #[test]
    fn softmax_and_argmax_match_numpy_conventions() {
        let p = softmax(&[1.0, 3.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(argmax(&p), 1, "first maximum wins, as numpy");
    }
}
