"""Where UD AnCora and UD GSD tag the same word form differently: per-form UPOS distributions of the two dev files,
ranked by (total-variation distance × GSD count). This table is how common.read_conllu_harmonized's rules were chosen.
    python models/train/conventions.py [N]
It ends with how many GSD tags those rules change (the share the model card states)."""
import collections, sys
from common import DATA, GSD_TEST, conllu_rows, read_conllu_harmonized


def dist(name):
    d = collections.defaultdict(collections.Counter)
    for rows in conllu_rows(f"{DATA}/ud_spanish/es_{name}-ud-dev.conllu"):
        for c in rows:
            d[c[1].lower()][c[3]] += 1
    return d


A, G = dist("ancora"), dist("gsd")
rows = []
for w in set(A) & set(G):
    na, ng = sum(A[w].values()), sum(G[w].values())
    if na >= 5 and ng >= 5:
        tv = 0.5 * sum(abs(A[w][t] / na - G[w][t] / ng) for t in set(A[w]) | set(G[w]))
        rows.append((tv * ng, tv, w, dict(A[w].most_common(3)), dict(G[w].most_common(3))))
for r in sorted(rows, reverse=True)[:int(sys.argv[1]) if len(sys.argv) > 1 else 30]:
    print(f"{r[0]:5.0f}  tv {r[1]:.2f}  {r[2]:<12} AnCora {r[3]}  GSD {r[4]}")
for path in (f"{DATA}/ud_spanish/es_gsd-ud-dev.conllu", GSD_TEST):
    sents, changed = read_conllu_harmonized(path)
    words = sum(len(w) for w, _ in sents)
    print(f"{path.rsplit('/', 1)[-1]}: {changed} of {words} tags mapped ({100 * changed / words:.1f} %)")
