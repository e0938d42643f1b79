"""Top-k singular triplets: matrix-free Lanczos against dense assembly + SVD, side by side.

    python tools/bench_spectra.py                    # the shipped model, a 128-token prompt, k = 4
    python tools/bench_spectra.py --model DIR --tokens 256 --k 8

Both methods run alternately in one process (A B A B ...) and the medians are
compared. Dense: assemble [J_1 … J_T] (T·d² numbers) and take its SVD.
Matrix-free: Golub–Kahan–Lanczos with products A v (a frozen forward pass) and
Aᵀ u (a one-row reverse sweep), never holding more than T·d·m numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import minielm
from minielm.interpret import stacked_svd
from minielm.spectra import singular_vectors

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "kjv-tiny"
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
        "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
        "and God divided the light from the darkness. And God called the light Day, and the darkness he called "
        "Night. And the evening and the morning were the first day. And God said, Let there be a firmament in "
        "the midst of the waters, and let it divide the waters from the waters.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = minielm.load(args.model)
    ids = model.tokenizer.encode(TEXT)
    while len(ids) < args.tokens:
        ids += ids[1:]
    ids = ids[: args.tokens]
    times = {"dense": [], "matrix-free": []}
    for _ in range(args.repeats + 1):  # the first round is a warm-up
        start = time.perf_counter()
        dense = stacked_svd(minielm.equivalent_linear_map(model, ids), args.k)
        times["dense"].append(time.perf_counter() - start)
        start = time.perf_counter()
        U, S, V = singular_vectors(model, ids, args.k, tol=1e-10)
        times["matrix-free"].append(time.perf_counter() - start)
    dense_s, free_s = (statistics.median(times[m][1:]) for m in ("dense", "matrix-free"))
    d = model.config.hidden_size
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: {args.model} (d={d}, L={model.config.num_hidden_layers}); T={len(ids)}, k={args.k}, float64")
    print(f"{'method':<36} {'time (s)':>9} {'numbers held':>14}")
    print(f"{'dense: assemble [J_1…J_T] + SVD':<36} {dense_s:>9.3f} {len(ids) * d * d:>14,}")
    print(f"{'matrix-free Lanczos (top k)':<36} {free_s:>9.3f} {'T·d·m':>14}")
    err_s = float(((S - dense.S) / dense.S).abs().max())
    err_u = float((U - dense.U).abs().max())
    print(f"speed-up {dense_s / free_s:.1f}x; singular values agree to {err_s:.1e} (relative), "
          f"U to {err_u:.1e}; σ = {', '.join(f'{s:.4f}' for s in S.tolist())}")


if __name__ == "__main__":
    main()
