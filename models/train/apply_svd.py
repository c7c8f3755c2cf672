"""python apply_svd.py SRC DST: copy an MLM checkpoint, replacing the word embeddings by out/svd_emb.npy."""
import sys, numpy as np, torch
from transformers import AlbertForMaskedLM, BertTokenizerFast
from common import OUT
src, dst = sys.argv[1], sys.argv[2]
m = AlbertForMaskedLM.from_pretrained(src)
emb = torch.from_numpy(np.load(f"{OUT}/svd_emb.npy"))
with torch.no_grad():
    m.albert.embeddings.word_embeddings.weight.copy_(emb)
m.save_pretrained(dst); BertTokenizerFast.from_pretrained(src).save_pretrained(dst)
print("saved", dst)
