#!/usr/bin/env python3
"""Train `kjv-tiny`, a small Llama-style model of the King James Bible, with minielm itself.

Usage::

    python tools/train_tiny.py                      # the defaults reproduce weights/kjv-tiny
    python tools/train_tiny.py --benchmark 5        # time 5 optimizer steps (tokens/second), save nothing
    python tools/train_tiny.py --hidden-size 256 --heads 4 --kv-heads 2 --intermediate-size 704 --out /tmp/m

Everything below is deterministic for a given --seed: the same weights, bit for bit, whatever --workers.

Corpus
    `bible -f "Gen1:1-Rev22:21"` (Debian's bible-kjv package) prints one verse per
    line as "Ge1:1 In the beginning God created the heaven and the earth.". We strip the
    reference and keep only the verse text, so a model prompt is plain Bible text.

Split
    5% of the verses (--heldout-fraction), drawn at random with --seed, are held out;
    every verse of Genesis 1, John 1, John 3 and Psalm 23 stays in training so that
    the best-known verses are learned (tests/test_shipped_model.py relies on them).

Tokenizer
    sentencepiece BPE trained on the training verses only: vocabulary 4096 with
    unk=0, bos=1 "<s>", eos=2 "</s>", no pad, byte fallback (any text encodes),
    identity normalisation (decode(encode(text)) == text for this corpus).

Training sequences
    The training verses, in canonical order, are concatenated as
    "<s> verse </s> <s> verse </s> ..." (1,014,598 tokens). --famous-repeats N > 1
    appends N - 1 more copies of the four kept chapters (124 verses, ~3,600 tokens a
    copy) so that those verses are seen N times as often; the shipped model uses the
    default, 1: every training verse counts the same. A sequence is --seq-len + 1 tokens taken
    from this stream starting at the <s> of a randomly chosen verse, so position 0
    is always <s> (as in a prompt from `tokenizer.encode`) and the model learns to
    use the preceding verses as context. Targets that are <s> (always right after
    </s>) are not scored. minielm's `Model.forward` takes one sequence (T, d) at a
    time, so a batch is a loop over --batch-size sequences with gradients
    accumulated; the loss is the mean over all scored tokens of the batch.

Evaluation
    Every verse is scored on its own, as <s> text </s>: mean nats per predicted
    token (the text tokens and </s>), and bits per character = total nats / ln 2
    / (characters + 1, the "+1" being the end of line that </s> stands for).
    The final figures are measured on the checkpoint as shipped (bfloat16),
    reloaded with `minielm.load(..., dtype=torch.float32)`.

How the defaults were chosen (2-core VM, float32, --benchmark runs)
    Throughput, sequences of 256 tokens: d=384 (4 layers, 6/2 heads, SwiGLU 1024,
    7.9M parameters) ~1,400-2,600 tokens/s; d=256 (4/2 heads, SwiGLU 704, 4.0M)
    ~3,000-3,800 tokens/s; the host's speed varies by ~2x from minute to minute.
    d=384 gets ~4.5 epochs in ~35 minutes, so we keep the size the project benchmarks.
    Same 614k tokens, held-out probe after the run (nats/token): 16 sequences per
    step at lr 1e-3: 4.35, at 2.5e-3: 4.54; 8 per step at lr 1e-3: 4.17, at 2e-3:
    4.15; 4 per step at lr 1.5e-3: 4.08. More, smaller steps win at this budget.
    Full runs: 16 sequences per step, lr 1e-3, 800 steps (3.2 epochs, 25 minutes):
    held-out 3.37 nats/token. The defaults with --famous-repeats 1 (4.4 epochs, 35
    minutes): held-out 3.30, training verses 2.81, but greedy decoding still gave
    "In the beginning God created the" -> "world, ...", "The LORD is my shepherd; I
    shall not" -> "be moved", "...his only begotten" -> "of the world": 4-5 passes over
    a verse are not enough for an 8M-parameter model to learn it verbatim. That run
    is the shipped model. --famous-repeats 10 (each kept verse seen ~45 times) is
    meant to fix this for the four chapters; it has not been trained to the end yet.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

import minielm
from minielm.checkpoint import expected_shapes, save_checkpoint
from minielm.config import Config
from minielm.model import Model

BIBLE_COMMAND = ["bible", "-f", "Gen1:1-Rev22:21"]
VERSE_LINE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.+)$")  # "1Sm3:10 And the LORD came, ..."
KEEP_IN_TRAIN = {("Ge", 1), ("John", 1), ("John", 3), ("Psa", 23)}  # (book as `bible` spells it, chapter)
UNK, BOS, EOS = 0, 1, 2
IGNORE = -100  # cross_entropy's ignore_index: targets that are not scored


# ---- corpus and split -------------------------------------------------------------------
def read_bible(command=BIBLE_COMMAND) -> list[tuple[str, str]]:
    """[(reference, text)] for all 31,102 verses, in canonical order."""
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    verses = []
    for line in out.splitlines():
        match = VERSE_LINE.match(line)
        if not match:
            raise SystemExit(f"unexpected line from {' '.join(command)!r}: {line!r}")
        book, chapter, verse, text = match.groups()
        verses.append((f"{book}{chapter}:{verse}", text.strip()))
    return verses


def chapter_of(reference: str) -> tuple[str, int]:
    """("Psa", 23) for "Psa23:1"."""
    book, chapter = VERSE_LINE.match(reference + " x").groups()[:2]
    return book, int(chapter)


def split_verses(verses, fraction: float, seed: int):
    """(train, heldout) lists of (reference, text), both in canonical order."""
    candidates = [i for i, (ref, _) in enumerate(verses) if chapter_of(ref) not in KEEP_IN_TRAIN]
    heldout = set(random.Random(seed).sample(candidates, round(fraction * len(verses))))
    train = [v for i, v in enumerate(verses) if i not in heldout]
    return train, [v for i, v in enumerate(verses) if i in heldout]


# ---- tokenizer ----------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A sentencepiece BPE model trained on `texts`, as the bytes of a tokenizer.model file."""
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1,
        normalization_rule_name="identity",  # keep the text as it is: exact round trips
        num_threads=1, minloglevel=2,  # one thread: the merges do not depend on scheduling
    )
    return model.getvalue()


