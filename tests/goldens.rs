//! Reproduces the Hugging Face pipeline goldens of the architecture fixtures
//! (tiny random-weight ALBERT, DistilBERT and BERT twins exported by
//! `models/export/make_fixtures.py`) through our tokenizer, tract and task code.
//!
//! Three layers, so a failure points at its cause:
//! 1. tokenization: our input ids equal transformers' for every recorded text;
//! 2. post-processing: fed transformers' own fp32 logits, our task code returns
//!    the pipeline's output (labels, offsets, scores to 1e-5);
//! 3. end to end through tract on the int8 bundle: logits close to fp32, argmax
//!    identical to onnxruntime int8, and the pipeline's entities and labels.

use std::sync::Arc;

use anotador::bundle::{Aggregation, ScoreFunction};
use anotador::engine::{ActivationRange, Int8Rewrite, KernelKind, Logits, Rewrites};
use anotador::tasks::{Output, TaskOptions};
use anotador::{Annotator, Bundle};
use serde::Deserialize;
use serde_json::Value;

mod fixture;
use fixture::dir;

fn golden(name: &str) -> Golden {
    fixture::golden(name)
}

const FIXTURES: [&str; 7] = [
    "albert-token",
    "albert-seq",
    "distilbert-token",
    "distilbert-seq",
    "bert-token",
    "bert-seq",
    "bert-multilabel",
];

#[derive(Deserialize)]
struct Golden {
    task: String,
    cases: Vec<Case>,
    logits: Vec<LogitCase>,
    window_logits: Vec<WindowLogits>,
}

/// fp32 logits of every window of a long text, as the pipeline ran them.
#[derive(Deserialize)]
struct WindowLogits {
    text: String,
    window: usize,
    stride: usize,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    torch_fp32: Value,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    text_pair: Option<String>,
    params: serde_json::Map<String, Value>,
    window: Option<usize>,
    stride: Option<usize>,
    /// The same pipeline with the model's forward replaced by onnxruntime int8.
    #[serde(default, deserialize_with = "as_list")]
    expected_int8: Vec<Value>,
    /// The pipeline returns a bare object for a pair without `top_k`.
    #[serde(deserialize_with = "as_list")]
    expected: Vec<Value>,
}

fn as_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => items,
        other => vec![other],
    })
}

#[derive(Deserialize)]
struct LogitCase {
    text: String,
    text_pair: Option<String>,
    input_ids: Vec<Vec<u32>>,
    torch_fp32: Value,
    ort_int8: Value,
}

fn options(case: &Case) -> TaskOptions {
    let p = &case.params;
    TaskOptions {
        aggregation: p
            .get("aggregation_strategy")
            .map(|v| serde_json::from_value::<Aggregation>(v.clone()).unwrap()),
        // Present and null: every label; absent: the pipeline's legacy top-1.
        top_k: match p.get("top_k") {
            Some(Value::Null) => Some(0),
            Some(v) => Some(v.as_u64().unwrap() as usize),
            None => None,
        },
        function_to_apply: p
            .get("function_to_apply")
            .map(|v| serde_json::from_value::<ScoreFunction>(v.clone()).unwrap()),
        window: case.window,
        stride: case.stride,
        max_windows: Some(64),
        ..TaskOptions::default()
    }
}

/// Flattens a nested JSON array of numbers.
fn flat(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
        other => panic!("not a number: {other}"),
    }
}

fn logits_from(v: &Value, labels: usize, per_token: bool) -> Logits {
    let mut values = Vec::new();
    flat(v, &mut values);
    let rows = 1;
    let seq_len = if per_token { values.len() / labels } else { 0 };
    Logits {
        rows,
        seq_len,
        labels,
        values,
    }
}

