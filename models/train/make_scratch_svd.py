"""python make_scratch_svd.py [EMB DST]: a freshly initialised ALBERT (config of out/pretrain-final, seed 1234) with
the PPMI-SVD word embeddings out/EMB.npy (default svd_emb -> out/scratch-svd)."""
import sys, torch, numpy as np
from transformers import AlbertForMaskedLM, AlbertConfig, BertTokenizerFast
emb, dst = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else ("svd_emb", "out/scratch-svd")
torch.manual_seed(1234)
cfg = AlbertConfig.from_pretrained('out/pretrain-final')
m = AlbertForMaskedLM(cfg)
with torch.no_grad():
    m.albert.embeddings.word_embeddings.weight.copy_(torch.from_numpy(np.load(f'out/{emb}.npy')))
m.save_pretrained(dst); BertTokenizerFast.from_pretrained('out/pretrain-final').save_pretrained(dst)
