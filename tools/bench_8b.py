"""A Llama-3-8B-shaped checkpoint on the CPU: built once, then streamed, and where each Lanczos step's time goes.

    python tools/bench_8b.py --build                        # write the checkpoint (16 GB, ~5 GB shards), or reuse it
    python tools/bench_8b.py --profile-step                 # a few Lanczos steps: reading, casting, norms, products
    python tools/bench_8b.py --profile-step --block 1 2 4 8 # the same for each block size, taken in turn
    python tools/bench_8b.py --blocks 1 2 4 8               # Lanczos to convergence, b rows per step: steps × time
    python tools/bench_8b.py --explain                      # `minielm explain --stream` as a user runs it: time, RSS, exactness
    python tools/bench_8b.py --layers 2 --vocab 8192 ...    # the same d, f and heads, fewer layers, a smaller vocab

The checkpoint (`build`): Llama 3 8B's config.json (hidden 4096, intermediate 14336, 32 layers, 32 query /
8 key-value heads of 128, vocab 128256, rope_theta 500000 with its llama3 scaling, rms_norm_eps 1e-5, untied
lm_head) with random bf16 weights N(0, 1/fan_in) (activations stay O(1); std 0.0156 for d = 4096) and norm
weights 1 + N(0, 0.1²) (not all 1: a norm diagonal left out would then change the results), in sharded
safetensors files of at most ~5 GB with model.safetensors.index.json. The files are written tensor by
tensor, a block of rows at a time, so memory stays at one block (~100 MB) whatever the size; a checkpoint
already in the directory is reused when its config.json, index and file sizes are those this tool writes.
Its tokenizer (tokenizer.json) is byte-level: ids 0-255 the bytes, then <|begin_of_text|> (Llama 3's id
128000 at the full vocabulary), <|end_of_text|> and reserved pieces up to the vocabulary's size, so every id
of the model decodes. `--layers N` and `--vocab V` build a smaller version (a directory of its own); the
vocabulary only sizes the embedding and the unembedding, not a Lanczos step.

The profile (`--profile-step`): the model loaded with `stream=True`, a 32-token prompt, one warm-up step
(it reads the file; a resident model keeps what it read), then `--steps` steps of block Lanczos' two
products (A V, a frozen forward pass over b inputs; Aᵀ U, a b-row reverse sweep) with timers around
reading (SafetensorsFile.read), checking values (read_checked, first reads only), casting to float64 and
applying norm diagonals (Model.norm_before / norm_after): each share is exclusive (time in a timed
function called from another counts once). The rest is the products (GEMMs and the small elementwise
work around them). Beside them: minor page faults and system time (getrusage), peak RSS, the float64
matmul rate (square GEMMs) and the step's matmul flops from minielm.cost, so that the step's time is also
given as a multiple of its products at that rate. Raw output: tools/results/bench_8b_*_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from bench_gpu import SHAPES, matmul_rate  # noqa: E402
from proc_memory import status_mb  # noqa: E402

import minielm  # noqa: E402
import minielm.checkpoint  # noqa: E402
import minielm.model  # noqa: E402
from minielm.checkpoint import TOP_LEVEL, expected_shapes, layer_map  # noqa: E402
from minielm.config import Config  # noqa: E402
from minielm.cost import Shape, frozen_product_flops, sweep_flops  # noqa: E402
from minielm.matrix_free import directional_checks  # noqa: E402
from minielm.spectra import FrozenProducts, block_lanczos  # noqa: E402

CACHE = Path.home() / ".cache" / "minielm-bench"
SHARD_BYTES = 5 * 10**9  # a new shard when the next tensor would take this one past it
ROWS = 8192  # rows of a tensor generated and written at a time
PROMPT = "In the beginning God created the heaven and the earth."  # its first 31 bytes, after BOS: T = 32


# ---- the checkpoint ---------------------------------------------------------------------------------
def llama3_8b(layers: int = 32, vocab: int = 128256) -> dict:
    """Llama 3 8B's config.json, with `layers` layers and a vocabulary of `vocab` ids."""
    special = 128000 if vocab > 128001 else 256  # Llama 3's ids of <|begin_of_text|>, <|end_of_text|>
    return dict(SHAPES["llama3-8b"], architectures=["LlamaForCausalLM"], num_hidden_layers=layers, vocab_size=vocab,
                bos_token_id=special, eos_token_id=special + 1, torch_dtype="bfloat16")