/// Compares our output with the pipeline's: same items in the same order, same
/// labels and offsets, scores within `tol`, and `word` equal to the input slice.
fn compare(text: &str, ours: &Output, expected: &[Value], tol: f32) -> Result<(), String> {
    let ours = serde_json::to_value(ours).unwrap();
    let ours = ours.as_array().unwrap();
    let show = || {
        format!(
            "\n ours:     {}\n expected: {}",
            Value::from(ours.clone()),
            Value::from(expected.to_vec())
        )
    };
    if ours.len() != expected.len() {
        return Err(format!("item count differs{}", show()));
    }
    let chars: Vec<char> = text.chars().collect();
    for (o, e) in ours.iter().zip(expected) {
        for key in ["entity", "entity_group", "label", "start", "end", "index"] {
            if o.get(key) != e.get(key) {
                return Err(format!("`{key}` differs{}", show()));
            }
        }
        let (os, es) = (
            o["score"].as_f64().unwrap() as f32,
            e["score"].as_f64().unwrap() as f32,
        );
        if (os - es).abs() > tol {
            return Err(format!("score {os} vs {es} (tol {tol}){}", show()));
        }
        if let (Some(s), Some(t)) = (
            o.get("start").and_then(Value::as_u64),
            o.get("end").and_then(Value::as_u64),
        ) {
            let slice: String = chars[s as usize..t as usize].iter().collect();
            assert_eq!(
                o["word"].as_str().unwrap(),
                slice,
                "word is not the input slice{}",
                show()
            );
        }
    }
    Ok(())
}

fn annotator(name: &str, options: &TaskOptions) -> Annotator {
    let bundle = Arc::new(Bundle::load(dir(name)).unwrap());
    Annotator::new(bundle, options).unwrap()
}

#[test]
fn tokenization_matches_transformers() {
    for name in FIXTURES {
        let a = annotator(name, &TaskOptions::default());
        for l in golden(name).logits {
            let windows = a
                .windower()
                .encode(&l.text, l.text_pair.as_deref())
                .unwrap();
            assert_eq!(
                windows.len(),
                1,
                "{name}: {:?} should fit one window",
                l.text
            );
            assert_eq!(
                windows[0].ids, l.input_ids[0],
                "{name}: input ids differ for {:?}",
                l.text
            );
        }
    }
}

