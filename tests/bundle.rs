//! Bundle loading: broken bundles fail at load with the file and the problem
//! named; the load-time rewrites keep the graph's outputs.

use std::path::{Path, PathBuf};

use anotador::engine::{ActivationRange, Batch, Engine, Int8Path, Int8Rewrite, Rewrites};
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

/// The largest logit difference between two engines on [`batch`].
fn logits_delta(a: &Engine, b: &Engine) -> f32 {
    let a = a.state().unwrap().run(&batch()).unwrap();
    let b = b.state().unwrap().run(&batch()).unwrap();
    max_delta(&a.values, &b.values)
}

fn max_delta(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// ALBERT's tanh-GELU and BERT's and DistilBERT's erf-GELU each become one node
/// per layer call, and on the int8 path move into the matmul before them, with the
/// logits those of the unfused graph.
#[test]
fn gelu_fusion_keeps_outputs_and_happens() {
    for (name, calls) in [
        ("albert-token", 2),
        ("bert-token", 2),
        ("distilbert-seq", 2),
    ] {
        let dir = fixture(name);
        // On the dequantized path, so that only the GELU differs between the two.
        let fused = load(&dir, Int8Rewrite::Dequantize);
        assert_eq!(
            fused.info().rewrites.gelu_fused,
            calls,
            "{name}: one GELU per layer call"
        );
        let plain = Engine::load_with(
            &dir,
            Rewrites {
                fuse_gelu: false,
                int8: Int8Rewrite::Dequantize,
                ..Rewrites::default()
            },
        )
        .unwrap();
        assert_eq!(plain.info().rewrites.gelu_fused, 0);
        let d = logits_delta(&fused, &plain);
        assert!(d < 1e-4, "{name}: fused GELU changed logits by {d}");

        // On the int8 path the GELU moves into the epilogue of the matmul before it.
        let native = |fuse_gelu| {
            Engine::load_with(
                &dir,
                Rewrites {
                    fuse_gelu,
                    ..Rewrites::for_path(Int8Path::Native)
                },
            )
            .unwrap()
        };
        let (folded, plain) = (native(true), native(false));
        assert_eq!(folded.info().rewrites.gelu_into_matmul, calls, "{name}");
        let d = logits_delta(&folded, &plain);
        assert!(
            d < 1e-4,
            "{name}: GELU in the int8 epilogue changed logits by {d}"
        );
    }
}

/// Windows of one length run as one group; each row's logits are the same bits as
/// when that window runs alone (every op computes a row on its own), on every
/// int8 kernel this CPU has, for token, sequence and span outputs.
#[test]
fn grouped_windows_give_the_bits_of_single_ones() {
    use anotador::engine::KernelKind;
    let (rows, seq) = (7, 9);
    // Rows 0, 1, 2, 4, 6: nine tokens (one group); 3 and 5: padded to five and
    // seven (groups of their own).
    let mut b = Batch {
        rows,
        seq_len: seq,
        input_ids: Vec::new(),
        attention_mask: Vec::new(),
        token_type_ids: Vec::new(),
    };
    for r in 0..rows {
        let len = match r {
            3 => 5,
            5 => 7,
            _ => seq,
        };
        for i in 0..seq {
            let real = i < len;
            b.input_ids.push(if real {
                5 + ((r * 31 + i * 7) % 90) as i64
            } else {
                0
            });
            b.attention_mask.push(real as i64);
            b.token_type_ids.push((real && i >= len / 2) as i64);
        }
    }
    let single = |r: usize| Batch {
        rows: 1,
        seq_len: seq,
        input_ids: b.input_ids[r * seq..(r + 1) * seq].to_vec(),
        attention_mask: b.attention_mask[r * seq..(r + 1) * seq].to_vec(),
        token_type_ids: b.token_type_ids[r * seq..(r + 1) * seq].to_vec(),
    };
    for name in ["albert-token", "bert-token", "distilbert-seq", "bert-qa"] {
        for kernel in KernelKind::available_here() {
            let engine = Engine::load_with(
                &fixture(name),
                Rewrites::for_model(Int8Path::Native, Some(kernel)).unwrap(),
            )
            .unwrap();
            let mut state = engine.state().unwrap();
            let grouped = state.run(&b).unwrap();
            let width = grouped.values.len() / rows;
            for r in 0..rows {
                let alone = state.run(&single(r)).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&grouped.values[r * width..(r + 1) * width]),
                    bits(&alone.values),
                    "{name} {kernel} row {r}"
                );
            }
        }
    }
}