def default_directory(layers: int, vocab: int) -> Path:
    name = "llama3-8b-random" + (f"-{layers}l" if layers != 32 else "") + (f"-v{vocab}" if vocab != 128256 else "")
    return CACHE / name


def tensors_in_file_order(config_json: dict) -> list:
    """[(hf name, short name, shape)]: the embedding, each layer's tensors, the final norm, the unembedding."""
    config = Config.from_dict(config_json)
    shapes = expected_shapes(config)
    top = [("model." + hf, short) for hf, short in TOP_LEVEL.items()]
    names = top[:1] + [(f"model.layers.{i}.{hf}", short) for i in range(config.num_hidden_layers)
                       for hf, short in layer_map(config).items()] + top[1:]
    if not config.tie_word_embeddings:
        names.append(("lm_head.weight", "lm_head"))
    return [(hf, short, shapes[short]) for hf, short in names]


def shards(config_json: dict) -> list:
    """The files to write: [(file name, header dict, [(hf name, short name, shape), ...])], each header as
    safetensors writes it (data offsets in bytes, bf16), at most SHARD_BYTES of data a file but for one tensor."""
    files, current, size = [], [], 0
    for entry in tensors_in_file_order(config_json):
        nbytes = 2 * math.prod(entry[2])
        if current and size + nbytes > SHARD_BYTES:
            files.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    files.append(current)
    result = []
    for k, entries in enumerate(files, 1):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for hf, _, shape in entries:
            nbytes = 2 * math.prod(shape)
            header[hf] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        result.append((f"model-{k:05d}-of-{len(files):05d}.safetensors", header, entries))
    return result


