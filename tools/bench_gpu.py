"""The seed's model sizes on one GPU in float64: operators, vectorized autograd and block spectra.

    python tools/bench_gpu.py --models llama3-8b --tokens 32 128      # one model per run (~5 min on an H100)
    python tools/bench_gpu.py --tiny                                   # small shapes on the CPU, end to end
    python tools/bench_gpu.py --models llama3-8b gemma3-12b --deadline 400   # what fits in 400 s, in that order

For each model shape (Llama 3 8B, Qwen 3 14B, Gemma 3 12B), in one run on one device:

1. random bf16 weights are generated on the device and written as a sharded
   safetensors checkpoint (config.json, shards, index), then loaded with
   `stream=True`: they stay memory-mapped in bf16 and each layer is cast to
   float64 on the device only while it runs;
2. the float64 matmul rate is measured (large square GEMMs; TF32 is asserted off);
3. for each prompt length T: the full operators (`equivalent_linear_map`: time,
   the cost model's flops per second as a fraction of that rate, peak device
   memory, reconstruction error); the same map by vectorized autograd
   (`detached_jacobian`) where it fits; the top-k singular triplets by block
   Lanczos (b = k + 4 rows per sweep) and by single-vector Lanczos (b = 1),
   their singular values checked against the eigenvalues of Σ_t J_t J_tᵀ.

A short table is printed at the end; the raw results (JSON and the table, with
the device's name) go to --out (default tools/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import minielm
from minielm.checkpoint import TOP_LEVEL, expected_shapes, layer_map
from minielm.config import Config
from minielm.cost import Shape, assembly_flops, lanczos_flops
from minielm.spectra import FrozenProducts, block_lanczos


def gemma_layer_types(n: int) -> list:
    """Five sliding-window layers, then one global, repeated (Gemma 3)."""
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]


SHAPES = {  # config.json of each model, as Hugging Face writes it (the weights are random)
    "llama3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=False, hidden_act="silu"),
    "qwen3-14b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=False, hidden_act="silu"),
    "gemma3-12b": dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=dict(rope_type="linear", factor=8.0),
        sliding_window=1024, layer_types=gemma_layer_types(48), max_position_embeddings=131072,
        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh"),
}


def tiny(config_json: dict) -> dict:
    """The same family and features at toy size: d 64, 6 layers, 4/2 heads of 16, f 128, vocab 512."""
    small = dict(config_json, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if "layer_types" in small:
        small.update(layer_types=gemma_layer_types(6), sliding_window=8, query_pre_attn_scalar=16)
    return small


# ---- a random checkpoint, written shard by shard -----------------------------------------------
def write_random_checkpoint(directory: Path, config_json: dict, device, seed=0, shard_bytes=4 << 30) -> float:
    """bf16 weights N(0, 1/fan_in) (norm weights: their neutral value + N(0, 0.1²)), generated on
    `device`, written as model-0000k.safetensors shards with an index. Returns the bytes written."""
    from safetensors.torch import save_file

    config = Config.from_dict(config_json)
    shapes, gen = expected_shapes(config), torch.Generator(device=device).manual_seed(seed)
    offset = config.norm_offset  # Gemma's norms are (1 + w): their neutral weight is 0

    def random(short):
        shape = shapes[short]
        noise = torch.randn(shape, generator=gen, device=device)
        value = (1 - offset) + 0.1 * noise if len(shape) == 1 else noise / math.sqrt(shape[-1])
        return value.to(torch.bfloat16).cpu()

    names = [("model." + hf, short) for hf, short in TOP_LEVEL.items()]
    if not config.tie_word_embeddings:
        names.append(("lm_head.weight", "lm_head"))
    names += [(f"model.layers.{i}.{hf}", short) for i in range(config.num_hidden_layers)
              for hf, short in layer_map(config).items()]
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, total, index = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, index
        index += 1
        save_file(shard, str(directory / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
        weight_map.update({name: f"model-{index:05d}.safetensors" for name in shard})
        shard, size = {}, 0

    for name, short in names:
        shard[name] = random(short)
        size += shard[name].numel() * 2
        total += shard[name].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    return total


# ---- measuring ---------------------------------------------------------------------------------------
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    """Peak device memory allocated by torch since the last reset (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def timed(run, device):
    """(result, seconds, peak device GB) of one call."""
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - start, peak_gb(device)


def matmul_rate(device, n: int, repeats: int = 5) -> float:
    """float64 FLOP/s of an n × n GEMM, the best of `repeats` (after a warm-up)."""
    assert not torch.backends.cuda.matmul.allow_tf32, "TF32 matmuls are on: this benchmark measures float64"
    a = torch.randn(n, n, dtype=torch.float64, device=device)
    b = torch.randn(n, n, dtype=torch.float64, device=device)
    assert (a @ b).dtype == torch.float64
    best = math.inf
    for _ in range(repeats):
        _, seconds, _ = timed(lambda: a @ b, device)
        best = min(best, seconds)
    return 2 * n ** 3 / best


def out_of_memory(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class Deadline:
    """What still fits before a fixed time: a lent GPU comes with minutes of device time, and a run
    cut off by the command's limit returns only what it had saved. Each step is predicted from the
    cost model at the measured matmul rate, times a margin; a step that would not finish is skipped
    and says so in the results, so that the cheaper steps after it still run."""

    MARGIN = 2.0  # predicted seconds × this must fit: GEMMs below the peak rate, streaming, small launches

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def rules_out(self, seconds: float) -> dict | None:
        """None if a step predicted to take `seconds` fits, else the record of its skipping."""
        if self.MARGIN * seconds <= self.left():
            return None
        return {"skipped": f"predicted {seconds:.1f} s (× {self.MARGIN:g}) does not fit in the "
                           f"{max(0.0, self.left()):.1f} s left"}


def bench_model(name: str, config_json: dict, args, device, workdir: Path, rate: float, record: dict, save,
                deadline: Deadline):
    """Fill `record` with one run per prompt length, calling save() after each (a run cut off by a
    time limit keeps what it measured). Steps that `deadline` rules out are recorded as skipped."""
    directory, k, methods = workdir / name, args.k, set(args.methods)
    shape = Shape.of(Config.from_dict(config_json))
    record.update({"model": name, "config": config_json, "params": shape.params, "runs": []})
    skip = deadline.rules_out(shape.params * 2 / args.write_rate  # write the bf16 checkpoint, then one map
                              + assembly_flops(shape, min(args.tokens)) / rate)
    if skip:
        record.update(skip)
        save()
        return
    _, write_s, _ = timed(lambda: write_random_checkpoint(directory, config_json, device), device)
    record["checkpoint_write_s"] = write_s
    model = minielm.load(directory, dtype=torch.float64, device=device, stream=True)
    gen = torch.Generator().manual_seed(1)
    for T in args.tokens:
        ids = torch.randint(0, shape.V, (T,), generator=gen).tolist()
        run = {"T": T, "operators_gb": T * shape.d ** 2 * 8 / 1e9}
        last, sigma_dense = None, None
        flops = assembly_flops(shape, T)
        if "operators" in methods and (skip := deadline.rules_out(flops / rate)):
            run["operators"] = skip
        elif "operators" in methods:
            try:
                elm, seconds, peak = timed(lambda: minielm.equivalent_linear_map(model, ids), device)
                J = elm.operators  # (T, d, d)
                gram = torch.einsum("tij,tkj->ik", J, J)  # Σ_t J_t J_tᵀ = A Aᵀ (d × d)
                sigma_dense = torch.linalg.eigvalsh(gram).flip(0)[:k].clamp_min(0).sqrt().cpu()
                last = J[-1].clone()
                run["operators"] = {"seconds": seconds, "flops": flops, "flop_rate": flops / seconds,
                                    "fraction_of_matmul_rate": flops / seconds / rate, "peak_gb": peak,
                                    "relative_error": elm.relative_error(), "sigma": sigma_dense.tolist()}
                del elm, J, gram
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if not out_of_memory(error):
                    raise
                run["operators"] = {"does_not_fit": str(error).splitlines()[0]}
        autograd_s = 3 * run.get("operators", {}).get("seconds", flops / rate)  # 1.9–3.3× the analytic time on a CPU
        if "autograd" in methods and (skip := deadline.rules_out(autograd_s)):
            run["autograd"] = skip
        elif "autograd" in methods:
            try:
                J, seconds, peak = timed(lambda: minielm.detached_jacobian(model, ids), device)
                run["autograd"] = {"seconds": seconds, "peak_gb": peak}
                if last is not None:
                    run["autograd"]["max_abs_difference_last_operator"] = float((J[-1] - last).abs().max())
                del J
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if not out_of_memory(error):
                    raise
                run["autograd"] = {"does_not_fit": str(error).splitlines()[0]}
        del last
        if "spectra" in methods:
            for block in args.blocks or [k + 4, 1]:
                skip = deadline.rules_out(lanczos_flops(shape, T, 40, block) / rate)  # the spectra so far took 24–36 steps
                if skip:
                    run[f"spectra_b{block}"] = skip
                    continue
                found, seconds, peak = timed(lambda: block_lanczos(FrozenProducts(model, ids), k, block, 1e-12),
                                             device)
                flops = lanczos_flops(shape, T, found.steps, block)
                entry = {"seconds": seconds, "steps": found.steps, "rows": found.steps * block, "flops": flops,
                         "fraction_of_matmul_rate": flops / seconds / rate, "peak_gb": peak,
                         "sigma": found.S.cpu().tolist(),
                         "max_residual_over_sigma1": float(found.residuals.max() / found.S[0])}
                if sigma_dense is not None:
                    entry["max_relative_sigma_difference"] = float(((found.S.cpu() - sigma_dense) / sigma_dense)
                                                                   .abs().max())
                run[f"spectra_b{block}"] = entry
        record["runs"].append(run)
        print(json.dumps(run), flush=True)
        save()
    del model
    shutil.rmtree(directory)  # the next model needs the disk


# ---- the report ----------------------------------------------------------------------------------------
def not_run(entry: dict) -> str:
    """Why a step has no figures ('does not fit', or skipped with the deadline's reason), or ''."""
    if "does_not_fit" in entry:
        return f"{'does not fit':>9}"
    return f"{'skipped':>9}  {entry['skipped']}" if "skipped" in entry else ""


def table(results: dict) -> str:
    def gb(x):
        return "  n/a" if x is None else f"{x:5.1f}"

    lines = [f"device: {results['device_name']}; float64 matmul {results['matmul_rate'] / 1e12:.2f} TFLOP/s "
             f"({results['matmul_n']}² GEMM); torch {results['torch']}",
             f"{'model':<11} {'T':>4} {'what':<22} {'time (s)':>9} {'of rate':>8} {'peak GB':>8}  notes"]
    for record in results["models"]:
        if not_run(record):
            lines.append(f"{record['model']:<11} {'':>4} {'(the whole model)':<22} {not_run(record)}")
        for run in record.get("runs", []):
            head = f"{record['model']:<11} {run['T']:>4}"
            for key, label in (("operators", "operators (analytic)"), ("autograd", "autograd (vectorized)")):
                entry = run.get(key)
                if entry is None:
                    continue
                if not_run(entry):
                    lines.append(f"{head} {label:<22} {not_run(entry)}")
                    continue
                share = f"{entry['fraction_of_matmul_rate']:7.0%}" if "fraction_of_matmul_rate" in entry else ""
                note = (f"reconstruction {entry['relative_error']:.1e}" if key == "operators"
                        else f"analytic {entry['seconds'] / run['operators']['seconds']:.2f}x faster"
                        if "seconds" in run.get("operators", {}) else "")
                lines.append(f"{head} {label:<22} {entry['seconds']:>9.2f} {share:>8} {gb(entry['peak_gb']):>8}  {note}")
            for key in sorted(k for k in run if k.startswith("spectra_b")):
                entry = run[key]
                if not_run(entry):
                    lines.append(f"{head} {'top-k, b = ' + key[9:]:<22} {not_run(entry)}")
                    continue
                check = (f", σ vs dense {entry['max_relative_sigma_difference']:.1e}"
                         if "max_relative_sigma_difference" in entry else "")
                lines.append(f"{head} {'top-k, b = ' + key[9:]:<22} {entry['seconds']:>9.2f} "
                             f"{entry['fraction_of_matmul_rate']:>7.0%} {gb(entry['peak_gb']):>8}  "
                             f"{entry['rows']} rows{check}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--methods", nargs="+", default=["operators", "autograd", "spectra"],
                        choices=["operators", "autograd", "spectra"])
    parser.add_argument("--k", type=int, default=4, help="singular triplets for the spectra")
    parser.add_argument("--blocks", nargs="+", type=int, default=None, help="rows per sweep to compare (k+4 1)")
    parser.add_argument("--tiny", action="store_true", help="toy shapes, on the CPU: to test this script")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--workdir", default=None, help="where the random checkpoints are written (a temp dir)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start: steps predicted not to finish by then are skipped")
    parser.add_argument("--write-rate", type=float, default=1e9,
                        help="bytes/s assumed for writing a checkpoint, for --deadline's prediction")
    args = parser.parse_args()
    deadline = Deadline(args.deadline)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    n = 8192 if device.type == "cuda" else 1024
    rate = matmul_rate(device, n)
    results = {"device_name": name, "device": str(device), "torch": torch.__version__,
               "cuda": torch.version.cuda, "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
               "matmul_n": n, "matmul_rate": rate, "tiny": args.tiny, "args": vars(args), "models": []}
    print(f"{name}: float64 matmul {rate / 1e12:.3f} TFLOP/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny-" if args.tiny else "") + "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    stem = out / f"bench_gpu_{slug}_{'-'.join(args.models)}_{time.strftime('%Y%m%dT%H%M%S')}"

    def save():
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        stem.with_suffix(".txt").write_text(table(results) + "\n")

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for model_name in args.models:
            config_json = tiny(SHAPES[model_name]) if args.tiny else SHAPES[model_name]
            results["models"].append({})
            bench_model(model_name, config_json, args, device, Path(workdir), rate, results["models"][-1], save,
                        deadline)
    save()
    print(table(results))
    print(f"wrote {stem}.json and .txt")


if __name__ == "__main__":
    main()
