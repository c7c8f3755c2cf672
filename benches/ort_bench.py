"""onnxruntime side of `cargo bench --bench compare` (see benches/compare.rs).

Runs the bare model.onnx on exactly the tensors anotador's engine ran (written by the
Rust harness), with the same thread count, and prints medians as JSON on stdout.
Needs onnxruntime and numpy (pinned in models/requirements.txt); optional: the harness
runs without it.
"""
import json
import statistics
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

    shapes = {}
    for s in spec["shapes"]:
        f = feeds(s["batch"])
        for _ in range(2):
            run(f)
        times, started = [], time.perf_counter()
        while len(times) < spec["min_reps"] or time.perf_counter() - started < spec["shape_budget_s"]:
            times.append(run(f))
        shapes[s["name"]] = statistics.median(times)

    messages = [[feeds(b) for b in m] for m in spec["messages"]]
    for m in messages:  # warm-up
        for f in m:
            run(f)
    totals = []
    for _ in range(spec["passes"]):
        started = time.perf_counter()
        for m in messages:
            for f in m:
                sess.run(None, f)
        totals.append(time.perf_counter() - started)
    print(json.dumps({
        "onnxruntime": ort.__version__,
        "shapes": shapes,
        "messages_per_s": len(messages) / statistics.median(totals),
    }))


if __name__ == "__main__":
    main()
