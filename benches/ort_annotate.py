"""onnxruntime side of benches/whole.sh: `python ort_annotate.py MODEL_DIR < lines > labels`.

Token classification of each stdin line with onnxruntime (int8 model.onnx as exported, one
intra-op thread, all graph optimizations) and tokenizers (the Rust library's Python wheel):
what `anotador annotate` does for a token-classification bundle, minus the entity grouping.
Needs onnxruntime, numpy and tokenizers (models/requirements.txt).
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main():
    d = sys.argv[1]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(os.path.join(d, "model.onnx"), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    config = json.load(open(os.path.join(d, "config.json")))
    labels = config["id2label"]
    limit = config.get("max_position_embeddings", 512)
    out = sys.stdout
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        ids = tok.encode(line).ids[:limit]
        n = len(ids)
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "token_type_ids": np.zeros((1, n), dtype=np.int64),
        }
        logits = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        tags = [labels[str(i)] for i in logits[0].argmax(-1)]
        out.write(json.dumps(tags, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
