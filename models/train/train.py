"""One command per step of the anotador training recipe (2 CPU cores, no GPU).

    python models/train/train.py prep       # text mix + cased WordPiece tokenizer + token cache   (~3 min)
    python models/train/train.py pretrain   # MLM pretraining of the shared ALBERT encoder (wall-clock budget, BUDGET_S)
    python models/train/train.py svd        # PPMI-SVD word embeddings -> out/svd_emb.npy
    python models/train/train.py apply-svd out/pretrain-stage2 out/pretrain-final   # MLM checkpoint + SVD embeddings
    python models/train/train.py scratch    # fresh encoder + SVD embeddings -> out/scratch-svd (emotion init)
    python models/train/train.py svd-dir    # directional PPMI-SVD embeddings + fresh encoder -> out/scratch-dir (pos init)
    python models/train/train.py ner        # CoNLL-2002 NER  -> out/ner-final, out/ner-scores.json
    python models/train/train.py pos        # UD UPOS         -> out/pos-final, out/pos-scores.json
    python models/train/train.py pos-splits # pos scoring files for `anotador eval` -> out/splits/pos-*.conllu
    python models/train/train.py emotion    # XED 8-class     -> out/emotion-final, out/emotion-scores.json
    python models/train/train.py eval-onnx BUNDLE TASK   # score an exported int8 bundle with onnxruntime

Environment knobs (defaults are what was used): BUDGET_S, EPOCHS, LR, THREADS=1, BF16=1, INIT, NAME,
TOK_BUDGET, DROPOUT, LOCAL_INIT (ner, pos: 1), SHIFTS (1,2,3,-1),
HARMONIZE (pos: 1, GSD tags in AnCora's conventions), POS_SPLIT_SEED (pos: 1234, which sentences are held out).
"""
import os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
# step -> the scripts it runs, in order (each with its arguments)
SCRIPTS = {"prep": [["prep.py"]], "pretrain": [["pretrain.py"]], "svd": [["svd_embed.py"]], "apply-svd": [["apply_svd.py"]],
           "scratch": [["make_scratch_svd.py"]],
           "svd-dir": [["svd_embed.py", "-1,1", "svd_dir_emb"], ["make_scratch_svd.py", "svd_dir_emb", "out/scratch-dir"]],
           "ner": [["finetune.py", "ner"]], "pos": [["finetune.py", "pos"]], "pos-splits": [["pos_splits.py"]],
           "emotion": [["finetune.py", "emotion"]], "eval-onnx": [["eval_onnx.py"]]}
if len(sys.argv) < 2 or sys.argv[1] not in SCRIPTS:
    sys.exit(__doc__)
for script, *args in SCRIPTS[sys.argv[1]]:
    rc = subprocess.call([sys.executable, os.path.join(HERE, script)] + args + sys.argv[2:], cwd=HERE)
    if rc:
        sys.exit(rc)
