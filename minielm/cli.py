"""The `minielm` command: explain a prompt, check exactness, generate text.

    minielm explain "In the beginning God created the" --html report.html
    minielm layers --prompt-file chapter.txt
    echo "The LORD is my shepherd" | minielm generate -
    minielm check

A prompt is the argument itself, `-` for all of stdin, or `--prompt-file PATH`
(UTF-8; one trailing newline is dropped). Progress bars show on stderr when it is
a terminal (not with --quiet); results go to stdout. Errors print one line on
stderr and exit with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import signal
import stat
import sys
import threading
from pathlib import Path

import torch

from . import checks, distributed, operators_file, progress
from .config import Config
from .errors import InputError, MinielmError, OutputError
from .interpret import (cell, decode_inputs, decode_outputs, forward_order, layer_table, model_token, printable,
                        stable_rank, stacked, stacked_svd, svd_ready, token_shares)
from .matrix_free import (DISPLAY_TOL, RANDOM_DIRECTIONS, autograd_fits, autograd_row, dense_is_too_big,
                          directional_checks)
from .spectra import FrozenProducts, default_block, top_triplets
from .layer_maps import all_layer_maps
from .linear_map import detached_jacobian, equivalent_linear_map
from .loader import load, resolve_checkpoint, resolve_device, resolve_dtype, shipped_model
from .progress import step as Progress
from .report import LEGENDS, SCHEMA_VERSION, explain_page, plot_format, plot_tradeoff, pyplot, replacing, save_figure
from .steering import DEFAULT_DEPTH, DEFAULT_METHOD, DEFAULT_SCALE, METHODS, NEUTRAL

DEFAULT_MODEL = shipped_model()
# `minielm check`'s pass/fail bound, one per compute dtype, on the worst of every column it prints
# (reconstruction, probabilities, vs autograd). float64: the project's exactness claim (measured 3.3e-15
# at worst on the shipped model). The others are that dtype's round-off, measured on the shipped model
# with the default prompt and a 121-token one (tools/README.md, "Exactness"), with a margin: float32
# 1.4e-6 at worst against 1e-4; bfloat16 1.6e-2 (about 2 units of 2^-7) against 1e-1; float16 1.5e-3
# (about 2 units of 2^-10) against 1e-2. Below float32 a check catches gross errors only.
CHECK_BOUNDS = {"float64": 1e-13, "float32": 1e-4, "bfloat16": 1e-1, "float16": 1e-2}
CHECK_COLUMNS = {"reconstruction": "reconstruction", "probabilities": "probabilities", "vs_autograd": "vs autograd"}
CHECK_PROMPT = "And God said, Let there be light: and there was light. And God saw the light, that it was good"


# ---- prompts from anywhere ----------------------------------------------------------------------
# A prompt is read whole before any work, so its size is bounded: 256 MiB is far beyond any model's
# positions (a million tokens are a few MiB of text), and far below what would exhaust memory
# (`--prompt-file /dev/zero` was a MemoryError). A pipe or a terminal gets PIPE_WAIT_S to show its first
# byte: a named pipe nobody writes to blocked for ever in open().
PROMPT_LIMIT_BYTES = 256 * 2**20
PIPE_WAIT_S = 60.0


def read_text(source: str, what: str) -> str:
    """The text of a file, or of all of stdin when `source` is '-': UTF-8, one trailing newline dropped."""
    name = "stdin" if source == "-" else source
    data = read_stdin(what) if source == "-" else read_file(source, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} from {name} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} "
                         f"({err.reason})") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def read_stdin(what: str) -> bytes:
    if sys.stdin is None:  # `minielm generate - <&-`: Python starts with no sys.stdin at all
        raise InputError(f"{what} from stdin ('-'): stdin is closed")
    try:
        return read_bounded(sys.stdin.buffer, "stdin", what)
    except OSError as err:
        raise InputError(f"{what} from stdin ('-'): cannot read ({err.strerror or err})") from None


def read_file(path: str, what: str) -> bytes:
    """A file's bytes, opened without blocking (a FIFO's open waits for a writer) and, where it is not a
    regular file, read only once its first byte arrives within PIPE_WAIT_S."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise InputError(f"{what} file {path}: cannot read ({err.strerror or err})") from None
    with open(fd, "rb", closefd=True) as file:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                wait_for_first_byte(fd, path, what)
            os.set_blocking(fd, True)  # from here a pipe's writer is there: wait for its end as any reader does
            return read_bounded(file, path, what)
        except OSError as err:
            raise InputError(f"{what} file {path}: cannot read ({err.strerror or err})") from None


def wait_for_first_byte(fd: int, path: str, what: str) -> None:
    ready, _, _ = select.select([fd], [], [], PIPE_WAIT_S)
    if not ready:  # Linux never reports the end of a FIFO that has had no writer: it looks like waiting
        raise InputError(f"{what} file {path}: nothing was written to it in {PIPE_WAIT_S:g} s "
                         "(a pipe with no writer?)")


def read_bounded(file, name: str, what: str) -> bytes:
    """All of `file`, read a MiB at a time (one read of the limit would allocate all of it at once)."""
    chunks, size = [], 0
    while chunk := file.read(2**20):
        chunks.append(chunk)
        size += len(chunk)
        if size > PROMPT_LIMIT_BYTES:
            raise InputError(f"{what} from {name}: more than {PROMPT_LIMIT_BYTES / 2**20:g} MiB, the most minielm "
                             "reads as a prompt (far beyond any model's positions)")
    return b"".join(chunks)


