//! Extractive QA against the `question-answering` pipeline's goldens of the QA
//! fixtures (tiny random-weight ALBERT, DistilBERT and BERT twins exported by
//! `models/export/make_qa_fixtures.py`; pipeline of transformers 4.57.3, the last
//! that has it). Layered like `goldens.rs`, so a failure points at its cause:
//! 1. windows: ids, segment ids, offsets, word ids, sequence ids and the
//!    answerable positions (`p_mask`) of every window equal the pipeline's;
//! 2. post-processing from the pipeline's own fp32 logits: same answers and
//!    offsets, scores to 1e-5;
//! 3. tract on the int8 bundle: logits near fp32 (no further than onnxruntime
//!    int8), the same start/end argmax in every window, and the pipeline's answers.
//! 4. `anotador eval` on SQuAD JSON: exact match and F1 of known predictions.

use std::sync::Arc;

use anotador::engine::Logits;
use anotador::tasks::{Output, TaskOptions};
use anotador::{Annotator, Bundle};
use serde::Deserialize;
use serde_json::Value;

mod fixture;
use fixture::dir;

fn golden(name: &str) -> Golden {
    fixture::golden(name)
}

const FIXTURES: [&str; 3] = ["albert-qa", "distilbert-qa", "bert-qa"];

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
    parity: Value,
}

#[derive(Deserialize)]
struct Params {
    top_k: Option<usize>,
    doc_stride: Option<usize>,
    max_answer_len: Option<usize>,
    max_seq_len: Option<usize>,
    handle_impossible_answer: Option<bool>,
}

#[derive(Deserialize)]
struct Case {
    question: String,
    context: String,
    params: Params,
    expected: Value,
    expected_int8: Value,
    windows: Vec<WindowGolden>,
}

#[derive(Deserialize)]
struct WindowGolden {
    input_ids: Vec<u32>,
    token_type_ids: Option<Vec<u32>>,
    offsets: Vec<(usize, usize)>,
    sequence_ids: Vec<Option<usize>>,
    word_ids: Vec<Option<u32>>,
    p_mask: Vec<u8>,
    start_logits_fp32: Vec<f32>,
    end_logits_fp32: Vec<f32>,
}

fn options(p: &Params) -> TaskOptions {
    TaskOptions {
        top_k: p.top_k,
        window: p.max_seq_len,
        stride: p.doc_stride,
        max_answer_len: p.max_answer_len,
        handle_impossible_answer: p.handle_impossible_answer,
        max_windows: Some(64),
        ..TaskOptions::default()
    }
}

/// One bundle per fixture (loading is the slow part); annotators per case.
struct Fixture {
    bundle: Arc<Bundle>,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        Fixture {
            bundle: Arc::new(Bundle::load(dir(name)).unwrap()),
        }
    }

    fn annotator(&self, p: &Params) -> Annotator {
        Annotator::new(self.bundle.clone(), &options(p)).unwrap()
    }
}

/// The pipeline's answers as a list (it returns a bare object for one answer).
fn as_list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    }
}

/// Same shape (object or list), same answers and offsets in the same order, scores
/// within `rel` (relative), and every answer the exact slice of the context.
fn compare(context: &str, ours: &Output, expected: &Value, rel: f64) -> Result<(), String> {
    let Output::Answers(answers) = ours else {
        return Err(format!("not answers: {ours:?}"));
    };
    let ours = serde_json::to_value(answers).unwrap();
    if ours.is_array() != expected.is_array() {
        return Err(format!("shape: ours {ours}, pipeline {expected}"));
    }
    let (ours, expected) = (as_list(&ours), as_list(expected));
    if ours.len() != expected.len() {
        return Err(format!(
            "{} answers, pipeline {}",
            ours.len(),
            expected.len()
        ));
    }
    for (o, e) in ours.iter().zip(&expected) {
        for key in ["answer", "start", "end"] {
            if o[key] != e[key] {
                return Err(format!("{key}: ours {o}, pipeline {e}"));
            }
        }
        let slice: String = {
            let (s, t) = (o["start"].as_u64().unwrap(), o["end"].as_u64().unwrap());
            context
                .chars()
                .skip(s as usize)
                .take((t - s) as usize)
                .collect()
        };
        assert_eq!(o["answer"].as_str().unwrap(), slice, "answer is the slice");
        let (a, b) = (o["score"].as_f64().unwrap(), e["score"].as_f64().unwrap());
        if (a - b).abs() > rel * a.abs().max(b.abs()) + 1e-12 {
            return Err(format!("score: ours {a}, pipeline {b}"));
        }
    }
    Ok(())
}

