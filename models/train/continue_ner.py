"""Continue NER fine-tuning from out/ner-final (scratch script; see README 'continuation')."""
import os, sys, json, time, random, datetime
os.environ.setdefault("INIT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "ner-final"))
os.environ.setdefault("THREADS", "2")
sys.argv = ["finetune.py", "ner"]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, torch.nn.functional as F
import finetune as ft
from transformers import AlbertForTokenClassification
torch.set_num_threads(2)
DEADLINE = datetime.datetime.fromisoformat(os.environ["DEADLINE"])  # UTC, e.g. 2026-11-26T07:42:00+00:00
NAME = os.environ.get("NAME", "ner-final-cont")
MAX_EP = int(os.environ.get("MORE_EPOCHS", 7))
OUT = ft.OUT; INIT = os.environ["INIT"]
# original schedule: 12 epochs, peak 7e-4, 10% warmup, linear decay to 0; we sit at step 5*nb and keep following it
ORIG_EP, ORIG_LR, DONE_EP = 12, 7e-4, 5
REWARM = int(os.environ.get("REWARM", 20))   # short ramp so the fresh AdamW moments settle (no peak-LR restart)
labels = ft.NER_LABELS
label2id = {l: i for i, l in enumerate(labels)}; id2label = {i: l for i, l in enumerate(labels)}
tr = ft.encode_tagged(ft.read_conll2002(f"{ft.DATA}/conll2002_es/esp.train"), label2id)
dv = ft.encode_tagged(ft.read_conll2002(f"{ft.DATA}/conll2002_es/esp.testa"), label2id)
model = AlbertForTokenClassification.from_pretrained(INIT, num_labels=len(labels), id2label=id2label, label2id=label2id,
                                                     hidden_dropout_prob=0.1, classifier_dropout_prob=0.1)
lens = [len(e[0]) for e in tr]
nb = len(ft.batches_by_len(tr, lens, ft.TOK_BUDGET, False, None))
total = nb * ORIG_EP; warm = max(1, int(total * 0.1))
rng = random.Random(ft.SEED)
for _ in range(DONE_EP):   # advance the shuffle RNG to where the original run stopped
    ft.batches_by_len(tr, lens, ft.TOK_BUDGET, True, rng)
def lr_at(step):
    base = ORIG_LR * max(0.0, (total - step) / max(1, total - warm))
    return base
opt = ft.make_opt(model, lr_at(DONE_EP * nb))
sc0, _ = ft.score_tags("ner", dv, ft.predict_tags(model, dv, id2label))
print(json.dumps({"start_dev": round(sc0, 2), "nb": nb, "lr_start": lr_at(DONE_EP * nb)}), flush=True)
best, best_ep, hist, step, t0 = sc0, DONE_EP, [], DONE_EP * nb, time.time()
last_ep_s = None
model.train()
for k in range(MAX_EP):
    now = datetime.datetime.now(datetime.timezone.utc)
    if last_ep_s is not None and now + datetime.timedelta(seconds=1.15 * last_ep_s) > DEADLINE:
        print(f"stop: next epoch (~{last_ep_s/60:.1f} min) would not finish by {DEADLINE}", flush=True); break
    te0 = time.time(); tl = tn = 0; aborted = False
    for i, b in enumerate(ft.batches_by_len(tr, lens, ft.TOK_BUDGET, True, rng)):
        lr = lr_at(step) * (min(1.0, (i + 1) / REWARM) if k == 0 else 1.0)
        for g in opt.param_groups: g["lr"] = lr
        x = ft.pad([tr[j][0] for j in b], ft.tok.pad_token_id); y = ft.pad([tr[j][1] for j in b], -100)
        am = ft.pad([[1] * len(tr[j][0]) for j in b], 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ft.BF16):
            logits = model(input_ids=x, attention_mask=am).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        step += 1; tl += loss.item(); tn += 1
        if i % 20 == 0 and datetime.datetime.now(datetime.timezone.utc) > DEADLINE:
            aborted = True; break
    if aborted:
        print("deadline reached mid-epoch; epoch discarded", flush=True); break
    sc, det = ft.score_tags("ner", dv, ft.predict_tags(model, dv, id2label))
    last_ep_s = time.time() - te0
    rec = {"epoch": DONE_EP + k + 1, "train_loss": round(tl / tn, 4), "dev": round(sc, 2), "lr_end": lr,
           "min": round((time.time() - t0) / 60, 2), "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")}
    print(json.dumps(rec), flush=True); hist.append(rec)
    if sc > best:
        best, best_ep = sc, DONE_EP + k + 1
        model.save_pretrained(f"{OUT}/{NAME}"); ft.tok.save_pretrained(f"{OUT}/{NAME}")
json.dump({"best_epoch": best_ep, "best_dev": best, "history": hist, "nb": nb, "minutes": round((time.time() - t0) / 60, 1)},
          open(f"{OUT}/{NAME}-raw.json", "w"), indent=1)
print("done", best_ep, best, flush=True)
