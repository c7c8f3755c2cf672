//! Bundle loading: broken bundles fail at load with the file and the problem
//! named; the load-time rewrites keep the graph's outputs.

use std::path::{Path, PathBuf};

use anotador::engine::{Batch, Engine, Rewrites};
use anotador::Bundle;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load_error(name: &str) -> String {
    Bundle::load(fixture(name))
        .expect_err("a broken bundle must not load")
        .to_string()
}

#[test]
fn broken_bundles_name_the_file_and_the_problem() {
    let e = load_error("broken/missing-tokenizer");
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    let e = load_error("broken/bad-labels");
    assert!(
        e.contains("config.json") && e.contains("3 labels") && e.contains("9 logits"),
        "{e}"
    );
    let e = load_error("broken/no-attention-mask");
    assert!(e.contains("model.onnx") && e.contains("`mask`"), "{e}");
    let e = load_error("broken/truncated-onnx");
    assert!(
        e.contains("model.onnx") && e.contains("truncated or corrupt"),
        "{e}"
    );
    let e = load_error("does-not-exist");
    assert!(
        e.contains("does-not-exist") && e.contains("not a folder"),
        "{e}"
    );
}

/// A short batch of two windows of different lengths.
fn batch() -> Batch {
    Batch {
        rows: 2,
        seq_len: 6,
        input_ids: vec![2, 40, 41, 42, 43, 3, 2, 50, 51, 3, 0, 0],
        attention_mask: vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        token_type_ids: vec![0; 12],
    }
}

fn max_delta(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn gelu_fusion_keeps_outputs_and_happens() {
    let dir = fixture("albert-token");
    let fused = Engine::load(&dir).unwrap();
    assert_eq!(
        fused.info().rewrites.gelu_fused,
        2,
        "one tanh-GELU per ALBERT layer call"
    );
    let plain = Engine::load_with(
        &dir,
        Rewrites {
            fuse_gelu: false,
            ..Rewrites::default()
        },
    )
    .unwrap();
    let a = fused.state().unwrap().run(&batch()).unwrap();
    let b = plain.state().unwrap().run(&batch()).unwrap();
    let d = max_delta(&a.values, &b.values);
    assert!(d < 1e-4, "fused GELU changed logits by {d}");
}

#[test]
fn dequantized_weights_match_native_int8_closely() {
    for name in ["albert-token", "bert-token", "distilbert-seq"] {
        let dir = fixture(name);
        let deq = Engine::load(&dir).unwrap();
        let info = &deq.info().rewrites;
        assert_eq!(
            info.matmul_integer_dequantized, info.matmul_integer_total,
            "{name}: every MatMulInteger rewritten"
        );
        assert!(info.matmul_integer_total > 0);
        let native = Engine::load_with(
            &dir,
            Rewrites {
                dequantize: false,
                ..Rewrites::default()
            },
        )
        .unwrap();
        assert_eq!(native.info().int8_path, "mixed-native-int8");
        let a = deq.state().unwrap().run(&batch()).unwrap();
        let b = native.state().unwrap().run(&batch()).unwrap();
        // The native path also quantizes activations: close, not identical.
        let d = max_delta(&a.values, &b.values);
        assert!(d < 1.0, "{name}: dequantized vs native int8 differ by {d}");
    }
}

#[test]
fn padding_does_not_change_a_window() {
    let engine = Engine::load(&fixture("bert-token")).unwrap();
    let mut state = engine.state().unwrap();
    let both = state.run(&batch()).unwrap();
    let alone = state
        .run(&Batch {
            rows: 1,
            seq_len: 4,
            input_ids: vec![2, 50, 51, 3],
            attention_mask: vec![1; 4],
            token_type_ids: vec![0; 4],
        })
        .unwrap();
    for pos in 0..4 {
        let d = max_delta(both.at(1, pos), alone.at(0, pos));
        assert!(d < 1e-4, "position {pos}: padded batch differs by {d}");
    }
}