def resolve_prompt(args, text_key: str, file_key: str, what: str, default=None):
    """args.<text_key> as the text to run: the argument, '-' (stdin) or --<file_key> PATH, exactly one."""
    text, path = getattr(args, text_key), getattr(args, file_key)
    if text is not None and path is not None:
        raise InputError(f"give the {what} as an argument or with --{file_key.replace('_', '-')}, not both")
    if path is not None:
        text = read_text(path, what)
    elif text == "-":
        text = read_text("-", what)
    elif text is None and default is None:
        raise InputError(f"no {what}: give it as an argument, '-' to read stdin, or --{file_key.replace('_', '-')} PATH")
    setattr(args, text_key, default if text is None else text)


def read_prompts(args):
    """Every prompt of the command, read before any work starts (stdin at most once)."""
    sources = [getattr(args, f"{k}_file", None) or getattr(args, k, None) for k in ("prompt", "concept")]
    if sources.count("-") > 1:
        raise InputError("the prompt and the concept cannot both be read from stdin")
    if hasattr(args, "prompt_file"):
        resolve_prompt(args, "prompt", "prompt_file", "prompt", CHECK_PROMPT if args.command == "check" else None)
    if hasattr(args, "concept_file"):
        resolve_prompt(args, "concept", "concept_file", "concept")


def load_model(args):
    path = model_path(args.model)
    with Progress(f"loading {path or 'the shipped model'}"):
        return load(path, dtype=args.dtype, device=args.device, stream=args.stream)


# ---- every flag, checked before the model loads -----------------------------------------------------
def check_arguments(args) -> None:
    """Check every flag before any work: one InputError (OutputError for an output path) naming the
    flag, the value and what is allowed. Bounds that depend on the model (its layers, width and
    positions) come from config.json or a GGUF file's metadata, read without the weights. A new flag
    gets its check here."""
    directory = resolve_checkpoint(model_path(args.model))
    resolve_dtype(args.dtype)
    resolve_device(args.device)
    prompt_files = [Path(f) for f in (getattr(args, "prompt_file", None), getattr(args, "concept_file", None)) if f]
    for flag in ("plot", "html", "out"):  # output files: writable, not the checkpoint nor an input, before any work
        if getattr(args, flag, None) is not None:
            writable_output(getattr(args, flag), f"--{flag}", reading=directory, prompt_files=prompt_files)
    if getattr(args, "out", None) is not None and Path(args.out).exists() and not Path(args.out).is_file():
        raise OutputError(f"--out {args.out}: not a regular file (a device or a pipe); "
                          "the operators are written into a file and mapped back from it")
    if getattr(args, "out", None) is not None:
        operators_file.refuse_existing_partial(args.out)
    config = model_config(directory)
    if getattr(args, "plot", None) is not None:
        plot_format(args.plot, "--plot")
    if getattr(args, "distributed", False):  # what torchrun sets, and init_process_group reads
        distributed.check_environment()
    if getattr(args, "block", None) is not None:
        checks.integer("--block", args.block, 1, why="output rows swept at a time")
    if getattr(args, "k", None) is not None:
        d = config.hidden_size if config else None
        checks.integer("-k", args.k, 1, d, closed=True, why="at most the model's hidden_size" if d else "")
    if getattr(args, "skip_positions", None) is not None:  # positions past the prompt: once it is tokenized
        positions = config.max_position_embeddings if config else None
        args.skip_positions = sorted({checks.integer("--skip-positions", v, 0, positions, why="a position")
                                      for v in number_list(args.skip_positions, int, "--skip-positions")})
    if getattr(args, "max_new_tokens", None) is not None:
        room = config.max_position_embeddings - 1 if config else None  # at least one prompt token
        checks.integer("--max-new-tokens", args.max_new_tokens, 1, room, closed=True,
                       why="max_position_embeddings minus one prompt token" if config else "")
    if getattr(args, "temperature", None) is not None:
        checks.real("--temperature", args.temperature, 0)
    if getattr(args, "top_k", None) is not None:
        checks.integer("--top-k", args.top_k, 1)
    if getattr(args, "seed", None) is not None:
        checks.seed("--seed", args.seed)
    if getattr(args, "scale", None) is not None:
        checks.real("--scale", args.scale)
    L = config.num_hidden_layers if config else None
    if getattr(args, "layer", None) is not None:
        checks.integer("--layer", args.layer, 0, L, why=f"the model has {L} layers" if L else "")
    if getattr(args, "layers", None) is not None:  # steer-eval's grid
        args.layers = [checks.integer("--layers", v, 0, L, why=f"the model has {L} layers" if L else "")
                       for v in number_list(args.layers, int, "--layers")]
        args.scales = [checks.real("--scales", v) for v in number_list(args.scales, float, "--scales")]
        methods = args.methods.split(",")
        if not set(methods) <= set(METHODS):
            raise InputError(f"--methods takes some of {','.join(METHODS)}, got {args.methods!r}")
        args.methods = methods


def model_config(checkpoint: Path) -> Config | None:
    """The Config that the flags' bounds come from, read without the weights: a directory's config.json,
    or a GGUF file's metadata (memory-mapped; no tensor is read). None for anything else: load says why."""
    if checkpoint.is_dir():
        return Config.from_file(checkpoint / "config.json")
    if checkpoint.is_file() and checkpoint.suffix.lower() == ".gguf":
        from .gguf import gguf_config, read_gguf

        return gguf_config(read_gguf(checkpoint), checkpoint)
    return None


