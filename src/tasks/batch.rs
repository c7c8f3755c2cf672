//! The one inference path: the windows of one or several messages for one model
//! run together, shortest with shortest and within `TOKENS_PER_RUN`, so a burst of
//! short messages costs fewer, fuller engine runs (one 8×64 run is cheaper than
//! eight 1×64 runs) without padding short messages to long ones or batching long
//! windows, where it does not pay. Each message still gets its own result or its
//! own error. [`Annotator::annotate`] and [`Annotator::infer`] are this path with
//! one item, so a message gets the same answer alone as in a micro-batch.

use std::time::Instant;

use super::windows::{Window, Windower};
use super::{runs, Annotation, Annotator, Timings};
use crate::engine::{Batch, EngineState, Logits};
use crate::error::{Error, Result};

/// One message of a micro-batch, with the annotator of its route. Every item must
/// use the same bundle (the same engine).
pub struct Item<'a> {
    pub annotator: &'a Annotator,
    pub text: &'a str,
    pub pair: Option<&'a str>,
}

/// One item's windows and their logits (padded to its longest window), with the
/// time its tokenization and its share of the engine runs took.
pub struct Inferred {
    pub windows: Vec<Window>,
    pub logits: Logits,
    pub tokenize_ms: f64,
    pub inference_ms: f64,
}

fn ms(a: Instant, b: Instant) -> f64 {
    (b - a).as_secs_f64() * 1e3
}

/// Annotates `items` together; the i-th outcome belongs to the i-th item. A bad
/// item fails alone; an engine failure fails the items whose windows were in
/// that run.
pub fn annotate_batch(state: &mut EngineState, items: &[Item]) -> Vec<Result<Annotation>> {
    infer_batch(state, items)
        .into_iter()
        .zip(items)
        .map(|(inferred, item)| {
            let inferred = inferred?;
            let t = Instant::now();
            let result = item.annotator.postprocess(
                item.text,
                item.pair,
                &inferred.windows,
                &inferred.logits,
            );
            let redaction = item.annotator.redact(item.text, &result);
            Ok(Annotation {
                result,
                redaction,
                windows: inferred.windows.len(),
                tokens: inferred.windows.iter().map(|w| w.ids.len()).sum(),
                timings: Timings {
                    tokenize_ms: inferred.tokenize_ms,
                    inference_ms: inferred.inference_ms,
                    postprocess_ms: ms(t, Instant::now()),
                },
            })
        })
        .collect()
}

/// Windows and logits of every item: checks and tokenization, then the engine runs.
pub fn infer_batch(state: &mut EngineState, items: &[Item]) -> Vec<Result<Inferred>> {
    let Some(first) = items.first() else {
        return Vec::new();
    };
    let mut tokenize_ms = Vec::with_capacity(items.len());
    let prepared: Vec<Result<Vec<Window>>> = items
        .iter()
        .map(|item| {
            assert!(
                std::sync::Arc::ptr_eq(item.annotator.bundle(), first.annotator.bundle()),
                "a micro-batch runs one model"
            );
            let t = Instant::now();
            let windows = item.annotator.prepare(item.text, item.pair);
            tokenize_ms.push(ms(t, Instant::now()));
            windows
        })
        .collect();

    // Logit rows per window, and engine time and failures per item.
    let mut rows: Vec<Vec<Option<Vec<f32>>>> = prepared
        .iter()
        .map(|p| p.as_ref().map_or(Vec::new(), |w| vec![None; w.len()]))
        .collect();
    let mut inference_ms = vec![0.0; items.len()];
    let mut failed: Vec<Option<String>> = vec![None; items.len()];
    let mut labels = 0;
    let mut per_token = true;
    for (batch, chunk) in runs_of(first.annotator.windower(), &prepared) {
        let t = Instant::now();
        let result = state.run(&batch);
        let took = ms(t, Instant::now());
        let mut touched: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
        touched.sort_unstable();
        touched.dedup();
        for &i in &touched {
            inference_ms[i] += took;
        }
        match result {
            Ok(logits) => {
                labels = logits.labels;
                per_token = logits.seq_len > 0;
                let width = logits.labels * logits.seq_len.max(1);
                for (row, &(i, w)) in chunk.iter().enumerate() {
                    rows[i][w] = Some(logits.values[row * width..(row + 1) * width].to_vec());
                }
            }
            Err(e) => {
                for &i in &touched {
                    failed[i] = Some(e.to_string());
                }
            }
        }
    }

    prepared
        .into_iter()
        .enumerate()
        .map(|(i, windows)| {
            let windows = windows?;
            if windows.is_empty() {
                return Err(Error::Inference("no windows".into()));
            }
            if let Some(e) = &failed[i] {
                return Err(Error::Inference(e.clone()));
            }
            let logits = item_logits(&windows, &mut rows[i], labels, per_token);
            Ok(Inferred {
                windows,
                logits,
                tokenize_ms: tokenize_ms[i],
                inference_ms: inference_ms[i],
            })
        })
        .collect()
}

/// The engine runs for the windows of the prepared items: every window, shortest
/// first, in runs within `WINDOWS_PER_RUN` and `TOKENS_PER_RUN`, each with the
/// (item, window) of its rows.
pub(crate) fn runs_of(
    windower: &Windower,
    prepared: &[Result<Vec<Window>>],
) -> Vec<(Batch, Vec<(usize, usize)>)> {
    let mut order: Vec<(usize, usize)> = prepared
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.as_ref().ok().map(|w| (i, w.len())))
        .flat_map(|(i, n)| (0..n).map(move |w| (i, w)))
        .collect();
    let window = |&(i, w): &(usize, usize)| &prepared[i].as_ref().expect("only prepared items")[w];
    order.sort_by_key(|iw| window(iw).ids.len());
    let sizes = runs(order.iter().map(|iw| window(iw).ids.len()));
    let mut rest = order.as_slice();
    sizes
        .into_iter()
        .map(|n| {
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            (
                windower.batch_of(chunk.iter().map(window), 0),
                chunk.to_vec(),
            )
        })
        .collect()
}

/// One message's logits, its windows' rows padded to its longest window (rows came
/// from runs padded to other lengths).
fn item_logits(
    windows: &[Window],
    rows: &mut [Option<Vec<f32>>],
    labels: usize,
    per_token: bool,
) -> Logits {
    let seq_len = if per_token {
        windows.iter().map(|w| w.ids.len()).max().unwrap_or(0)
    } else {
        0
    };
    let width = labels * seq_len.max(1);
    let mut values = Vec::with_capacity(windows.len() * width);
    for row in rows.iter_mut() {
        let row = row.take().expect("every window ran");
        let keep = width.min(row.len());
        values.extend_from_slice(&row[..keep]);
        values.resize(values.len() + width - keep, 0.0);
    }
    Logits {
        rows: windows.len(),
        seq_len,
        labels,
        values,
    }
}
