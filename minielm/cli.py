"""The `minielm` command: explain a prompt, check exactness, generate text.

    minielm explain "In the beginning God created the"
    minielm check
    minielm generate "The LORD is my shepherd"

Errors print one line on stderr and exit with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .errors import InputError, MinielmError
from .interpret import (decode_input, decode_output, layer_table, model_token, stable_rank, stacked_svd, svd_ready,
                        token_shares)
from .linear_map import all_layer_maps, detached_jacobian, equivalent_linear_map
from .loader import load

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "kjv-tiny"
CHECK_PROMPT = "And God said, Let there be light: and there was light. And God saw the light, that it was good"


class Progress:
    """`with Progress("assembling operators"):` prints the step and its time on stderr."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        self.start, self.shown = time.perf_counter(), sys.stderr.isatty()  # only for a person watching
        if self.shown:
            print(f"… {self.what}", end="", file=sys.stderr, flush=True)

    def __exit__(self, kind, *_):
        if self.shown:
            done = f"{time.perf_counter() - self.start:.2f} s" if kind is None else "failed"
            print(f" ({done})", file=sys.stderr, flush=True)


def load_model(args):
    if args.model is None and not DEFAULT_MODEL.is_dir():
        raise InputError(f"the shipped model is not at {DEFAULT_MODEL}; pass --model DIR")
    path = args.model or DEFAULT_MODEL
    with Progress(f"loading {path}"):
        return load(path, dtype=args.dtype, device=args.device, stream=args.stream)


