"""Generating text: a KV cache, greedy or sampled next tokens.

Generation is not part of the equivalent linear map; it is here so that the
model file stays the forward pass. `Model.generate` and `Model.generate_ids`
call these functions. This module does not import the model: it uses only
`model.forward`, `model.embed`, `model.unembed`, the tokenizer and the config.
"""

from __future__ import annotations

import torch

from . import checks
from .errors import InputError
from .progress import progress
from .rope import rotation_switches


class KVCache:
    """Keys (after RoPE) and values of every layer, for generation one token at a time."""

    def __init__(self, num_layers):
        self.keys = [None] * num_layers  # each (S, Hkv, hd)
        self.values = [None] * num_layers
        self.length = 0  # S: the positions already cached

    def extend(self, store, layer, rows):
        """Append this call's rows (T, Hkv, hd) to `store` ("keys" or "values"); return all (S, Hkv, hd)."""
        cached = getattr(self, store)
        if cached[layer] is not None:
            rows = torch.cat([cached[layer], rows])
        cached[layer] = rows
        return rows


def generate(model, prompt, max_new_tokens=20, temperature=0.0, top_k=None, seed=None, edit=None) -> str:
    """The continuation of `prompt` (text, or a list of token ids), as text: greedy at temperature 0,
    else sampled from softmax(logits / temperature), over the top k if given: from a generator seeded
    with `seed`, or without one from torch's global generator (each call then draws afresh)."""
    prompt = checks.prompt("prompt", prompt)  # bytes would iterate as token ids: refused
    ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else model.check_ids(prompt)
    new = model.generate_ids(ids, max_new_tokens, temperature, top_k, seed, edit)
    before, after = model.tokenizer.decode(ids), model.tokenizer.decode(ids + new)
    # decoding the whole sequence keeps the space between prompt and continuation
    return after[len(before):] if after.startswith(before) else model.tokenizer.decode(new)


def generate_ids(model, ids, max_new_tokens=20, temperature=0.0, top_k=None, seed=None, edit=None) -> list:
    """The new token ids, computed with a KV cache: the prompt once, then one token per step.

    With `longrope` (Phi-3) every position rotates with the short factors while the sequence fits
    original_max_position_embeddings, and with the long ones beyond: keys cached before that length
    are stale after it. The step that crosses it recomputes the cache over the whole sequence, as
    Hugging Face's Phi-3 generate does, so every token is the one a full forward pass predicts."""
    config = model.config
    max_new_tokens, temperature, top_k, seed = check_sampling(config, max_new_tokens, temperature, top_k, seed, edit)
    ids = model.check_ids(ids)
    room = config.max_position_embeddings - len(ids)  # the whole sequence must fit the positions
    if max_new_tokens > room:
        raise InputError(f"max_new_tokens={max_new_tokens} after a {len(ids)}-token prompt: "
                         f"{len(ids) + max_new_tokens} tokens exceed max_position_embeddings="
                         f"{config.max_position_embeddings} (at most {room} new tokens)")
    generator = None  # no seed: torch's global generator, so that each call draws afresh (torch.manual_seed fixes it)
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    cache, new = KVCache(config.num_hidden_layers), []
    step_input = list(ids)
    eos = set(model.eos_token_id if isinstance(model.eos_token_id, list) else [model.eos_token_id])
    switches = rotation_switches(config)  # lengths past which every cached key rotates differently
    with torch.no_grad():
        for _ in progress(range(max_new_tokens), "generating", unit="token"):
            if cache.length and any(cache.length <= s < cache.length + len(step_input) for s in switches):
                cache, step_input = KVCache(config.num_hidden_layers), ids + new  # stale keys: start over
            y, _ = model.forward(model.embed(step_input, start=cache.length), cache=cache, edit=edit)
            next_id = sample(model.unembed(y[-1]), temperature, top_k, generator)
            new.append(next_id)
            if next_id in eos:
                break
            step_input = [next_id]
    return new


def check_sampling(config, max_new_tokens, temperature, top_k, seed, edit=None):
    """The generation settings, checked: (max_new_tokens, temperature, top_k, seed) as plain numbers."""
    checks.edit_hook("edit", edit)
    return (checks.integer("max_new_tokens", max_new_tokens, 0, config.max_position_embeddings, closed=True,
                           why="max_position_embeddings"),
            checks.real("temperature", temperature, 0),
            checks.optional_integer("top_k", top_k, 1),
            checks.seed("seed", seed))


def sample(logits, temperature, top_k, generator) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / temperature) over the top k."""
    if temperature == 0:
        return int(torch.argmax(logits))
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # shifted so the largest is 0 before dividing: a tiny temperature then gives -inf, never inf - inf = nan;
    # and the largest stays 0 where the temperature rounds to 0 in a low-precision dtype (0 / 0 would be nan)
    shifted = logits - logits.max()  # (V,), ≤ 0
    probs = torch.softmax(torch.where(shifted == 0, shifted, shifted / temperature), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
