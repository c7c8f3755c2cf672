//! Micro-batching: the windows of several queued messages for one model run
//! together, shortest with shortest and within `TOKENS_PER_RUN`, so a burst of
//! short messages costs fewer, fuller engine runs (one 8×64 run is cheaper than
//! eight 1×64 runs) without padding short messages to long ones or batching long
//! windows, where it does not pay. Each message still gets its own result or its own error, the same
//! as [`Annotator::annotate`] gives it.

use std::time::Instant;

use super::windows::Window;
use super::{runs, Annotation, Annotator, Timings};
use crate::engine::{EngineState, Logits};
use crate::error::{Error, Result};

/// One message of a micro-batch, with the annotator of its route. Every item must
/// use the same bundle (the same engine).
pub struct Item<'a> {
    pub annotator: &'a Annotator,
    pub text: &'a str,
    pub pair: Option<&'a str>,
}

/// Annotates `items` together; the i-th outcome belongs to the i-th item. A bad
/// item fails alone; an engine failure fails the items whose windows were in
/// that run.
pub fn annotate_batch(state: &mut EngineState, items: &[Item]) -> Vec<Result<Annotation>> {
    let Some(first) = items.first() else {
        return Vec::new();
    };
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
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

    // (item, window) of every window, shortest first.
    let mut order: Vec<(usize, usize)> = prepared
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.as_ref().ok().map(|w| (i, w.len())))
        .flat_map(|(i, n)| (0..n).map(move |w| (i, w)))
        .collect();
    let len = |&(i, w): &(usize, usize)| prepared[i].as_ref().map_or(0, |ws| ws[w].ids.len());
    order.sort_by_key(len);

    // Logit rows per window, and engine time and failures per item.
    let mut rows: Vec<Vec<Option<Vec<f32>>>> = prepared
        .iter()
        .map(|p| p.as_ref().map_or(Vec::new(), |w| vec![None; w.len()]))
        .collect();
    let mut inference_ms = vec![0.0; items.len()];
    let mut failed: Vec<Option<String>> = vec![None; items.len()];
    let mut labels = 0;
    let mut per_token = true;
    let windower = first.annotator.windower();
    let sizes = runs(order.iter().map(len));
    let mut rest = order.as_slice();
    for n in sizes {
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let windows = chunk
            .iter()
            .map(|&(i, w)| &prepared[i].as_ref().expect("only prepared items")[w]);
        let batch = windower.batch_of(windows, 0);
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
            if let Some(e) = &failed[i] {
                return Err(Error::Inference(e.clone()));
            }
            let item = &items[i];
            let logits = item_logits(&windows, &mut rows[i], labels, per_token);
            let t = Instant::now();
            let result = item
                .annotator
                .postprocess(item.text, item.pair, &windows, &logits);
            Ok(Annotation {
                result,
                windows: windows.len(),
                tokens: windows.iter().map(|w| w.ids.len()).sum(),
                timings: Timings {
                    tokenize_ms: tokenize_ms[i],
                    inference_ms: inference_ms[i],
                    postprocess_ms: ms(t, Instant::now()),
                },
            })
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