def model_path(value) -> str | None:
    """--model as `minielm.load` takes it (None: the shipped model); an empty value is an error, not a default."""
    if value is not None and not str(value).strip():
        raise InputError(f"--model must name a checkpoint directory, a GGUF file or a model id, got {value!r}")
    return value


def writable_output(path, what: str, reading: Path | None = None, prompt_files=()) -> Path:
    """`path` as a file that `what` (a flag) can write, checked before any computation: not empty, not
    an existing directory, not the checkpoint being read (`reading`: see `checks.overwrites`), not one of
    the `prompt_files` read (links resolved), in an existing directory, and writable there (tried by opening it, which also catches read-only file systems and
    root's permissions; a file created by the try is removed)."""
    if not str(path).strip():
        raise OutputError(f"{what} needs a file name, got {str(path)!r}")
    checks.path_fits(what, path, OutputError)
    if what == "--out":
        checks.path_fits(what, path, OutputError, suffix=".partial")
    else:  # written first to a temporary name beside it, longer by as many bytes as this suffix
        checks.path_fits(what, path, OutputError, suffix="." * len(".0123456789abcdef.tmp."),
                         why="the temporary name it is written to first")
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a directory; expected a file name")
    if reading is not None and checks.overwrites(path, reading):
        raise OutputError(f"{what} {path}: would overwrite the checkpoint being read ({reading}); "
                          "write it somewhere else")
    if path.exists() and any(f.exists() and os.path.samefile(path, f) for f in prompt_files):
        raise OutputError(f"{what} {path}: is a file the prompt is read from; write it somewhere else")
    if not path.parent.is_dir():
        why = "does not exist" if not path.parent.exists() else "is not a directory"
        raise OutputError(f"{what} {path}: {path.parent} {why}")
    tried = Path(os.path.realpath(path))  # a link's target: what the write replaces, and what the try may create
    if path.exists() and not tried.exists():  # /dev/stdout onto a pipe: its target ("pipe:[…]") has no path
        tried = path
    existed = tried.exists()
    try:  # O_NONBLOCK: a FIFO without a reader fails instead of blocking
        os.close(os.open(tried, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o666))
    except OSError as err:
        raise OutputError(f"{what} {path}: cannot write there ({err.strerror})") from None
    if not existed:
        tried.unlink(missing_ok=True)  # under torchrun every rank tries the path: another may have removed it
    return path


def write_text_replacing(path, text: str, flag: str) -> None:
    """Write `text` to `path` through a temporary file renamed over it (minielm.report.replacing)."""
    with written(flag, path), replacing(path) as f:
        f.write(text.encode())


def write_stdout(text: str) -> None:
    """Print a command's whole output; a closed pipe or a full disk is an OutputError, and fd 1 then points
    at /dev/null so that the interpreter's own flush at exit stays quiet."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as err:
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(err, BrokenPipeError):
            raise OutputError("standard output was closed before all output was written (broken pipe)") from None
        raise OutputError(f"cannot write to standard output ({err.strerror or err})") from None


def relative_max(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- explain ------------------------------------------------------------------------------------
def explain(args) -> int:
    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    kept = kept_positions(args.skip_positions, len(ids))  # None: all of them
    too_big = dense_is_too_big(model, len(ids)) if args.route == "auto" else None
    if args.route == "matrix-free" or too_big:
        if args.html:
            raise InputError(f"--html needs the dense operators, and {too_big or 'the route is matrix-free'}: "
                             f"drop --html for the matrix-free report, or pass --route dense to assemble them")
        report, elm = explain_matrix_free(args, model, ids, kept, too_big or "asked for (--route matrix-free)"), None
    else:
        report, elm = explain_dense(args, model, ids, kept)
    if args.plot:
        with Progress(f"plotting to {args.plot}"):
            spectrum = (torch.linalg.svdvals(svd_ready(stacked(elm.operators[kept or slice(None)])))
                        if elm is not None else torch.tensor(report["singular_values"]))  # matrix-free: the top k
            plot_explanation(args.plot, report, spectrum.cpu())
    if args.html:
        with Progress(f"logit lens, attribution and the report {args.html}"):
            page = explain_page(model, elm, report)
            write_text_replacing(args.html, page, "--html")
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print_explanation(report, model)
    announce_files(args, plot="the spectrum and the shares", html="the HTML report")
    return 0


def explain_dense(args, model, ids, kept):
    """explain's report from the assembled operators J_t (T, d, d), and the map."""
    with Progress(f"assembling {len(ids)} operators of {model.config.hidden_size}×{model.config.hidden_size}"):
        elm = equivalent_linear_map(model, ids)
    autograd = None  # --no-autograd: the cross-check skipped (null in --json)
    if not args.no_autograd:
        with Progress("autograd cross-check"):
            autograd = relative_max(elm.operators, detached_jacobian(model, ids))
    with Progress("singular value decompositions"):
        svd = stacked_svd(elm, args.k, kept)
        sigma1 = torch.linalg.matrix_norm(svd_ready(elm.operators), ord=2)
        ranks = stable_rank(elm.operators, sigma1)
    probs = torch.softmax(model.logits(ids)[-1], dim=-1)
    per_token = [{"share": float(s), "stable_rank": float(r), "sigma1": float(s1)}
                 for s, r, s1 in zip(token_shares(elm), ranks, sigma1)]
    exactness = {"relative_error": elm.relative_error(),
                 "probability_error": float((elm.probabilities() - probs).abs().max()),
                 "autograd_relative_difference": autograd}
    report = explanation(args, model, ids, kept, "dense", probs, exactness, per_token, svd.U, svd.S, svd.V)
    return report, elm


