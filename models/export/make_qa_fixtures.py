#!/usr/bin/env python3
"""Build the tiny random-weight extractive question-answering fixtures
tests/fixtures/{albert,bert,distilbert}-qa/.

    /work/venv/bin/python models/export/make_qa_fixtures.py            # all three
    /work/venv/bin/python models/export/make_qa_fixtures.py bert-qa    # one

Same recipe as make_fixtures.py (same corpus slice, same tiny tokenizers: WordPiece cased for
bert, uncased for distilbert, SentencePiece Unigram for albert; hidden 48, 2 layers,
max_position_embeddings 64), with {Albert,DistilBert,Bert}ForQuestionAnswering heads, exported
through export.py (task "question-answering").

Reference pipeline. transformers 5.x removed the "question-answering" pipeline
(transformers/pipelines/__init__.py REMOVED_TASKS), so the goldens come from the *unmodified*
QuestionAnsweringPipeline of the last release that has it, transformers 4.57.3
(transformers/pipelines/question_answering.py, sha256 checked below), executed on top of the
installed transformers 5.x (its ChunkPipeline, tokenizers and models). Only the module's import
header is replaced (SquadExample/SquadFeatures, also removed in 5.x, are taken verbatim from
4.57.3 transformers/data/processors/squad.py); decode_spans, select_starts_ends, preprocess,
_forward, postprocess, get_answer and get_indices run as released. The wheel is read from
$ANOTADOR_QA_REFERENCE_WHEEL or WORK/transformers-4.57.3-py3-none-any.whl, else fetched with
`pip download transformers==4.57.3 --no-deps`.

Each goldens.json case holds the pipeline output on the torch fp32 model (expected), on the
onnxruntime int8 graph (expected_int8), and every window exactly as the pipeline ran it
(input ids, mask, token types as fed to the model, offsets, sequence ids, word ids, p_mask,
fp32 start/end logits). An independent numpy re-implementation of the post-processing
(`reference_postprocess`, the semantics written down in models/export/README.md) must reproduce
every expected output from the recorded windows.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
import warnings
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make_fixtures as mf  # noqa: E402  (corpus, tokenizers, checkpoints, helpers)

FIX = mf.FIX
WORK = mf.WORK
MAXLEN = mf.MAXLEN
MAX_ATTEMPTS = int(os.environ.get("ANOTADOR_MAX_ATTEMPTS", "60"))
REF_VERSION = "4.57.3"
REF_FILES = {
    "transformers/pipelines/question_answering.py":
        "8945cab983de991b336b2f080f6efd8e8063d608b97dbb1fbb4b7ff6a87e95a5",
}

SPECS = [
    # name, arch, seed
    ("albert-qa", "albert", 41),
    ("distilbert-qa", "distilbert", 51),
    ("bert-qa", "bert", 61),
]

Q1 = "¿Dónde nació García Márquez?"
C1 = "García Márquez nació en Colombia en 1927 y murió en México."
Q2 = "¿Quién escribió el Quijote?"
C2 = "Miguel de Cervantes escribió el Quijote en Madrid en 1605."
Q3 = "¿Cuánto costó el ñandú 🦜?"
C3 = "El ñandú 🦜 de Zyzzyx costó 1.250,50 € en Łódź, según el señor Ibáñez."
Q4 = "¿Qué ciudad visitó el ministro?"
C4 = "La Comisión Europea anunció ayer en Bruselas nuevas medidas para el sector agrícola."
QL = "¿Con quién se reunió?"
CL = (
    "El presidente del Gobierno, Pedro Sánchez, se reunió el lunes en el Palacio de la Moncloa "
    "con representantes de la Comisión Europea y del Banco de España para analizar la situación "
    "económica, mientras que en Buenos Aires el ministro Sergio Massa viajaba a Washington para "
    "negociar con el Fondo Monetario Internacional."
)
# the random model is fitted so that [CLS] wins start and end on these (question, context)
# windows, so that handle_impossible_answer returns the empty answer there
NULL_PAIRS = {(Q4, C4)}


def P(top_k=1, doc_stride=None, max_answer_len=None, max_seq_len=None, handle_impossible_answer=None):
    return {"top_k": top_k, "doc_stride": doc_stride, "max_answer_len": max_answer_len,
            "max_seq_len": max_seq_len, "handle_impossible_answer": handle_impossible_answer}


CASES = [
    (Q1, C1, P(1)),
    (Q1, C1, P(3)),
    (Q2, C2, P(1)),
    (Q2, C2, P(3, max_answer_len=3)),
    (Q4, C4, P(1, handle_impossible_answer=True)),
    (Q4, C4, P(3, handle_impossible_answer=True)),
    (Q3, C3, P(1)),
    (Q3, C3, P(3)),
    (QL, CL, P(1, max_seq_len=32, doc_stride=8)),
    (QL, CL, P(3, max_seq_len=32, doc_stride=8)),
    (QL, CL, P(2, max_seq_len=32, doc_stride=8, max_answer_len=5, handle_impossible_answer=True)),
    (QL, CL, P(1)),  # defaults: max_seq_len = min(model_max_length, 384) = 64, doc_stride = 32
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- reference pipeline
def reference_wheel():
    env = os.environ.get("ANOTADOR_QA_REFERENCE_WHEEL")
    if env:
        return env
    path = os.path.join(WORK, f"transformers-{REF_VERSION}-py3-none-any.whl")
    if not os.path.exists(path):
        os.makedirs(WORK, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"transformers=={REF_VERSION}", "--no-deps",
                        "-d", WORK], check=True, stdout=sys.stderr)
    return path


def reference_sources():
    with zipfile.ZipFile(reference_wheel()) as z:
        qa = z.read("transformers/pipelines/question_answering.py").decode("utf-8")
        squad = z.read("transformers/data/processors/squad.py").decode("utf-8")
    return qa, squad


def load_reference_pipeline_class():
    """The 4.57.3 QuestionAnsweringPipeline module, import header replaced, on transformers 5.x."""
    qa, squad = reference_sources()
    digest = hashlib.sha256(qa.encode("utf-8")).hexdigest()
    want = REF_FILES["transformers/pipelines/question_answering.py"]
    if digest != want:
        raise SystemExit(f"unexpected question_answering.py sha256 {digest} (want {want})")
    body = qa[qa.index("def decode_spans("):]
    squad_classes = squad[squad.index("def _is_whitespace("):squad.index("def squad_convert_example_to_features(")]
    squad_classes += squad[squad.index("class SquadExample:"):squad.index("class SquadResult:")]
    header = (
        "import inspect\nimport types\nimport warnings\nfrom collections.abc import Iterable\n"
        "from typing import TYPE_CHECKING, Optional, Union\n\nimport numpy as np\nimport torch\n"
        "from torch.utils.data import Dataset\n"
        "ModelCard = object\n"
        "from transformers import PreTrainedTokenizerBase as PreTrainedTokenizer\n"
        "from transformers.tokenization_utils_base import BatchEncoding\n"
        "from transformers.utils import PaddingStrategy, add_end_docstrings, logging\n"
        "from transformers.pipelines.base import ArgumentHandler, ChunkPipeline, build_pipeline_init_args\n"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES\n"
        "logger = logging.get_logger(__name__)\n"
        "def squad_convert_examples_to_features(*a, **k):\n"
        "    raise NotImplementedError('slow-tokenizer path is not used')\n"
    )
    mod = types.ModuleType("anotador_reference_question_answering")
    exec(compile(header + squad_classes + body, "<transformers-4.57.3 question_answering.py>", "exec"), mod.__dict__)
    return mod


def make_pipeline(ref, model, tokenizer, record=None):
    """QuestionAnsweringPipeline(model, tokenizer) of the reference module; `record`, when a list,
    receives every window as it is run (inputs fed to the model, encoding, fp32 logits)."""
    base = ref.QuestionAnsweringPipeline

    class Pipe(base):
        framework = "pt"  # 4.57 code reads self.framework; transformers 5 is torch-only

        def __init__(self, model, tokenizer):
            ref.ChunkPipeline.__init__(self, model=model, tokenizer=tokenizer, task="question-answering", device="cpu")
            self._args_parser = ref.QuestionAnsweringArgumentHandler()

        def _forward(self, inputs):
            out = super()._forward(inputs)
            if record is not None:
                enc = inputs["encoding"]
                fed = set(self.tokenizer.model_input_names)
                record.append({
                    "input_ids": inputs["input_ids"][0].tolist(),
                    "token_type_ids": inputs["token_type_ids"][0].tolist() if "token_type_ids" in fed else None,
                    "attention_mask": inputs["attention_mask"][0].tolist(),
                    "offsets": [list(o) for o in enc.offsets],
                    "sequence_ids": list(enc.sequence_ids),
                    "word_ids": list(enc.word_ids),
                    "p_mask": [int(x) for x in inputs["p_mask"][0].tolist()],
                    "start_logits_fp32": f32list(out["start"][0]),
                    "end_logits_fp32": f32list(out["end"][0]),
                })
            return out

    return Pipe(model, tokenizer)


def f32list(t):
    """float32 values written with the shortest repr that round-trips to the same float32."""
    a = t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)
    return [float(str(np.float32(x))) for x in a.astype(np.float32)]


def call_params(params):
    return {k: v for k, v in params.items() if v is not None}


def run_pipe(pipe, question, context, params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.to_py(pipe(question=question, context=context, **call_params(params)))


# --------------------------------------------------------------------------- independent re-implementation
def reference_postprocess(windows, context, params, cls_id_positions=None):
    """The post-processing of models/export/README.md, written independently of the pipeline code,
    from the recorded windows: must reproduce `expected` exactly (scores to float32 rounding)."""
    top_k = params["top_k"] if params["top_k"] is not None else 1
    max_answer_len = params["max_answer_len"] if params["max_answer_len"] is not None else 15
    impossible = bool(params["handle_impossible_answer"])
    k_pre = top_k * 2 + 10  # align_to_words=True (default)
    min_null = 1000000.0
    answers = []
    for w in windows:
        allowed = np.array([(1 - p) & m for p, m in zip(w["p_mask"], w["attention_mask"])], dtype=bool)
        s = np.where(allowed, np.asarray(w["start_logits_fp32"], np.float32), np.float32(-10000.0)).astype(np.float32)
        e = np.where(allowed, np.asarray(w["end_logits_fp32"], np.float32), np.float32(-10000.0)).astype(np.float32)
        s = np.exp(s - s.max())
        s = s / s.sum()
        e = np.exp(e - e.max())
        e = e / e.sum()
        if impossible:
            min_null = min(min_null, float(s[0] * e[0]))
        s[0] = e[0] = 0.0
        n = len(s)
        cands = []
        for i in range(n):
            for j in range(i, min(n, i + max_answer_len)):
                cands.append((float(np.float32(s[i] * e[j])), i, j))
        # best first; among equal scores the pipeline's order is numpy's argpartition/argsort order,
        # which the fixtures avoid needing (no ties among the first k_pre candidates)
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        cands = cands[:k_pre]
        ok = set(np.nonzero(allowed)[0].tolist()) | {0}  # decode_spans' np.isin also accepts index 0
        for score, i, j in cands:
            if i not in ok or j not in ok:
                continue
            wi, wj = w["word_ids"][i], w["word_ids"][j]
            if wi is None or wj is None:
                a, b = w["offsets"][i][0], w["offsets"][j][1]
            else:
                idx = [t for t in range(n) if w["sequence_ids"][t] == 1 and w["word_ids"][t] == wi]
                jdx = [t for t in range(n) if w["sequence_ids"][t] == 1 and w["word_ids"][t] == wj]
                a, b = w["offsets"][idx[0]][0], w["offsets"][jdx[-1]][1]
            text = context[a:b]
            same = [x for x in answers if x["answer"].lower() == text.lower()]
            if same:
                same[0]["score"] += score
            else:
                answers.append({"score": score, "start": a, "end": b, "answer": text})
    if impossible:
        answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


def same_answers(a, b, rel=1e-5):
    a = a if isinstance(a, list) else [a]
    b = b if isinstance(b, list) else [b]
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if (x["answer"], x["start"], x["end"]) != (y["answer"], y["start"], y["end"]):
            return False
        if abs(x["score"] - y["score"]) > rel * max(abs(x["score"]), abs(y["score"])) + 1e-12:
            return False
    return True


# --------------------------------------------------------------------------- model
def build_qa_model(arch, vocab_size, seed):
    import torch
    from transformers import (AlbertConfig, AlbertForQuestionAnswering, BertConfig, BertForQuestionAnswering,
                              DistilBertConfig, DistilBertForQuestionAnswering)

    init = 0.02
    if arch == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=MAXLEN, type_vocab_size=2,
                         initializer_range=init, pad_token_id=0)
        cls = BertForQuestionAnswering
    elif arch == "distilbert":
        cfg = DistilBertConfig(vocab_size=vocab_size, dim=48, n_layers=2, n_heads=4, hidden_dim=96,
                               max_position_embeddings=MAXLEN, initializer_range=init, pad_token_id=0)
        cls = DistilBertForQuestionAnswering
    else:
        cfg = AlbertConfig(vocab_size=vocab_size, embedding_size=32, hidden_size=48, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=96, max_position_embeddings=MAXLEN,
                           type_vocab_size=2, initializer_range=init, hidden_act="gelu_new",
                           bos_token_id=2, eos_token_id=3, pad_token_id=0)
        cls = AlbertForQuestionAnswering
    torch.manual_seed(seed)
    return cls(cfg).eval()


def pipeline_windows(tokenizer, question, context, params):
    """The windows preprocess() builds (fast-tokenizer branch), as model-input dicts + p_mask."""
    max_seq_len = params["max_seq_len"] or min(tokenizer.model_max_length, 384)
    doc_stride = params["doc_stride"] if params["doc_stride"] is not None else min(max_seq_len // 2, 128)
    enc = tokenizer(text=question, text_pair=context, truncation="only_second", max_length=max_seq_len,
                    stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True,
                    return_offsets_mapping=True)
    out = []
    for i in range(len(enc["input_ids"])):
        d = {"input_ids": np.asarray([enc["input_ids"][i]], np.int64),
             "attention_mask": np.asarray([enc["attention_mask"][i]], np.int64)}
        if "token_type_ids" in tokenizer.model_input_names:
            d["token_type_ids"] = np.asarray([enc["token_type_ids"][i]], np.int64)
        allowed = np.array([sid == 1 for sid in enc.sequence_ids(i)])
        allowed[np.asarray(enc["input_ids"][i]) == tokenizer.cls_token_id] = True
        out.append((d, allowed))
    return out


def qa_head_inputs(model, encs):
    import torch

    feats = []
    hook = model.qa_outputs.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()[0]))
    with torch.no_grad():
        for e in encs:
            kw = {k: torch.from_numpy(v) for k, v in e.items()}
            if model.config.model_type == "distilbert":
                kw.pop("token_type_ids", None)
            model(**kw)
    hook.remove()
    return feats


def calibrate(model, tokenizer, calib, seed, margin=2.0, steps=600):
    """Re-scale and centre the random qa_outputs layer (W <- s*W, b <- -W mu + noise; logit std ~3)
    so that start/end logits vary across positions, then widen the top-1/top-2 gaps of start and
    end (over all positions and over the answerable positions) of every golden window, so that
    int8 noise does not move the argmax (as make_fixtures.py does for classifiers)."""
    import torch

    encs = []
    for i in range(0, len(calib) - 1, 2):
        e = tokenizer(calib[i], calib[i + 1], truncation="longest_first", max_length=MAXLEN, return_tensors="np")
        encs.append({k: e[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids") if k in e})
    H = torch.cat(qa_head_inputs(model, encs))
    mu = H.mean(0)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        W = torch.randn(model.qa_outputs.weight.shape, generator=g)
        z = (H - mu) @ W.T
        W *= 3.0 / z.std()
        model.qa_outputs.weight.copy_(W)
        model.qa_outputs.bias.copy_(-(W @ mu) + 0.5 * torch.randn(model.qa_outputs.bias.shape, generator=g))

    wins, null = [], []
    for q, c, p in CASES:
        ws = pipeline_windows(tokenizer, q, c, p)
        wins += ws
        null += [(q, c) in NULL_PAIRS] * len(ws)
    feats = qa_head_inputs(model, [w for w, _ in wins])
    masks = [torch.from_numpy(a) for _, a in wins]
    W = model.qa_outputs.weight.detach().clone().requires_grad_(True)
    b = model.qa_outputs.bias.detach().clone().requires_grad_(True)
    W0, b0 = W.detach().clone(), b.detach().clone()
    with torch.no_grad():
        targets = []
        for Hw, m, nl in zip(feats, masks, null):
            z = Hw @ W.T + b
            if nl:  # position 0 ([CLS]) for start and end
                targets.append((torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)))
            else:
                targets.append((z.argmax(0), z.masked_fill(~m[:, None], float("-inf")).argmax(0)))
    opt = torch.optim.Adam([W, b], lr=0.03)

    def gap(z, y, m=None):
        zz = z if m is None else z.masked_fill(~m[:, None], float("-inf"))
        top = zz.gather(0, y[None])[0]
        other = zz.scatter(0, y[None], float("-inf")).max(0).values
        return top - other

    for _ in range(steps):
        loss = 0.0
        for Hw, m, (ya, ym), nl in zip(feats, masks, targets, null):
            z = Hw @ W.T + b
            wt = 10.0 if nl else 1.0
            loss = loss + wt * (torch.relu(margin - gap(z, ya)).mean() + torch.relu(margin - gap(z, ym, m)).mean())
        loss = loss / len(feats) + 1e-3 * ((W - W0) ** 2).sum() + 1e-3 * ((b - b0) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.qa_outputs.weight.copy_(W)
        model.qa_outputs.bias.copy_(b)


def build_bundle(name, arch, vsize, s, wp, spm_bytes, lines):
    import export
    from transformers import AutoTokenizer

    ckpt = os.path.join(WORK, "ckpt", name)
    mf.write_checkpoint(ckpt, arch, wp, spm_bytes)
    tok = AutoTokenizer.from_pretrained(ckpt, use_fast=True)
    model = build_qa_model(arch, vsize, s)
    calibrate(model, tok, lines[:60], s)
    model.save_pretrained(ckpt)
    bundle = os.path.join(FIX, name)
    if os.path.exists(bundle):
        shutil.rmtree(bundle)
    fp32 = os.path.join(WORK, f"{name}.fp32.onnx")
    argv = ["--checkpoint", ckpt, "--out", bundle, "--task", "question-answering",
            "--licence", "CC0-1.0 (random weights, test fixture)",
            "--source", f"tiny random-weight twin built by models/export/make_qa_fixtures.py (seed {s})",
            "--keep-fp32", fp32]
    with contextlib.redirect_stdout(sys.stderr):
        export.main(argv)
    return ckpt, bundle, fp32


def load(ckpt):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(ckpt, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(ckpt, use_fast=True)
    return model, tok


def quick_check(ckpt, bundle):
    """int8-vs-torch argmax agreement of start and end, over all positions and over the answerable
    positions, on every window of every golden case."""
    from export import ort_qa_logits, ort_session, torch_qa_logits

    model, tok = load(ckpt)
    s8 = ort_session(os.path.join(bundle, "model.onnx"))
    agree = total = 0
    dmax = 0.0
    for q, c, p in CASES:
        for enc, allowed in pipeline_windows(tok, q, c, p):
            t = torch_qa_logits(model, enc)
            o = ort_qa_logits(s8, enc)
            for a, b in zip(t, o):
                a, b = a[0], b[0]
                dmax = max(dmax, float(np.abs(a - b).max()))
                agree += int(a.argmax() == b.argmax())
                agree += int(np.where(allowed, a, -np.inf).argmax() == np.where(allowed, b, -np.inf).argmax())
                total += 2
    return agree / total, dmax


def ort_qa_forward(sess):
    import torch
    from transformers.modeling_outputs import QuestionAnsweringModelOutput

    names = {i.name for i in sess.get_inputs()}

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, **_):
        feed = {"input_ids": input_ids.numpy().astype(np.int64),
                "attention_mask": attention_mask.numpy().astype(np.int64)}
        if "token_type_ids" in names:
            feed["token_type_ids"] = (token_type_ids.numpy().astype(np.int64) if token_type_ids is not None
                                      else np.zeros_like(feed["input_ids"]))
        s, e = sess.run(["start_logits", "end_logits"], feed)
        return QuestionAnsweringModelOutput(start_logits=torch.from_numpy(s), end_logits=torch.from_numpy(e))

    return forward


def write_goldens(path, gold):
    d = lambda x: json.dumps(x, ensure_ascii=False, separators=(",", ":"))
    head = {k: gold[k] for k in ("model", "task", "reference")}
    with open(path, "w", encoding="utf-8") as f:
        f.write(d(head)[:-1] + ',\n"cases":[\n')
        f.write(",\n".join(d(c) for c in gold["cases"]))
        f.write('\n],\n"parity":' + d(gold["parity"]) + "}\n")
    json.load(open(path, encoding="utf-8"))


def make_goldens(name, ckpt, bundle):
    from export import ort_qa_logits, ort_session

    ref = load_reference_pipeline_class()
    model, tok = load(ckpt)
    s8 = ort_session(os.path.join(bundle, "model.onnx"))
    model8, _ = load(ckpt)
    model8.forward = ort_qa_forward(s8)
    cases = []
    dstart = dend = 0.0
    agree = total = n_unk = 0
    for q, c, p in CASES:
        rec = []
        expected = run_pipe(make_pipeline(ref, model, tok, rec), q, c, p)
        expected8 = run_pipe(make_pipeline(ref, model8, tok), q, c, p)
        # the recorded windows are what preprocess() + the model produced; check them against
        # a plain tokenizer call and the int8 graph
        wins = pipeline_windows(tok, q, c, p)
        assert len(wins) == len(rec), (name, q, len(wins), len(rec))
        for w, (enc, allowed) in zip(rec, wins):
            assert w["input_ids"] == enc["input_ids"][0].tolist()
            assert [bool(1 - x) for x in w["p_mask"]] == allowed.tolist()
            n_unk += w["input_ids"].count(tok.unk_token_id)
            s8l, e8l = ort_qa_logits(s8, enc)
            for a, b in ((w["start_logits_fp32"], s8l[0]), (w["end_logits_fp32"], e8l[0])):
                a = np.asarray(a, np.float32)
                agree += int(a.argmax() == b.argmax())
                agree += int(np.where(allowed, a, -np.inf).argmax() == np.where(allowed, b, -np.inf).argmax())
                total += 2
            dstart = max(dstart, float(np.abs(np.asarray(w["start_logits_fp32"]) - s8l[0]).max()))
            dend = max(dend, float(np.abs(np.asarray(w["end_logits_fp32"]) - e8l[0]).max()))
        mine = reference_postprocess(rec, c, p)
        assert same_answers(mine, expected), (name, q, p, mine, expected)
        if p["max_seq_len"] == 32:
            assert len(rec) > 1, (name, len(rec))
        cases.append({"question": q, "context": c, "params": p, "expected": expected,
                      "expected_int8": expected8, "windows": rec})
    assert n_unk > 0, f"{name}: no window contains the unk token"
    strip = mf.strip_scores
    same = sum(1 for x in cases if strip(x["expected"]) == strip(x["expected_int8"]))
    top1 = [(x["expected"] if isinstance(x["expected"], dict) else x["expected"][0]) for x in cases]
    distinct = len({(a["answer"], a["start"]) for a in top1})
    parity = {"max_abs_dstart_logit_int8": dstart, "max_abs_dend_logit_int8": dend,
              "argmax_agreement_int8": agree / total, "argmax_checks": total,
              "windows": sum(len(x["windows"]) for x in cases), "unk_tokens_in_windows": n_unk,
              "cases_same_as_int8_ignoring_scores": same, "distinct_top1_answers": distinct}
    gold = {"model": name, "task": "question-answering",
            "reference": f"transformers {REF_VERSION} QuestionAnsweringPipeline (unmodified pre/post-processing) "
                         f"on transformers {__import__('transformers').__version__}; see models/export/README.md",
            "cases": cases, "parity": parity}
    write_goldens(os.path.join(bundle, "goldens.json"), gold)
    return parity, top1


def main():
    import torch

    torch.set_num_threads(1)
    os.makedirs(WORK, exist_ok=True)
    load_reference_pipeline_class()  # fail early
    lines = mf.corpus_lines()
    wp = {"cased": mf.train_wordpiece(lines, lowercase=False), "uncased": mf.train_wordpiece(lines, lowercase=True)}
    spm_bytes = mf.train_spm(lines)
    only = set(sys.argv[1:])
    summary = {}
    for name, arch, seed in SPECS:
        if only and name not in only:
            continue
        vsize = {"bert": len(wp["cased"]), "distilbert": len(wp["uncased"]), "albert": mf.VOCAB}[arch]
        best = None
        for attempt in range(MAX_ATTEMPTS + 1):
            s = best[1] if attempt == MAX_ATTEMPTS else seed + 100 * attempt
            ckpt, bundle, fp32 = build_bundle(name, arch, vsize, s, wp, spm_bytes, lines)
            agree, dmax = quick_check(ckpt, bundle)
            log(f"{name}: seed {s}: int8 start/end argmax agreement {agree:.4f}, max|Δ| {dmax:.3g}")
            if best is None or agree > best[0]:
                best = (agree, s)
            if agree == 1.0 or attempt == MAX_ATTEMPTS:
                break
        parity, top1 = make_goldens(name, ckpt, bundle)
        parity["seed"] = s
        log(name, json.dumps(parity, ensure_ascii=False))
        log(name, "top-1 answers:", json.dumps([a["answer"] for a in top1], ensure_ascii=False))
        size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(bundle, "*")))
        parity["bundle_bytes"] = size
        assert size < 1_000_000, (name, size)
        summary[name] = parity
    print(json.dumps(summary, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
