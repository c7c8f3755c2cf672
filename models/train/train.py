"""One command per step of the anotador training recipe (2 CPU cores, no GPU).

    python models/train/train.py prep       # text mix + cased WordPiece tokenizer + token cache   (~3 min)
    python models/train/train.py pretrain   # MLM pretraining of the shared ALBERT encoder (wall-clock budget, BUDGET_S)
    python models/train/train.py svd        # PPMI-SVD word embeddings -> out/svd_emb.npy
    python models/train/train.py apply-svd out/pretrain-stage2 out/pretrain-final   # MLM checkpoint + SVD embeddings
    python models/train/train.py scratch    # fresh encoder + SVD embeddings -> out/scratch-svd (pos/emotion init)
    python models/train/train.py ner        # CoNLL-2002 NER  -> out/ner-final, out/ner-scores.json
    python models/train/train.py pos        # UD UPOS         -> out/pos-final, out/pos-scores.json
    python models/train/train.py emotion    # XED 8-class     -> out/emotion-final, out/emotion-scores.json
    python models/train/train.py eval-onnx BUNDLE TASK   # score an exported int8 bundle with onnxruntime

Environment knobs (defaults are what was used): BUDGET_S, EPOCHS, LR, THREADS=1, BF16=1, INIT, NAME,
TOK_BUDGET, DROPOUT, LOCAL_INIT (pos: 1), SHIFTS (pos: 1,2,3,-1).
"""
import os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"prep": ["prep.py"], "pretrain": ["pretrain.py"], "svd": ["svd_embed.py"], "apply-svd": ["apply_svd.py"], "scratch": ["make_scratch_svd.py"], "ner": ["finetune.py", "ner"],
           "pos": ["finetune.py", "pos"], "emotion": ["finetune.py", "emotion"], "eval-onnx": ["eval_onnx.py"]}
if len(sys.argv) < 2 or sys.argv[1] not in SCRIPTS:
    sys.exit(__doc__)
cmd = [sys.executable] + [os.path.join(HERE, SCRIPTS[sys.argv[1]][0])] + SCRIPTS[sys.argv[1]][1:] + sys.argv[2:]
sys.exit(subprocess.call(cmd, cwd=HERE))
