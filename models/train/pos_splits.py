"""Write the pos scoring files (from ../shared/data, nothing committed: AnCora r2.7 is GPL-3.0) so that
`anotador eval --model models/pos-es --data FILE` reproduces the card:
    out/splits/pos-ancora-heldout.conllu        held-out 10 % of AnCora-dev (AnCora's own tags)
    out/splits/pos-gsd-heldout.conllu           held-out 10 % of GSD-dev, tags in AnCora's conventions
    out/splits/pos-gsd-test-ancora-tags.conllu  GSD test, tags in AnCora's conventions
(GSD test with GSD's own tags is ../shared/data/ud_spanish/es_gsd-ud-test.conllu itself.)"""
from common import OUT, pos_parts, write_conllu

_, dv, te = pos_parts(harmonize=True)
for name, sents in (("pos-ancora-heldout", dv["ancora"]), ("pos-gsd-heldout", dv["gsd"]),
                    ("pos-gsd-test-ancora-tags", te)):
    write_conllu(f"{OUT}/splits/{name}.conllu", sents)
    print(f"{OUT}/splits/{name}.conllu", len(sents), "sentences", sum(len(w) for w, _ in sents), "words")
