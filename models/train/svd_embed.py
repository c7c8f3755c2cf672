"""Distributional word-piece embeddings: PPMI of a +-4 token window over the pretraining cache, truncated SVD to
the embedding size. Used to initialise the word embeddings (MLM pretraining on this CPU budget stayed near the
unigram plateau). Writes out/svd_emb.npy [V, E]."""
import time, numpy as np, torch, os
from common import OUT
torch.set_num_threads(1); t0 = time.time()
E, W, V = 128, 4, 7000
ids = np.load(f"{OUT}/pretrain_ids.npy").astype(np.int64)
C = np.zeros(V * V, dtype=np.float64)
for d in range(1, W + 1):
    idx = ids[:-d] * V + ids[d:]
    C += np.bincount(idx, minlength=V * V) * (1.0 / d)
C = C.reshape(V, V); C = C + C.T
C[:5, :] = 0; C[:, :5] = 0          # no specials as context
print("counts", time.time() - t0, flush=True)
row = C.sum(1, keepdims=True); col = C.sum(0, keepdims=True) ** 0.75
tot = C.sum(); colp = col / col.sum()
with np.errstate(divide="ignore", invalid="ignore"):
    pmi = np.log((C / tot) / ((row / tot) * colp))
pmi[~np.isfinite(pmi)] = 0; pmi = np.maximum(pmi, 0).astype(np.float32)
M = torch.from_numpy(pmi)
U, S, Vt = torch.svd_lowrank(M, q=E + 16, niter=4)
emb = (U[:, :E] * S[:E].sqrt()).numpy()
emb = emb / (emb.std() + 1e-8) * 0.02 * 3   # scale comparable to trained ALBERT embeddings before LayerNorm
emb[:5] = np.random.default_rng(0).normal(0, 0.02, (5, E))
np.save(f"{OUT}/svd_emb.npy", emb.astype(np.float32))
print("done", emb.shape, time.time() - t0, flush=True)
