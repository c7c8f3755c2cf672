//! `anotador eval`: scores a bundle on labelled data, through the same path as
//! `annotate` and the daemon, so a converted model can be compared with its
//! published figures on the device itself.
//!
//! - CoNLL (word … tag, blank line between sentences): entity F1, conlleval rules.
//! - CoNLL-U: UPOS accuracy.
//! - TSV `text[<TAB>text_pair]<TAB>label`: accuracy and macro-F1 (multi-label
//!   models: comma-separated labels, exact match and micro/macro F1).
//! - SQuAD v1.1 JSON (XQuAD, MLQA, TAR): exact match and F1 with the official
//!   script's normalisation, best over the gold answers (`squad` module).
//!
//! Word-level tasks join a sentence's words with single spaces and label each
//! word by its first sub-token, the usual protocol for these benchmarks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::bundle::{ScoreFunction, Task};
use crate::error::{Error, Result};
use crate::tasks::{text, token::argmax, Annotator};

pub mod squad;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataFormat {
    Conll,
    Conllu,
    Tsv,
    Squad,
}

impl DataFormat {
    pub fn guess(path: &Path) -> DataFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("conllu") => DataFormat::Conllu,
            Some("tsv") => DataFormat::Tsv,
            Some("json") => DataFormat::Squad,
            _ => DataFormat::Conll,
        }
    }
}

/// A sentence of words with gold tags.
#[derive(Debug, Clone)]
pub struct TaggedSentence {
    pub words: Vec<String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LabelledText {
    pub text: String,
    pub pair: Option<String>,
    pub labels: Vec<String>,
}

pub fn read_conll(path: &Path, conllu: bool) -> Result<Vec<TaggedSentence>> {
    let content = std::fs::read_to_string(path)?;
    let mut sentences = Vec::new();
    let mut current = TaggedSentence {
        words: vec![],
        tags: vec![],
    };
    for (n, line) in content.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !current.words.is_empty() {
                sentences.push(std::mem::replace(
                    &mut current,
                    TaggedSentence {
                        words: vec![],
                        tags: vec![],
                    },
                ));
            }
            continue;
        }
        if conllu {
            if line.starts_with('#') {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() < 4 {
                return Err(bad_line(
                    path,
                    n,
                    "expected 10 tab-separated CoNLL-U columns",
                ));
            }
            // Multiword tokens ("1-2") and empty nodes ("1.1") carry no UPOS of their own.
            if cols[0].contains('-') || cols[0].contains('.') {
                continue;
            }
            current.words.push(cols[1].to_string());
            current.tags.push(cols[3].to_string());
        } else {
            if line.starts_with("-DOCSTART-") {
                continue;
            }
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 2 {
                return Err(bad_line(path, n, "expected `word … tag`"));
            }
            current.words.push(cols[0].to_string());
            current.tags.push(cols[cols.len() - 1].to_string());
        }
    }
    if !current.words.is_empty() {
        sentences.push(current);
    }
    Ok(sentences)
}

pub fn read_tsv(path: &Path) -> Result<Vec<LabelledText>> {
    let content = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for (n, line) in content.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let (text, pair, label) = match cols.as_slice() {
            [t, l] => (t, None, l),
            [t, p, l] => (t, Some(p.to_string()), l),
            _ => return Err(bad_line(path, n, "expected text<TAB>[text_pair<TAB>]label")),
        };
        out.push(LabelledText {
            text: text.to_string(),
            pair,
            labels: label
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        });
    }
    Ok(out)
}

fn bad_line(path: &Path, n: usize, problem: &str) -> Error {
    Error::EvalData {
        path: PathBuf::from(path),
        line: n + 1,
        problem: problem.into(),
    }
}

