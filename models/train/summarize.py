"""Compact the fine-tune results for the model cards: out/<task>-scores.json keeps flat headline numbers;
the per-epoch history goes to out/<task>-history.json."""
import json, sys
from common import OUT
task = sys.argv[1]
r = json.load(open(f"{OUT}/{task}-scores.json"))
if "history" in r:
    json.dump(r, open(f"{OUT}/{task}-history.json", "w"), indent=1, ensure_ascii=False)
else:
    r = json.load(open(f"{OUT}/{task}-history.json"))
pre = json.load(open(f"{OUT}/pretrain-stats.json"))
c = {}
if task == "ner":
    c["dev_entity_f1 (esp.testa, fp32)"] = round(r["dev"]["f1"], 2)
    c["dev_precision"] = round(r["dev"]["precision"], 2); c["dev_recall"] = round(r["dev"]["recall"], 2)
    c["dev_f1_per_type"] = {k: round(100 * v["f1"], 1) for k, v in r["dev"]["per_type"].items()}
elif task == "pos":
    conv = " in AnCora's conventions" if r.get("harmonized") else ""
    if "parts" in r["dev"]:   # held-out 10 % of each treebank's dev file, never trained on
        for k, v in r["dev"]["parts"].items():
            c[f"heldout_upos_accuracy_{k} (held-out 10% of {k}-dev, {v['words']} words{conv if k == 'gsd' else ''})"] = round(v["accuracy"], 2)
        c["heldout_upos_accuracy_mean (selection)"] = round(r["dev"]["accuracy"], 2)
    else:
        c["dev_upos_accuracy (5% of train sentences, selection)"] = round(r["dev"]["accuracy"], 2)
    c[f"test_upos_accuracy (es_gsd-ud-test{conv}, fp32)"] = round(r["test"]["accuracy"], 2)
    if r.get("harmonized"):
        c["gsd_tags"] = ("mapped to AnCora's conventions for training and scoring (models/train/common.py "
                         "read_conllu_harmonized: relative que PRON, como SCONJ, donde PRON, ser/haber AUX, month/day names "
                         "NOUN, capitalised nouns/adjectives inside names PROPN; 3.1 % of GSD-dev tags, 4.0 % of GSD-test)")
    if "test_native_gsd_tags" in r:
        c["test_upos_accuracy (es_gsd-ud-test, GSD's own tags, fp32)"] = round(r["test_native_gsd_tags"]["accuracy"], 2)
else:
    c["test_accuracy (splits/xed-test.tsv, fp32)"] = r["test"]["accuracy"]; c["test_macro_f1"] = r["test"]["macro_f1"]
    c["dev_accuracy"] = r["dev"]["accuracy"]; c["dev_macro_f1"] = r["dev"]["macro_f1"]
    c["majority_baseline"] = r["majority_baseline"]
    c["test_per_class_f1"] = r["test"]["per_class_f1"]
c["metric"] = r["metric"]; c["best_epoch"] = r["best_epoch"]; c["epochs_run"] = len(r["history"])
c["fine_tune_minutes (2 shared CPU cores)"] = r["total_minutes"]
arch = "ALBERT (unshared, 4 layers, hidden 256, embedding 128, 4 heads, ffn 1024, vocab 7000 cased WordPiece, max_pos 512)"
if "scratch" in r["init"]:
    kind = ("directional PPMI-SVD vectors (left and right neighbours as separate contexts)" if "scratch-dir" in r["init"]
            else "PPMI-SVD vectors")
    c["encoder"] = arch + f", encoder layers freshly initialised (seed 1234), word embeddings = {kind} from the pretraining text"
else:
    c["encoder"] = (arch + f", MLM-pretrained {pre['tokens_seen_total']/1e6:.1f}M tokens (held-out MLM loss {pre['final_eval_mlm_loss']}, "
                    "still on the unigram plateau), then word embeddings replaced by PPMI-SVD vectors")
# ner (pretrained init) and pos (fresh init) both go through local_init when it is on
if "local_init" in r["init"]:
    c["encoder"] += (", then local_init.py: embedding = 96 PCA dims of those vectors + 32 sinusoidal position dims, "
                     "layer-0 heads initialised to copy the sub-tokens at i+1, i+2, i+3, i-1 (all weights trained)")
c["training_data_licence"] = r["licence"]
c["recipe"] = f"models/train/README.md (python models/train/train.py {task})"
json.dump(c, open(f"{OUT}/{task}-scores.json", "w"), indent=1, ensure_ascii=False)
print(json.dumps(c, indent=1, ensure_ascii=False))
