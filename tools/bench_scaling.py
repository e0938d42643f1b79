"""Measured against predicted: the analytic assembly across T and d, and its memory.

    python tools/bench_scaling.py --plot scaling.png

For each size a random Llama-style model (L = 4 layers, f = 8d/3 rounded, head
size 64, 3:1 GQA) is built, and a child process assembles all T operators,
reporting the median time and the extra peak memory. The prediction is the
cost model's flop count (minielm/cost.py) over this machine's float64 matmul
rate, and its memory formula.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import torch

import minielm
from bench import matmul_rate, measure, random_checkpoint
from minielm.cost import Shape, assembly_bytes, assembly_flops


def sizes(quick):
    Ts = [8, 16, 32, 64] if quick else [8, 16, 32, 64, 128]
    ds = [128, 256, 384] if quick else [128, 256, 384, 512, 768]
    return [(T, 384) for T in Ts] + [(32, d) for d in ds if d != 384]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", help="write measured against predicted to this PNG")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    rate = matmul_rate(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; float64 matmul {rate / 1e9:.1f} GFLOP/s")
    print(f"{'T':>5} {'d':>5} {'GFLOP':>8} {'measured s':>11} {'predicted s':>12} {'of peak':>8} "
          f"{'MB measured':>12} {'MB operators':>13}")
    rows = []
    for T, d in sizes(args.quick):
        f = (8 * d // 3 + 63) // 64 * 64
        heads = d // 64
        with tempfile.TemporaryDirectory() as tmp:
            random_checkpoint(tmp, d, 4, f, heads, max(1, heads // 3), 4096)
            shape = Shape.of(minielm.load(tmp).config)
            result = measure(tmp, "analytic", T, repeats=2, threads=args.threads)
        flops = assembly_flops(shape, T)
        memory = assembly_bytes(shape, T)
        row = dict(T=T, d=d, flops=flops, seconds=result["seconds"], predicted=flops / rate,
                   mb=result["extra_peak_mb"], operators_mb=memory["operators"] / 2**20)
        rows.append(row)
        print(f"{T:>5} {d:>5} {flops / 1e9:>8.2f} {row['seconds']:>11.3f} {row['predicted']:>12.3f} "
              f"{row['predicted'] / row['seconds']:>8.0%} {row['mb']:>12.0f} {row['operators_mb']:>13.0f}")
    if args.plot:
        plot(args.plot, rows, rate)


def plot(path, rows, rate):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, fixed in ((axes[0], "T", "d = 384"), (axes[1], "d", "T = 32")):
        part = [r for r in rows if (r["d"] == 384 if key == "T" else r["T"] == 32)]
        part.sort(key=lambda r: r[key])
        xs = [r[key] for r in part]
        ax.loglog(xs, [r["seconds"] for r in part], "o-", label="measured")
        ax.loglog(xs, [r["predicted"] for r in part], "s--", label=f"flops / {rate / 1e9:.0f} GFLOP/s")
        ax.set(title=f"assembly of all J_t ({fixed}, L = 4)", xlabel=key, ylabel="seconds")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