def explain_matrix_free(args, model, ids, kept, why: str):
    """explain's report from products with the map only (minielm/matrix_free.py): the shares and the
    exactness from one sweep of a few rows and a frozen forward pass, the spectrum by block Lanczos."""
    with Progress("the forward pass, its factors frozen"):
        ops = FrozenProducts(model, ids)
    with Progress(f"exactness along ŷ and {RANDOM_DIRECTIONS} random directions: one sweep of "
                  f"{RANDOM_DIRECTIONS + 1} rows, one frozen forward pass"):
        found = directional_checks(ops)
    autograd = None  # --no-autograd, or a model too big for the backward pass (`skipped` says why)
    skipped = None if args.no_autograd else autograd_fits(model)
    if not args.no_autograd and skipped is None:
        with Progress("autograd cross-check along ŷ"):
            autograd = relative_max(found.rows[0], autograd_row(ops, found.directions[0]))
    block = default_block(model, args.k)
    with Progress(f"top {args.k} singular triplets by block Lanczos ({block} rows a step, tol {DISPLAY_TOL:g})"):
        kept_ops = ops.restricted_to(kept)
        svd = top_triplets(kept_ops, args.k, block, DISPLAY_TOL, start=kept_ops.columns(found.rows))  # Aᵀu, swept
    probs = torch.softmax(model.unembed(ops.y), dim=-1)
    per_token = [{"share": float(s), "stable_rank": None, "sigma1": None} for s in found.shares]
    exactness = {"relative_error": found.reconstruction_error,
                 "probability_error": float((torch.softmax(model.unembed(found.reconstruction), dim=-1)
                                             - probs).abs().max()),
                 "autograd_relative_difference": autograd,
                 "directional_error": float(found.errors.max()),
                 "directions": found.errors.shape[0],
                 "autograd_skipped": skipped,
                 "lanczos": {"steps": svd.steps, "block": block, "tol": DISPLAY_TOL,
                             "largest_residual": svd.history[-1]},
                 "why": why}
    return explanation(args, model, ids, kept, "matrix-free", probs, exactness, per_token, svd.U, svd.S, svd.V)


def explanation(args, model, ids, kept, route, probs, exactness, per_token, U, S, V) -> dict:
    """explain's report (its --json): the same keys on both routes; the matrix-free route adds its own
    exactness figures and leaves the per-token stable rank and σ1 null. V (P, d, k): the kept positions."""
    tokens = [model_token(model, i) for i in ids]
    top = torch.topk(probs, 5)
    kept = kept or list(range(len(ids)))
    block = V.norm(dim=1).argmax(dim=0)  # (k,): the block of v_k with the largest norm, a position in kept
    outputs = decode_outputs(model, U)  # (d, k): W_U read once for all k
    inputs = decode_inputs(model, V[block, :, torch.arange(len(S), device=V.device)].T)  # (d, k): v_k's strongest block
    return {
        "schema_version": SCHEMA_VERSION,
        "model": str(args.model or DEFAULT_MODEL),
        "dtype": str(model.dtype).removeprefix("torch."),
        "dequantized_from": getattr(model, "dequantized_from", []),  # quantized GGUF types, if any
        "route": route,
        "tokens": tokens,
        "next_token": model_token(model, top.indices[0]),
        "top": [{"token": model_token(model, i), "probability": float(p)} for p, i in zip(top.values, top.indices)],
        **exactness,
        "per_token": [dict(token=tok, **row) for tok, row in zip(tokens, per_token)],
        "skipped_positions": args.skip_positions or [],  # left out of the stacked operator (--skip-positions)
        "singular_values": [float(s) for s in S],
        "decoded": [{"sigma": float(S[k]),
                     "output_tokens": [t for t, _ in outputs[k]],
                     "input_position": kept[block[k]],
                     "input_tokens": [t for t, _ in inputs[k]]}
                    for k in range(len(S))],
    }


def kept_positions(skip, T: int) -> list | None:
    """The positions whose operators explain's stacked spectrum takes: all but --skip-positions (None: all),
    each of which must be a position of the T-token prompt, leaving at least one."""
    if not skip:
        return None
    for t in skip:
        checks.integer("--skip-positions", t, 0, T, why=f"a position in the {T}-token prompt")
    kept = [t for t in range(T) if t not in skip]
    if not kept:
        raise InputError(f"--skip-positions {','.join(map(str, skip))} leaves out every position of the {T}-token prompt")
    return kept


def stacked_title(r) -> str:
    """'[J_1 … J_T]', or with the positions left out: '[J_1 … J_T] without position 0 (<bos>)'."""
    skipped = r.get("skipped_positions") or []
    if not skipped:
        return "[J_1 … J_T]"
    named = ", ".join(f"{t} ({printable(r['tokens'][t])})" for t in skipped)
    return f"[J_1 … J_T] without position{'s' if len(skipped) > 1 else ''} {named}"