fn load(dir: &Path, int8: Int8Rewrite) -> Engine {
    Engine::load_with(
        dir,
        Rewrites {
            int8,
            ..Rewrites::default()
        },
    )
    .unwrap()
}

/// The three ways to run the int8 weights give close logits, and the fused int8
/// node with onnxruntime's per-tensor range computes what tract's own
/// `DynamicQuantizeLinear → MatMulInteger` chain computes.
/// Every layer norm becomes one op, the residual adds before them go into it, and
/// the logits stay those of tract's own decomposition.
#[test]
fn layer_norm_fusion_keeps_outputs_and_happens() {
    for name in ["albert-token", "bert-token", "distilbert-seq"] {
        let dir = fixture(name);
        let fused = load(&dir, Int8Rewrite::Dequantize);
        let report = &fused.info().rewrites;
        let plain = Engine::load_with(
            &dir,
            Rewrites {
                fuse_layer_norm: false,
                int8: Int8Rewrite::Dequantize,
                ..Rewrites::default()
            },
        )
        .unwrap();
        // Embeddings, then two per layer (after attention, after the feed-forward).
        assert!(report.layer_norm_fused >= 5, "{name}: {report:?}");
        assert!(
            report.residual_add_fused + 1 >= report.layer_norm_fused,
            "{name}: every residual add but at most the embeddings' folded: {report:?}"
        );
        let d = logits_delta(&fused, &plain);
        assert!(d < 1e-4, "{name}: fused layer norm changed logits by {d}");
    }
}

/// Every layer's self-attention becomes one op, on both int8 paths, and the logits
/// stay those of tract running the exported subgraph.
#[test]
fn attention_fusion_keeps_outputs_and_happens() {
    for name in ["albert-token", "bert-token", "distilbert-seq"] {
        let dir = fixture(name);
        for path in [Int8Path::Native, Int8Path::Dequantize] {
            let with = |fuse_attention| {
                Engine::load_with(
                    &dir,
                    Rewrites {
                        fuse_attention,
                        ..Rewrites::for_path(path)
                    },
                )
                .unwrap()
            };
            let (fused, plain) = (with(true), with(false));
            assert_eq!(
                fused.info().rewrites.attention_fused,
                2,
                "{name}: one per layer (two layers)"
            );
            assert_eq!(plain.info().rewrites.attention_fused, 0);
            let d = logits_delta(&fused, &plain);
            assert!(
                d < 1e-4,
                "{name} {path:?}: fused attention changed logits by {d}"
            );
        }
    }
}

#[test]
fn int8_paths_agree() {
    for name in ["albert-token", "bert-token", "distilbert-seq"] {
        let dir = fixture(name);
        let deq = load(&dir, Int8Rewrite::Dequantize);
        let info = &deq.info().rewrites;
        assert_eq!(
            info.matmul_integer_dequantized, info.matmul_integer_total,
            "{name}: every MatMulInteger rewritten"
        );
        assert!(info.matmul_integer_total > 0);
        assert_eq!(deq.info().int8_path, "dequantized-at-load");

        let native = Engine::load_int8(&dir, Int8Path::Native).unwrap();
        let info = &native.info().rewrites;
        assert_eq!(
            info.matmul_integer_fused, info.matmul_integer_total,
            "{name}"
        );
        assert_eq!(
            info.bias_fused, info.matmul_integer_total,
            "{name}: every bias add folded"
        );
        assert_eq!(native.info().int8_path, "native-int8");

        let tract = load(&dir, Int8Rewrite::Keep);
        assert_eq!(tract.info().int8_path, "tract-matmul-integer");
        let per_tensor = load(
            &dir,
            Int8Rewrite::Fused {
                kernel: anotador::engine::qmatmul::KernelKind::Tract,
                range: ActivationRange::Tensor,
            },
        );

        let run = |e: &Engine| e.state().unwrap().run(&batch()).unwrap().values;
        let (deq, native, tract, per_tensor) =
            (run(&deq), run(&native), run(&tract), run(&per_tensor));
        // Quantizing activations moves logits a little; per row less than per tensor.
        let d = max_delta(&deq, &native);
        assert!(d < 1.0, "{name}: dequantized vs native int8 differ by {d}");
        let d = max_delta(&per_tensor, &tract);
        assert!(
            d < 1e-3,
            "{name}: fused per-tensor int8 vs tract's MatMulInteger differ by {d}"
        );
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
