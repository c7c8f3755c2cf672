"""Build out/ner-final-cont-scores.json (flat, card format) + out/ner-final-cont-history.json."""
import os, sys, json
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
os.environ["INIT"] = f"{OUT}/ner-final-cont"; os.environ.setdefault("THREADS", "2")
sys.argv = ["finetune.py", "ner"]; sys.path.insert(0, HERE)
import torch
import finetune as ft
from transformers import AlbertForTokenClassification
torch.set_num_threads(2)
labels = ft.NER_LABELS; label2id = {l: i for i, l in enumerate(labels)}; id2label = dict(enumerate(labels))
dv = ft.encode_tagged(ft.read_conll2002(f"{ft.DATA}/conll2002_es/esp.testa"), label2id)
model = AlbertForTokenClassification.from_pretrained(os.environ["INIT"])
sc, det = ft.score_tags("ner", dv, ft.predict_tags(model, dv, id2label))
old = json.load(open(f"{OUT}/ner-history.json")); raw = json.load(open(f"{OUT}/ner-final-cont-raw.json"))
oldflat = json.load(open(f"{OUT}/ner-scores.json"))
hist = old["history"] + raw["history"]
full = {"best_epoch": raw["best_epoch"], "dev": det, "history": hist, "metric": old["metric"], "dev_split": old.get("dev_split"),
        "licence": old["licence"], "init": "out/ner-final (continued)", "seed": old["seed"],
        "total_minutes": round(old["total_minutes"] + raw["minutes"], 1),
        "note": "continued from ner-final: epochs 1-5 = the original run (out/ner-history.json); epochs 6+ = continuation "
                "(out/continue_ner.py): fresh AdamW, 20-step ramp, then the original linear-decay schedule from step 5*129 "
                "(lr 4.53e-4 -> ...), same batches/seed stream"}
json.dump(full, open(f"{OUT}/ner-final-cont-history.json", "w"), indent=1, ensure_ascii=False)
c = {"dev_entity_f1 (esp.testa, fp32)": round(det["f1"], 2), "dev_precision": round(det["precision"], 2),
     "dev_recall": round(det["recall"], 2),
     "dev_f1_per_type": {k: round(100 * v["f1"], 1) for k, v in det["per_type"].items()},
     "metric": old["metric"], "best_epoch": raw["best_epoch"], "epochs_run": len(hist),
     "dev_f1_per_epoch": {str(h["epoch"]): h["dev"] for h in hist},
     "fine_tune_minutes (2 shared CPU cores)": full["total_minutes"],
     "encoder": oldflat["encoder"], "training_data_licence": oldflat["training_data_licence"],
     "note": "continued from ner-final (epochs 1-5 original run, 6+ continued fine-tuning, best epoch kept)",
     "recipe": "models/train/README.md (python models/train/train.py ner, then the continuation)"}
json.dump(c, open(f"{OUT}/ner-final-cont-scores.json", "w"), indent=1, ensure_ascii=False)
print(json.dumps(c, indent=1, ensure_ascii=False))