def announce_files(args, **what) -> None:
    """One line per file written by --plot or --html: on stdout after the text report; on stderr with
    --json (stdout is then the JSON alone), unless --quiet."""
    for flag, description in what.items():
        path = getattr(args, flag, None)
        if path is None:
            continue
        line = f"wrote {path}  ({description}, --{flag})"
        if not getattr(args, "json", False):
            print(line)
        elif not args.quiet:
            print(line, file=sys.stderr)


def print_header(model, args, ids) -> None:
    """The first lines of `check` and `layers`: the model, then the prompt and its length."""
    print(model_line(model, args))
    print(f"prompt  {shorten(args.prompt)}  ({len(ids)} tokens)\n")


def model_line(model, args) -> str:
    """The header's first line, in every report: the checkpoint and its shape."""
    c = model.config
    return (f"model   {args.model or DEFAULT_MODEL}  ({c.model_type}, d={c.hidden_size}, {c.num_hidden_layers} layers, "
            f"{str(model.dtype).removeprefix('torch.')})")


def print_explanation(r, model):
    c = model.config
    print(f"model   {r['model']}  ({c.model_type}, d={c.hidden_size}, {c.num_hidden_layers} layers, {r['dtype']})")
    if r.get("dequantized_from"):
        print(f"weights dequantized from GGUF {', '.join(r['dequantized_from'])}: "
              f"the exactness below is for the dequantized model")
    print(f"prompt  {len(r['tokens'])} tokens: {' | '.join(printable(t) for t in r['tokens'])}")
    free = r.get("route") == "matrix-free"
    if free:
        print(f"route   matrix-free, the operators J_t never formed: {r['why']}")
    print("\nnext token")
    legend("next")
    for row in r["top"]:
        print(f"  {cell(row['token'], 16)} {row['probability']:.4f}")
    exact = "" if r["dtype"] == "float64" else f"   ({r['dtype']}: not exact, round-off of that dtype)"
    print(f"\nexactness{exact}")
    legend("exactness")
    print(f"  reconstruction  ‖Σ J_t x_t + b − y‖ / ‖y‖     {r['relative_error']:.1e}"
          + ("   (Σ J_t x_t by a frozen forward pass)" if free else ""))
    print(f"  probabilities   max |p_reconstructed − p|     {r['probability_error']:.1e}")
    if free:
        print(f"  along u         max |Σ (uᵀJ_t) x_t + uᵀb − uᵀy| / ‖y‖ {r['directional_error']:.1e}"
              f"   (u = ŷ and {r['directions'] - 1} random directions, one sweep)")
    J = "ŷᵀJ" if free else "J"
    if r["autograd_relative_difference"] is None:
        print(f"  autograd        {r.get('autograd_skipped') or 'skipped (--no-autograd)'}: the operators are not "
              "cross-checked")
    else:
        print(f"  autograd        max |{J} − {J}_autograd| / max |{J}| {r['autograd_relative_difference']:.1e}")
    print("\nper token      share of y" + ("" if free else "   stable rank      σ1"))
    legend("per_token")
    if free:
        print("  # stable rank and σ1 need each whole J_t: not computed on the matrix-free route")
    for t, row in enumerate(r["per_token"]):
        ranks = "" if free else f" {row['stable_rank']:>12.2f} {row['sigma1']:>8.3f}"
        print(f"  {t:>3} {cell(row['token'], 14)} {row['share']:>8.3f}{ranks}")
    print(f"\nstacked operator {stacked_title(r)}: top singular values and vectors")
    legend("stacked")
    if free:
        lz = r["lanczos"]
        print(f"  # block Lanczos, {lz['steps']} steps of {lz['block']} row{'s' * (lz['block'] > 1)}: A v = σ u to round-off, "
              f"‖Aᵀu − σ v‖ ≤ {lz['tol']:g}·σ1 (largest {lz['largest_residual']:.1e}), so each σ is within that of a true one")
    print(f"  {'σ':>8}   {'output side (unembedding)':<40} input side (cosine to embeddings)")
    for row in r["decoded"]:
        out = " ".join(row["output_tokens"])
        at = printable(r["tokens"][row["input_position"]])
        print(f"  {row['sigma']:>8.3f}   {cell(out, 40)} @{at}: {printable(' '.join(row['input_tokens']))}")


@contextlib.contextmanager
def written(flag: str, path):
    """A failed write inside (full disk, a directory removed under us) as an OutputError naming the flag."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot write ({err.strerror or err})") from None


def legend(key: str):
    """The section's one-line legend (minielm.report.LEGENDS), dimmed as a comment."""
    print(f"  # {LEGENDS[key]}")


