#!/usr/bin/env python3
"""Full-size seed-family configs with random (seeded) weights -> anotador bundles.

Builds Hugging Face checkpoints of the published architectures of the seed families
(ALBETO tiny/base, DistilBETO, BETO cased) with random weights and a WordPiece
tokenizer of the right vocabulary size, then exports each with export.py. The bundles
are for measuring size / load time / peak RSS / inference speed only: the weights are
random, so the predictions are meaningless. Results: models/SEED_CONFIGS.md.

    python models/export/seed_configs.py                      # all four
    python models/export/seed_configs.py albeto-tiny beto-cased
    python models/export/seed_configs.py --out /tmp/seed-bundles --work /tmp/seed-ckpt
    python models/export/seed_configs.py --qa albeto-tiny     # *ForQuestionAnswering twin -> <name>-qa

Checkpoints go to --work (default /tmp/seed-ckpt/<name>), bundles to --out
(default /tmp/seed-bundles/<name>); neither belongs in the repository.

Tokenizer: vocab.txt = [PAD] [UNK] [CLS] [SEP] [MASK], the characters of the corpus and
their "##" forms, the most frequent words of CoNLL-2002 es train (ties: first occurrence),
"##" suffixes of those words, then "[unusedN]" up to the vocabulary size; wrapped as
BertTokenizerFast (cased, accents kept) for every family, ALBERT included. The tokenizer
does not affect size or speed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DATA = os.environ.get("ANOTADOR_DATA", "/work/shared/data")
SEED = 1234
MAXLEN = 512
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

# Published configs (only the fields that differ from the transformers defaults matter
# for size/speed; all are spelled out for clarity).
CONFIGS = {
    "albeto-tiny": dict(
        arch="albert", vocab_size=31000, embedding_size=128, hidden_size=312, num_hidden_layers=4,
        num_attention_heads=12, intermediate_size=1248, max_position_embeddings=512,
        hidden_act="gelu_new", num_hidden_groups=1, inner_group_num=1, type_vocab_size=2),
    "albeto-base": dict(
        arch="albert", vocab_size=31000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
        hidden_act="gelu_new", num_hidden_groups=1, inner_group_num=1, type_vocab_size=2),
    "distilbeto": dict(
        arch="distilbert", vocab_size=31002, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
        max_position_embeddings=512, activation="gelu"),
    "beto-cased": dict(
        arch="bert", vocab_size=31002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, hidden_act="gelu", type_vocab_size=2),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def corpus_words():
    """Words of CoNLL-2002 es train (UTF-8), in file order."""
    with open(os.path.join(DATA, "conll2002_es", "esp.train"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("-DOCSTART-"):
                yield line.split(" ")[0]


def build_vocab(size):
    words = list(corpus_words())
    counts = collections.Counter(words)
    first = {}
    for i, w in enumerate(words):
        first.setdefault(w, i)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen = set(vocab)

    def add(t):
        if t not in seen and len(vocab) < size:
            seen.add(t)
            vocab.append(t)

    chars = sorted({c for w in counts for c in w})
    for c in chars:
        add(c)
    for c in chars:
        if c.isalnum():
            add("##" + c)
    # BertPreTokenizer splits punctuation off words; keep only punctuation-free words
    ranked = sorted(counts, key=lambda w: (-counts[w], first[w]))
    budget = int(size * 0.8)
    for w in ranked:
        if len(vocab) >= budget:
            break
        if all(c.isalnum() for c in w):
            add(w)
    suffixes = collections.Counter()
    for w in ranked:
        if all(c.isalnum() for c in w) and len(w) > 3:
            for k in (2, 3, 4):
                suffixes["##" + w[-k:]] += counts[w]
    for s, _ in sorted(suffixes.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size - 100:
            break
        add(s)
    n = 0
    while len(vocab) < size:
        add(f"[unused{n}]")
        n += 1
    assert len(vocab) == size == len(set(vocab))
    return vocab


def build_model(spec, qa=False):
    import torch
    import transformers
    from transformers import AlbertConfig, BertConfig, DistilBertConfig

    spec = dict(spec)
    arch = spec.pop("arch")
    head = "ForQuestionAnswering" if qa else "ForTokenClassification"
    common = dict(pad_token_id=0)
    if not qa:
        common.update(id2label=dict(enumerate(NER_LABELS)), label2id={l: i for i, l in enumerate(NER_LABELS)})
    if arch == "bert":
        cfg, cls = BertConfig(**spec, **common), getattr(transformers, "Bert" + head)
    elif arch == "distilbert":
        cfg, cls = DistilBertConfig(**spec, **common), getattr(transformers, "DistilBert" + head)
    else:
        cfg, cls = (AlbertConfig(**spec, bos_token_id=2, eos_token_id=3, **common),
                    getattr(transformers, "Albert" + head))
    torch.manual_seed(SEED)
    model = cls(cfg).eval()
    return model


def write_checkpoint(name, ckpt, qa=False):
    from transformers import BertTokenizerFast

    spec = CONFIGS[name]
    if os.path.exists(ckpt):
        shutil.rmtree(ckpt)
    os.makedirs(ckpt)
    vocab = build_vocab(spec["vocab_size"])
    vpath = os.path.join(ckpt, "vocab.txt")
    with open(vpath, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False,
                            strip_accents=False, model_max_length=MAXLEN)
    assert len(tok) == spec["vocab_size"], (len(tok), spec["vocab_size"])
    tok.save_pretrained(ckpt)
    model = build_model(spec, qa)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(ckpt)
    del model
    return n_params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=list(CONFIGS), help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--out", default="/tmp/seed-bundles", help="bundles go to OUT/<name>")
    ap.add_argument("--work", default="/tmp/seed-ckpt", help="checkpoints go to WORK/<name>")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--qa", action="store_true",
                    help="*ForQuestionAnswering heads instead of token classification (bundle name <name>-qa)")
    args = ap.parse_args(argv)
    for n in args.names:
        if n not in CONFIGS:
            ap.error(f"unknown config {n!r}; known: {list(CONFIGS)}")

    import torch
    torch.set_num_threads(1)

    summary = {}
    for name in args.names:
        suffix = "-qa" if args.qa else ""
        ckpt = os.path.join(args.work, name + suffix)
        out = os.path.join(args.out, name + suffix)
        t0 = time.time()
        log(f"== {name}: building checkpoint in {ckpt}")
        n_params = write_checkpoint(name, ckpt, args.qa)
        log(f"   {n_params:,} parameters ({time.time() - t0:.0f} s)")
        if os.path.exists(out):
            shutil.rmtree(out)
        cmd = [sys.executable, os.path.join(HERE, "export.py"), "--checkpoint", ckpt, "--out", out,
               "--source", f"random weights (seed {SEED}), published {name} config; models/export/seed_configs.py",
               "--licence", "n/a (random weights, not for use)"]
        log("   " + " ".join(cmd))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env)
        size = os.path.getsize(os.path.join(out, "model.onnx"))
        summary[name] = {"params": n_params, "model_onnx_bytes": size,
                         "fp32_equivalent_bytes": 4 * n_params, "export_s": round(time.time() - t0, 1)}
        with open(os.path.join(out, "seed_config.json"), "w") as f:
            json.dump({"name": name, "config": CONFIGS[name], "seed": SEED, **summary[name]}, f, indent=2)
            f.write("\n")
        log(f"   model.onnx {size / 1e6:.1f} MB; done in {time.time() - t0:.0f} s")
        if not args.keep_checkpoints:
            shutil.rmtree(ckpt)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
