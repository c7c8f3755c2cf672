#!/usr/bin/env python3
"""Export a Hugging Face {Bert,DistilBert,Albert}For{Token,Sequence}Classification or
{Bert,DistilBert,Albert}ForQuestionAnswering checkpoint to an anotador model bundle:

    BUNDLE/model.onnx      int8 (dynamic quantization, MatMul weights only)
    BUNDLE/tokenizer.json  HF fast tokenizer, truncation/padding disabled
    BUNDLE/config.json     HF config + "anotador" section
    BUNDLE/README.md       model card (source, labels, licence, parity, scores, command)
    BUNDLE/parity.json     PyTorch fp32 vs onnxruntime fp32/int8 on built-in Spanish samples

Example:
    python models/export/export.py --checkpoint dccuchile/bert-base-spanish-wwm-cased \
        --out bundles/beto-ner --licence "CC BY 4.0" --source "fine-tuned on CoNLL-2002"

Notes on the graph (see README in this folder):
  * The model is wrapped so that the ONNX graph takes the 2-D int64 `attention_mask`
    and builds the 4-D additive float mask itself:
        ext = (1 - mask[:, None, None, :].float()) * finfo(float32).min
    transformers >= 5 returns a 4-D mask unchanged (masking_utils._preprocess_mask_arguments),
    so its own mask construction (which tract cannot handle with symbolic shapes)
    never enters the graph. Attention is forced to the "eager" implementation.
  * Shared (ALBERT) weights are exported behind Identity nodes, which quantize_dynamic
    skips; the Identity nodes are removed before quantization.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import warnings

import numpy as np

SAMPLE_SENTENCES = [
    "El Real Madrid ganó en Sevilla ante el Betis, según informó EFE.",
    "Gabriel García Márquez nació en Aracataca (Colombia) en 1927.",
    "La Comisión Europea anunció ayer en Bruselas nuevas medidas para el sector agrícola.",
    "¿Dónde está la estación de tren más cercana?",
    "Miguel de Cervantes escribió Don Quijote de la Mancha.",
    "El Banco Central de Chile subió la tasa al 11,25 % el 14 de octubre de 2022.",
    "Me encantó la película, aunque el final fue un poco lento.",
    "La ONU y la OTAN se reunieron en Nueva York con representantes de Perú y Argentina.",
    "Según el Instituto Nacional de Estadística, el paro bajó un 3 por ciento.",
    "Pedro Sánchez viajó a Barcelona   para reunirse con la alcaldesa Ada Colau.",
]

SAMPLE_PAIRS = [
    ("El perro duerme en el sofá.", "Un animal está descansando."),
    ("La reunión se celebró en Madrid.", "La reunión tuvo lugar en Lima."),
    ("Juan compró un coche nuevo.", "Juan no tiene coche."),
    ("Llueve mucho en Santiago.", "Hace mal tiempo en Santiago."),
    ("María estudia medicina en Salamanca.", "María es estudiante universitaria."),
]

# (question, context) pairs for the parity report of question-answering models
SAMPLE_QA = [
    ("¿Dónde nació Gabriel García Márquez?",
     "Gabriel García Márquez nació en Aracataca (Colombia) en 1927 y murió en Ciudad de México en 2014."),
    ("¿Quién escribió Don Quijote de la Mancha?",
     "Miguel de Cervantes escribió Don Quijote de la Mancha, publicado en dos partes en 1605 y 1615."),
    ("¿A cuánto subió la tasa?",
     "El Banco Central de Chile subió la tasa al 11,25 % el 14 de octubre de 2022, según informó EFE."),
    ("¿Con quién se reunió Pedro Sánchez?",
     "Pedro Sánchez viajó a Barcelona para reunirse con la alcaldesa Ada Colau y con empresarios catalanes."),
    ("¿Qué anunció la Comisión Europea?",
     "La Comisión Europea anunció ayer en Bruselas nuevas medidas para el sector agrícola y pesquero."),
    ("¿Dónde se reunieron la ONU y la OTAN?",
     "La ONU y la OTAN se reunieron en Nueva York con representantes de Perú y Argentina."),
]

QA_TASK = "question-answering"

BIO_RE = re.compile(r"^(O|[BIES]-.+)$")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- model
def load_checkpoint(checkpoint, task):
    import torch
    from transformers import (AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification, AutoTokenizer)

    config = AutoConfig.from_pretrained(checkpoint)
    if task is None:
        archs = config.architectures or []
        if any(a.endswith("ForTokenClassification") for a in archs):
            task = "token-classification"
        elif any(a.endswith("ForSequenceClassification") for a in archs):
            task = "text-classification"
        elif any(a.endswith("ForQuestionAnswering") for a in archs):
            task = QA_TASK
        else:
            raise SystemExit(f"cannot infer --task from architectures={archs!r}; pass --task")
    if config.model_type not in ("bert", "distilbert", "albert"):
        log(f"warning: model_type {config.model_type!r} is untested")
    cls = {"token-classification": AutoModelForTokenClassification, "text-classification": AutoModelForSequenceClassification,
           QA_TASK: AutoModelForQuestionAnswering}[task]
    model = cls.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, use_fast=True)
    if not tokenizer.is_fast:
        raise SystemExit("no fast tokenizer could be built for this checkpoint")
    return task, config, model, tokenizer


def make_wrapper(model, has_token_type_ids, qa=False):
    import torch
    from torch import nn

    class _Wrapper(nn.Module):
        """Takes the 2-D int64 attention mask and passes a 4-D additive float mask
        (shape [batch, 1, 1, sequence]) to the HF model, which uses it as-is.
        Question-answering models return (start_logits, end_logits), each [batch, sequence]."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            ext = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            kw = dict(input_ids=input_ids, attention_mask=ext)
            if has_token_type_ids:
                kw["token_type_ids"] = token_type_ids
            out = self.m(**kw)
            if qa:
                return out.start_logits, out.end_logits
            return out.logits

    return _Wrapper(model).eval()