#[test]
fn windows_match_the_pipeline() {
    let mut windows_checked = 0;
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let cls = fixture.bundle.tokenizer.token_to_id("[CLS]").unwrap();
        for case in golden(name).cases {
            let a = fixture.annotator(&case.params);
            let ours = a
                .windower()
                .encode_qa(&case.question, &case.context)
                .unwrap();
            assert_eq!(ours.len(), case.windows.len(), "{name}: window count");
            for (o, g) in ours.iter().zip(&case.windows) {
                let at = format!("{name} {:?}", case.question);
                assert_eq!(o.ids, g.input_ids, "{at}: ids");
                assert_eq!(o.sequence, g.sequence_ids, "{at}: sequence ids");
                assert_eq!(o.words, g.word_ids, "{at}: word ids");
                if let Some(types) = &g.token_type_ids {
                    assert_eq!(&o.type_ids, types, "{at}: token type ids");
                }
                for (t, (&ours, &theirs)) in o.offsets.iter().zip(&g.offsets).enumerate() {
                    if o.sequence[t].is_some() {
                        assert_eq!(ours, theirs, "{at}: offsets of token {t}");
                    }
                }
                let p_mask: Vec<u8> = (0..o.ids.len())
                    .map(|t| (o.sequence[t] != Some(1) && o.ids[t] != cls) as u8)
                    .collect();
                assert_eq!(p_mask, g.p_mask, "{at}: answerable positions");
                windows_checked += 1;
            }
        }
    }
    assert!(windows_checked >= 100, "{windows_checked} windows");
}

/// The recorded fp32 logits of a case's windows, padded as one batch.
fn recorded_logits(case: &Case) -> Logits {
    let seq_len = case
        .windows
        .iter()
        .map(|w| w.input_ids.len())
        .max()
        .unwrap();
    let mut values = Vec::new();
    for w in &case.windows {
        for t in 0..seq_len {
            values.push(w.start_logits_fp32.get(t).copied().unwrap_or(-1e4));
            values.push(w.end_logits_fp32.get(t).copied().unwrap_or(-1e4));
        }
    }
    Logits {
        rows: case.windows.len(),
        seq_len,
        labels: 2,
        values,
    }
}