def plot_explanation(path, report, S):
    """The singular values S of [J_1 … J_T] (all of them, or the top k found matrix-free) and the shares."""
    plt = pyplot()
    shares = [row["share"] for row in report["per_token"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    left.semilogy(range(1, len(S) + 1), S, marker=".", lw=1)
    top = f"top {len(S)} " if report.get("route") == "matrix-free" else ""  # matrix-free: those Lanczos found
    left.set(title=f"{top}singular values of {stacked_title(report)}", xlabel="index k", ylabel="σ_k")
    left.grid(alpha=0.3)
    colors = ["tab:blue" if s >= 0 else "tab:red" for s in shares]
    right.bar(range(len(shares)), shares, color=colors)
    right.set_xticks(range(len(shares)), report["tokens"], rotation=60, ha="right", fontsize=8)
    right.axhline(0, color="black", lw=0.6)
    right.set(title=f"share of y from each token: (J_t x_t)·y / ‖y‖²   → next: {report['next_token']!r}",
              ylabel="share")
    fig.tight_layout()
    with written("--plot", path):
        save_figure(fig, path, "--plot")


# ---- check ----------------------------------------------------------------------------------------
def check(args) -> int:
    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    refuse_if_too_big(model, ids, "check")
    L = model.config.num_hidden_layers
    rows = []
    with Progress(f"checking the whole model and {L} layers on {len(ids)} tokens"):
        elm = equivalent_linear_map(model, ids)
        probs = torch.softmax(model.logits(ids)[-1], dim=-1)
        parts = all_layer_maps(model, ids)  # every layer and module in one pass
        for key in sorted(parts, key=forward_order)[:-1]:  # the order of `minielm layers`, 'final' last
            part = parts[key]
            p_err = float("nan") if key[1] != "output" else float((part.probabilities() - part.model_probabilities()).abs().max())
            rows.append({"target": part.target, "reconstruction": part.relative_error(), "probabilities": p_err,
                         "vs_autograd": float("nan")})
        # the final row from equivalent_linear_map, the public entry point, with autograd beside it
        rows.append({"target": elm.target, "reconstruction": elm.relative_error(),
                     "probabilities": float((elm.probabilities() - probs).abs().max()),
                     "vs_autograd": relative_max(elm.operators, detached_jacobian(model, ids))})
    dtype = str(model.dtype).removeprefix("torch.")
    bound = CHECK_BOUNDS[dtype]
    worst = {column: max((r[column] for r in rows if r[column] == r[column]), default=float("nan"))
             for column in CHECK_COLUMNS}  # NaN (not computed for that target) is skipped
    column = max((c for c in CHECK_COLUMNS if worst[c] == worst[c]), key=worst.get)  # the worst of them all
    passed = worst[column] < bound
    verdict = (f"worst error {worst[column]:.1e}, in the {CHECK_COLUMNS[column]} column "
               f"({'within' if passed else 'ABOVE'} {bound:.0e} for {dtype}); "
               + ", ".join(f"{CHECK_COLUMNS[c]} {fmt(worst[c])}" for c in CHECK_COLUMNS))
    if args.json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "dtype": dtype, "tokens": len(ids), "bound": bound,
                          "worst": worst[column], "worst_column": column,
                          "worst_by_column": {c: (None if v != v else v) for c, v in worst.items()},
                          "rows": [{k: (None if v != v else v) for k, v in r.items()} for r in rows]}, indent=1))
        return 0 if passed else 1
    print_header(model, args, ids)
    legend("targets")
    legend("check")
    print(f"{'target':<14} {'reconstruction':>15} {'probabilities':>14} {'vs autograd':>12}")
    for r in rows:
        print(f"{r['target']:<14} {r['reconstruction']:>15.1e} {fmt(r['probabilities']):>14} {fmt(r['vs_autograd']):>12}")
    print(f"\n{verdict}")
    return 0 if passed else 1


def refuse_if_too_big(model, ids, command: str) -> None:
    """`layers` and `check` read every layer's dense operators: an InputError, before any of that work,
    where even the model's own operators would be too big to assemble here."""
    why = dense_is_too_big(model, len(ids))
    if why:
        raise InputError(f"{command} assembles the dense operators of every layer, and {why}: at this size use "
                         f"`minielm explain` (matrix-free) or minielm.attribution (one sweep per module), or a "
                         f"shorter prompt")


def fmt(x) -> str:
    return "—" if x != x else f"{x:.1e}"


# ---- layers -----------------------------------------------------------------------------------------
def layers(args) -> int:
    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    refuse_if_too_big(model, ids, "layers")
    L = model.config.num_hidden_layers
    with Progress(f"operators of {L} layers and {2 * L} modules in one pass, and their spectra"):
        rows = layer_table(model, ids)
    if args.plot:
        with Progress(f"plotting to {args.plot}"):
            plot_layers(args.plot, rows, [model_token(model, i) for i in ids])
    if args.json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "tokens": [model_token(model, i) for i in ids],
                          "targets": rows}, indent=1, ensure_ascii=False))
        return 0
    print_header(model, args, ids)
    legend("targets")
    legend("layers")
    print(f"{'target':<13} {'σ1':>8} {'σ2':>8} {'stable rank':>12} {'rec. error':>11}  "
          f"{'top output singular vector':<34} target decoded")
    for r in rows:
        s = r["singular_values"]
        print(f"{r['target']:<13} {s[0]:>8.3f} {s[1] if len(s) > 1 else 0:>8.3f} {r['stable_rank']:>12.2f} "
              f"{r['relative_error']:>11.1e}  {cell(' '.join(r['top_tokens']), 34)} "
              f"{printable(' '.join(r['predicts'][:3]))}")
    announce_files(args, plot="stable rank and σ1 by layer")
    return 0


