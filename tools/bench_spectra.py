"""Top-k singular triplets: dense assembly + SVD, single-vector Lanczos and block Lanczos, side by side.

    python tools/bench_spectra.py                    # the shipped model, a 128-token prompt, k = 4
    python tools/bench_spectra.py --model DIR --tokens 256 --k 8 --block 12

The three methods run alternately in one process (A B C A B C ...) and the
medians are compared. Dense: assemble [J_1 … J_T] (T·d² numbers) and take its
SVD. Lanczos (`minielm.singular_vectors`): products A V (a frozen forward pass
over a batch of b inputs) and Aᵀ U (a reverse sweep carrying b rows), b = 1 for
the single-vector method and b = k + 4 for the block one, both to the same
residual tolerance. Then the cost of one product with 1 and with 8 rows, the
fastest of several alternating runs.
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
from minielm.cost import Shape, assembly_flops, frozen_product_flops, lanczos_flops, sweep_flops
from minielm.interpret import stacked_svd
from minielm.spectra import FrozenProducts, block_lanczos

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "kjv-tiny"
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
        "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
        "and God divided the light from the darkness. And God called the light Day, and the darkness he called "
        "Night. And the evening and the morning were the first day. And God said, Let there be a firmament in "
        "the midst of the waters, and let it divide the waters from the waters.")


def prompt(model, tokens: int) -> list:
    ids = model.tokenizer.encode(TEXT)
    while len(ids) < tokens:
        ids += ids[1:]
    return ids[:tokens]


def product_costs(ops: FrozenProducts, rows=(1, 8), repeats: int = 7) -> dict:
    """Seconds for A (forward over b inputs) and Aᵀ (sweep with b rows), b in `rows`: the fastest
    of `repeats` alternating runs (the fastest is the least disturbed on a shared machine)."""
    gen = torch.Generator().manual_seed(0)
    blocks = {r: (torch.randn(r, ops.n, generator=gen, dtype=ops.x.dtype).to(ops.x.device),
                  torch.randn(r, ops.d, generator=gen, dtype=ops.x.dtype).to(ops.x.device)) for r in rows}
    times = {(r, what): [] for r in rows for what in ("forward", "sweep")}
    for _ in range(repeats):
        for r, (V, U) in blocks.items():
            for what, run in (("forward", lambda: ops.apply(V)), ("sweep", lambda: ops.apply_transposed(U))):
                start = time.perf_counter()
                run()
                times[(r, what)].append(time.perf_counter() - start)
    return {key: min(t) for key, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--block", type=int, default=None, help="rows per sweep of the block method (k + 4)")
    parser.add_argument("--tol", type=float, default=1e-12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    block = args.block or args.k + 4

    model = minielm.load(args.model, dtype=torch.float64)
    ids = prompt(model, args.tokens)
    methods = {"dense": None, "single": 1, "block": block}
    times, found = {m: [] for m in methods}, {}
    for _ in range(args.repeats + 1):  # the first round is a warm-up
        for method, b in methods.items():
            start = time.perf_counter()
            if b is None:
                found[method] = stacked_svd(minielm.equivalent_linear_map(model, ids), args.k)
            else:  # what singular_vectors(model, ids, k, block=b) does, keeping the step count
                found[method] = block_lanczos(FrozenProducts(model, ids), args.k, b, args.tol)
            times[method].append(time.perf_counter() - start)
    median = {m: statistics.median(t[1:]) for m, t in times.items()}
    ops = FrozenProducts(model, ids)
    costs = product_costs(ops)

    shape, T, d = Shape.of(model.config), len(ids), model.config.hidden_size
    dense = found["dense"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"model: {args.model} (d={d}, L={shape.L}); T={T}, k={args.k}, float64, tol={args.tol:g}")
    print(f"{'method':<38} {'time (s)':>9} {'speed-up':>9} {'rows':>5} {'GFLOP':>7} {'max |Δσ|/σ':>11}")
    print(f"{'dense: assemble [J_1…J_T] + SVD':<38} {median['dense']:>9.3f} {1:>8.1f}x {d:>5} "
          f"{assembly_flops(shape, T) / 1e9:>7.1f} {'':>11}")
    for method, label in (("single", "single-vector Lanczos (b = 1)"), ("block", f"block Lanczos (b = {block})")):
        result, b = found[method], methods[method]
        error = float(((result.S - dense.S) / dense.S).abs().max())
        print(f"{label:<38} {median[method]:>9.3f} {median['dense'] / median[method]:>8.1f}x "
              f"{result.steps * b:>5} {lanczos_flops(shape, T, result.steps, b) / 1e9:>7.1f} {error:>11.1e}")
    print(f"σ = {', '.join(f'{s:.6f}' for s in dense.S.tolist())}")
    print(f"one product at T={T}, fastest of 7:  rows  forward (s)  sweep (s)   GFLOP (fwd + sweep)")
    for r in (1, 8):
        print(f"{'':<36}{r:>5} {costs[(r, 'forward')]:>12.4f} {costs[(r, 'sweep')]:>10.4f} "
              f"{(r * frozen_product_flops(shape, T) + sweep_flops(shape, T, r)) / 1e9:>10.2f}")
    print(f"8 rows cost {costs[(8, 'forward')] / costs[(1, 'forward')]:.1f}x one row in the forward pass, "
          f"{costs[(8, 'sweep')] / costs[(1, 'sweep')]:.1f}x in the sweep")


if __name__ == "__main__":
    main()
