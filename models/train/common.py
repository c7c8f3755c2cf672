"""Shared helpers for the anotador training recipe (data readers, tokenizer, scoring)."""
import gzip, os, random, re, json, time
import torch

DATA = "/work/shared/data"
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
SPLITS = os.path.join(HERE, "splits")
SEED = 1234

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
UPOS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
        "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"]
EMOTIONS = ["anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust"]


def set_seed(seed=SEED):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def read_conll2002(path):
    """-> list of (words, tags). Format: `word POS BIO` per line, blank line between sentences."""
    sents, words, tags = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                if words:
                    sents.append((words, tags))
                words, tags = [], []
                continue
            parts = line.split(" ")
            words.append(parts[0])
            tags.append(parts[-1])
    if words:
        sents.append((words, tags))
    return sents


def conllu_rows(path):
    """Yield each sentence as a list of its word rows (the 10 columns), without multiword-token ranges (1-2) and
    empty nodes (1.1)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                if rows:
                    yield rows
                rows = []
            elif not line.startswith("#"):
                cols = line.split("\t")
                if "-" not in cols[0] and "." not in cols[0]:
                    rows.append(cols)
    if rows:
        yield rows


def read_conllu(path):
    """-> list of (forms, upos)."""
    return [([c[1] for c in rows], [c[3] for c in rows]) for rows in conllu_rows(path)]


MONTHS_DAYS = {"enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "setiembre",
               "octubre", "noviembre", "diciembre", "lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"}


SENTENCE_OPENERS = {".", ":", "\"", "«", "¿", "¡", "(", "-", "—", "?", "!"}


def read_conllu_harmonized(path):
    """read_conllu for UD Spanish GSD, with the tags where GSD and AnCora annotate the same word differently mapped to
    AnCora's choice, so one tagger learns one convention (AnCora's: the larger treebank, and the one the seed's POS
    scores are measured on). Measured on the dev files: relative "que" is PRON in AnCora (788 PRON / 725 SCONJ) but
    SCONJ in GSD (534 SCONJ / 62 PRON); "como" SCONJ vs ADP; "donde" PRON vs ADV; ser/haber always AUX in AnCora;
    month and day names NOUN vs PROPN; capitalised nouns and adjectives inside a sentence PROPN in AnCora (3,362 PROPN /
    29 NOUN) but often NOUN/ADJ in GSD (2,874 / 385). Uses the gold head and relation, so it applies to treebank files only.
    Returns (sentences, number of changed tags)."""
    sents, changed = [], 0
    for sent in conllu_rows(path):
        words, tags = [], []
        for i, c in enumerate(sent):
            form, lemma, upos, rel = c[1], c[2], c[3], c[7]
            head = int(c[6]) if c[6].isdigit() else 0
            low, new = form.lower(), upos
            if low == "que" and upos == "SCONJ" and rel == "mark" and head > 0 and sent[head - 1][7].startswith("acl"):
                new = "PRON"          # relative-clause "que": AnCora's PronType=Rel pronoun
            elif low == "que" and upos == "CCONJ":
                new = "SCONJ"         # comparative "más ... que"
            elif low == "como" and upos in ("ADP", "CCONJ"):
                new = "SCONJ"
            elif low == "donde" and upos == "ADV":
                new = "PRON"
            elif lemma in ("ser", "haber") and upos == "VERB":
                new = "AUX"
            elif low in MONTHS_DAYS and form == low and upos == "PROPN":
                new = "NOUN"
            elif (upos in ("NOUN", "ADJ") and i > 0 and form[:1].isupper() and not form.isupper()
                  and low not in MONTHS_DAYS and words[-1] not in SENTENCE_OPENERS):
                new = "PROPN"         # capitalised words inside names ("Plaza", "Gobierno", "Unidos")
            changed += new != upos
            words.append(form); tags.append(new)
        sents.append((words, tags))
    return sents, changed


def word_first_subtoken_index(tokenizer, words, max_length=512):
    """Mirror of the Rust eval: join words with single spaces, tokenize the sentence, and map each
    word to its FIRST sub-token. Returns (input_ids, first_idx list with None for words lost to truncation)."""
    text = " ".join(words)
    starts = []
    pos = 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
    offs = enc["offset_mapping"]
    # char -> first token whose span covers or starts at/after it
    first = []
    ti = 0
    for wi, (s, w) in enumerate(zip(starts, words)):
        e = s + len(w)
        idx = None
        for j in range(len(offs)):
            a, b = offs[j]
            if a == b:  # special token
                continue
            if b > s and a < e:
                idx = j
                break
        first.append(idx)
    return enc["input_ids"], first


def word_first_subtoken_index_fast(tokenizer, words, max_length=512):
    text = " ".join(words)
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
    offs = enc["offset_mapping"]
    # map char position -> word index
    char2word = []
    for wi, w in enumerate(words):
        char2word.extend([wi] * len(w))
        char2word.append(-1)
    first = [None] * len(words)
    for j, (a, b) in enumerate(offs):
        if a == b:
            continue
        for c in range(a, b):
            if c < len(char2word) and char2word[c] >= 0:
                wi = char2word[c]
                if first[wi] is None:
                    first[wi] = j
                break
    return enc["input_ids"], first


# ---------------- conlleval-style chunk F1 (seqeval default mode semantics) ----------------
def _split_tag(t):
    if t == "O" or t is None:
        return "O", ""
    if "-" in t:
        p, ty = t.split("-", 1)
        return p, ty
    return t, ""


def _end_of_chunk(prev_tag, tag, prev_type, type_):
    if prev_tag == "E": return True
    if prev_tag == "S": return True
    if prev_tag == "B" and tag in ("B", "S", "O"): return True
    if prev_tag == "I" and tag in ("B", "S", "O"): return True
    if prev_tag != "O" and prev_tag != "." and prev_type != type_: return True
    return False


def _start_of_chunk(prev_tag, tag, prev_type, type_):
    if tag == "B": return True
    if tag == "S": return True
    if prev_tag == "E" and tag in ("E", "I"): return True
    if prev_tag == "S" and tag in ("E", "I"): return True
    if prev_tag == "O" and tag in ("E", "I"): return True
    if tag != "O" and tag != "." and prev_type != type_: return True
    return False


def get_entities(seq):
    """seqeval.metrics.sequence_labeling.get_entities (default/conlleval mode)."""
    seq = list(seq) + ["O"]
    prev_tag, prev_type, begin = "O", "", 0
    chunks = []
    for i, chunk in enumerate(seq):
        tag, type_ = _split_tag(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_f1(gold_seqs, pred_seqs):
    tp = npred = ngold = 0
    per = {}
    for g, p in zip(gold_seqs, pred_seqs):
        ge = set(get_entities(g)); pe = set(get_entities(p))
        tp += len(ge & pe); npred += len(pe); ngold += len(ge)
        for e in ge:
            per.setdefault(e[0], [0, 0, 0])[1] += 1
        for e in pe:
            per.setdefault(e[0], [0, 0, 0])[2] += 1
        for e in ge & pe:
            per[e[0]][0] += 1
    def f(tp, ng, npd):
        pr = tp / npd if npd else 0.0
        rc = tp / ng if ng else 0.0
        return pr, rc, (2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    pr, rc, f1 = f(tp, ngold, npred)
    return {"precision": pr, "recall": rc, "f1": f1,
            "per_type": {k: dict(zip(["precision", "recall", "f1"], f(*v))) | {"support": v[1]} for k, v in sorted(per.items())}}


GSD_TEST = f"{DATA}/ud_spanish/es_gsd-ud-test.conllu"   # scored only, never trained on


def pos_parts(harmonize=True, split_seed=SEED):
    """The pos data: a seeded 10 % of EACH treebank's dev file is held out (both annotation styles are scored), the
    rest of both files is the training set (no train splits are available here). GSD's tags follow AnCora's
    conventions when `harmonize`; another `split_seed` holds out other sentences (a variance check). -> (train, {"ancora": held-out, "gsd": held-out}, gsd-test)"""
    tr, dv = [], {}
    for name in ("ancora", "gsd"):
        path = f"{DATA}/ud_spanish/es_{name}-ud-dev.conllu"
        s = read_conllu_harmonized(path)[0] if harmonize and name == "gsd" else read_conllu(path)
        rng = random.Random(split_seed); idx = list(range(len(s))); rng.shuffle(idx); ndv = len(s) // 10
        dv[name] = [s[i] for i in idx[:ndv]]; tr += [s[i] for i in idx[ndv:]]
    te = read_conllu_harmonized(GSD_TEST)[0] if harmonize else read_conllu(GSD_TEST)
    return tr, dv, te


def write_conllu(path, sents):
    """Minimal CoNLL-U (ID, FORM, UPOS; other columns `_`), enough for `anotador eval`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for words, tags in sents:
            for i, (w, t) in enumerate(zip(words, tags), 1):
                f.write(f"{i}\t{w}\t_\t{t}\t_\t_\t_\t_\t_\t_\n")
            f.write("\n")
