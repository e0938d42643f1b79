"""What reading (not mapping) checkpoints costs: load, logits and operators, streamed and not.

    python tools/bench_loading.py                      # this tree only
    python tools/bench_loading.py --tree /tmp/before   # side by side with another copy of minielm

Each measurement runs in a fresh child process with PYTHONPATH pointed at one tree, on the random
bfloat16 Llama-style checkpoint of tests/test_streaming.py (124M parameters: 250 MB on disk, about
1 GB in float64). Trees alternate run by run, so that a busy machine slows both alike; the figures
are medians. Memory is the child's peak resident set above what it held after the imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from proc_memory import CHILD_PRELUDE  # noqa: E402

CHILD = CHILD_PRELUDE + """
import json, sys, time, torch
import minielm

directory, stream, ids = sys.argv[1], sys.argv[2] == "stream", [1, 17, 5, 88]
torch.set_num_threads(int(sys.argv[3]))
before = status_mb("VmRSS")
times = {}
start = time.perf_counter()
model = minielm.load(directory, dtype=torch.float64, stream=stream)
times["load_s"] = time.perf_counter() - start
start = time.perf_counter()
logits = model.logits(ids)
times["logits_s"] = time.perf_counter() - start
start = time.perf_counter()
operators = minielm.equivalent_linear_map(model, ids).operators
times["operators_s"] = time.perf_counter() - start
print(json.dumps({**times, "peak_mb": status_mb("VmHWM") - before, "checksum": float(operators.abs().sum())}))
"""


def measure(tree: Path, directory: Path, stream: bool, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-c", CHILD, str(directory), "stream" if stream else "load", str(threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="another minielm source tree to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--mode", choices=["both", "stream", "load"], default="both")
    args = parser.parse_args()
    trees = [ROOT] + [Path(t) for t in args.tree]

    from bench import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        random_checkpoint(tmp, d=1024, layers=9, f=2816, heads=8, kv_heads=8, vocab=4096, dtype=__import__(
            "torch").bfloat16, tied=False)
        for stream in {"both": (True, False), "stream": (True,), "load": (False,)}[args.mode]:
            runs = {tree: [] for tree in trees}
            for _ in range(args.repeats):
                for tree in trees:  # alternate, so that load on a shared machine falls on both
                    runs[tree].append(measure(tree, Path(tmp), stream, args.threads))
            for tree, results in runs.items():
                summary = {key: statistics.median(r[key] for r in results) for key in results[0]}
                print(json.dumps({"tree": str(tree), "stream": stream, **{k: round(v, 3) for k, v in
                                                                          summary.items()}}))


if __name__ == "__main__":
    main()