def export_fp32(wrapper, has_tt, path, opset, token_level, qa=False):
    import torch

    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 14, 3, 0]], dtype=torch.int64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.int64)
    names = ["input_ids", "attention_mask"]
    args = [ids, mask]
    if has_tt:
        names.append("token_type_ids")
        args.append(torch.zeros_like(ids))
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    if qa:
        outputs = ["start_logits", "end_logits"]
        for o in outputs:
            dyn[o] = {0: "batch", 1: "sequence"}
    else:
        outputs = ["logits"]
        dyn["logits"] = {0: "batch", 1: "sequence"} if token_level else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(args), path,
            input_names=names, output_names=outputs, dynamic_axes=dyn,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def remove_initializer_identities(model):
    """Point consumers of Identity(initializer) at the initializer itself and drop the Identity."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    outs = {o.name for o in g.output}
    rename = {}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outs:
            rename[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    if not rename:
        return 0
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    return len(rename)


def op_counts(model):
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def quantize(fp32_path, int8_path, weight_type):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    m = onnx.load(fp32_path)
    removed = remove_initializer_identities(m)
    del m.graph.value_info[:]
    tmp = fp32_path + ".noid.onnx"
    onnx.save(m, tmp)
    wt = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}[weight_type]
    quantize_dynamic(tmp, int8_path, op_types_to_quantize=["MatMul"], weight_type=wt)
    os.remove(tmp)
    q = onnx.load(int8_path)
    del q.graph.value_info[:]  # the Rust side ignores value_info; drop possibly conflicting shapes
    onnx.save(q, int8_path)
    total_matmul = sum(1 for n in m.graph.node if n.op_type == "MatMul")
    remaining = sum(1 for n in q.graph.node if n.op_type == "MatMul")
    quantized = sum(1 for n in q.graph.node if n.op_type == "MatMulInteger")
    return {"identity_removed": removed, "matmul_total": total_matmul,
            "matmul_quantized": quantized, "matmul_fp32_remaining": remaining}


# --------------------------------------------------------------------------- parity
def ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_logits(sess, enc):
    names = {i.name for i in sess.get_inputs()}
    feed = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feed:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    return sess.run(["logits"], feed)[0]


def torch_logits(model, enc):
    import torch

    names = ["input_ids", "attention_mask", "token_type_ids"]
    kw = {k: torch.tensor(np.asarray(v, dtype=np.int64)) for k, v in enc.items() if k in names}
    if model.config.model_type == "distilbert":
        kw.pop("token_type_ids", None)
    with torch.no_grad():
        return model(**kw).logits.numpy()


def encode(tokenizer, text, pair=None):
    enc = tokenizer(text, pair, truncation=True, max_length=tokenizer_max_len(tokenizer), return_tensors="np")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def tokenizer_max_len(tokenizer):
    ml = tokenizer.model_max_length
    return ml if ml and ml < 100000 else 512


def parity_report(task, model, tokenizer, fp32_path, int8_path):
    s32, s8 = ort_session(fp32_path), ort_session(int8_path)
    inputs = [(t, None) for t in SAMPLE_SENTENCES]
    if task == "text-classification":
        inputs += list(SAMPLE_PAIRS)
    rows = []
    d32 = d8 = 0.0
    agree8 = agree32 = total = 0
    singles = []
    for text, pair in inputs:
        enc = encode(tokenizer, text, pair)
        lt = torch_logits(model, enc)
        l32 = ort_logits(s32, enc)
        l8 = ort_logits(s8, enc)
        singles.append((enc, l8))
        if task == "token-classification":
            lt, l32, l8 = lt[0, 1:-1], l32[0, 1:-1], l8[0, 1:-1]  # score real tokens only
        a8 = int((lt.argmax(-1) == l8.argmax(-1)).sum())
        a32 = int((lt.argmax(-1) == l32.argmax(-1)).sum())
        n = int(np.prod(lt.shape[:-1]))
        md32 = float(np.abs(lt - l32).max())
        md8 = float(np.abs(lt - l8).max())
        d32, d8 = max(d32, md32), max(d8, md8)
        agree8 += a8
        agree32 += a32
        total += n
        rows.append({"text": text, "text_pair": pair, "n": n, "max_abs_dlogit_ort_fp32": md32,
                     "max_abs_dlogit_ort_int8": md8, "argmax_agree_int8": a8})
    # padded batch through the int8 graph must equal the unpadded single runs
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    L = max(e["input_ids"].shape[1] for e, _ in singles)
    batch = {k: np.stack([np.pad(e[k][0], (0, L - e[k].shape[1]),
                                 constant_values=(pad_id if k == "input_ids" else 0)) for e, _ in singles])
             for k in singles[0][0]}
    lb = ort_logits(s8, batch)
    lb32 = ort_logits(s32, batch)
    pad_diff = pad_diff32 = 0.0
    for i, (e, l8) in enumerate(singles):
        n = e["input_ids"].shape[1]
        got = lb[i, :n] if task == "token-classification" else lb[i]
        pad_diff = max(pad_diff, float(np.abs(got - l8[0]).max()))
        got32 = lb32[i, :n] if task == "token-classification" else lb32[i]
        pad_diff32 = max(pad_diff32, float(np.abs(got32 - ort_logits(s32, e)[0]).max()))
    return {
        "unit": "tokens (special tokens excluded)" if task == "token-classification" else "sequences",
        "n_inputs": len(inputs),
        "n_scored": total,
        "max_abs_dlogit_ort_fp32_vs_torch": d32,
        "argmax_agreement_ort_fp32_pct": 100.0 * agree32 / total,
        "max_abs_dlogit_ort_int8_vs_torch": d8,
        "argmax_agreement_ort_int8_pct": 100.0 * agree8 / total,
        "padded_batch_vs_single_max_abs_diff_fp32": pad_diff32,
        "padded_batch_vs_single_max_abs_diff_int8": pad_diff,
        "rows": rows,
    }


def ort_feed(sess, enc):
    names = {i.name for i in sess.get_inputs()}
    feed = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feed:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    return feed


def ort_qa_logits(sess, enc):
    """(start_logits, end_logits), each [batch, sequence]."""
    s, e = sess.run(["start_logits", "end_logits"], ort_feed(sess, enc))
    return s, e


def torch_qa_logits(model, enc):
    import torch

    names = ["input_ids", "attention_mask", "token_type_ids"]
    kw = {k: torch.tensor(np.asarray(v, dtype=np.int64)) for k, v in enc.items() if k in names}
    if model.config.model_type == "distilbert":
        kw.pop("token_type_ids", None)
    with torch.no_grad():
        out = model(**kw)
    return out.start_logits.numpy(), out.end_logits.numpy()


def encode_qa(tokenizer, question, context):
    """Question first, context second, as the question-answering pipeline tokenizes a window."""
    enc = tokenizer(question, context, truncation="only_second", max_length=tokenizer_max_len(tokenizer),
                    return_tensors="np")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def parity_report_qa(model, tokenizer, fp32_path, int8_path):
    """start/end logits of PyTorch fp32 vs onnxruntime fp32/int8 on SAMPLE_QA; every position of
    the (unpadded) sequence is compared; argmax agreement counts start and end separately."""
    s32, s8 = ort_session(fp32_path), ort_session(int8_path)
    rows = []
    dmax = {("fp32", "start"): 0.0, ("fp32", "end"): 0.0, ("int8", "start"): 0.0, ("int8", "end"): 0.0}
    agree = {"fp32": 0, "int8": 0}
    total = 0
    singles = []
    for question, context in SAMPLE_QA:
        enc = encode_qa(tokenizer, question, context)
        ts, te = torch_qa_logits(model, enc)
        o32 = ort_qa_logits(s32, enc)
        o8 = ort_qa_logits(s8, enc)
        singles.append((enc, o32, o8))
        row = {"question": question, "context": context, "n": int(ts.shape[1])}
        for kind, (os_, oe) in (("fp32", o32), ("int8", o8)):
            ds, de = float(np.abs(ts - os_).max()), float(np.abs(te - oe).max())
            dmax[(kind, "start")] = max(dmax[(kind, "start")], ds)
            dmax[(kind, "end")] = max(dmax[(kind, "end")], de)
            a = int(ts.argmax(-1)[0] == os_.argmax(-1)[0]) + int(te.argmax(-1)[0] == oe.argmax(-1)[0])
            agree[kind] += a
            row[f"max_abs_dstart_ort_{kind}"] = ds
            row[f"max_abs_dend_ort_{kind}"] = de
            row[f"argmax_agree_{kind}"] = a
        row["argmax_start_end_torch"] = [int(ts.argmax(-1)[0]), int(te.argmax(-1)[0])]
        total += 2
        rows.append(row)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    L = max(e["input_ids"].shape[1] for e, _, _ in singles)
    batch = {k: np.stack([np.pad(e[k][0], (0, L - e[k].shape[1]),
                                 constant_values=(pad_id if k == "input_ids" else 0)) for e, _, _ in singles])
             for k in singles[0][0]}
    pad = {}
    for kind, sess, idx in (("fp32", s32, 1), ("int8", s8, 2)):
        bs, be = ort_qa_logits(sess, batch)
        d = 0.0
        for i, single in enumerate(singles):
            n = single[0]["input_ids"].shape[1]
            d = max(d, float(np.abs(bs[i, :n] - single[idx][0][0]).max()), float(np.abs(be[i, :n] - single[idx][1][0]).max()))
        pad[kind] = d
    return {
        "unit": "start and end argmax per (question, context) pair",
        "n_inputs": len(SAMPLE_QA),
        "n_scored": total,
        "max_abs_dstart_ort_fp32_vs_torch": dmax[("fp32", "start")],
        "max_abs_dend_ort_fp32_vs_torch": dmax[("fp32", "end")],
        "max_abs_dlogit_ort_fp32_vs_torch": max(dmax[("fp32", "start")], dmax[("fp32", "end")]),
        "argmax_agreement_ort_fp32_pct": 100.0 * agree["fp32"] / total,
        "max_abs_dstart_ort_int8_vs_torch": dmax[("int8", "start")],
        "max_abs_dend_ort_int8_vs_torch": dmax[("int8", "end")],
        "max_abs_dlogit_ort_int8_vs_torch": max(dmax[("int8", "start")], dmax[("int8", "end")]),
        "argmax_agreement_ort_int8_pct": 100.0 * agree["int8"] / total,
        "padded_batch_vs_single_max_abs_diff_fp32": pad["fp32"],
        "padded_batch_vs_single_max_abs_diff_int8": pad["int8"],
        "rows": rows,
    }


# --------------------------------------------------------------------------- bundle
def default_aggregation(task, labels):
    if task != "token-classification":
        return None
    if all(BIO_RE.match(l) for l in labels) and any(l.startswith(("B-", "I-")) for l in labels):
        return "simple"
    return "none"


def write_config(out, model, tokenizer, task, aggregation, has_tt):
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    ml = min(tokenizer_max_len(tokenizer), int(cfg.get("max_position_embeddings") or 512))
    dlc = getattr(tokenizer, "do_lower_case", None)
    cfg["anotador"] = {
        "task": task,
        "aggregation_strategy": aggregation,
        "has_token_type_ids": has_tt,
        # transformers 5 tokenizers of some families (ALBERT) return no token_type_ids:
        # the pipeline then feeds zeros, and anotador does the same to match it.
        "token_type_ids_from_tokenizer": bool(has_tt and "token_type_ids" in getattr(tokenizer, "model_input_names", [])),
        "do_lower_case": dlc if isinstance(dlc, bool) else None,
        "max_length": ml,
    }
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    return cfg


def write_tokenizer(out, tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    path = os.path.join(out, "tokenizer.json")
    tok.save(path, pretty=True)
    return path


def check_tokenizer_json(path, tokenizer, extra_pairs=()):
    """The raw tokenizer.json must reproduce what transformers' tokenizer does."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(path)
    bad = []
    for text, pair in [(t, None) for t in SAMPLE_SENTENCES] + list(SAMPLE_PAIRS) + list(extra_pairs):
        hf = tokenizer(text, pair, return_offsets_mapping=True)
        r = raw.encode(text, pair) if pair else raw.encode(text)
        if hf["input_ids"] != r.ids or [tuple(o) for o in hf["offset_mapping"]] != [tuple(o) for o in r.offsets]:
            bad.append(text)
    if bad:
        raise SystemExit(f"tokenizer.json does not reproduce the HF tokenizer on: {bad}")


