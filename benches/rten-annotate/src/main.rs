//! `rten-annotate MODEL_DIR < lines > labels`: token classification of each stdin
//! line with rten 0.27 (weights prepacked) and tokenizers: what `anotador annotate`
//! does for a token-classification bundle, minus the entity grouping, so that
//! benches/whole.sh can time whole processes side by side.

use std::io::{BufRead, Write};

use rten::{Model, ModelOptions};
use rten_tensor::prelude::*;
use rten_tensor::NdTensor;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: rten-annotate MODEL_DIR"));
    let mut options = ModelOptions::with_all_ops();
    options.prepack_weights(true);
    let model: Model = options.load_file(dir.join("model.onnx")).expect("model.onnx");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let labels = &config["id2label"];
    let max = config["max_position_embeddings"].as_u64().unwrap_or(512) as usize;
    let input_ids = model.node_id("input_ids").unwrap();
    let attention = model.node_id("attention_mask").unwrap();
    let token_types = model.find_node("token_type_ids");
    let output = model.output_ids()[0];
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if line.trim().is_empty() {
            continue;
        }
        let enc = tokenizer.encode(line.as_str(), true).unwrap();
        let n = enc.get_ids().len().min(max);
        let ids = NdTensor::from_data([1, n], enc.get_ids()[..n].iter().map(|&i| i as i32).collect::<Vec<_>>());
        let mask = NdTensor::from_data([1, n], vec![1i32; n]);
        let mut inputs = vec![(input_ids, ids.view().into()), (attention, mask.view().into())];
        let types = NdTensor::from_data([1, n], vec![0i32; n]);
        if let Some(t) = token_types {
            inputs.push((t, types.view().into()));
        }
        let [logits] = model.run_n(inputs, [output], None).unwrap();
        let logits: NdTensor<f32, 3> = logits.try_into().unwrap();
        let tags: Vec<&str> = (0..n)
            .map(|i| {
                let row = logits.slice((0, i));
                let best = (0..row.size(0))
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap();
                labels[best.to_string()].as_str().unwrap_or("?")
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string(&tags).unwrap()).unwrap();
    }
}