#[test]
fn postprocessing_reproduces_pipeline_from_fp32_logits() {
    let mut checked = 0;
    for name in FIXTURES {
        let g = golden(name);
        let per_token = g.task == "token-classification";
        for case in &g.cases {
            let Some(l) = g
                .logits
                .iter()
                .find(|l| l.text == case.text && l.text_pair == case.text_pair)
            else {
                continue; // windowed cases: covered end to end below
            };
            let a = annotator(name, &options(case));
            let windows = a
                .windower()
                .encode(&case.text, case.text_pair.as_deref())
                .unwrap();
            let labels = a.bundle().config.labels.len();
            let logits = logits_from(&l.torch_fp32, labels, per_token);
            let out = a.postprocess(&case.text, case.text_pair.as_deref(), &windows, &logits);
            if let Err(e) = compare(&case.text, &out, &case.expected, 1e-5) {
                panic!("{name} {:?} {:?}: {e}", case.params, case.text);
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} cases checked");
}

#[test]
fn windows_and_their_merge_reproduce_pipeline_from_fp32_logits() {
    let mut checked = 0;
    for name in FIXTURES {
        let g = golden(name);
        for w in &g.window_logits {
            for case in g
                .cases
                .iter()
                .filter(|c| c.text == w.text && c.window == Some(w.window))
            {
                assert_eq!(case.stride, Some(w.stride));
                let a = annotator(name, &options(case));
                let windows = a.windower().encode(&w.text, None).unwrap();
                assert_eq!(windows.len(), w.input_ids.len(), "{name}: window count");
                for (ours, (ids, mask)) in windows
                    .iter()
                    .zip(w.input_ids.iter().zip(&w.attention_mask))
                {
                    let real = mask.iter().filter(|&&m| m == 1).count();
                    assert_eq!(ours.ids, ids[..real], "{name}: window ids");
                }
                let mut values = Vec::new();
                flat(&w.torch_fp32, &mut values);
                let labels = a.bundle().config.labels.len();
                let logits = Logits {
                    rows: windows.len(),
                    seq_len: values.len() / labels / windows.len(),
                    labels,
                    values,
                };
                let out = a.postprocess(&w.text, None, &windows, &logits);
                if let Err(e) = compare(&w.text, &out, &case.expected, 1e-5) {
                    panic!("{name} {:?} windows: {e}", case.params);
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "only {checked} windowed cases checked");
}

/// Every int8 path against the recorded logits of the fp32 model (torch) and of
/// onnxruntime's int8 path: argmax equal to onnxruntime everywhere, and the
/// distance to fp32 no larger than onnxruntime's. The fused int8 node with
/// onnxruntime's per-tensor activation range is onnxruntime's arithmetic: what is
/// left of the difference comes from the fp32 ops around the matmuls.
#[test]
fn tract_int8_agrees_with_onnxruntime_and_torch() {
    let fused = |kernel, range| Rewrites {
        int8: Int8Rewrite::Fused { kernel, range },
        ..Rewrites::default()
    };
    // Every int8 kernel this CPU runs, per row (the default) and per tensor
    // (onnxruntime's own arithmetic), then the dequantized path.
    let mut paths = Vec::new();
    for kernel in KernelKind::available_here() {
        paths.push((
            format!("native int8 ({kernel}), per-row range (default)"),
            fused(kernel, ActivationRange::Row),
        ));
        paths.push((
            format!("native int8 ({kernel}), per-tensor range"),
            fused(kernel, ActivationRange::Tensor),
        ));
    }
    paths.push((
        "dequantized".to_string(),
        Rewrites {
            int8: Int8Rewrite::Dequantize,
            ..Rewrites::default()
        },
    ));
    for name in FIXTURES {
        let g = golden(name);
        let per_token = g.task == "token-classification";
        for (path, rewrites) in &paths {
            let rewrites = *rewrites;
            let bundle = Arc::new(Bundle::load_with(dir(name), rewrites).unwrap());
            let a = Annotator::new(bundle, &TaskOptions::default()).unwrap();
            let mut state = a.bundle().engine.state().unwrap();
            let labels = a.bundle().config.labels.len();
            let (mut fp32_delta, mut ort_delta, mut ort_fp32_delta) = (0f32, 0f32, 0f32);
            let (mut agree, mut total) = (0, 0);
            for l in &g.logits {
                let (_, ours) = a
                    .infer(&mut state, &l.text, l.text_pair.as_deref())
                    .unwrap();
                let fp32 = logits_from(&l.torch_fp32, labels, per_token);
                let int8 = logits_from(&l.ort_int8, labels, per_token);
                assert_eq!(ours.values.len(), fp32.values.len(), "{name}: logits shape");
                for ((o, f), i) in ours.values.iter().zip(&fp32.values).zip(&int8.values) {
                    fp32_delta = fp32_delta.max((o - f).abs());
                    ort_delta = ort_delta.max((o - i).abs());
                    ort_fp32_delta = ort_fp32_delta.max((i - f).abs());
                }
                for pos in 0..fp32.seq_len.max(1) {
                    let argmax = anotador::tasks::token::argmax;
                    total += 1;
                    let ok = argmax(ours.at(0, pos)) == argmax(int8.at(0, pos));
                    agree += ok as usize;
                }
            }
            println!(
                "{name}, {path}: max |Δlogit| vs onnxruntime int8 {ort_delta:.5}, vs torch fp32 \
                 {fp32_delta:.4} (onnxruntime int8's own {ort_fp32_delta:.4}); argmax agreement \
                 with onnxruntime int8 {agree}/{total}"
            );
            assert_eq!(
                agree, total,
                "{name}, {path}: argmax differs from onnxruntime int8"
            );
            // No further from fp32 than onnxruntime int8 (up to float noise: the
            // per-tensor path is onnxruntime's arithmetic, so it ties).
            assert!(
                fp32_delta <= ort_fp32_delta + 1e-4,
                "{name}, {path}: max |Δlogit| to fp32 {fp32_delta} > onnxruntime int8's {ort_fp32_delta}"
            );
            if matches!(
                rewrites.int8,
                Int8Rewrite::Fused {
                    range: ActivationRange::Tensor,
                    ..
                }
            ) {
                assert!(
                    ort_delta < 1e-4,
                    "{name}: onnxruntime's arithmetic, yet {ort_delta} from its logits"
                );
            }
        }
    }
}

/// Scores after softmax move with the int8 weights: the random-weight twins have
/// logits that differ by up to 0.8 from fp32 (onnxruntime's int8 likewise), which
/// can move a probability by 0.15. Exact scores are checked from fp32 logits above.
const SCORE_TOL: f32 = 0.2;

#[test]
fn tract_int8_reproduces_pipeline_goldens() {
    let (mut checked, mut flips) = (0, 0);
    for name in FIXTURES {
        let g = golden(name);
        let mut cache: Option<(String, Annotator)> = None;
        for case in &g.cases {
            let opts = options(case);
            let key = format!("{opts:?}");
            if cache.as_ref().is_none_or(|(k, _)| *k != key) {
                cache = Some((key, annotator(name, &opts)));
            }
            let a = &cache.as_ref().unwrap().1;
            let mut state = a.bundle().engine.state().unwrap();
            let ann = a
                .annotate(&mut state, &case.text, case.text_pair.as_deref())
                .unwrap();
            if let Some(w) = case.window {
                assert!(
                    ann.windows > 1,
                    "{name}: a {w}-token window should split {:?}",
                    case.text
                );
            }
            // Quantization noise moves scores a little and, where two labels are
            // nearly tied, can flip a choice (the exact checks above use fp32
            // logits). A case passes if it matches the fp32 pipeline or the same
            // pipeline on onnxruntime int8; the rest are counted and bounded.
            let fp32 = compare(&case.text, &ann.result, &case.expected, SCORE_TOL);
            if let Err(e) = fp32 {
                if compare(&case.text, &ann.result, &case.expected_int8, SCORE_TOL).is_err() {
                    println!(
                        "near-tie flip? {name} {:?} {:?}: {e}",
                        case.params, case.text
                    );
                    flips += 1;
                }
            }
            checked += 1;
        }
    }
    println!("{checked} cases; {flips} differ from both the fp32 and the int8 pipeline");
    assert!(checked >= 50, "only {checked} cases checked");
    assert!(
        flips * 20 <= checked,
        "{flips} of {checked} cases differ from both pipelines"
    );
}

/// A micro-batch (windows of several messages run together, shortest with
/// shortest) gives every message what it gets alone, and a bad message its own error.
#[test]
fn micro_batch_equals_one_by_one() {
    use anotador::tasks::batch::{annotate_batch, Item};
    let long = "El Banco de España publicó ayer en Madrid su informe anual. ".repeat(6);
    let texts = [
        "Hola.",
        long.as_str(),
        "",
        "Gabriel García Márquez nació en Aracataca.",
        "La ONU y la OTAN se reunieron en Nueva York.",
    ];
    for (name, window) in [
        ("bert-token", Some(16)),
        ("albert-token", None),
        ("bert-seq", None),
    ] {
        let small = annotator(
            name,
            &TaskOptions {
                window,
                max_windows: Some(64),
                ..TaskOptions::default()
            },
        );
        // A second route on the same model with other options.
        let all = Annotator::new(
            small.bundle().clone(),
            &TaskOptions {
                top_k: Some(0),
                aggregation: Some(Aggregation::None),
                max_windows: Some(64),
                ..TaskOptions::default()
            },
        )
        .unwrap();
        let mut state = small.bundle().engine.state().unwrap();
        let items: Vec<Item> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Item {
                annotator: if i % 2 == 0 { &small } else { &all },
                text: t,
                pair: None,
            })
            .collect();
        let batched = annotate_batch(&mut state, &items);
        assert_eq!(batched.len(), texts.len());
        for (item, got) in items.iter().zip(batched) {
            let alone = item.annotator.annotate(&mut state, item.text, None);
            match (alone, got) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.windows, b.windows);
                    let a = serde_json::to_value(&a.result).unwrap();
                    let expected: Vec<Value> = match a {
                        Value::Array(v) => v,
                        other => vec![other],
                    };
                    compare(item.text, &b.result, &expected, 1e-5)
                        .unwrap_or_else(|e| panic!("{name} {:?}: {e}", item.text));
                }
                (Err(a), Err(b)) => assert_eq!(a.code(), b.code()),
                (a, b) => panic!(
                    "{name} {:?}: alone {:?}, batched {:?}",
                    item.text,
                    a.is_ok(),
                    b.is_ok()
                ),
            }
        }
    }
}
