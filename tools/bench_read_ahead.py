"""What reading the next layer ahead buys a streamed model: logits and operators, with and without.

    python tools/bench_read_ahead.py                         # the random bf16 checkpoint of test_streaming.py
    python tools/bench_read_ahead.py --gguf /path/model.gguf # and a GGUF file (dequantized per tensor)

A child process loads the checkpoint with `stream=True` and times `logits` and
`equivalent_linear_map` with the read-ahead and without, alternating run by run in the one
process, so that a busy machine slows both alike; figures are medians. The setting is the
layers' `read_ahead` (on by default on a GPU only). Memory is
measured in one fresh child per setting: its peak resident set above what it held after the
imports, over one `logits` and one `equivalent_linear_map`.
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
import json, statistics, sys, time, torch
import minielm

path, mode, ids, rounds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[5])
torch.set_num_threads(int(sys.argv[4]))
device = sys.argv[6]
before = status_mb("VmRSS")
model = minielm.load(path, dtype=torch.float64, stream=True, device=device)
sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
layers = model.weights["layers"]

def read_ahead(on):
    layers.read_ahead = on  # off: nothing read ahead, every layer reads its own tensors

def timed(run):
    sync()
    start = time.perf_counter()
    result = run()
    sync()
    return time.perf_counter() - start, result

if mode == "memory":  # one setting, one process: the peak resident set of logits and operators
    read_ahead(sys.argv[7] == "with")
    model.logits(ids)
    operators = minielm.equivalent_linear_map(model, ids).operators
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    print(json.dumps({"peak_mb": status_mb("VmHWM") - before, "gpu_peak_mb": gpu,
                      "checksum": float(operators.abs().sum())}))
    sys.exit()
model.logits(ids)  # a first pass: the file's pages are in the page cache for both settings
times = {(what, on): [] for what in ("logits_s", "operators_s") for on in (False, True)}
checksums = {}
for what, run, n in (("logits_s", lambda: model.logits(ids), rounds[0]),
                     ("operators_s", lambda: minielm.equivalent_linear_map(model, ids).operators, rounds[1])):
    for k in range(n):
        for on in ((False, True) if k % 2 == 0 else (True, False)):  # alternate, and alternate who goes first
            read_ahead(on)
            seconds, result = timed(run)
            times[what, on].append(seconds)
            checksums[what, on] = float(result.abs().sum())
assert checksums["operators_s", False] == checksums["operators_s", True]
print(json.dumps({f"{what} {'with' if on else 'without'}": [round(t, 3) for t in ts] for (what, on), ts in times.items()}))
"""


def child(path: Path, threads: int, device: str, mode: str, ids: list, rounds: list, *setting) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-c", CHILD, str(path), mode, json.dumps(ids), str(threads), json.dumps(rounds),
               device, *setting]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def compare(name: str, path: Path, ids: list, rounds: list, threads: int, device: str, memory=True) -> None:
    times = child(path, threads, device, "time", ids, rounds)
    print(json.dumps({"checkpoint": name, "device": device, "threads": threads, **times}), flush=True)
    for what in ("logits_s", "operators_s"):
        off, on = statistics.median(times[f"{what} without"]), statistics.median(times[f"{what} with"])
        print(f"{name}  T={len(ids)}  threads={threads}  {what:12s} without {off:8.3f}  with {on:8.3f}  "
              f"(with/without {on / off:.2f}; medians of {len(times[f'{what} with'])}, alternating in one process)")
    if not memory:
        return
    peaks = {ra: child(path, threads, device, "memory", ids, rounds, ra) for ra in ("without", "with")}
    assert peaks["without"]["checksum"] == peaks["with"]["checksum"], "the operators differ"
    off, on = peaks["without"]["peak_mb"], peaks["with"]["peak_mb"]
    print(f"{name}  T={len(ids)}  threads={threads}  peak_mb      without {off:8.1f}  with {on:8.1f}  "
          f"(+{on - off:.1f} MB; one process each: logits, then operators)", flush=True)
    if device.startswith("cuda"):
        off, on = peaks["without"]["gpu_peak_mb"], peaks["with"]["gpu_peak_mb"]
        print(f"{name}  T={len(ids)}  gpu_peak_mb  without {off:8.1f}  with {on:8.1f}  (+{on - off:.1f} MB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, nargs=2, default=[8, 2], metavar=("LOGITS", "OPERATORS"),
                        help="timed runs of each setting")
    parser.add_argument("--gguf", type=Path, help="also a GGUF file (slow to parse: a minute or more)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads in each child")
    parser.add_argument("--skip-safetensors", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="time only (each memory run loads once more)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from bench import random_checkpoint

    print(f"# {' '.join(sys.argv)}; {os.cpu_count()} CPU cores", flush=True)
    if not args.skip_safetensors:
        with tempfile.TemporaryDirectory() as tmp:
            random_checkpoint(tmp, d=1024, layers=9, f=2816, heads=8, kv_heads=8, vocab=4096, dtype=torch.bfloat16,
                              tied=False)
            compare("random bf16 safetensors (124M, 9 layers)", Path(tmp), [1, 17, 5, 88], args.rounds, args.threads,
                    args.device, not args.no_memory)
    if args.gguf:
        compare(args.gguf.name, args.gguf, [2, 818, 5279, 529, 7001, 563, 496, 1304], args.rounds, args.threads,
                args.device, not args.no_memory)


if __name__ == "__main__":
    main()
