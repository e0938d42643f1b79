"""Wall-clock time of each `minielm` command on the shipped model, as a person would run it.

    python tools/time_commands.py            # a Markdown table for the README, with the machine named
    python tools/time_commands.py --runs 3   # median of 3 runs per command

Each run is a fresh `python -m minielm ... --quiet` process, so the time includes
starting Python, importing torch and loading the model. The load average before and
after is printed: figures taken on a busy machine say so. The CPU time (user + system)
of the child is printed beside the wall time: it suffers less from other processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "In the beginning God created the"
COMMANDS = {
    "explain": ["explain", PROMPT],
    "explain --html": ["explain", PROMPT, "--html", "{tmp}/report.html"],
    "layers": ["layers", PROMPT],
    "check": ["check"],
    "steer (30 tokens, twice)": ["steer", "And he said unto them", "--concept", "the waters of the sea",
                                 "--layer", "1", "--scale", "0.6"],
    "generate (30 tokens)": ["generate", "The LORD is my shepherd"],
}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def measure(argv: list, env: dict | None = None) -> dict:
    """Run `argv` to its end (its output discarded) and measure that one process: wall seconds, CPU
    seconds (user + system) and peak resident memory in MB, from os.wait4's resource usage of that
    child alone (RUSAGE_CHILDREN would give the largest peak of every child so far)."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if child.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(argv)} exited with {child.returncode}: {stderr.read().decode(errors='replace').strip()}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024}


def minielm_command(args: list) -> list:
    """A fresh `python -m minielm ... --quiet` process, as a person runs the command."""
    return [sys.executable, "-m", "minielm", *args, "--quiet"]


def time_once(args: list, tmp: str) -> tuple:
    """(wall seconds, CPU seconds) of one run."""
    run = measure(minielm_command([a.format(tmp=tmp) for a in args]))
    return run["wall"], run["cpu"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in COMMANDS.items():
            runs = [time_once(command, tmp) for _ in range(args.runs)]
            walls = [wall for wall, _ in runs]
            rows.append((name, statistics.median(walls), min(walls), max(walls),
                         statistics.median(cpu for _, cpu in runs)))
            print(f"{name}: {rows[-1][1]:.1f} s", file=sys.stderr)
    load_after = os.getloadavg()
    print(f"machine: {machine()}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}; "
          f"median of {args.runs} run(s), fresh process each (Python start, torch import, model load included)\n")
    print("| command | wall time | CPU time (user + system) |\n|---|---:|---:|")
    for name, median, low, high, cpu in rows:
        spread = f" ({low:.1f}–{high:.1f})" if args.runs > 1 else ""
        print(f"| `minielm {name}` | {median:.1f} s{spread} | {cpu:.1f} s |")


if __name__ == "__main__":
    main()
