"""out/scratch-svd: a freshly initialised ALBERT (config of out/pretrain-final, seed 1234) with the PPMI-SVD word embeddings."""
import torch, numpy as np
from transformers import AlbertForMaskedLM, AlbertConfig, BertTokenizerFast
torch.manual_seed(1234)
cfg = AlbertConfig.from_pretrained('out/pretrain-final')
m = AlbertForMaskedLM(cfg)
with torch.no_grad():
    m.albert.embeddings.word_embeddings.weight.copy_(torch.from_numpy(np.load('out/svd_emb.npy')))
m.save_pretrained('out/scratch-svd'); BertTokenizerFast.from_pretrained('out/pretrain-final').save_pretrained('out/scratch-svd')
