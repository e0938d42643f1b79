"""Analytic operators against vectorized autograd, side by side in one run.

    python tools/bench.py                       # random Llama-style model, d=384, 4 layers, 32 tokens
    python tools/bench.py --model weights/kjv-tiny --tokens 32
    python tools/bench.py --suite                # the toy shape, then a Gemma-3-270M-shaped model at T = 23
    python tools/bench.py --suite --against ../before   # this tree's analytic map against another checkout's

Each method runs in its own child process, which loads the model, notes its
peak resident memory, runs the method `--repeats` times after a warm-up and
reports the median and fastest times and the extra peak memory over the loaded
model, with the kernel's share of its CPU time and its page faults per run (minor ones: pages
taken fresh from the system, which is what that share mostly is). The analytic path's flop
count (from the shapes; see minielm/cost.py) divided by its time is compared with the float64 matmul rate (2048² GEMMs)
measured in the same child right after each timed run, since these machines
are shared and their speed drifts: the median run against the median rate, and
the fastest run against the fastest rate (like with like; the fastest is the
least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import minielm
from minielm.checkpoint import expected_shapes, layer_map, save_checkpoint
from minielm.config import Config
from minielm.cost import Shape, assembly_flops
from proc_memory import status_mb


def random_checkpoint(directory, d, layers, f, heads, kv_heads, vocab, seed=0, dtype=torch.float32, tied=True,
                      family="llama", head_dim=None):
    """A random checkpoint of the given size (weights scaled so activations stay O(1)): Llama-style, or
    with `family="gemma3_text"` Gemma 3's four norms per layer, q/k norms, tanh-GELU and sliding layers."""
    config_json = dict(model_type=family, vocab_size=vocab, hidden_size=d, intermediate_size=f,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=tied)
    if head_dim is not None:
        config_json["head_dim"] = head_dim
    if family == "gemma3_text":  # Gemma 3 270M's pattern: five sliding layers, then a global one
        config_json.update(hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=head_dim or d // heads,
                           sliding_window=512, rms_norm_eps=1e-6,
                           layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                        for i in range(layers)])
    config = Config.from_dict(config_json)
    shapes = expected_shapes(config)
    gen = torch.Generator().manual_seed(seed)

    def tensor(name):
        shape = shapes[name]
        if len(shape) == 1:  # norm weights: w near 1, or near 0 where the norm multiplies by (1 + w)
            return 1 - config.norm_offset + 0.1 * torch.randn(shape, generator=gen)
        return torch.randn(shape, generator=gen) / shape[-1] ** 0.5

    layer_names = [n for v in layer_map(config).values() for n in (v if isinstance(v, tuple) else (v,))]
    weights = {"embed": tensor("embed"), "final_norm": tensor("final_norm"), "lm_head": tensor("lm_head"),
               "layers": [{n: tensor(n) for n in layer_names} for _ in range(layers)]}
    save_checkpoint(directory, config_json, weights, dtype)


def child(args):
    """Run one method in this process and print one JSON line."""
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # float64 never uses TF32; nothing else may either
    model = minielm.load(args.model, dtype=torch.float64)
    ids = [i % model.config.vocab_size for i in range(1, args.tokens + 1)]
    before = status_mb("VmRSS")
    if args.method == "analytic":
        def run():
            with torch.inference_mode():
                return minielm.equivalent_linear_map(model, ids).operators
    else:
        def run():
            return minielm.detached_jacobian(model, ids)
    times, rates, user, system, faults = [], [], 0.0, 0.0, 0
    for k in range(args.repeats + 1):  # the first run is a warm-up
        cpu, paged, start = os.times(), minor_faults(), time.perf_counter()
        J = run()
        seconds, used = time.perf_counter() - start, os.times()
        if k > 0:
            times.append(seconds)
            user, system = user + used.user - cpu.user, system + used.system - cpu.system
            faults += minor_faults() - paged
            rates.append(matmul_rate(args.threads, repeats=3))  # beside each run: the machine's speed drifts
    d = model.config.hidden_size  # the sweep's per-position products G_t (I + M_t) are d × d × d GEMMs
    print(json.dumps({"method": args.method, "seconds": statistics.median(times), "fastest": min(times),
                      "matmul_rate": statistics.median(rates), "fastest_matmul_rate": max(rates),
                      "d_cubed_rate": matmul_rate(args.threads, n=d, repeats=50),
                      "kernel_share": system / max(user + system, 1e-9), "faults": faults / args.repeats,
                      "extra_peak_mb": status_mb("VmHWM") - before, "checksum": float(J.abs().sum())}))