# ---- model --------------------------------------------------------------------------------
def llama_config(args, vocab_size: int) -> dict:
    """config.json for a Hugging Face LlamaForCausalLM of the requested size."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,  # SwiGLU width
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,  # grouped-query attention
        "head_dim": args.hidden_size // args.heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "torch_dtype": args.save_dtype,
    }


def init_weights(config: Config, seed: int) -> dict:
    """Random float32 weights in the layout `minielm.checkpoint.load_weights` returns.

    Matrices ~ N(0, 0.02²), the two projections that write into the residual stream
    (wo, w_down) scaled down by sqrt(2·layers) as in GPT-2; RMSNorm weights are ones.
    The unembedding is tied: weights["lm_head"] IS weights["embed"].
    """
    torch.manual_seed(seed)
    shapes, std = expected_shapes(config), 0.02
    residual_std = std / math.sqrt(2 * config.num_hidden_layers)

    def matrix(name, scale=std):
        return (torch.randn(shapes[name]) * scale).requires_grad_()

    def ones(name):
        return torch.ones(shapes[name]).requires_grad_()

    embed = matrix("embed")
    layers = [{
        "attn_norm": ones("attn_norm"),
        "wq": matrix("wq"), "wk": matrix("wk"), "wv": matrix("wv"), "wo": matrix("wo", residual_std),
        "mlp_norm": ones("mlp_norm"),
        "w_gate": matrix("w_gate"), "w_up": matrix("w_up"), "w_down": matrix("w_down", residual_std),
    } for _ in range(config.num_hidden_layers)]
    return {"embed": embed, "final_norm": ones("final_norm"), "lm_head": embed, "layers": layers}


def sequence_loss(model: Model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (nats) of one sequence. The embedding is indexed here, not with
    model.embed (which takes a list and is meant for inference), so gradients reach it."""
    x = model.weights["embed"][ids]  # (T, d)
    y, _ = model.forward(x)  # (T, d), final-normed
    logits = model.unembed(y)  # (T, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def sequence_gradients(model: Model, params: list, ids, targets, scale: float):
    """(loss / scale, d(loss / scale)/d params) for one sequence, computed on the calling thread."""
    loss = sequence_loss(model, ids, targets) / scale
    return loss.item(), torch.autograd.grad(loss, params)