/// Runs `f` over `items` on `threads` workers, each with its own engine state,
/// printing progress on stderr; results come back in input order.
fn par_map<T: Sync, R: Send>(
    annotator: &Annotator,
    items: &[T],
    threads: usize,
    f: impl Fn(&mut crate::engine::EngineState, &T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let done = AtomicUsize::new(0);
    let threads = threads.clamp(1, items.len().max(1));
    let started = Instant::now();
    let results: Vec<Result<Vec<(usize, R)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (f, done) = (&f, &done);
                scope.spawn(move || -> Result<Vec<(usize, R)>> {
                    let mut state = annotator.bundle().engine.state()?;
                    let mut out = Vec::new();
                    for i in (t..items.len()).step_by(threads) {
                        out.push((i, f(&mut state, &items[i])?));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut last = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            if last.elapsed() >= Duration::from_secs(2) {
                last = Instant::now();
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "eval: {n}/{} ({:.0} s)",
                    items.len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("eval worker panicked"))
            .collect()
    });
    let mut indexed = Vec::with_capacity(items.len());
    for r in results {
        indexed.extend(r?);
    }
    indexed.sort_by_key(|(i, _)| *i);
    Ok(indexed.into_iter().map(|(_, r)| r).collect())
}

/// Predicted tag per word: the first sub-token's label.
pub fn predict_words(
    annotator: &Annotator,
    state: &mut crate::engine::EngineState,
    words: &[String],
) -> Result<Vec<String>> {
    let labels = &annotator.bundle().config.labels;
    let text = words.join(" ");
    // Character span of each word in the joined text.
    let mut spans = Vec::with_capacity(words.len());
    let mut pos = 0;
    for w in words {
        let len = w.chars().count();
        spans.push((pos, pos + len));
        pos += len + 1;
    }
    let (windows, logits) = annotator.infer(state, &text, None)?;
    let mut predicted: Vec<Option<usize>> = vec![None; words.len()];
    for (row, window) in windows.iter().enumerate() {
        for (idx, &(s, e)) in window.offsets.iter().enumerate() {
            if window.special[idx] || e <= s {
                continue;
            }
            // The first word that ends after the token starts (SentencePiece
            // offsets can include the space before a word).
            let w = spans.partition_point(|&(_, end)| end <= s);
            if w < spans.len() && spans[w].0 < e && predicted[w].is_none() {
                predicted[w] = Some(argmax(logits.at(row, idx)));
            }
        }
    }
    let fallback = annotator.bundle().config.label_index("O").unwrap_or(0);
    Ok(predicted
        .into_iter()
        .map(|p| labels[p.unwrap_or(fallback)].clone())
        .collect())
}

/// Entity chunks `(type, start, end)` of a BIO sequence, with conlleval's rules:
/// an `I-` that does not continue a chunk of its type starts a new one.
pub fn chunks(tags: &[String]) -> BTreeSet<(String, usize, usize)> {
    let mut out = BTreeSet::new();
    let mut open: Option<(String, usize)> = None;
    for (i, tag) in tags.iter().enumerate() {
        let (prefix, kind) = match tag.split_once('-') {
            Some((p, k)) if p == "B" || p == "I" => (p, k),
            _ => ("O", ""),
        };
        let continues = prefix == "I" && open.as_ref().is_some_and(|(k, _)| k == kind);
        if !continues {
            if let Some((k, s)) = open.take() {
                out.insert((k, s, i));
            }
            if prefix != "O" {
                open = Some((kind.to_string(), i));
            }
        }
    }
    if let Some((k, s)) = open {
        out.insert((k, s, tags.len()));
    }
    out
}

#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

fn prf(tp: usize, predicted: usize, gold: usize) -> Prf {
    let precision = if predicted == 0 {
        0.0
    } else {
        tp as f64 / predicted as f64
    };
    let recall = if gold == 0 {
        0.0
    } else {
        tp as f64 / gold as f64
    };
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    Prf {
        precision: 100.0 * precision,
        recall: 100.0 * recall,
        f1: 100.0 * f1,
        support: gold,
    }
}

/// Entity-level precision/recall/F1 over whole sentences.
pub fn entity_f1(gold: &[Vec<String>], predicted: &[Vec<String>]) -> (Prf, BTreeMap<String, Prf>) {
    let mut counts: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let (mut tp, mut np, mut ng) = (0, 0, 0);
    for (g, p) in gold.iter().zip(predicted) {
        let (gc, pc) = (chunks(g), chunks(p));
        for c in &gc {
            counts.entry(c.0.clone()).or_default().2 += 1;
        }
        for c in &pc {
            let e = counts.entry(c.0.clone()).or_default();
            e.1 += 1;
            if gc.contains(c) {
                e.0 += 1;
                tp += 1;
            }
        }
        np += pc.len();
        ng += gc.len();
    }
    let per_type = counts
        .into_iter()
        .map(|(k, (t, p, g))| (k, prf(t, p, g)))
        .collect();
    (prf(tp, np, ng), per_type)
}

pub fn run(
    annotator: &Annotator,
    path: &Path,
    format: DataFormat,
    threads: usize,
    limit: Option<usize>,
) -> Result<Value> {
    let started = Instant::now();
    let task = annotator.task();
    let mut report = match format {
        DataFormat::Conll | DataFormat::Conllu => {
            if task != Task::TokenClassification {
                return Err(Error::InvalidRequest(format!(
                    "{format:?} data needs a token-classification model"
                )));
            }
            let mut sentences = read_conll(path, format == DataFormat::Conllu)?;
            sentences.truncate(limit.unwrap_or(usize::MAX));
            let predicted = par_map(annotator, &sentences, threads, |state, s| {
                predict_words(annotator, state, &s.words)
            })?;
            let gold: Vec<Vec<String>> = sentences.iter().map(|s| s.tags.clone()).collect();
            let words: usize = gold.iter().map(Vec::len).sum();
            if format == DataFormat::Conll {
                let (overall, per_type) = entity_f1(&gold, &predicted);
                json!({"format": "conll", "metric": "entity_f1 (conlleval)", "sentences": sentences.len(), "words": words,
                       "precision": overall.precision, "recall": overall.recall, "f1": overall.f1,
                       "entities": overall.support, "per_type": per_type})
            } else {
                let correct: usize = gold
                    .iter()
                    .zip(&predicted)
                    .map(|(g, p)| g.iter().zip(p).filter(|(a, b)| a == b).count())
                    .sum();
                json!({"format": "conllu", "metric": "upos_accuracy", "sentences": sentences.len(), "words": words,
                       "accuracy": 100.0 * correct as f64 / words.max(1) as f64})
            }
        }
        DataFormat::Tsv => {
            if task != Task::TextClassification {
                return Err(Error::InvalidRequest(
                    "TSV data needs a text-classification model".into(),
                ));
            }
            let mut items = read_tsv(path)?;
            items.truncate(limit.unwrap_or(usize::MAX));
            classification_report(annotator, &items, threads)?
        }
        DataFormat::Squad => {
            if task != Task::QuestionAnswering {
                return Err(Error::InvalidRequest(
                    "SQuAD data needs a question-answering model".into(),
                ));
            }
            let mut items = squad::read(path)?;
            items.truncate(limit.unwrap_or(usize::MAX));
            let predicted = par_map(annotator, &items, threads, |state, q| {
                Ok(squad::predict(annotator, state, q))
            })?;
            squad::report(&items, &predicted)?
        }
    };
    report["model"] = json!(annotator.bundle().name);
    report["data"] = json!(path.display().to_string());
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    report["threads"] = json!(threads);
    Ok(report)
}

fn classification_report(
    annotator: &Annotator,
    items: &[LabelledText],
    threads: usize,
) -> Result<Value> {
    let config = &annotator.bundle().config;
    let labels = &config.labels;
    let function = config.default_score_function();
    let multi = function == ScoreFunction::Sigmoid;
    // Gold labels by name, or by index when the data uses numbers (PAWS-X's 0/1).
    let resolve = |l: &str| -> Option<usize> {
        config
            .label_index(l)
            .or_else(|| l.parse::<usize>().ok().filter(|&i| i < labels.len()))
    };
    for (n, item) in items.iter().enumerate() {
        if let Some(l) = item.labels.iter().find(|l| resolve(l).is_none()) {
            return Err(Error::InvalidRequest(format!(
                "item {}: label `{l}` is not one of the model's {labels:?}",
                n + 1
            )));
        }
    }
    let predicted = par_map(annotator, items, threads, |state, item| {
        let (_, logits) = annotator.infer(state, &item.text, item.pair.as_deref())?;
        let scores = text::scores(&logits, function);
        Ok(if multi {
            (0..labels.len())
                .filter(|&i| scores[i] >= 0.5)
                .collect::<BTreeSet<usize>>()
        } else {
            BTreeSet::from([argmax(&scores)])
        })
    })?;
    let gold: Vec<BTreeSet<usize>> = items
        .iter()
        .map(|i| i.labels.iter().filter_map(|l| resolve(l)).collect())
        .collect();
    let exact = gold.iter().zip(&predicted).filter(|(g, p)| g == p).count();
    let mut per_label = BTreeMap::new();
    let (mut tp_all, mut np_all, mut ng_all) = (0, 0, 0);
    let mut macro_f1 = 0.0;
    let mut counted = 0;
    for (i, name) in labels.iter().enumerate() {
        let tp = gold
            .iter()
            .zip(&predicted)
            .filter(|(g, p)| g.contains(&i) && p.contains(&i))
            .count();
        let np = predicted.iter().filter(|p| p.contains(&i)).count();
        let ng = gold.iter().filter(|g| g.contains(&i)).count();
        let m = prf(tp, np, ng);
        if ng + np > 0 {
            macro_f1 += m.f1;
            counted += 1;
        }
        per_label.insert(name.clone(), m);
        tp_all += tp;
        np_all += np;
        ng_all += ng;
    }
    let majority = (0..labels.len())
        .map(|i| gold.iter().filter(|g| **g == BTreeSet::from([i])).count())
        .max()
        .unwrap_or(0);
    Ok(json!({
        "format": "tsv",
        "metric": if multi { "exact_match / micro_f1 / macro_f1 (multi-label, sigmoid ≥ 0.5)" } else { "accuracy / macro_f1" },
        "items": items.len(),
        "accuracy": 100.0 * exact as f64 / items.len().max(1) as f64,
        "micro_f1": prf(tp_all, np_all, ng_all).f1,
        "macro_f1": macro_f1 / counted.max(1) as f64,
        "majority_baseline_accuracy": 100.0 * majority as f64 / items.len().max(1) as f64,
        "per_label": per_label,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn conlleval_chunking() {
        let c = chunks(&tags("B-PER I-PER O I-LOC I-LOC B-LOC B-ORG I-PER"));
        let expected: BTreeSet<(String, usize, usize)> = [
            ("PER".to_string(), 0, 2),
            ("LOC".to_string(), 3, 5),
            ("LOC".to_string(), 5, 6),
            ("ORG".to_string(), 6, 7),
            ("PER".to_string(), 7, 8),
        ]
        .into_iter()
        .collect();
        assert_eq!(c, expected);
    }

    #[test]
    fn entity_f1_counts_exact_matches_only() {
        let gold = vec![tags("B-PER I-PER O B-LOC")];
        let pred = vec![tags("B-PER O O B-LOC")];
        let (overall, per_type) = entity_f1(&gold, &pred);
        assert!((overall.precision - 50.0).abs() < 1e-9);
        assert!((overall.recall - 50.0).abs() < 1e-9);
        assert!((per_type["LOC"].f1 - 100.0).abs() < 1e-9);
        assert!((per_type["PER"].f1 - 0.0).abs() < 1e-9);
    }
}