def relative_max(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- explain ------------------------------------------------------------------------------------
def explain(args) -> int:
    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    tokens = [model_token(model, i) for i in ids]
    with Progress(f"assembling {len(ids)} operators of {model.config.hidden_size}×{model.config.hidden_size}"):
        elm = equivalent_linear_map(model, ids)
    with Progress("autograd cross-check"):
        autograd = relative_max(elm.operators, detached_jacobian(model, ids))
    with Progress("singular value decompositions"):
        svd = stacked_svd(elm, args.k)
        ranks = stable_rank(elm.operators)
        sigma1 = torch.linalg.matrix_norm(svd_ready(elm.operators), ord=2)
    probs = torch.softmax(model.logits(ids)[-1], dim=-1)
    top = torch.topk(probs, 5)
    shares = token_shares(elm)
    strongest = svd.V.norm(dim=1).argmax(dim=0)  # (k,): the token whose block carries most of v_k
    report = {
        "model": str(args.model or DEFAULT_MODEL),
        "dtype": str(model.dtype).removeprefix("torch."),
        "tokens": tokens,
        "next_token": model_token(model, top.indices[0]),
        "top": [{"token": model_token(model, i), "probability": float(p)} for p, i in zip(top.values, top.indices)],
        "relative_error": elm.relative_error(),
        "probability_error": float((elm.probabilities() - probs).abs().max()),
        "autograd_relative_difference": autograd,
        "per_token": [{"token": tok, "share": float(s), "stable_rank": float(r), "sigma1": float(s1)}
                      for tok, s, r, s1 in zip(tokens, shares, ranks, sigma1)],
        "singular_values": [float(s) for s in svd.S],
        "decoded": [{"sigma": float(svd.S[k]),
                     "output_tokens": [t for t, _ in decode_output(model, svd.U[:, k])],
                     "input_position": int(strongest[k]),
                     "input_tokens": [t for t, _ in decode_input(model, svd.V[strongest[k], :, k])]}
                    for k in range(len(svd.S))],
    }
    if args.plot:
        with Progress(f"plotting to {args.plot}"):
            plot_explanation(args.plot, report, elm)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print_explanation(report, model)
    return 0


def print_explanation(r, model):
    c = model.config
    print(f"model   {r['model']}  ({c.model_type}, d={c.hidden_size}, {c.num_hidden_layers} layers, {r['dtype']})")
    print(f"prompt  {len(r['tokens'])} tokens: {' | '.join(r['tokens'])}")
    print("\nnext token")
    for row in r["top"]:
        print(f"  {row['token']:<16} {row['probability']:.4f}")
    exact = "" if r["dtype"] == "float64" else f"   ({r['dtype']}: not exact, round-off of that dtype)"
    print(f"\nexactness{exact}")
    print(f"  reconstruction  ‖Σ J_t x_t − y‖ / ‖y‖         {r['relative_error']:.1e}")
    print(f"  probabilities   max |p_reconstructed − p|     {r['probability_error']:.1e}")
    print(f"  autograd        max |J − J_autograd| / max |J| {r['autograd_relative_difference']:.1e}")
    print("\nper token      share of y   stable rank      σ1")
    for t, row in enumerate(r["per_token"]):
        print(f"  {t:>3} {row['token']:<14} {row['share']:>8.3f} {row['stable_rank']:>12.2f} {row['sigma1']:>8.3f}")
    print("\nstacked operator [J_1 … J_T]: top singular values and vectors")
    print(f"  {'σ':>8}   {'output side (unembedding)':<40} input side (cosine to embeddings)")
    for row in r["decoded"]:
        out = " ".join(row["output_tokens"])
        at = r["tokens"][row["input_position"]]
        print(f"  {row['sigma']:>8.3f}   {out:<40} @{at}: {' '.join(row['input_tokens'])}")


def pyplot():
    """matplotlib's pyplot, drawing to files only; an InputError if it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'minielm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_explanation(path, report, elm):
    plt = pyplot()

    S = torch.linalg.svdvals(svd_ready(elm.operators).permute(1, 0, 2).reshape(elm.operators.shape[1], -1)).cpu()
    shares = [row["share"] for row in report["per_token"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    left.semilogy(range(1, len(S) + 1), S, marker=".", lw=1)
    left.set(title="singular values of [J_1 … J_T]", xlabel="index k", ylabel="σ_k")
    left.grid(alpha=0.3)
    colors = ["tab:blue" if s >= 0 else "tab:red" for s in shares]
    right.bar(range(len(shares)), shares, color=colors)
    right.set_xticks(range(len(shares)), report["tokens"], rotation=60, ha="right", fontsize=8)
    right.axhline(0, color="black", lw=0.6)
    right.set(title=f"share of y from each token: (J_t x_t)·y / ‖y‖²   → next: {report['next_token']!r}",
              ylabel="share")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- check ----------------------------------------------------------------------------------------
def check(args) -> int:
    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    L = model.config.num_hidden_layers
    rows = []
    with Progress(f"checking the whole model and {L} layers on {len(ids)} tokens"):
        elm = equivalent_linear_map(model, ids)
        probs = torch.softmax(model.logits(ids)[-1], dim=-1)
        rows.append(("model", elm.relative_error(), float((elm.probabilities() - probs).abs().max()),
                     relative_max(elm.operators, detached_jacobian(model, ids))))
        parts = all_layer_maps(model, ids)  # every layer and module in one pass
        for layer in range(L):
            for component in ("output", "attention", "mlp"):
                part = parts[(layer, component)]
                p_err = (float((part.probabilities() - part.model_probabilities()).abs().max())
                         if component == "output" else float("nan"))
                rows.append((part.target, part.relative_error(), p_err, float("nan")))
    print(f"{'target':<14} {'reconstruction':>15} {'probabilities':>14} {'vs autograd':>12}")
    for name, rec, p, ag in rows:
        print(f"{name:<14} {rec:>15.1e} {fmt(p):>14} {fmt(ag):>12}")
    worst = max(r[1] for r in rows)
    bound = 1e-13 if model.dtype == torch.float64 else 1e-4
    print(f"\nworst reconstruction error {worst:.1e} ({'within' if worst < bound else 'ABOVE'} {bound:.0e} "
          f"for {str(model.dtype).removeprefix('torch.')})")
    return 0 if worst < bound else 1


def fmt(x) -> str:
    return "—" if x != x else f"{x:.1e}"


# ---- layers -----------------------------------------------------------------------------------------
def layers(args) -> int:
    model = load_model(args)
    ids = model.tokenizer.encode(args.prompt)
    L = model.config.num_hidden_layers
    with Progress(f"operators of {L} layers and {2 * L} modules in one pass, and their spectra"):
        rows = layer_table(model, ids)
    if args.plot:
        with Progress(f"plotting to {args.plot}"):
            plot_layers(args.plot, rows, [model_token(model, i) for i in ids])
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return 0
    print(f"prompt: {args.prompt!r}  ({len(ids)} tokens)\n")
    print(f"{'target':<13} {'σ1':>8} {'σ2':>8} {'stable rank':>12} {'rec. error':>11}  "
          f"{'top output singular vector':<34} target decoded")
    for r in rows:
        s = r["singular_values"]
        print(f"{r['target']:<13} {s[0]:>8.3f} {s[1] if len(s) > 1 else 0:>8.3f} {r['stable_rank']:>12.2f} "
              f"{r['relative_error']:>11.1e}  {' '.join(r['top_tokens']):<34} {' '.join(r['predicts'][:3])}")
    return 0


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- steer ------------------------------------------------------------------------------------------
def steer_command(args) -> int:
    from .steering import steer

    model = load_model(args)
    with Progress("baseline and steered generation"):
        baseline = model.generate(args.prompt, args.max_new_tokens)
        steered = steer(model, args.concept, args.prompt, args.layer, args.scale, args.max_new_tokens)
    print(f"concept   {args.concept!r} at layer {args.layer}, scale {args.scale}")
    print(f"baseline  {args.prompt}{baseline}")
    print(f"steered   {args.prompt}{steered}")
    return 0


# ---- operators ------------------------------------------------------------------------------------
def operators_command(args) -> int:
    """Write a prompt's operators to a safetensors file, a block of rows at a time (torchrun: --distributed)."""
    import os

    if args.distributed:  # under torchrun: one process per device, the rows split over them
        gpu = args.device.startswith("cuda")
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if gpu else args.device
        torch.distributed.init_process_group("nccl" if gpu else "gloo")
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
def build_parser():
    parser = argparse.ArgumentParser(prog="minielm", description="Exact equivalent linear maps of decoder LLMs.")
    parser.add_argument("--debug", action="store_true", help="show the traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, fn, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(run=fn)
        sub.add_argument("--model", help=f"checkpoint directory (default: the shipped {DEFAULT_MODEL.name})")
        sub.add_argument("--dtype", default="float64", help="compute dtype (default float64)")
        sub.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        sub.add_argument("--stream", action="store_true",
                         help="keep the weights memory-mapped and cast one layer at a time (large models)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sub

    sub = command("explain", explain, "the equivalent linear map of a prompt, read out")
    sub.add_argument("prompt")
    sub.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_argument("--plot", metavar="FILE.png", help="write the spectrum and per-token shares")
    sub.add_argument("-k", type=int, default=5, help="singular triplets to decode (default 5)")

    sub = command("check", check, "exactness report for the whole model and each layer")
    sub.add_argument("--prompt", default=CHECK_PROMPT)

    sub = command("layers", layers, "how the operator emerges layer by layer: spectra, stable ranks, decoded vectors")
    sub.add_argument("prompt")
    sub.add_argument("--json", action="store_true", help="print a JSON list, one object per layer and module")
    sub.add_argument("--plot", metavar="FILE.png", help="write stable rank and σ1 by layer")

    sub = command("steer", steer_command, "generate with a concept prompt's layer operator added to the stream")
    sub.add_argument("prompt")
    sub.add_argument("--concept", required=True, help="the concept prompt")
    sub.add_argument("--layer", type=int, required=True)
    sub.add_argument("--scale", type=float, default=1.0, help="λ, relative to the hidden state's norm")
    sub.add_argument("--max-new-tokens", type=int, default=30)

    sub = command("operators", operators_command, "write a prompt's operators J_t to a safetensors file")
    sub.add_argument("prompt")
    sub.add_argument("--out", required=True, metavar="FILE.safetensors")
    sub.add_argument("--block", type=int, help="output rows swept at a time (default: about 1 GiB of them)")
    sub.add_argument("--distributed", action="store_true", help="under torchrun: split the rows over the ranks")

    sub = command("generate", generate, "continue a prompt (greedy unless --temperature)")
    sub.add_argument("prompt")
    sub.add_argument("--max-new-tokens", type=int, default=30)
    sub.add_argument("--temperature", type=float, default=0.0)
    sub.add_argument("--top-k", type=int)
    sub.add_argument("--seed", type=int)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
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
