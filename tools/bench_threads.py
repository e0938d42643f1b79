"""`minielm explain` with torch's thread defaults and the alternatives, idle and beside one busy process.

    python tools/bench_threads.py                     # the shipped model, 3 repeats
    python tools/bench_threads.py --repeats 5 --out tools/results/bench_threads_cpu.txt
    python tools/bench_threads.py --gguf F.gguf       # also the real Gemma 3 270M (about 30 s a run idle)

Each run is a fresh process, as a person runs the command (Python start, torch import and loading
included), with one of these settings:

    torch defaults            python -m minielm.cli: the command without its THREAD_DEFAULTS
    OMP_WAIT_POLICY=PASSIVE   the same, waiting threads sleep instead of spinning
    OMP_NUM_THREADS=1         the same, one thread (torch.set_num_threads(1) and MKL follow it)
    the command               python -m minielm: the shipped command, with minielm/__main__.py's
                              THREAD_DEFAULTS (the mechanism the lead sets from these figures)

each idle and with one competing process (`python -c "while True: pass"`, pinned to nothing, started
before and killed after that condition's runs). Settings and conditions are interleaved within each
repeat, so that a machine that drifts affects them alike. Printed: every run (wall and CPU time), then
per model a table with the median and range of the wall times. The load average before and after is
printed: on a machine shared with other jobs the "idle" condition is not idle, and only ratios
measured side by side count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from time_commands import machine, measure

ROOT = Path(__file__).resolve().parent.parent
PROMPT = {"kjv-tiny": "In the beginning God created the", "gemma3-270m": "The Eiffel Tower is located in the city of"}
# name -> (module run with -m, environment added)
SETTINGS = {
    "torch defaults": ("minielm.cli", {}),
    "OMP_WAIT_POLICY=PASSIVE": ("minielm.cli", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "OMP_NUM_THREADS=1": ("minielm.cli", {"OMP_NUM_THREADS": "1"}),
    "the command": ("minielm", {}),
}
CONDITIONS = ("idle", "1 busy process")
OMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def command(module: str, model: str, model_path: str | None) -> list:
    extra = ["--model", model_path] if model_path else []
    return [sys.executable, "-m", module, "explain", PROMPT[model], *extra, "--quiet"]


def environment(added: dict) -> dict:
    """This process's environment without any OpenMP setting of its own, plus `added`."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    return dict(env, PYTHONPATH=str(ROOT), **added)


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf", help="also the real Gemma 3 270M, from this GGUF file")
    parser.add_argument("--out", type=Path, help="also write the output to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # this tree's minielm, as the children run it
    from minielm.__main__ import THREAD_DEFAULTS

    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    models = {"kjv-tiny": None, **({"gemma3-270m": args.gguf} if args.gguf else {})}
    load_before = os.getloadavg()
    say(f"machine: {machine()}")
    say(f"the command's THREAD_DEFAULTS (minielm/__main__.py): {THREAD_DEFAULTS}; {args.repeats} repeat(s)")
    walls = {}  # (model, condition, setting) -> [seconds]
    for repeat in range(args.repeats):
        for condition in CONDITIONS:
            competitor = busy_process() if condition != "idle" else None
            try:
                for model, path in models.items():
                    for setting, (module, added) in SETTINGS.items():
                        run = measure(command(module, model, path), environment(added))
                        walls.setdefault((model, condition, setting), []).append(run["wall"])
                        say(f"  run {repeat + 1}  {model:<12} {condition:<15} {setting:<24} "
                            f"wall {run['wall']:6.1f} s  cpu {run['cpu']:6.1f} s")
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    load_after = os.getloadavg()
    say(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    for model in models:
        say()
        say(f"`minielm explain` on {model}: wall time, median (range) of {args.repeats}")
        say()
        say("| setting | " + " | ".join(CONDITIONS) + " |")
        say("|---|" + "---:|" * len(CONDITIONS))
        for setting in SETTINGS:
            cells = []
            for condition in CONDITIONS:
                w = walls[(model, condition, setting)]
                cells.append(f"{statistics.median(w):.1f} s ({min(w):.1f}–{max(w):.1f})")
            say(f"| {setting} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