def shorten(text: str, limit: int = 100) -> str:
    """repr(text), cut to `limit` characters: a prompt read from a file can be long."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def plot_layers(path, rows, tokens):
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"output": ("residual stream (final norm)", "tab:blue"), "attention": ("attention", "tab:orange"),
              "mlp": ("MLP", "tab:green")}
    for component, (label, color) in styles.items():
        part = [r for r in rows if r["component"] == component]
        layers_ = [r["layer"] for r in part]
        left.plot(layers_, [r["stable_rank"] for r in part], marker="o", color=color, label=label)
        right.semilogy(layers_, [r["singular_values"][0] for r in part], marker="o", color=color, label=label)
        if component == "output":
            for r in part:
                right.annotate(r["top_tokens"][0], (r["layer"], r["singular_values"][0]), textcoords="offset points",
                               xytext=(0, 7), ha="center", fontsize=9, color=color)
    left.set(title="stable rank ‖J‖²_F / σ₁² of [J_1 … J_T]", xlabel="layer", ylabel="stable rank")
    right.set(title="σ₁ (residual stream: top singular vector decoded)", xlabel="layer", ylabel="σ₁")
    right.margins(y=0.15)  # room for the decoded tokens above the points
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xticks(sorted({r["layer"] for r in rows}))
    fig.suptitle(" ".join(tokens)[:120], fontsize=9)
    fig.tight_layout()
    with written("--plot", path):
        save_figure(fig, path, "--plot")


# ---- steer ------------------------------------------------------------------------------------------
def steer_command(args) -> int:
    from .steering import default_layer, steer

    model = load_model(args)
    args.layer = default_layer(model) if args.layer is None else args.layer
    with Progress("baseline and steered generation"):
        baseline = model.generate(args.prompt, args.max_new_tokens)
        steered = steer(model, args.concept, args.prompt, args.layer, args.scale, args.max_new_tokens,
                        method=args.method, neutral=args.neutral)
    print(f"concept   {args.concept!r} by {args.method} at layer {args.layer}, scale {args.scale}")
    print(f"baseline  {args.prompt}{baseline}")
    print(f"steered   {args.prompt}{steered}")
    if steered == baseline:  # e.g. the default λ, measured on Gemma 3 270M, is too small for this model
        print(f"note      no change at scale {args.scale:g}: the steered text is the baseline; try a larger --scale")
    return 0


def steer_eval_command(args) -> int:
    from .steering import evaluate, format_table

    layers, scales, methods = args.layers, args.scales, args.methods  # lists, checked before loading
    model = load_model(args)
    with Progress(f"{len(methods) * len(layers) * len(scales)} steered generations"):
        result = evaluate(model, args.concept, args.prompt, layers, scales, methods, args.max_new_tokens,
                          args.neutral, args.temperature, None, args.seed)
    if args.plot:
        with written("--plot", args.plot):
            plot_tradeoff([result], args.plot)  # exactly the path given
    print(json.dumps(result, indent=1) if args.json else format_table(result, legend=LEGENDS["steer_eval"]))
    announce_files(args, plot="lift against fluency cost")
    return 0


def number_list(text, kind, flag) -> list:
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{flag} takes comma-separated numbers, got {text!r}") from None


# ---- operators ------------------------------------------------------------------------------------
def operators_command(args) -> int:
    """Write a prompt's operators to a safetensors file, a block of rows at a time (torchrun: --distributed)."""
    if args.distributed:  # under torchrun: one process per device, the rows split over them
        gpu = args.device.startswith("cuda")
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if gpu else args.device
        distributed.init_process_group("nccl" if gpu else "gloo")
    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    elm = equivalent_linear_map(model, ids, out=args.out, block=args.block, distributed=args.distributed)
    if not args.distributed or torch.distributed.get_rank() == 0:
        T, d, _ = elm.operators.shape
        print(f"{args.out}: J_t for {T} tokens, {T} × {d} × {d} {str(model.dtype).removeprefix('torch.')} "
              f"({elm.operators.numel() * elm.operators.element_size() / 2**20:.0f} MiB); "
              f"reconstruction error {elm.relative_error():.1e}")
    return 0


# ---- generate -------------------------------------------------------------------------------------
def generate(args) -> int:
    model = load_model(args)
    text = model.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(args.prompt + text)
    return 0


