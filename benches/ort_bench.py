"""onnxruntime side of `cargo bench --bench compare` (see benches/compare.rs).

Runs the bare model.onnx on exactly the tensors anotador's engine ran (written by the
Rust harness), with the same thread count. It takes turns with the engine: the
harness writes one request per line on stdin and reads one JSON line back, so that
both sides see the same minute of a shared machine's noise.

    shape NAME REPS   ->  {"ms": [REPS times]}   (two unreported warm-up runs first time)
    pass              ->  {"s": seconds}         (every message's windows once)

Needs onnxruntime and numpy (pinned in models/requirements.txt); optional: the harness
runs without it.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    spec = json.load(open(sys.argv[1]))
    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}

    def feeds(batch):
        return {k: np.asarray(v, dtype=np.int64) for k, v in batch.items() if k in names}

    def run(f):
        t = time.perf_counter()
        sess.run(None, f)
        return (time.perf_counter() - t) * 1e3

    shapes = {s["name"]: feeds(s["batch"]) for s in spec["shapes"]}
    messages = [[feeds(b) for b in m] for m in spec["messages"]]
    warm = set()
    print(json.dumps({"onnxruntime": ort.__version__}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "shape":
            f = shapes[words[1]]
            if words[1] not in warm:
                warm.add(words[1])
                run(f)
                run(f)
            reply = {"ms": [run(f) for _ in range(int(words[2]))]}
        elif words[0] == "pass":
            if "messages" not in warm:
                warm.add("messages")
                for m in messages:
                    for f in m:
                        sess.run(None, f)
            started = time.perf_counter()
            for m in messages:
                for f in m:
                    sess.run(None, f)
            reply = {"s": time.perf_counter() - started}
        else:
            raise SystemExit(f"unknown request {line!r}")
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
