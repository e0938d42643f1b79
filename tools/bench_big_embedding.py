"""Peak memory while loading a checkpoint whose embedding is most of it, streamed and not.

    python tools/bench_big_embedding.py                        # this tree only
    python tools/bench_big_embedding.py --tree /tmp/before     # side by side with another copy of minielm
    python tools/bench_big_embedding.py --vocab 65536          # a smaller one (the default: a 1 GiB file)

The checkpoint: vocabulary 262144 × d 2048 in bfloat16 (1 GiB; 4 GiB in float64), tied, one small
Llama layer, so that the embedding is nearly all there is to load. Each load runs in a fresh child
process with PYTHONPATH pointed at one tree (trees alternate run by run; it runs in the checkpoint's
directory, so that the current directory's minielm does not come first); the child reports its peak
resident set (VmHWM) above what it held after the imports, what it holds once loaded, and the time.
Ideal: the result (bf16 streamed, float64 otherwise) and one block of rows (checkpoint.BLOCK_BYTES).
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
from proc_memory import CHILD_PRELUDE  # noqa: E402

CHILD = CHILD_PRELUDE + """
import json, sys, time, torch
import minielm

directory, stream = sys.argv[1], sys.argv[2] == "stream"
before = status_mb("VmRSS")
start = time.perf_counter()
model = minielm.load(directory, dtype=torch.float64, stream=stream)
seconds = time.perf_counter() - start
print(json.dumps({"load_s": seconds, "peak_mb": status_mb("VmHWM") - before, "held_mb": status_mb("VmRSS") - before,
                  "embedding_mb": model.weights["embed"].numel() * model.weights["embed"].element_size() / 2**20}))
"""


def measure(tree: Path, directory: Path, stream: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-c", CHILD, str(directory), "stream" if stream else "load"]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=directory).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="another minielm source tree to compare")
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    trees = [ROOT] + [Path(t) for t in args.tree]

    import torch
    from bench import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        random_checkpoint(tmp, d=2048, layers=1, f=256, heads=16, kv_heads=4, vocab=args.vocab, dtype=torch.bfloat16)
        size_mb = (Path(tmp) / "model.safetensors").stat().st_size / 2**20
        print(f"# tools/bench_big_embedding.py --vocab {args.vocab}: embedding {args.vocab} × 2048 bf16, "
              f"model.safetensors {size_mb:.0f} MB; peak and held: MB above the imports, medians of {args.repeats}")
        for stream in (True, False):
            runs = {tree: [] for tree in trees}
            for _ in range(args.repeats):
                for tree in trees:  # alternate, so that load on a shared machine falls on both
                    runs[tree].append(measure(tree, Path(tmp), stream))
            for tree, results in runs.items():
                summary = {key: round(statistics.median(r[key] for r in results), 2) for key in results[0]}
                print(json.dumps({"tree": str(tree), "stream": stream, **summary}))


if __name__ == "__main__":
    main()