# ---- the parser ---------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (and exit status 2) like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser():
    parser = Parser(prog="minielm", description="Exact equivalent linear maps of decoder LLMs.")
    parser.add_argument("--debug", action="store_true", help="show the traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, fn, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(run=fn)
        sub.add_argument("--model", help="a checkpoint directory, a GGUF file, or a model id 'org/name[@revision]' "
                                         f"in the local Hugging Face cache (default: the shipped {DEFAULT_MODEL.name})")
        sub.add_argument("--dtype", default="float64", help="compute dtype (default float64)")
        sub.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        sub.add_argument("--stream", action="store_true",
                         help="read and cast one layer at a time (large models)")
        sub.add_argument("--quiet", action="store_true", help="no progress on stderr (none is shown when piped)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sub

    def prompt_arguments(sub, positional=True):
        if positional:
            sub.add_argument("prompt", nargs="?", help="the prompt text, or - to read it from stdin")
        else:
            sub.add_argument("--prompt", help=f"the prompt text, or - to read it from stdin (default: {CHECK_PROMPT!r})")
        sub.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a UTF-8 file")

    sub = command("explain", explain, "the equivalent linear map of a prompt, read out")
    prompt_arguments(sub)
    sub.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_argument("--plot", metavar="FILE.png", help="write the spectrum and per-token shares")
    sub.add_argument("--html", metavar="FILE.html", help="write a self-contained interactive report (offline)")
    sub.add_argument("-k", type=int, default=5, help="singular triplets to decode (default 5)")
    sub.add_argument("--no-autograd", action="store_true",
                     help="skip the autograd cross-check of the operators (about a third of the time on long prompts)")
    sub.add_argument("--route", choices=("auto", "dense", "matrix-free"), default="auto",
                     help="dense: assemble every J_t; matrix-free: products with the map only (the shares, exactness "
                          "along a few directions, the top k by Lanczos); auto (default): matrix-free when the dense "
                          "operators would be too costly for this machine")
    sub.add_argument("--skip-positions", metavar="LIST",
                     help="comma-separated positions (0 = the first token) left out of the stacked operator's "
                          "spectrum, e.g. 0 for an attention sink; the per-token table keeps them")

    sub = command("check", check, "exactness report for the whole model and each layer")
    sub.description = ("exactness report for the whole model and each layer. It passes (exit 0) when the worst "
                       "figure of every column (reconstruction, probabilities, vs autograd) is below the bound "
                       "of the compute dtype: " + ", ".join(f"{k} {v:.0e}" for k, v in CHECK_BOUNDS.items())
                       + " (round-off of that dtype, measured on the shipped model, with a margin); else exit 1")
    prompt_arguments(sub, positional=False)
    sub.add_argument("--json", action="store_true", help="print one JSON object")

    sub = command("layers", layers, "how the operator emerges layer by layer: spectra, stable ranks, decoded vectors")
    prompt_arguments(sub)
    sub.add_argument("--json", action="store_true", help="print one JSON object, one entry per layer and module")
    sub.add_argument("--plot", metavar="FILE.png", help="write stable rank and σ1 by layer")

    sub = command("steer", steer_command, "generate with a concept pushed into the residual stream at a layer "
                  f"(default {DEFAULT_METHOD}: the concept's mean activation difference; minielm and paper: "
                  "its layer operator)")
    prompt_arguments(sub)
    sub.add_argument("--concept", help="the concept prompt, or - to read it from stdin")
    sub.add_argument("--concept-file", metavar="PATH", help="read the concept prompt from a UTF-8 file")
    sub.add_argument("--layer", type=int, help=f"default: {DEFAULT_DEPTH:g} of the way up (measured best)")
    sub.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                     help=f"λ, relative to the hidden state's norm (default {DEFAULT_SCALE:g}, measured best)")
    sub.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                     help="minielm: Σ_t J_t after the layer; paper: Golden's cycled, cumulative operators at "
                          f"the layer's input; actadd: mean activation difference (default {DEFAULT_METHOD}, "
                          "measured best)")
    sub.add_argument("--neutral", default=NEUTRAL, help="actadd's neutral prompt")
    sub.add_argument("--max-new-tokens", type=int, default=30)

    sub = command("steer-eval", steer_eval_command,
                  "measure steering: concept lift against fluency cost over layers, scales and recipes")
    prompt_arguments(sub)
    sub.add_argument("--concept", help="the concept prompt, or - to read it from stdin")
    sub.add_argument("--concept-file", metavar="PATH", help="read the concept prompt from a UTF-8 file")
    sub.add_argument("--layers", required=True, help="comma-separated, e.g. 4,8,12")
    sub.add_argument("--scales", default="0.1,0.2,0.4,0.8", help="comma-separated λ (default 0.1,0.2,0.4,0.8)")
    sub.add_argument("--methods", default="minielm,paper,actadd", help="comma-separated (default all three)")
    sub.add_argument("--neutral", default=NEUTRAL, help="actadd's neutral prompt")
    sub.add_argument("--max-new-tokens", type=int, default=24)
    sub.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else seeded sampling")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--json", action="store_true", help="print the rows as JSON")
    sub.add_argument("--plot", metavar="FILE.png", help="write lift against fluency cost")

    sub = command("operators", operators_command, "write a prompt's operators J_t to a safetensors file")
    prompt_arguments(sub)
    sub.add_argument("--out", required=True, metavar="FILE.safetensors")
    sub.add_argument("--block", type=int, help="output rows swept at a time (default: about 1 GiB of them)")
    sub.add_argument("--distributed", action="store_true", help="under torchrun: split the rows over the ranks")

    sub = command("generate", generate, "continue a prompt (greedy unless --temperature)")
    prompt_arguments(sub)
    sub.add_argument("--max-new-tokens", type=int, default=30)
    sub.add_argument("--temperature", type=float, default=0.0)
    sub.add_argument("--top-k", type=int)
    sub.add_argument("--seed", type=int)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt: the same clean-up runs
    (an operators file's .partial is removed), where SIGTERM's default would leave it."""


def terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_raises_terminated():
    """SIGTERM handled by `terminated` inside the block, the caller's handler back after it (cli.main may
    be called from a program, or a test); only the main thread may set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    callers = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, callers)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress.enabled = not args.quiet  # bars on stderr, and only when it is a terminal
    try:
        with sigterm_raises_terminated():
            return run_command(args)
    except Terminated:
        print("minielm: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


def run_command(args) -> int:
    """The command of `args`, its errors as one line on stderr and an exit status."""
    try:
        read_prompts(args)
        check_arguments(args)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):  # printed at the end: an output error is then one clean line
            code = args.run(args)
        write_stdout(output.getvalue())
        return code
    except MinielmError as err:
        if args.debug:
            raise
        print(f"minielm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minielm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line, the traceback on request
        if args.debug:
            raise
        print(f"minielm: error: internal {type(err).__name__}: {' '.join(str(err).split())} "
              "(--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