def fmt(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def write_card(out, args, task, cfg, parity, qinfo, scores, opset, command):
    a = cfg["anotador"]
    labels = [cfg["id2label"][k] for k in sorted(cfg["id2label"], key=int)]
    L = []
    L.append(f"# anotador bundle: {os.path.basename(os.path.abspath(out))}\n")
    L.append("| | |\n|---|---|")
    L.append(f"| Source checkpoint | `{args.checkpoint}` |")
    if args.source:
        L.append(f"| Source / provenance | {args.source} |")
    L.append(f"| Architecture | {cfg.get('model_type')} ({', '.join(cfg.get('architectures') or [])}) |")
    L.append(f"| Task | {task} |")
    if cfg.get("problem_type"):
        L.append(f"| Problem type | {cfg['problem_type']} |")
    L.append(f"| Default aggregation | {a['aggregation_strategy']} |")
    L.append(f"| Max length (tokens) | {a['max_length']} |")
    L.append(f"| Lower-cased input | {a['do_lower_case']} |")
    L.append(f"| Licence | {args.licence or 'unspecified'} |")
    L.append("")
    if task == QA_TASK:
        L.append("## Outputs\n")
        L.append("Extractive question answering: `start_logits` and `end_logits` `[batch, sequence]` "
                 "(question first, context second; see models/export/README.md for the pipeline semantics).")
    else:
        L.append(f"## Labels ({len(labels)})\n")
        L.append(", ".join(f"`{l}`" for l in labels))
    L.append("")
    L.append("## Quantization\n")
    L.append(f"ONNX opset {opset}; onnxruntime `quantize_dynamic`, weight type {args.weight_type}, "
             f"op types `MatMul` only (embedding Gathers stay fp32). "
             f"MatMuls quantized: {qinfo['matmul_quantized']} of {qinfo['matmul_total']} "
             f"(shared-weight Identity nodes removed first: {qinfo['identity_removed']}). "
             "Inputs: int64 `input_ids`, `attention_mask`"
             + (", `token_type_ids`" if a["has_token_type_ids"] else "")
             + " `[batch, sequence]`; "
             + ("outputs `start_logits`, `end_logits`." if task == QA_TASK else "output `logits`."))
    L.append("")
    L.append("## Parity (PyTorch fp32 vs onnxruntime)\n")
    L.append(f"{parity['n_inputs']} built-in Spanish samples, {parity['n_scored']} {parity['unit']}.\n")
    if task == QA_TASK:
        L.append("| Comparison | max abs Δstart_logit | max abs Δend_logit | start/end argmax agreement |\n|---|---|---|---|")
        for kind in ("fp32", "int8"):
            L.append(f"| ONNX {kind} vs PyTorch | {fmt(parity[f'max_abs_dstart_ort_{kind}_vs_torch'])} | "
                     f"{fmt(parity[f'max_abs_dend_ort_{kind}_vs_torch'])} | "
                     f"{parity[f'argmax_agreement_ort_{kind}_pct']:.2f} % |")
    else:
        L.append("| Comparison | max abs Δlogit | argmax agreement |\n|---|---|---|")
        L.append(f"| ONNX fp32 vs PyTorch | {fmt(parity['max_abs_dlogit_ort_fp32_vs_torch'])} | "
                 f"{parity['argmax_agreement_ort_fp32_pct']:.2f} % |")
        L.append(f"| ONNX int8 vs PyTorch | {fmt(parity['max_abs_dlogit_ort_int8_vs_torch'])} | "
                 f"{parity['argmax_agreement_ort_int8_pct']:.2f} % |")
    L.append(f"\nPadded batch vs single runs: max abs diff fp32 {fmt(parity['padded_batch_vs_single_max_abs_diff_fp32'])}, "
             f"int8 {fmt(parity['padded_batch_vs_single_max_abs_diff_int8'])} (int8 differs because "
             "DynamicQuantizeLinear picks one activation scale per tensor, i.e. per batch).")
    L.append("")
    L.append("## Measured scores\n")
    if scores:
        L.append("| Metric | Value |\n|---|---|")
        for k, v in (scores.items() if isinstance(scores, dict) else []):
            L.append(f"| {k} | {fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v, ensure_ascii=False)} |")
    else:
        L.append("Not provided.")
    L.append("")
    L.append("## Reproduce\n")
    L.append("```\n" + command + "\n```\n")
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint folder or hub id")
    ap.add_argument("--out", required=True, help="bundle folder to create")
    ap.add_argument("--task", choices=["token-classification", "text-classification", QA_TASK])
    ap.add_argument("--aggregation", choices=["simple", "first", "average", "max", "none"],
                    help="default aggregation strategy written to config.json (token models)")
    ap.add_argument("--licence", default=None)
    ap.add_argument("--source", default=None)
    ap.add_argument("--scores-json", default=None)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--weight-type", choices=["QInt8", "QUInt8"], default="QInt8")
    ap.add_argument("--keep-fp32", default=None, metavar="PATH", help="also keep the fp32 ONNX at PATH")
    args = ap.parse_args(argv)
    command = "python models/export/export.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)

    task, _, model, tokenizer = load_checkpoint(args.checkpoint, args.task)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    has_tt = model.config.model_type != "distilbert"
    aggregation = args.aggregation or default_aggregation(task, labels)
    if task != "token-classification":
        aggregation = None

    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        fp32 = os.path.join(td, "model.fp32.onnx")
        qa = task == QA_TASK
        export_fp32(make_wrapper(model, has_tt, qa=qa), has_tt, fp32, args.opset, task == "token-classification", qa=qa)
        import onnx
        m32 = onnx.load(fp32)
        ops32 = op_counts(m32)
        if "Flatten" in ops32:
            log("warning: fp32 graph contains Flatten (mask construction leaked into the graph?)")
        int8 = os.path.join(args.out, "model.onnx")
        qinfo = quantize(fp32, int8, args.weight_type)
        parity = (parity_report_qa(model, tokenizer, fp32, int8) if qa
                  else parity_report(task, model, tokenizer, fp32, int8))
        if args.keep_fp32:
            shutil.copyfile(fp32, args.keep_fp32)
    q = onnx.load(int8)
    tok_path = write_tokenizer(args.out, tokenizer)
    check_tokenizer_json(tok_path, tokenizer, SAMPLE_QA if task == QA_TASK else ())
    cfg = write_config(args.out, model, tokenizer, task, aggregation, has_tt)
    scores = None
    if args.scores_json:
        with open(args.scores_json, encoding="utf-8") as f:
            scores = json.load(f)
    report = {
        "checkpoint": args.checkpoint,
        "task": task,
        "opset": args.opset,
        "weight_type": args.weight_type,
        "quantization": qinfo,
        "inputs": [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in q.graph.input],
        "outputs": [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in q.graph.output],
        "op_types_fp32": ops32,
        "op_types_int8": op_counts(q),
        "parity": parity,
        "command": command,
    }
    with open(os.path.join(args.out, "parity.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    write_card(args.out, args, task, cfg, parity, qinfo, scores, args.opset, command)

    print(f"bundle: {args.out}  task={task}  model_type={cfg['model_type']}"
          + ("" if task == QA_TASK else f"  labels={len(labels)}"))
    print(f"MatMul quantized: {qinfo['matmul_quantized']}/{qinfo['matmul_total']} "
          f"(Identity removed: {qinfo['identity_removed']})")
    if task == QA_TASK:
        for kind in ("fp32", "int8"):
            print(f"ONNX {kind} vs torch: max|Δstart|={parity[f'max_abs_dstart_ort_{kind}_vs_torch']:.3g} "
                  f"max|Δend|={parity[f'max_abs_dend_ort_{kind}_vs_torch']:.3g} "
                  f"start/end argmax={parity[f'argmax_agreement_ort_{kind}_pct']:.2f}%")
        print(f"padded-batch diff fp32={parity['padded_batch_vs_single_max_abs_diff_fp32']:.3g} "
              f"int8={parity['padded_batch_vs_single_max_abs_diff_int8']:.3g}")
        print(f"int8 ops: {report['op_types_int8']}")
        return report
    print(f"ONNX fp32 vs torch: max|Δlogit|={parity['max_abs_dlogit_ort_fp32_vs_torch']:.3g} "
          f"argmax={parity['argmax_agreement_ort_fp32_pct']:.2f}%")
    print(f"ONNX int8 vs torch: max|Δlogit|={parity['max_abs_dlogit_ort_int8_vs_torch']:.3g} "
          f"argmax={parity['argmax_agreement_ort_int8_pct']:.2f}%  "
          f"padded-batch diff fp32={parity['padded_batch_vs_single_max_abs_diff_fp32']:.3g} "
          f"int8={parity['padded_batch_vs_single_max_abs_diff_int8']:.3g}")
    print(f"int8 ops: {report['op_types_int8']}")
    return report


if __name__ == "__main__":
    main()
