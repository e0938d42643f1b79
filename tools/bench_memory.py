"""Peak memory of equivalent_linear_map above the loaded model: in memory, and with out=.

    python tools/bench_memory.py                   # a Gemma-3-270M-shaped model (H·hd = 1024 > d = 640), T = 256
    python tools/bench_memory.py --layers 2 --tokens 600

Each run is a child process that loads the model, runs the forward pass once (the
heap keeps its temporaries), notes its resident memory, assembles the operators and
reports its peak (/proc VmHWM) above that. The bound of issue 10: at most 1.5× the
operators + 200 MB in memory; with out=, one block's work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

from bench import random_checkpoint
from proc_memory import CHILD_PRELUDE

CHILD = CHILD_PRELUDE + """
import json, sys, time, torch, minielm, minielm.linear_map
directory, T, out, block = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
model = minielm.load(directory)
ids = [1 + i % 1000 for i in range(T)]
with torch.inference_mode():
    minielm.linear_map.traced(model, ids)
    before = status_mb("VmRSS")
    start = time.perf_counter()
    elm = minielm.equivalent_linear_map(model, ids, **({} if out == "-" else dict(out=out, block=block)))
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
print(json.dumps({"extra_mb": peak - before, "operators_mb": elm.operators.numel() * 8 / 2**20,
                  "seconds": seconds, "error": elm.relative_error()}))
"""


def run(directory, tokens, out="-", block=0) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(tokens), str(out), str(block)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=18, help="memory does not depend on it; time does")
    parser.add_argument("--block", type=int, default=64, help="rows per block with out=")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        random_checkpoint(tmp, d=640, layers=args.layers, f=2048, heads=4, kv_heads=1, vocab=262144,
                          family="gemma3_text", head_dim=256, dtype=torch.bfloat16)
        memory = run(tmp, args.tokens)
        on_file = run(tmp, args.tokens, f"{tmp}/operators.safetensors", args.block)
    ops = memory["operators_mb"]
    block_mb = args.tokens * args.block * 640 * 8 / 2**20
    print(f"Gemma-3-270M shape (d 640, 4 heads × 256, 1 kv head, f 2048), {args.layers} layers, T = {args.tokens}; "
          f"operators {ops:.0f} MB")
    print(f"{'run':<24} {'time (s)':>9} {'peak above model (MB)':>22} {'bound (MB)':>11} {'error':>9}")
    print(f"{'in memory':<24} {memory['seconds']:>9.1f} {memory['extra_mb']:>22.0f} {1.5 * ops + 200:>11.0f} "
          f"{memory['error']:>9.1e}")
    print(f"{f'out=, blocks of {args.block} rows':<24} {on_file['seconds']:>9.1f} {on_file['extra_mb']:>22.0f} "
          f"{'block ' + format(block_mb, '.0f'):>11} {on_file['error']:>9.1e}")


if __name__ == "__main__":
    main()
