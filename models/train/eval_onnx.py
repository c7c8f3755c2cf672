"""Score an exported bundle (model.onnx + tokenizer.json + config.json) with onnxruntime, mirroring `anotador eval`:
words joined with single spaces, tokenized, each word tagged by its FIRST sub-token.
    python eval_onnx.py BUNDLE ner|pos|emotion   -> prints and writes BUNDLE-less JSON to out/<task>-onnx-scores.json"""
import json, os, sys
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
from common import DATA, OUT, SPLITS, read_conll2002, read_conllu, entity_f1

bundle, task = os.path.abspath(sys.argv[1]), sys.argv[2]
cfg = json.load(open(f"{bundle}/config.json"))
id2label = {int(k): v for k, v in cfg["id2label"].items()}
tok = Tokenizer.from_file(f"{bundle}/tokenizer.json")
tok.no_truncation(); tok.no_padding()
so = ort.SessionOptions(); so.intra_op_num_threads = 2
sess = ort.InferenceSession(f"{bundle}/model.onnx", so, providers=["CPUExecutionProvider"])
inputs = [i.name for i in sess.get_inputs()]


def run(ids):
    feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
    if "token_type_ids" in inputs:
        feed["token_type_ids"] = np.zeros((1, len(ids)), dtype=np.int64)
    return sess.run(None, feed)[0][0]


def tag(words):
    enc = tok.encode(" ".join(words))
    ids, offs = enc.ids[:512], enc.offsets[:512]
    if len(enc.ids) > 512:
        ids[-1] = tok.token_to_id("[SEP]")
    logits = run(ids)
    char2word = []
    for wi, w in enumerate(words):
        char2word.extend([wi] * len(w)); char2word.append(-1)
    first = [None] * len(words)
    for j, (a, b) in enumerate(offs):
        if a == b or ids[j] in (2, 3):
            continue
        for c in range(a, b):
            if c < len(char2word) and char2word[c] >= 0:
                if first[char2word[c]] is None:
                    first[char2word[c]] = j
                break
    am = logits.argmax(-1)
    return [id2label[int(am[j])] if j is not None else "O" for j in first]


if task in ("ner", "pos"):
    sents = (read_conll2002(f"{DATA}/conll2002_es/esp.testa") if task == "ner"
             else read_conllu(f"{DATA}/ud_spanish/es_gsd-ud-test.conllu"))
    gold = [t for _, t in sents]; pred = [tag(w) for w, _ in sents]
    if task == "ner":
        r = entity_f1(gold, pred); res = {"split": "esp.testa", "entity_f1": 100 * r["f1"], "precision": 100 * r["precision"], "recall": 100 * r["recall"]}
    else:
        n = sum(len(g) for g in gold); c = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
        res = {"split": "es_gsd-ud-test", "upos_accuracy": 100 * c / n, "words": n}
else:
    rows = [l.rstrip("\n").split("\t") for l in open(f"{SPLITS}/xed-test.tsv", encoding="utf-8") if l.strip()]
    labels = [id2label[i] for i in range(len(id2label))]
    pred = [id2label[int(run(tok.encode(t).ids[:512]).argmax())] for t, _ in rows]
    gold = [l for _, l in rows]
    acc = 100 * sum(p == g for p, g in zip(pred, gold)) / len(gold)
    f1s = []
    for c in labels:
        tp = sum(p == c and g == c for p, g in zip(pred, gold)); fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold)); f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    res = {"split": "splits/xed-test.tsv", "accuracy": acc, "macro_f1": 100 * sum(f1s) / len(f1s), "n": len(gold)}
res["bundle"] = bundle; res["runtime"] = f"onnxruntime {ort.__version__} CPU, int8 model.onnx"
json.dump(res, open(f"{OUT}/{task}-onnx-scores.json", "w"), indent=1)
print(json.dumps(res, indent=1))