# ---- data -----------------------------------------------------------------------------------
class Stream:
    """All training verses as one token stream "<s> v1 </s> <s> v2 </s> ...", sampled at verse starts."""

    def __init__(self, encoded: list[list[int]], seq_len: int, seed: int):
        tokens, starts = [], []
        for ids in encoded:
            starts.append(len(tokens))
            tokens += [BOS, *ids, EOS]
        self.tokens = torch.tensor(tokens)
        self.seq_len = seq_len
        self.starts = torch.tensor([s for s in starts if s + seq_len + 1 <= len(tokens)])
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self):
        """(inputs, targets), each (seq_len,), starting at the <s> of a random verse."""
        start = int(self.starts[torch.randint(len(self.starts), (1,), generator=self.generator)])
        chunk = self.tokens[start:start + self.seq_len + 1]
        targets = chunk[1:].clone()
        targets[targets == BOS] = IGNORE  # <s> always follows </s>: nothing to learn
        return chunk[:-1], targets


# ---- evaluation -----------------------------------------------------------------------------
def evaluate(model: Model, sp, texts: list[str], pool) -> dict:
    """Each verse on its own, <s> text </s>: mean nats per predicted token, bits per character."""
    def verse_nats(x):
        with torch.no_grad():  # grad mode is per thread: set it in the worker
            return float(sequence_loss(model, x[:-1], x[1:]))

    encoded = [torch.tensor([BOS, *sp.EncodeAsIds(text), EOS]) for text in texts]
    nats = sum(pool.map(verse_nats, encoded))  # results in order: the sum does not depend on scheduling
    tokens = sum(len(x) - 1 for x in encoded)
    chars = sum(len(text) + 1 for text in texts)  # + the end of line that </s> predicts
    return {"nats_per_token": nats / tokens, "bits_per_char": nats / math.log(2) / chars,
            "verses": len(texts), "tokens": tokens}


# ---- schedule and progress ----------------------------------------------------------------
def learning_rate(step: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to --lr * --min-lr-ratio at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress(step: int, total: int, elapsed: float, text: str, every: int) -> None:
    """One line, redrawn in place on a terminal; a new line every `every` steps in a log file."""
    eta = elapsed / step * (total - step)
    line = f"step {step:5d}/{total} {100 * step / total:5.1f}% | {text} | {clock(elapsed)} elapsed, eta {clock(eta)}"
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if step == total else "", file=sys.stderr, flush=True)
    elif step % every == 0 or step == total:
        print(line, file=sys.stderr, flush=True)


