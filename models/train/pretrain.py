"""Step 1: MLM pretraining of a small cased ALBERT (unshared layers, factorized embeddings) on the packed cache.
Wall-clock budgeted: the LR schedule (linear warmup, linear decay) runs on elapsed time / BUDGET_S, so the
run ends on time whatever the (shared, noisy) CPU throughput is. Checkpoints every CKPT_S seconds."""
import json, math, os, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AlbertConfig, AlbertForMaskedLM, BertTokenizerFast
from common import OUT, SEED, set_seed

BUDGET_S = float(os.environ.get("BUDGET_S", 3300))
CKPT_S = float(os.environ.get("CKPT_S", 600))
LR = float(os.environ.get("LR", 1e-3))
WARMUP = float(os.environ.get("WARMUP", 0.06))
L_SHORT, B_SHORT = 128, int(os.environ.get("BATCH", 32))
L_LONG, B_LONG, P_LONG = 512, max(1, B_SHORT // 4), 0.08   # a few full-length windows so positions 128..511 get trained too
MASK_P = 0.15
torch.set_num_threads(int(os.environ.get("THREADS", 1)))  # 1: on this shared 2-core box, 2 OpenMP threads were 3x slower under contention
torch.set_flush_denormal(True)   # denormals made AdamW/GELU several times slower here
BF16 = os.environ.get("BF16", "1") == "1"   # autocast matmuls to bf16 (AMX on this CPU): ~2x faster
set_seed(SEED)

tok = BertTokenizerFast.from_pretrained(f"{OUT}/tokenizer")
V = len(tok)
PAD, UNK, CLS, SEP, MSK = (tok.convert_tokens_to_ids(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
ids = np.load(f"{OUT}/pretrain_ids.npy").astype(np.int64)
EVAL_N = 200_000
train_ids, eval_ids = ids[:-EVAL_N], ids[-EVAL_N:]
print(f"vocab {V} train tokens {train_ids.size} eval tokens {eval_ids.size}", flush=True)

cfg = AlbertConfig(vocab_size=V, embedding_size=128, hidden_size=256, num_hidden_layers=4, num_hidden_groups=4,
                   num_attention_heads=4, intermediate_size=1024, inner_group_num=1, hidden_act="gelu_new",
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.1,
                   max_position_embeddings=512, type_vocab_size=2, pad_token_id=PAD, bos_token_id=CLS,
                   eos_token_id=SEP)
RESUME = os.environ.get("RESUME")   # continue from saved weights (fresh optimizer, short warmup)
model = AlbertForMaskedLM.from_pretrained(RESUME) if RESUME else AlbertForMaskedLM(cfg)
if RESUME:
    cfg = model.config
nparam = sum(p.numel() for p in model.parameters())
print(f"params {nparam/1e6:.2f}M", flush=True)

g = torch.Generator().manual_seed(SEED)
npr = np.random.default_rng(SEED)


def make_batch(src, L, B, rng, gen):
    n = L - 2
    starts = rng.integers(0, src.size - n, size=B)
    x = np.stack([src[s:s + n] for s in starts])
    x = torch.from_numpy(np.concatenate([np.full((B, 1), CLS), x, np.full((B, 1), SEP)], axis=1))
    special = (x == CLS) | (x == SEP) | (x == PAD)
    # exactly K masked positions per batch: a fixed decoder shape (with bf16, every new shape costs a oneDNN
    # kernel build; a varying masked count made steps 3x slower and leaked memory)
    K = int(MASK_P * B * n)
    score = torch.rand(x.shape, generator=gen).masked_fill(special, 2.0)
    masked = torch.zeros(x.numel(), dtype=torch.bool)
    masked[score.view(-1).topk(K, largest=False).indices] = True
    masked = masked.view(x.shape) & ~special
    labels = x[masked].clone()
    r = torch.rand(x.shape, generator=gen)
    inp = x.clone()
    inp[masked & (r < 0.8)] = MSK
    rnd = masked & (r >= 0.8) & (r < 0.9)
    inp[rnd] = torch.randint(5, V, (int(rnd.sum()),), generator=gen)
    return inp, masked, labels


def mlm_loss(inp, masked, labels):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16 and model.training):
        h = model.albert(input_ids=inp).last_hidden_state       # [B, L, H]
        hm = h[masked]                                          # only masked positions go through the decoder
        logits = model.predictions(hm)
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


if os.environ.get("SVD_EMB"):   # distributional init of the word embeddings (svd_embed.py)
    with torch.no_grad():
        model.albert.embeddings.word_embeddings.weight.copy_(torch.from_numpy(np.load(os.environ["SVD_EMB"])))
if os.environ.get("FREEZE_EMB") == "1":   # keep them fixed (tied MLM decoder too): the encoder learns to predict into that space
    model.albert.embeddings.word_embeddings.weight.requires_grad_(False)
    print("word embeddings frozen; tied decoder:", model.predictions.decoder.weight is model.albert.embeddings.word_embeddings.weight, flush=True)
decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
nodecay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": nodecay, "weight_decay": 0.0}],
                        lr=LR, betas=(0.9, 0.98), eps=1e-6, fused=True)


def lr_at(frac):
    if frac < WARMUP:
        return LR * frac / WARMUP
    return LR * max(0.0, (1 - frac) / (1 - WARMUP))


def evaluate():
    model.eval()
    rng = np.random.default_rng(999); gen = torch.Generator().manual_seed(999)
    tot, n, accs = 0.0, 0, 0.0
    with torch.no_grad():
        for _ in range(20):
            inp, m, lab = make_batch(eval_ids, L_SHORT, B_SHORT, rng, gen)
            loss, acc = mlm_loss(inp, m, lab)
            k = int(m.sum()); tot += loss.item() * k; accs += acc.item() * k; n += k
    model.train()
    return tot / n, accs / n


def save(tag):
    d = f"{OUT}/{tag}"
    model.save_pretrained(d); tok.save_pretrained(d)


log = {"config": cfg.to_dict(), "budget_s": BUDGET_S, "lr": LR, "resume": RESUME, "history": []}
model.train()
t0 = time.time(); last_ckpt = t0; step = 0; tokens = 0; run_loss = 0.0; run_acc = 0.0; run_n = 0
while True:
    el = time.time() - t0
    frac = el / BUDGET_S
    if frac >= 1.0:
        break
    for gr in opt.param_groups:
        gr["lr"] = lr_at(frac)
    if npr.random() < P_LONG:
        inp, m, lab = make_batch(train_ids, L_LONG, B_LONG, npr, g)
    else:
        inp, m, lab = make_batch(train_ids, L_SHORT, B_SHORT, npr, g)
    loss, acc = mlm_loss(inp, m, lab)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step += 1; tokens += inp.numel(); run_loss += loss.item(); run_acc += acc.item(); run_n += 1
    if step % 50 == 0:
        el = time.time() - t0
        rec = {"step": step, "min": round(el / 60, 2), "tokens": tokens, "tok_s": round(tokens / el),
               "lr": opt.param_groups[0]["lr"], "loss": round(run_loss / run_n, 4), "acc": round(run_acc / run_n, 4)}
        print(json.dumps(rec), flush=True)
        log["history"].append(rec); run_loss = run_acc = 0.0; run_n = 0
    if time.time() - last_ckpt > CKPT_S:
        save("pretrain-ckpt"); last_ckpt = time.time()
        el_loss, el_acc = evaluate()
        print(json.dumps({"ckpt": step, "eval_loss": round(el_loss, 4), "eval_acc": round(el_acc, 4)}), flush=True)

el = time.time() - t0
ev_loss, ev_acc = evaluate()
save("pretrain-final")
log.update({"steps": step, "tokens_seen": tokens, "seconds": el, "tok_s": tokens / el, "final_eval_mlm_loss": ev_loss,
            "final_eval_mlm_acc": ev_acc, "params": nparam})
json.dump(log, open(f"{OUT}/pretrain-stats.json", "w"), indent=1)
print(json.dumps({k: v for k, v in log.items() if k not in ("config", "history")}), flush=True)