def measure(model_dir, method, tokens, repeats=3, threads=None, tree=None) -> dict:
    """Run one method in a child process: {'seconds': median, 'fastest', 'matmul_rate', ...} (see child).
    With `tree`, the child imports minielm from that checkout instead of this one."""
    command = [sys.executable, __file__, "--model", str(model_dir), "--tokens", str(tokens),
               "--repeats", str(repeats), "--threads", str(threads or os.cpu_count()), "--method", method]
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve())) if tree else None
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def matmul_rate(threads, n=2048, repeats=10) -> float:
    """This machine's float64 GEMM rate, flop/s (best of a few n × n products)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def minor_faults() -> int:
    """Page faults of this process so far that needed no disk: pages taken fresh from the system."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: a random Llama-style model)")
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--suite", action="store_true",
                        help="the README's toy shape and a Gemma-3-270M-shaped model (T 32 and 23), in one run")
    parser.add_argument("--against", metavar="DIR",
                        help="another checkout of minielm (a git worktree of an earlier commit): time its analytic "
                             "map and this tree's, alternately, in the same run, instead of analytic against autograd")
    parser.add_argument("--method", choices=["analytic", "autograd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return child(args)

    if args.suite:  # the README's toy shape and Gemma 3 270M's, in one run
        shapes = [dict(d=384, layers=4, f=1024, heads=6, kv_heads=2, vocab=4096, tokens=32),
                  dict(d=640, layers=18, f=2048, heads=4, kv_heads=1, vocab=262144, tokens=23,
                       family="gemma3_text", head_dim=256, dtype=torch.bfloat16)]
        for shape in shapes:
            tokens = shape.pop("tokens")
            with tempfile.TemporaryDirectory() as tmp:
                random_checkpoint(tmp, **shape)
                compare(tmp, tokens, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = tmp
            random_checkpoint(tmp, args.d, args.layers, args.ffn, args.heads, args.kv_heads, args.vocab)
        compare(args.model, args.tokens, args)


def compare(model_dir, tokens, args):
    """Analytic against autograd on one model, each in its own child process; one table."""
    config = minielm.load(model_dir).config
    if args.against:
        return compare_trees(model_dir, tokens, args, config)
    results = {method: measure(model_dir, method, tokens, args.repeats, args.threads)
               for method in ("analytic", "autograd")}
    rate = results["analytic"]["matmul_rate"]
    flops = assembly_flops(Shape.of(config), tokens)
    a, g = results["analytic"], results["autograd"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads; float64 matmul {rate / 1e9:.1f} GFLOP/s (median beside the runs)")
    print(f"model: {config.model_type}, d={config.hidden_size}, L={config.num_hidden_layers}, "
          f"f={config.intermediate_size}, H={config.num_attention_heads}, Hkv={config.num_key_value_heads}, "
          f"hd={config.head_dim}; T={tokens}")
    print(f"{'method':<34} {'time (s)':>9} {'extra peak MB':>14} {'kernel share of CPU':>20} {'page faults':>12}")
    print(f"{'analytic reverse sweep':<34} {a['seconds']:>9.3f} {a['extra_peak_mb']:>14.0f} {a['kernel_share']:>20.1%}"
          f" {a['faults']:>12.0f}")
    print(f"{'autograd jacobian (vectorize)':<34} {g['seconds']:>9.3f} {g['extra_peak_mb']:>14.0f} "
          f"{g['kernel_share']:>20.1%} {g['faults']:>12.0f}")
    print(f"speed-up {g['seconds'] / a['seconds']:.2f}x; analytic {flops / 1e9:.1f} GFLOP at "
          f"{flops / a['seconds'] / 1e9:.1f} GFLOP/s = {flops / a['seconds'] / rate:.0%} of the matmul rate "
          f"(medians); fastest run {flops / a['fastest'] / 1e9:.1f} GFLOP/s = "
          f"{flops / a['fastest'] / a['fastest_matmul_rate']:.0%} of the fastest rate "
          f"{a['fastest_matmul_rate'] / 1e9:.1f} GFLOP/s")
    d = config.hidden_size
    print(f"(a lone {d}³ GEMM, the sweep's per-position product, runs at {a['d_cubed_rate'] / 1e9:.1f} GFLOP/s "
          f"= {a['d_cubed_rate'] / rate:.0%} of the 2048² rate)\n")
    if abs(a["checksum"] - g["checksum"]) > 1e-9 * abs(g["checksum"]):
        raise SystemExit(f"the two methods disagree: {a['checksum']} vs {g['checksum']}")


def compare_trees(model_dir, tokens, args, config, rounds=2):
    """This tree's analytic map against the one of the checkout `args.against`, on one model: `rounds`
    child processes each, alternating, so that a drift in the machine's speed falls on both."""
    trees = {"this tree": None, f"--against {args.against}": args.against}
    runs = {name: [] for name in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            runs[name].append(measure(model_dir, "analytic", tokens, args.repeats, args.threads, tree))
    flops = assembly_flops(Shape.of(config), tokens)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads")
    print(f"model: {config.model_type}, d={config.hidden_size}, L={config.num_hidden_layers}, "
          f"f={config.intermediate_size}, H={config.num_attention_heads}, Hkv={config.num_key_value_heads}, "
          f"hd={config.head_dim}; T={tokens}; analytic map {flops / 1e9:.1f} GFLOP")
    print(f"{'analytic map of':<40} {'median (s)':>10} {'fastest (s)':>12} {'% of matmul rate':>17} {'extra peak MB':>14}")
    for name, results in runs.items():
        median = statistics.median(r["seconds"] for r in results)
        fastest = min(r["fastest"] for r in results)
        share = statistics.median(flops / r["seconds"] / r["matmul_rate"] for r in results)
        peak = max(r["extra_peak_mb"] for r in results)
        print(f"{name:<40} {median:>10.3f} {fastest:>12.3f} {share:>17.0%} {peak:>14.0f}")
    checksums = {name: results[0]["checksum"] for name, results in runs.items()}
    print()
    a, b = checksums.values()
    if abs(a - b) > 1e-9 * abs(b):
        raise SystemExit(f"the two trees' operators disagree: {checksums}")


if __name__ == "__main__":
    main()
