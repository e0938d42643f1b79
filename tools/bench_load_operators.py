"""What load_operators pays for never mapping the operators file itself: time and memory, three ways.

    python tools/bench_load_operators.py                 # kjv-tiny, T = 256: a 302 MB operators file
    python tools/bench_load_operators.py --tokens 64 --rounds 5

The file is written once (`equivalent_linear_map(..., out=)`, the shipped model); then each way of
reading it back runs in a fresh child process, the ways alternating round after round so that a busy
machine slows each alike (figures: medians):

    mapped    the file itself memory-mapped (minielm before issue 26): a cut in place is SIGBUS
    copied    an unnamed copy beside the file, mapped (operators_file.private_copy: what minielm does)
    read      the whole file read into this process's memory (copy-on-read, as checkpoints are read)

Each child times `load_operators(path)` and then `relative_error()` (which touches every J_t), and
reports its peak resident set (VmHWM) above what it held before loading, after each. File pages
mapped and touched count in the resident set too, but the kernel may drop them under pressure;
`read` holds anonymous memory that it cannot. The file is in the page cache (just written), as
after equivalent_linear_map(out=).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from proc_memory import CHILD_PRELUDE  # noqa: E402

CHILD = CHILD_PRELUDE + """
import json, mmap, sys, time, torch
import minielm, minielm.operators_file as operators_file

path, way = sys.argv[1], sys.argv[2]


def mapped(path, stamp):  # before issue 26: the file itself
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def read(path, stamp):  # copy-on-read: anonymous memory, pread in 1 GiB pieces
    buffer = bytearray(stamp[2])
    with open(path, "rb", buffering=0) as f:
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            done += f.readinto(view[done:done + 2**30])
    return buffer


if way != "copied":
    operators_file.private_copy = {"mapped": mapped, "read": read}[way]
before = status_mb("VmRSS")
start = time.perf_counter()
elm = minielm.load_operators(path)
load_s, load_mb = time.perf_counter() - start, status_mb("VmHWM") - before
start = time.perf_counter()
error = elm.relative_error()
use_s, use_mb = time.perf_counter() - start, status_mb("VmHWM") - before
print(json.dumps({"load_s": load_s, "load_peak_mb": load_mb, "use_s": use_s, "use_peak_mb": use_mb, "error": error}))
"""

WAYS = ("mapped", "copied", "read")


def write_operators(path: Path, tokens: int) -> int:
    import minielm

    model = minielm.load()
    ids = [1 + i % (model.config.vocab_size - 1) for i in range(tokens)]
    minielm.equivalent_linear_map(model, ids, out=path)
    return path.stat().st_size


def run(path: Path, way: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), way], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="T: the file holds T·d² float64 numbers (d = 384)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the file (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "ops.safetensors"
        size_mb = write_operators(path, args.tokens) / 2**20
        runs = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                runs[way].append(run(path, way))
    print(f"# tools/bench_load_operators.py --tokens {args.tokens} --rounds {args.rounds}; {platform.machine()}, "
          f"kjv-tiny (d = 384), T = {args.tokens}: an operators file of {size_mb:.0f} MB")
    print(json.dumps(runs))
    print(f"{'way':<8} {'load s':>8} {'peak after load MB':>19} {'relative_error() s':>19} {'peak after use MB':>18}")
    for way, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"{way:<8} {median['load_s']:>8.3f} {median['load_peak_mb']:>19.0f} {median['use_s']:>19.3f} "
              f"{median['use_peak_mb']:>18.0f}")


if __name__ == "__main__":
    main()
