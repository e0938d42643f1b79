"""What reading the next layer ahead buys a streamed model: logits and operators, with and without.

    python tools/bench_read_ahead.py                         # the random bf16 checkpoint of test_streaming.py
    python tools/bench_read_ahead.py --gguf /path/model.gguf # and a GGUF file (dequantized per tensor)

Each measurement runs in a fresh child process that loads the checkpoint with `stream=True`.
"without" switches the read-ahead off in the child only: its layers then hand over nothing read
ahead and start no read (`layers.take` returns {}), which is streaming as it was before the
read-ahead. The two alternate run by run, so that a busy machine slows both alike; figures are
medians. Memory is the child's peak resident set above what it held after the imports.
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
sys.path.insert(0, str(ROOT / "tools"))

CHILD = """
import json, sys, time, torch
import minielm

def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

path, read_ahead, ids = sys.argv[1], sys.argv[2] == "with", json.loads(sys.argv[3])
before = status_mb("VmRSS")
model = minielm.load(path, dtype=torch.float64, stream=True)
if not read_ahead:
    model.weights["layers"].take = lambda i: {}  # nothing read ahead: every layer reads its own tensors
model.logits(ids)  # a first pass: the file's pages in the page cache for both
times = []
for _ in range(3):
    start = time.perf_counter()
    model.logits(ids)
    times.append(time.perf_counter() - start)
start = time.perf_counter()
operators = minielm.equivalent_linear_map(model, ids).operators
print(json.dumps({"logits_s": sorted(times)[1], "operators_s": time.perf_counter() - start,
                  "peak_mb": status_mb("VmHWM") - before, "checksum": float(operators.abs().sum())}))
"""


def measure(path: Path, read_ahead: bool, ids: list) -> dict:
    command = [sys.executable, "-c", CHILD, str(path), "with" if read_ahead else "without", json.dumps(ids)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def compare(name: str, path: Path, ids: list, repeats: int) -> None:
    runs = {False: [], True: []}
    for _ in range(repeats):
        for read_ahead in (False, True):  # alternate, so that load on a shared machine falls on both
            result = measure(path, read_ahead, ids)
            runs[read_ahead].append(result)
            print(json.dumps({"checkpoint": name, "read_ahead": read_ahead, **{k: round(v, 3) for k, v in
                                                                              result.items()}}), flush=True)
    summary = {ra: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for ra, rs in runs.items()}
    assert summary[False]["checksum"] == summary[True]["checksum"], "the operators differ"
    for key in ("logits_s", "operators_s", "peak_mb"):
        off, on = summary[False][key], summary[True][key]
        print(f"{name}  T={len(ids)}  {key:12s} without {off:9.3f}  with {on:9.3f}  (with/without {on / off:.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf", type=Path, help="also a GGUF file")
    parser.add_argument("--gguf-repeats", type=int, default=1, help="repeats for the GGUF file (slow to parse)")
    args = parser.parse_args()
    import torch

    from bench import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        random_checkpoint(tmp, d=1024, layers=9, f=2816, heads=8, kv_heads=8, vocab=4096, dtype=torch.bfloat16,
                          tied=False)
        compare("random bf16 safetensors (124M, 9 layers)", Path(tmp), [1, 17, 5, 88], args.repeats)
    if args.gguf:
        compare(args.gguf.name, args.gguf, [2, 818, 5279, 529, 7001, 563, 496, 1304], args.gguf_repeats)


if __name__ == "__main__":
    main()