def header_bytes(header: dict) -> bytes:
    """The header as it opens the file: its length (8 bytes, little-endian), then the JSON, padded with
    spaces to a multiple of 8 bytes (as the safetensors library pads it)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def file_size(header: dict) -> int:
    data = max(entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__")
    return len(header_bytes(header)) + data


def write_tensor(file, short: str, shape: tuple, generator: torch.Generator) -> None:
    """Random bf16 values, ROWS rows at a time: N(0, 1/fan_in), or 1 + N(0, 0.1²) for a norm's weight."""
    rows, columns = shape[0], math.prod(shape[1:])
    for start in range(0, rows, ROWS):
        block = torch.randn(min(ROWS, rows - start), columns, generator=generator)
        block = 1 + 0.1 * block if len(shape) == 1 else block / math.sqrt(columns)
        file.write(block.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def is_built(directory: Path, config_json: dict, files: list) -> bool:
    """Whether `directory` holds this checkpoint already: the same config.json and index, and every shard of
    the size its header gives (a build cut short leaves no index: it is written last)."""
    try:
        same_config = json.loads((directory / "config.json").read_text()) == config_json
        index = json.loads((directory / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    weight_map = {hf: name for name, _, entries in files for hf, _, _ in entries}
    return (same_config and index.get("weight_map") == weight_map
            and all((directory / name).is_file() and (directory / name).stat().st_size == file_size(header)
                    for name, header, _ in files))


def build(directory: Path, config_json: dict, seed: int = 0) -> Path:
    """The checkpoint of `config_json` (llama3_8b's) in `directory`, written unless it is there already (see
    the module's docstring)."""
    files = shards(config_json)
    if is_built(directory, config_json, files):
        print(f"reusing {directory}", file=sys.stderr)
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)  # until every shard is written again
    start, total = time.perf_counter(), 0
    order = {entry[0]: k for k, entry in enumerate(tensors_in_file_order(config_json))}  # each tensor's own seed
    for name, header, entries in files:
        with open(directory / name, "wb") as file:
            file.write(header_bytes(header))
            for hf, short, shape in entries:
                write_tensor(file, short, shape, torch.Generator().manual_seed(seed * 100003 + order[hf]))
                total += 2 * math.prod(shape)
        print(f"wrote {directory / name} ({file_size(header) / 1e9:.2f} GB)", file=sys.stderr)
    write_tokenizer(directory, config_json["vocab_size"], config_json["bos_token_id"])
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    index = {"metadata": {"total_size": total},
             "weight_map": {hf: name for name, _, entries in files for hf, _, _ in entries}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"built {directory}: {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return directory


def byte_alphabet() -> list:
    """The 256 characters that stand for the bytes 0-255 in a byte-level BPE (GPT-2's bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tokenizer(directory: Path, vocab: int, bos: int) -> None:
    """tokenizer.json (byte-level: id b is byte b) and tokenizer_config.json (BOS first, as Llama 3's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = byte_alphabet() + [f"<|reserved_special_token_{i}|>" for i in range(256, vocab)]
    pieces[bos], pieces[bos + 1] = "<|begin_of_text|>", "<|end_of_text|>"
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


# ---- where a step's time goes -----------------------------------------------------------------------------
class Timers:
    """Exclusive time in wrapped functions, by label: time spent in a wrapped function that another wrapped
    function called counts for the inner one only."""

    def __init__(self):
        self.seconds, self.calls, self.inner = defaultdict(float), defaultdict(int), []

    def wrap(self, owner, attribute: str, label: str) -> None:
        original = getattr(owner, attribute, None)
        if original is None:  # a tree without this function (the profile runs on older trees too)
            return

        def timed(*args, **kwargs):
            start = time.perf_counter()
            self.inner.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                spent, inner = time.perf_counter() - start, self.inner.pop()
                self.seconds[label] += spent - inner
                self.calls[label] += 1
                if self.inner:
                    self.inner[-1] += spent

        setattr(owner, attribute, timed)

    def take(self) -> dict:
        seconds = dict(self.seconds)
        self.seconds.clear()
        self.calls.clear()
        return seconds


def timed_functions(timers: Timers) -> None:
    checkpoint, model = minielm.checkpoint, minielm.model
    timers.wrap(checkpoint.SafetensorsFile, "read", "reading")
    timers.wrap(checkpoint, "read_checked", "checking values")
    timers.wrap(checkpoint, "to_compute", "casting")  # the cast of the trees before the buffers
    timers.wrap(checkpoint, "cast_into", "casting")  # into a reused buffer
    timers.wrap(model.Model, "norm_before", "norm diagonals")
    timers.wrap(model.Model, "norm_after", "norm diagonals")


def usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "system": r.ru_stime, "minor_faults": r.ru_minflt, "wall": time.perf_counter()}


def since(before: dict) -> dict:
    now = usage()
    return {k: now[k] - before[k] for k in before}


def load(directory: Path):
    model = minielm.load(directory, stream=True)
    ids = model.tokenizer.encode(PROMPT)[:32]
    return model, ids


def lanczos_step(ops: FrozenProducts, b: int, gen: torch.Generator) -> None:
    """One step's two products on random blocks: A V (b inputs) and Aᵀ U (b rows)."""
    ops.apply(torch.randn(b, ops.n, generator=gen, dtype=torch.float64))
    ops.apply_transposed(torch.randn(b, ops.d, generator=gen, dtype=torch.float64))


def profile_step(directory: Path, steps: int, blocks: list) -> dict:
    """`steps` Lanczos steps for each block size in `blocks`, taken in turn (one of each, then again), after
    a warm-up step: time, its shares, page faults and system time of each, and the matmul rate beside."""
    timers = Timers()
    timed_functions(timers)
    model, ids = load(directory)
    layers = model.weights["layers"]
    shape, T = Shape.of(model.config), len(ids)
    start = usage()
    ops = FrozenProducts(model, ids)
    setup = since(start)
    gen = torch.Generator().manual_seed(0)
    first = usage()
    lanczos_step(ops, blocks[0], gen)  # the first step after the traced pass: a resident model has read everything
    warm_up = {**since(first), "shares": timers.take()}
    records = {b: [] for b in blocks}
    for _ in range(steps):
        for b in blocks:
            before = usage()
            lanczos_step(ops, b, gen)
            record = since(before)
            record["shares"] = timers.take()
            record["rate"] = matmul_rate(torch.device("cpu"), 2048, repeats=3)  # beside each step: the machine drifts
            records[b].append(record)
    runs = [{"block": b, "steps": records[b], "step_flops": b * frozen_product_flops(shape, T) + 2 * b * shape.d ** 2
             + sweep_flops(shape, T, b)} for b in blocks]
    return {"checkpoint": str(directory), "layers": shape.L, "T": T, "resident": getattr(layers, "resident", False),
            "threads": torch.get_num_threads(), "setup": setup, "warm_up": warm_up, "runs": runs,
            "peak_rss_mb": status_mb("VmHWM"), "minielm": str(Path(minielm.__file__).parent.parent)}


def profile_table(result: dict) -> str:
    lines = [f"{result['checkpoint']}: {result['layers']} layers, T = {result['T']}, resident: {result['resident']}, "
             f"{result['threads']} threads ({result['minielm']})"]
    for run in result["runs"]:
        steps = run["steps"]
        wall = sum(s["wall"] for s in steps) / len(steps)
        shares = defaultdict(float)
        for s in steps:
            for label, seconds in s["shares"].items():
                shares[label] += seconds / len(steps)
        products = wall - sum(shares.values())
        rate = max(s["rate"] for s in steps)
        at_rate = run["step_flops"] / rate
        lines += [f"b = {run['block']}: a step {wall:.2f} s wall (mean of {len(steps)}), "
                  f"{sum(s['user'] for s in steps) / len(steps):.2f} s user, "
                  f"{sum(s['system'] for s in steps) / len(steps):.2f} s system, "
                  f"{sum(s['minor_faults'] for s in steps) / len(steps):,.0f} minor page faults",
                  f"  {'products and the rest':24s} {products:7.2f} s  {100 * products / wall:5.1f} %"]
        lines += [f"  {label:24s} {seconds:7.2f} s  {100 * seconds / wall:5.1f} %"
                  for label, seconds in sorted(shares.items())]
        lines.append(f"  products at the float64 matmul rate ({rate / 1e9:.1f} GFLOP/s, 2048² GEMMs, best beside): "
                     f"{run['step_flops'] / 1e9:.1f} GFLOP in {at_rate:.2f} s; "
                     f"the step takes {wall / at_rate:.2f}× that")
    lines.append(f"warm-up step (reads the file): {result['warm_up']['wall']:.2f} s; "
                 f"peak RSS {result['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


# ---- the block size -------------------------------------------------------------------------------------
def blocks(directory: Path, sizes: list, k: int, tol: float, max_steps: int, starts: list) -> list:
    """Block Lanczos to convergence (top k, tol) with each block size and each start ('random': b random
    rows; 'directional': the rows Aᵀu of explain's exactness sweep, u = ŷ and 3 random directions, as
    `explain` starts): steps, seconds, seconds a step, and the largest residual ÷ σ1 after each step."""
    model, ids = load(directory)
    print(f"{directory}: {model.config.num_hidden_layers} layers, T = {len(ids)}, resident: "
          f"{getattr(model.weights['layers'], 'resident', False)}, {torch.get_num_threads()} threads", flush=True)
    ops = FrozenProducts(model, ids)
    swept = directional_checks(ops).rows  # (r, T, d): the sweep explain makes before Lanczos
    results = []
    for b in sizes:
        for start in starts:
            before = usage()
            given = ops.columns(swept) if start == "directional" else None
            try:
                found = block_lanczos(ops, k, b, tol, max_steps, start=given)
                steps, converged, history = found.steps, True, found.history
            except minielm.NumericalError as err:
                steps, converged, history = max_steps, str(err), None
            spent = since(before)
            results.append({"block": b, "start": start, "steps": steps, "converged": converged, **spent,
                            "seconds_per_step": spent["wall"] / steps, "rows": steps * b, "history": history})
            print(f"b = {b}, {start} start: {steps} steps ({steps * b} rows), {spent['wall']:.1f} s, "
                  f"{spent['wall'] / steps:.2f} s a step, "
                  f"{spent['system']:.1f} s system, {spent['minor_faults']:,} faults; converged: {converged}; "
                  f"largest residual ÷ σ1 by step: {' '.join(f'{r:.0e}' for r in history or [])}", flush=True)
    return results


# ---- minielm explain on the checkpoint, as a user runs it ------------------------------------------------
def explain(directory: Path, k: int, out: Path) -> dict:
    """`minielm explain --stream --json` on a 32-token prompt in a child process: its wall time, peak RSS,
    user and system time and minor page faults (getrusage of the child), and the report's own figures."""
    prompt = PROMPT[:31]  # byte-level tokenizer: 31 bytes after BOS, T = 32
    command = [sys.executable, "-m", "minielm", "explain", "--model", str(directory), "--stream", "--json",
               "--quiet", "-k", str(k), prompt]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=out)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"explain failed ({done.returncode}): {done.stderr.strip()}")
    report = json.loads(done.stdout)
    keys = ("route", "why", "next_token", "relative_error", "probability_error", "directional_error",
            "autograd_relative_difference", "autograd_skipped", "lanczos", "singular_values")
    return {"command": " ".join(command[1:]), "wall_s": wall, "peak_rss_mb": after.ru_maxrss / 1024,
            "user_s": after.ru_utime - before.ru_utime, "system_s": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt, **{key: report.get(key) for key in keys}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--directory", type=Path, help="default: ~/.cache/minielm-bench/llama3-8b-random[-Nl][-vV]")
    parser.add_argument("--build", action="store_true", help="write the checkpoint (or reuse it) and stop")
    parser.add_argument("--profile-step", action="store_true", help="the shares of a Lanczos step's time")
    parser.add_argument("--steps", type=int, default=3, help="steps profiled after the warm-up one")
    parser.add_argument("--block", type=int, nargs="+", default=[1], help="rows a profiled step carries (several: "
                        "taken in turn)")
    parser.add_argument("--blocks", type=int, nargs="+", help="run Lanczos to convergence with each block size")
    parser.add_argument("--start", nargs="+", default=["random"], choices=["random", "directional"],
                        help="with --blocks: Lanczos' first block (several: each in turn)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-12)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=TOOLS / "results")
    parser.add_argument("--tag", default="", help="added to the results' file name (e.g. 'before')")
    parser.add_argument("--explain", action="store_true",
                        help="run `minielm explain --stream` on a 32-token prompt: time, peak RSS, exactness, steps")
    args = parser.parse_args()
    directory = build(args.directory or default_directory(args.layers, args.vocab), llama3_8b(args.layers, args.vocab))
    machine = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch": torch.__version__}
    name = f"{args.layers}l{'_v' + str(args.vocab) if args.vocab != 128256 else ''}{'_' + args.tag if args.tag else ''}"
    if args.profile_step:
        result = {**machine, **profile_step(directory, args.steps, args.block)}
        table = profile_table(result)
        print(table)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"bench_8b_profile_{name}_b{'-'.join(map(str, args.block))}_cpu.json"
        path.write_text(json.dumps({**result, "table": table}, indent=1) + "\n")
        print(f"raw: {path}")
    if args.explain:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {**machine, **explain(directory, args.k, args.out)}
        print(json.dumps(result, indent=1))
        path = args.out / f"bench_8b_explain_{name}_cpu.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"raw: {path}")
    if args.blocks:
        result = {**machine, "checkpoint": str(directory), "k": args.k, "tol": args.tol,
                  "runs": blocks(directory, args.blocks, args.k, args.tol, args.max_steps, args.start),
                  "peak_rss_mb": status_mb("VmHWM")}
        path = args.out / f"bench_8b_blocks_{name}_cpu.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"raw: {path}")


if __name__ == "__main__":
    main()
