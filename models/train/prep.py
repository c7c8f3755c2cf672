"""Step 0: build the pretraining text mix, train the cased WordPiece tokenizer, tokenize+pack into a cache.
Output: out/tokenizer/ (BertTokenizerFast save_pretrained), out/pretrain_ids.npy (uint16 token ids, [SEP]-joined
paragraphs), out/prep-stats.json."""
import gzip, json, os, random, re, sys, time
import numpy as np
from common import DATA, OUT, SEED, read_conll2002

VOCAB = int(os.environ.get("VOCAB", 7000))
rng = random.Random(SEED)
os.makedirs(OUT, exist_ok=True)
t0 = time.time()


def chunks_of(line, max_words=160):
    """Split very long lines (novels with one paragraph per line, one film per line) on sentence ends."""
    words = line.split()
    if len(words) <= max_words:
        return [line] if words else []
    sents = re.split(r"(?<=[.!?…])\s+", line)
    out, cur, n = [], [], 0
    for s in sents:
        k = len(s.split())
        if n + k > max_words and cur:
            out.append(" ".join(cur)); cur, n = [], 0
        cur.append(s); n += k
    if cur:
        out.append(" ".join(cur))
    return out


def read_gz(path):
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("### "):
                continue
            yield line


# XED lines (emotion task) come from OpenSubtitles like ACTIV-ES: remove any XED line found verbatim in the
# subtitle text so the held-out emotion test text is never seen in pretraining.
xed = []
with open(f"{DATA}/xed_es_emotion/es-projections.clean.tsv", encoding="utf-8") as f:
    for line in f:
        t = line.rstrip("\n").split("\t")[0].strip()
        if len(t) >= 12:
            xed.append(t)
xed.sort(key=len, reverse=True)

# (source, path, keep-probability, repeats)
SOURCES = [
    ("parlamint", f"{DATA}/raw_text_es_modern/parlamint-es-congreso-2015-2022.txt.gz", 0.33, 1),
    ("peru_legal", f"{DATA}/raw_text_es_modern/peru-legislacion-nacional.txt.gz", 0.07, 1),
    ("subtitles", f"{DATA}/raw_text_es_modern/activ-es-film-subtitles.txt.gz", 1.0, 1),
    ("news", f"{DATA}/raw_text_es_modern/fakedes-spanish-news.txt.gz", 1.0, 2),
    ("novela_es", f"{DATA}/raw_text_es/cligs-novela-espanola.txt.gz", 0.6, 1),
    ("cuentos", f"{DATA}/raw_text_es/cligs-cuentos-espanoles.txt.gz", 0.8, 1),
    ("novela_hisp", f"{DATA}/raw_text_es/cligs-novela-hispanoamericana.txt.gz", 0.6, 1),
    ("galdos", f"{DATA}/raw_text_es/galdos-episodios-celestina.txt.gz", 0.5, 1),
]
paras, stats = [], {}
xed_removed = 0
for name, path, p, rep in SOURCES:
    n_words = 0; n_par = 0
    for line in read_gz(path):
        if name == "subtitles":
            for t in xed:
                if t in line:
                    xed_removed += line.count(t)
                    line = line.replace(t, " ")
        for c in chunks_of(line):
            if rng.random() < p:
                for _ in range(rep):
                    paras.append(c)
                n_words += len(c.split()) * rep; n_par += rep
    stats[name] = {"paragraphs": n_par, "words": n_words}
    print(name, stats[name], f"{time.time()-t0:.0f}s", flush=True)
# CoNLL-2002 esp.train sentence text only (NOT esp.testa), 3 copies
conll = [" ".join(w) for w, _ in read_conll2002(f"{DATA}/conll2002_es/esp.train")]
for _ in range(3):
    paras.extend(conll)
stats["conll2002_esp_train_text_x3"] = {"paragraphs": 3 * len(conll), "words": 3 * sum(len(s.split()) for s in conll)}
stats["xed_lines_removed_from_subtitles"] = xed_removed
rng.shuffle(paras)
total_words = sum(v["words"] for k, v in stats.items() if isinstance(v, dict))
stats["total_words"] = total_words
print("total words", total_words, "paragraphs", len(paras), f"{time.time()-t0:.0f}s", flush=True)

# ---- tokenizer: cased WordPiece, BERT-style normalizer/pre-tokenizer ----
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers, decoders
tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
tok.decoder = decoders.WordPiece(prefix="##")
specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, min_frequency=3, special_tokens=specials,
                                    limit_alphabet=200, continuing_subword_prefix="##")
sample = paras[: min(len(paras), 400000)]
tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                   special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
from transformers import BertTokenizerFast
hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=False, strip_accents=False, tokenize_chinese_chars=True,
                       unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                       model_max_length=512)
hf.save_pretrained(f"{OUT}/tokenizer")
print("tokenizer trained", tok.get_vocab_size(), f"{time.time()-t0:.0f}s", flush=True)

# ---- tokenize + concat with [SEP] between paragraphs ----
ids = []
B = 2000
tok.no_truncation()
for i in range(0, len(paras), B):
    encs = tok.encode_batch(paras[i:i + B], add_special_tokens=False)
    for e in encs:
        ids.extend(e.ids); ids.append(sep_id)
arr = np.asarray(ids, dtype=np.uint16)
np.save(f"{OUT}/pretrain_ids.npy", arr)
stats["tokens"] = int(arr.size)
stats["tokens_per_word"] = arr.size / total_words
stats["vocab"] = tok.get_vocab_size()
stats["seconds"] = time.time() - t0
json.dump(stats, open(f"{OUT}/prep-stats.json", "w"), indent=1)
print(json.dumps(stats, indent=1))