# ---- main ------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="weights/kjv-tiny", help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, initialisation and sampling")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--famous-repeats", type=int, default=1,
                   help="times Genesis 1, John 1, John 3 and Psalm 23 appear in the training stream")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--intermediate-size", type=int, default=1024, help="SwiGLU width (~2.7 x hidden)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=4400, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=200, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the matrices (not norms)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--workers", type=int, default=2,
                   help="threads that each run whole sequences with single-threaded torch ops (see below)")
    p.add_argument("--log-every", type=int, default=50, help="progress lines in a log file, in steps")
    p.add_argument("--eval-every", type=int, default=500, help="held-out check on --eval-verses verses (0: never)")
    p.add_argument("--eval-verses", type=int, default=200)
    p.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="time N optimizer steps, print tokens/second, save nothing")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Parallelism: --workers Python threads each run a whole sequence (forward and backward)
    # with single-threaded torch ops, instead of one sequence at a time with 2 intra-op threads.
    # On this 2-core VM the intra-op threads meet at a barrier after every op, and whenever the
    # host takes one core away they stall: we measured 150-2060 tokens/s with
    # torch.set_num_threads(2), a steady ~1330 with 1 thread, and 1270-2630 with 2 workers.
    # Per-sequence gradients are summed in a fixed order, so the result does not depend on
    # scheduling (the same seed gives the same weights, bit for bit).
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(args.workers)
    torch.manual_seed(args.seed)
    started = time.time()

    # corpus, split, tokenizer
    verses = read_bible()
    train, heldout = split_verses(verses, args.heldout_fraction, args.seed)
    print(f"corpus: {len(verses)} verses -> {len(train)} train, {len(heldout)} held out", file=sys.stderr)
    train_texts, heldout_texts = [t for _, t in train], [t for _, t in heldout]
    sp_bytes = train_tokenizer(train_texts, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (UNK, BOS, EOS, -1)
    # the training stream: every training verse once, in canonical order, then
    # --famous-repeats - 1 more copies of each kept chapter (Genesis 1, John 1, ...)
    famous = [text for ref, text in train if chapter_of(ref) in KEEP_IN_TRAIN]
    stream_texts = train_texts + famous * (args.famous_repeats - 1)
    stream = Stream([sp.EncodeAsIds(t) for t in stream_texts], args.seq_len, args.seed)
    repeats = f", the {len(famous)} kept verses {args.famous_repeats} times" if args.famous_repeats > 1 else ""
    print(f"tokenizer: {sp.GetPieceSize()} pieces, {len(stream.tokens) / len(''.join(stream_texts)):.3f} "
          f"tokens per character; training stream {len(stream.tokens):,} tokens{repeats}", file=sys.stderr)

    # model
    config_json = llama_config(args, sp.GetPieceSize())
    config = Config.from_dict(config_json)
    weights = init_weights(config, args.seed)
    model = Model(config, weights)
    params = model.parameters()
    n_params = sum(p.numel() for p in params)
    print(f"model: d={config.hidden_size} layers={config.num_hidden_layers} heads={config.num_attention_heads}/"
          f"{config.num_key_value_heads} f={config.intermediate_size} V={config.vocab_size}: "
          f"{n_params:,} parameters ({n_params - weights['embed'].numel():,} without the tied embedding)",
          file=sys.stderr)

    decay = [p for p in params if p.dim() == 2]  # matrices (and the embedding); norms are not decayed
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    # training
    steps = args.benchmark or args.steps
    probe = random.Random(args.seed + 1).sample(heldout_texts, min(args.eval_verses, len(heldout_texts)))
    tokens_seen, loop_start, recent = 0, time.time(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        batch = [stream.sample() for _ in range(args.batch_size)]
        scored = sum(int((t != IGNORE).sum()) for _, t in batch)  # the loss is a mean over these
        total = 0.0
        # gradient accumulation: model.forward takes one sequence, so each is its own
        # forward/backward; the workers return per-sequence gradients, summed here in order
        for loss, grads in pool.map(lambda b: sequence_gradients(model, params, *b, scored), batch):
            total += loss
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad.add_(g)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_seen += args.batch_size * args.seq_len
        recent = (recent + [total])[-args.log_every:]
        elapsed = time.time() - loop_start
        progress(step + 1, steps, elapsed, f"loss {total:.3f} (avg {sum(recent) / len(recent):.3f}) "
                 f"lr {learning_rate(step, args):.2e} {tokens_seen / elapsed:,.0f} tok/s", args.log_every)
        if args.eval_every and not args.benchmark and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            check = evaluate(model, sp, probe, pool)
            print(f"  held-out probe ({check['verses']} verses): {check['nats_per_token']:.3f} nats/token",
                  file=sys.stderr, flush=True)

    train_seconds = time.time() - loop_start
    print(f"trained {steps} steps, {tokens_seen:,} tokens ({tokens_seen / len(stream.tokens):.2f} epochs) in "
          f"{clock(train_seconds)}: {tokens_seen / train_seconds:,.0f} tokens/second", file=sys.stderr)
    if args.benchmark:  # for comparing settings: the held-out probe after the short run
        check = evaluate(model, sp, probe, pool)
        print(f"held-out probe ({check['verses']} verses): {check['nats_per_token']:.3f} nats/token", file=sys.stderr)
        return

    # save: config.json + model.safetensors, then the tokenizer
    out = Path(args.out)
    save_checkpoint(out, config_json, weights, dtype=getattr(torch, args.save_dtype))
    (out / "tokenizer.model").write_bytes(sp_bytes)
    tokenizer_config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    # evaluate what ships: the saved checkpoint, reloaded in float32
    shipped = minielm.load(out, dtype=torch.float32)
    sample = random.Random(args.seed + 2).sample(train_texts, len(heldout_texts))  # as many training verses
    results = {
        "train_loss_last_step": total,
        "train": evaluate(shipped, sp, sample, pool),
        "heldout": evaluate(shipped, sp, heldout_texts, pool),
        "heldout_float32_before_saving": evaluate(model, sp, heldout_texts, pool),
        "parameters": n_params, "steps": steps, "tokens": tokens_seen,
        "train_seconds": round(train_seconds), "total_seconds": round(time.time() - started),
    }
    print(json.dumps(results, indent=2))
    prompts = ["In the beginning God created the", "The LORD is my shepherd; I shall not",
               "For God so loved the world, that he gave his only begotten", "And God said, Let there be",
               "Jesus wept", "Blessed are the"]
    for prompt in prompts:
        print(f"{prompt!r} -> {shipped.generate(prompt, max_new_tokens=24)!r}")


if __name__ == "__main__":
    main()