#[test]
fn postprocessing_reproduces_pipeline_from_fp32_logits() {
    let mut checked = 0;
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        for case in golden(name).cases {
            let a = fixture.annotator(&case.params);
            let windows = a
                .windower()
                .encode_qa(&case.question, &case.context)
                .unwrap();
            let out = a.postprocess(
                &case.question,
                Some(&case.context),
                &windows,
                &recorded_logits(&case),
            );
            if let Err(e) = compare(&case.context, &out, &case.expected, 1e-5) {
                panic!(
                    "{name} {:?} top_k {:?}: {e}",
                    case.question, case.params.top_k
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
}

/// Start and end logits of every window close to fp32 (no further than onnxruntime
/// int8's own), argmax equal to fp32's except between positions fp32 itself
/// separates by less than int8 noise: the random twins have near-tied positions,
/// and onnxruntime int8 flips the same ones (see the answers test below).
#[test]
fn tract_int8_logits_agree_with_fp32() {
    for name in FIXTURES {
        let g = golden(name);
        let fixture = Fixture::load(name);
        let mut state = fixture.bundle.engine.state().unwrap();
        let ort = g.parity["max_abs_dstart_logit_int8"]
            .as_f64()
            .unwrap()
            .max(g.parity["max_abs_dend_logit_int8"].as_f64().unwrap()) as f32;
        let (mut delta, mut argmax_checks, mut flips) = (0f32, 0, 0);
        for case in &g.cases {
            let a = fixture.annotator(&case.params);
            let (windows, logits) = a
                .infer(&mut state, &case.question, Some(&case.context))
                .unwrap();
            assert_eq!(windows.len(), case.windows.len());
            for (row, w) in case.windows.iter().enumerate() {
                for (col, recorded) in [&w.start_logits_fp32, &w.end_logits_fp32]
                    .into_iter()
                    .enumerate()
                {
                    // The window's own tokens: the engine leaves the batch's padding
                    // uncomputed, and the task never reads it.
                    let n = windows[row].ids.len();
                    let recorded = &recorded[..n];
                    let ours: Vec<f32> = (0..n).map(|t| logits.at(row, t)[col]).collect();
                    for (o, r) in ours.iter().zip(recorded) {
                        delta = delta.max((o - r).abs());
                    }
                    let argmax = anotador::tasks::token::argmax;
                    let (a, b) = (argmax(&ours), argmax(recorded));
                    if a != b {
                        // A flip is only acceptable between near-tied positions: ones
                        // fp32 itself separates by less than int8 noise.
                        let margin = (recorded[a] - recorded[b]).abs();
                        assert!(
                            margin < ort,
                            "{name}: argmax {a} instead of {b}, fp32 margin {margin} ≥ {ort}"
                        );
                        flips += 1;
                    }
                    argmax_checks += 1;
                }
            }
        }
        println!("{name}: max |Δlogit| vs torch fp32: tract int8 {delta:.4}, onnxruntime int8 {ort:.4}; {argmax_checks} argmax checks, {flips} near-tie flips");
        assert!(
            flips * 20 <= argmax_checks,
            "{name}: {flips} argmax flips in {argmax_checks}"
        );
        assert!(delta <= ort, "{name}: {delta} > onnxruntime int8's {ort}");
    }
}

/// Probabilities move with the int8 weights (logits within ~0.4 of fp32; the
/// random twins' answers score ~0.005, where that is up to 12% relative): the
/// answers and offsets must match exactly, the scores within this relative margin.
const SCORE_REL: f64 = 0.25;

#[test]
fn tract_int8_reproduces_pipeline_answers() {
    let (mut checked, mut int8_only) = (0, 0);
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let mut state = fixture.bundle.engine.state().unwrap();
        for case in golden(name).cases {
            let a = fixture.annotator(&case.params);
            let ann = a
                .annotate(&mut state, &case.question, Some(&case.context))
                .unwrap();
            assert_eq!(ann.windows, case.windows.len());
            // A case passes if it matches the fp32 pipeline, or the same pipeline
            // run on onnxruntime int8 (near-ties among lower-ranked answers).
            if let Err(e) = compare(&case.context, &ann.result, &case.expected, SCORE_REL) {
                if let Err(e8) = compare(&case.context, &ann.result, &case.expected_int8, SCORE_REL)
                {
                    panic!("{name} {:?}: fp32: {e}; int8: {e8}", case.question);
                }
                int8_only += 1;
            }
            checked += 1;
        }
    }
    println!("{checked} cases, {int8_only} matched only the int8 pipeline");
    assert_eq!(checked, 36);
}

#[test]
fn eval_scores_squad_json() {
    // A SQuAD file over the golden cases: the gold answer of the first half is the
    // model's own answer (exact match), of the second half a word the model does not
    // answer (no match), so the expected figures are known.
    let fixture = Fixture::load("bert-qa");
    let default = Params {
        top_k: None,
        doc_stride: None,
        max_answer_len: None,
        max_seq_len: None,
        handle_impossible_answer: None,
    };
    let a = fixture.annotator(&default);
    let mut state = fixture.bundle.engine.state().unwrap();
    let cases: Vec<Case> = golden("bert-qa")
        .cases
        .into_iter()
        .filter(|c| c.params.max_seq_len.is_none())
        .collect();
    let mut paragraphs = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let ann = a
            .annotate(&mut state, &c.question, Some(&c.context))
            .unwrap();
        let Output::Answers(answers) = ann.result else {
            panic!()
        };
        let answer = answers.best().unwrap().answer.clone();
        let gold = if i % 2 == 0 {
            format!("  {}.", answer.to_uppercase())
        } else {
            "zzz".to_string()
        };
        paragraphs.push(serde_json::json!({"context": c.context, "qas": [
            {"id": format!("q{i}"), "question": c.question, "answers": [{"text": gold, "answer_start": 0}]}
        ]}));
    }
    let dir = std::env::temp_dir().join(format!("anotador-squad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mini.json");
    std::fs::write(
        &path,
        serde_json::json!({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]})
            .to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anotador"))
        .args(["eval", "--threads", "2", "--model"])
        .arg(self::dir("bert-qa"))
        .arg("--data")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = cases.len();
    let matched = n.div_ceil(2) as f64;
    assert_eq!(report["questions"], n);
    assert_eq!(report["format"], "squad");
    let em = report["exact_match"].as_f64().unwrap();
    assert!((em - 100.0 * matched / n as f64).abs() < 1e-9, "{report}");
    // Every exact match is also F1 1; "zzz" shares no token with any answer.
    assert!(
        (report["f1"].as_f64().unwrap() - em).abs() < 1e-9,
        "{report}"
    );
}
