"""Steering: a concept prompt's equivalent linear map, applied to new text while it is generated.

Three recipes, all edits of the residual stream made through `model.generate(..., edit=...)`.
Layers are numbered from 0; "after layer ℓ" is the residual stream leaving block ℓ, which
is also the input of block ℓ+1. J^ℓ_t (d × d) is the operator from the concept's input vector
x_t to its residual stream after layer ℓ at the last position, final norm applied (Golden 2025):
`equivalent_linear_map(model, concept_ids, layer=ℓ).operators[t]`.

minielm (`method="minielm"`): one operator, the sum over the concept's positions,
S = Σ_t J^ℓ_t, applied to each new position's own input vector, normalized, and added
*after* layer ℓ, the space S maps into:

    h_p <- h_p + λ ‖h_p‖ S x_p / ‖S x_p‖                    after layer ℓ, every position p

paper (`method="paper"`, Golden's `apply_steering_operator`): the concept's operators one
per position, cycled over the positions k of the new text, summed cumulatively over
positions, rescaled, and added at the *input* of layer ℓ:

    c_k = Σ_{j ≤ k} J^ℓ_{j mod T_c} x_j                        (T_c: the concept's length)
    h_k <- h_k + λ ‖h_k‖ c_k / (2 ‖c_k‖)                     input of layer ℓ, every position k

  The one-layer offset: J^ℓ maps into the stream *after* layer ℓ, but the paper adds its
  output at the stream *entering* layer ℓ (its `lsplit` is the number of layers in the
  operator, and generation resumes at layer `lsplit - 1`). Layer ℓ itself then processes
  the push; minielm's recipe adds it where it lives and leaves it to the layers above.
  With a KV cache, c_k is a running sum carried from one generation step to the next: an
  edit holds that state, so build a new one for every generation.

actadd (`method="actadd"`, activation addition, Turner et al. 2023): a fixed direction, the
mean residual stream after layer ℓ over the concept's tokens minus that over a neutral
prompt's (the BOS position, identical in both, left out), added where it was measured:

    v = mean_t h^ℓ_t(concept) − mean_t h^ℓ_t(neutral)
    h_p <- h_p + λ ‖h_p‖ v / ‖v‖                              after layer ℓ, every position p

λ = 0 leaves the model unchanged in every recipe. λ is relative to the hidden state's
norm in all three; the paper's 1/2 makes its push half of minielm's at the same λ.

`evaluate` measures what a recipe does over a grid of layers and scales: the concept's lift
(log-probability of the concept's own tokens, steered against unsteered) and the fluency cost
(negative log-likelihood of the steered text under the unsteered model, and its repetition).
"""

from __future__ import annotations

import torch

from . import checks
from .errors import InputError
from .interpret import printable
from .linear_map import equivalent_linear_map, trace
from .model import Model

METHODS = ("minielm", "paper", "actadd")
NEUTRAL = "This is a sentence about something."  # actadd's default neutral prompt

# The measured default (tools/README.md, "Steering Gemma 3 270M"; tools/results/steer_gemma3_270m.md): on Gemma 3 270M
# the best lift at a fluent cost, over three concepts, came from this recipe a quarter of the
# way up the layers at this λ. `minielm steer` uses it when no --method/--layer/--scale is given.
DEFAULT_METHOD, DEFAULT_DEPTH, DEFAULT_SCALE = "actadd", 0.25, 0.05


def default_layer(model: Model) -> int:
    """The default steering layer: DEFAULT_DEPTH of the way up (layer 4 of Gemma 3 270M's 18)."""
    return int(DEFAULT_DEPTH * model.config.num_hidden_layers)


# ---- minielm's recipe ---------------------------------------------------------------------------------
def steering_operator(model: Model, concept: str, layer: int) -> torch.Tensor:
    """S = Σ_t J^ℓ_t for the concept prompt: (d, d)."""
    return concept_operators(model, concept, layer).sum(0)


def steering_layer(model: Model, layer) -> int:
    """A layer index in [0, L): steering acts after that layer."""
    L = model.config.num_hidden_layers
    return checks.integer("layer", layer, 0, L, why=f"the model has {L} layers")


def steering_edit(operator: torch.Tensor, layer: int, scale: float):
    """The `edit(i, h, x)` hook that adds λ‖h_p‖ S x_p / ‖S x_p‖ after `layer`."""
    checks.matrices("operator", operator)
    if operator.dim() != 2 or operator.shape[0] != operator.shape[1]:
        raise InputError(f"operator must be a square (d, d) matrix, got shape {tuple(operator.shape)}")
    layer = checks.integer("layer", layer, 0)
    scale = checks.real("scale", scale)

    def edit(i, h, x):
        if i != layer:
            return h
        push = x @ operator.T  # (T, d): S x_p for every position of this call
        return pushed(h, unit(push), scale)

    return named(edit, layer, scale)


# ---- the paper's recipe -------------------------------------------------------------------------------
def concept_operators(model: Model, concept: str, layer: int) -> torch.Tensor:
    """J^ℓ_t for every position t of the concept prompt: (T_c, d, d), in the model's dtype."""
    checks.instance("model", model, Model, "from minielm.load")
    layer, concept = steering_layer(model, layer), checks.text("concept", concept)
    return equivalent_linear_map(model, encoded(model, "concept", concept), layer=layer).operators


def encoded(model: Model, name: str, text: str) -> list:
    """The token ids of the concept (or the neutral prompt), refused by name if they exceed the positions:
    the length check further down named neither ("841 tokens exceed ..."), and the prompt was suspected."""
    ids = model.tokenizer.encode(text)
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise InputError(f"the {name} (--{name}) is {len(ids)} tokens, more than the model's "
                         f"max_position_embeddings={limit}; shorten it")
    return ids


def paper_edit(operators: torch.Tensor, layer: int, scale: float):
    """The hook that adds λ‖h_k‖ c_k / (2‖c_k‖) at the input of `layer` (Golden's recipe).

    It keeps the running sum c and the number of positions seen, so that a KV-cached
    generation (the prompt in one call, then one token per call) sums over every position
    so far. One edit per generation.
    """
    T_c, d = operators.shape[0], operators.shape[-1]
    state = {"sum": torch.zeros(d, dtype=operators.dtype, device=operators.device), "seen": 0}

    def edit(i, h, x):
        if i != layer - 1:  # i = -1 is the stream entering layer 0
            return h
        k = torch.arange(state["seen"], state["seen"] + x.shape[0], device=x.device)  # absolute positions (T,)
        pushes = torch.einsum("tij,tj->ti", operators[k % T_c], x)  # (T, d): J_{k mod T_c} x_k
        c = state["sum"] + torch.cumsum(pushes, dim=0)  # (T, d): c_k, the running sum
        state["sum"], state["seen"] = c[-1], state["seen"] + x.shape[0]
        return pushed(h, unit(c) / 2, scale)

    return named(edit, layer, scale)


# ---- activation addition ---------------------------------------------------------------------------
def activation_difference(model: Model, concept: str, layer: int, neutral: str = NEUTRAL) -> torch.Tensor:
    """v = mean residual stream after `layer` over the concept's tokens minus the neutral prompt's: (d,)."""

    def mean_stream(name, text):
        ids = encoded(model, name, text)
        keep = [t for t, i in enumerate(ids) if i != model.tokenizer.bos_id] or [len(ids) - 1]
        with torch.no_grad():
            residual = trace(model, model.embed(ids))[0][layer]  # (T, d)
        return residual[keep].mean(0)

    v = mean_stream("concept", concept) - mean_stream("neutral", neutral)  # (d,)
    if not v.any():
        raise InputError(f"actadd at layer {layer}: the concept and the neutral prompt give the same mean stream "
                         "(a zero direction); choose another concept or --neutral")
    return v


def actadd_edit(direction: torch.Tensor, layer: int, scale: float):
    """The hook that adds λ‖h_p‖ v/‖v‖ after `layer`."""

    def edit(i, h, x):
        if i != layer:
            return h
        return pushed(h, unit(direction), scale)

    return named(edit, layer, scale)


# ---- one entry point ----------------------------------------------------------------------------------
class Steering:
    """A concept's steering ingredient for one recipe and layer, computed once; `edit(scale)` makes hooks."""

    def __init__(self, model: Model, concept: str, layer: int, method: str = "minielm", neutral: str = NEUTRAL):
        checks.instance("model", model, Model, "from minielm.load")
        method = checks.one_of("method", method, METHODS)
        layer, concept = steering_layer(model, layer), checks.text("concept", concept)
        if not concept.strip():
            raise InputError("empty concept prompt")
        self.method, self.layer = method, layer
        if method == "minielm":
            self.ingredient = steering_operator(model, concept, layer)  # S (d, d)
        elif method == "paper":
            self.ingredient = concept_operators(model, concept, layer)  # J^ℓ_t (T_c, d, d)
        else:
            self.ingredient = activation_difference(model, concept, layer, neutral)  # v (d,)

    def edit(self, scale: float):
        """A fresh hook for one generation at this λ."""
        make = {"minielm": steering_edit, "paper": paper_edit, "actadd": actadd_edit}[self.method]
        return make(self.ingredient, self.layer, checks.real("scale", scale))


def steer(model: Model, concept: str, prompt: str, layer: int, scale: float, max_new_tokens: int = 30,
          temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
          method: str = "minielm", neutral: str = NEUTRAL) -> str:
    """The continuation of `prompt` steered toward `concept` by `method` at `layer` with weight `scale`."""
    checks.prompt("prompt", prompt)
    model.check_sampling(max_new_tokens, temperature, top_k, seed)
    edit = Steering(model, concept, layer, method, neutral).edit(scale)
    return model.generate(prompt, max_new_tokens, temperature, top_k, seed, edit=edit)


def pushed(h: torch.Tensor, direction: torch.Tensor, scale: float) -> torch.Tensor:
    """h + λ‖h‖·direction, the push of every recipe. If that overflows, the forward pass's check of
    the hook's result (minielm.model.edited) names the steering (`named`), not the layer above."""
    return h + scale * torch.linalg.vector_norm(h, dim=-1, keepdim=True) * direction


def named(edit, layer: int, scale: float):
    """`edit`, named for the forward pass's message should its push overflow."""
    edit.blame = f"steering at layer {layer} with scale {scale:g}"
    return edit


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ‖v‖ along the last axis (zero stays zero)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)  # not 0 in any dtype


# ---- evaluation ---------------------------------------------------------------------------------------
STOPWORDS = {"the", "a", "an", "in", "of", "on", "at", "to", "and", "or", "is", "for", "with", "by", "from", "as"}


def concept_token_ids(model: Model, concept: str) -> list:
    """The concept's own tokens, with and without a leading space, less specials and stopwords."""
    tok, eos = model.tokenizer, model.eos_token_id
    specials = {model.config.bos_token_id, tok.bos_id, *(eos if isinstance(eos, list) else [eos])}
    ids = set(tok.encode(concept)) | set(tok.encode(" " + concept))
    keep = [i for i in ids if i not in specials and tok.decode([i]).strip().lower() not in STOPWORDS | {""}]
    if not keep:
        raise InputError(f"the concept {concept!r} has no tokens but stopwords")
    return sorted(keep)


def next_token_log_probs(model: Model, ids: list, edit=None) -> torch.Tensor:
    """log p(· | ids[:t+1]) at every position, in one pass without a cache: (T, V)."""
    with torch.no_grad():
        y, _ = model.forward(model.embed(ids), edit=edit)
        return torch.log_softmax(model.unembed(y), dim=-1)


def repetition_rate(ids: list) -> float:
    """The share of the continuation's bigrams that already occurred in it: 0 for none repeated."""
    bigrams = list(zip(ids, ids[1:]))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def measure(model: Model, prompt_ids: list, new: list, concept_ids: list, edit_for_scoring=None) -> dict:
    """Lift and cost of one continuation `new` of the prompt.

    The steered distributions come from one uncached pass over prompt + continuation with
    a fresh edit (the same edit that generated it); the unsteered from one without.
    concept mass m(t) = log Σ_{c ∈ concept} p(c | prompt, new[:t]).
    """
    seq, P = prompt_ids + new, len(prompt_ids)
    base = next_token_log_probs(model, seq)[P - 1:-1]  # (N, V): predicting new[0..N-1]
    steered = base if edit_for_scoring is None else next_token_log_probs(model, seq, edit_for_scoring)[P - 1:-1]
    lift = torch.logsumexp(steered[:, concept_ids], -1) - torch.logsumexp(base[:, concept_ids], -1)  # (N,)
    steps, new_ids = torch.arange(len(new), device=base.device), torch.tensor(new, device=base.device)
    nll = -base[steps, new_ids]  # (N,) -log p_unsteered(new_t | ...)
    return {"next_token_lift": float(lift[0]), "continuation_lift": float(lift.mean()),
            "concept_hits": sum(i in set(concept_ids) for i in new), "nll": float(nll.mean()),
            "repetition": repetition_rate(new)}


def evaluate(model: Model, concept: str, prompt: str, layers, scales, methods=METHODS, max_new_tokens: int = 24,
             neutral: str = NEUTRAL, temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             progress=None) -> dict:
    """Lift against fluency cost for each recipe over a grid of layers and scales.

    For every (layer, method, λ): the continuation generated with a KV cache (greedy, or
    sampled with the same seed every time), and `measure` of it, in nats:
      next_token_lift      log-mass of the concept's tokens as the prompt's next token, steered − unsteered
      continuation_lift    the same, averaged over every step of the steered continuation
      concept_hits         how many generated tokens are concept tokens
      nll                  mean −log p of the steered continuation under the unsteered model
      repetition           share of repeated bigrams in the continuation
    The unsteered continuation is the `baseline` row (method "none", lifts 0). `progress(row)`,
    if given, sees every row as it is measured, the baseline first.
    """
    checks.instance("model", model, Model, "from minielm.load")
    concept, prompt, neutral = (checks.text(name, value) for name, value in
                                (("concept", concept), ("prompt", prompt), ("neutral", neutral)))
    if not concept.strip():
        raise InputError("empty concept prompt")
    layers, scales, methods = grid(model, layers, scales, methods)
    checks.integer("max_new_tokens", max_new_tokens, 1, model.config.max_position_embeddings, closed=True,
                   why="at least one token to measure, at most max_position_embeddings")
    _, temperature, top_k, seed = model.check_sampling(max_new_tokens, temperature, top_k, seed)
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be None or a function progress(row), got {type(progress).__name__}")
    prompt_ids, concept_ids = model.tokenizer.encode(prompt), concept_token_ids(model, concept)
    sampling = dict(temperature=temperature, top_k=top_k, seed=seed)
    new = model.generate_ids(prompt_ids, max_new_tokens, **sampling)
    baseline = {"method": "none", "layer": None, "scale": 0.0, "text": model.tokenizer.decode(new),
                **measure(model, prompt_ids, new, concept_ids)}
    rows = []
    if progress:
        progress(baseline)
    for layer in layers:
        for method in methods:
            steering = Steering(model, concept, layer, method, neutral)
            for scale in scales:
                new = model.generate_ids(prompt_ids, max_new_tokens, edit=steering.edit(scale), **sampling)
                rows.append({"method": method, "layer": layer, "scale": float(scale),
                             "text": model.tokenizer.decode(new),
                             **measure(model, prompt_ids, new, concept_ids, steering.edit(scale))})
                if progress:
                    progress(rows[-1])
    return {"concept": concept, "prompt": prompt, "concept_tokens": [model.tokenizer.decode([i]) for i in concept_ids],
            "max_new_tokens": max_new_tokens, **sampling, "baseline": baseline, "rows": rows}


def grid(model: Model, layers, scales, methods) -> tuple:
    """evaluate's grid, checked before any generation: lists of layers in [0, L), of real λ, of recipes."""

    def listed(name, value, what):
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise InputError(f"{name} must be a list of {what}, got {type(value).__name__} {value!r:.40}")
        value = list(value)
        if not value:
            raise InputError(f"{name} is empty; expected a list of {what}")
        return value

    return ([steering_layer(model, layer) for layer in listed("layers", layers, "layer indices")],
            [checks.real("scales", scale) for scale in listed("scales", scales, "numbers")],
            [checks.one_of("methods", method, METHODS) for method in listed("methods", methods, "recipe names")])


def format_table(result: dict, legend: str | None = None) -> str:
    """The evaluation as a Markdown table, the baseline first; `legend`, a line saying what the columns
    mean, under the concept's line as `  # legend`."""
    lines = [f"concept {result['concept']!r}, prompt {result['prompt']!r}",
             *([f"  # {legend}"] if legend else []),
             "",
             "| method | layer | λ | next-token lift | continuation lift | hits | NLL | repetition | continuation |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in [result["baseline"]] + result["rows"]:
        text = printable(" ".join(r["text"].split())[:80]).replace("|", "\\|")
        lines.append(f"| {r['method']} | {'' if r['layer'] is None else r['layer']} | {r['scale']:g} "
                     f"| {r['next_token_lift']:+.2f} | {r['continuation_lift']:+.2f} | {r['concept_hits']} "
                     f"| {r['nll']:.2f} | {r['repetition']:.2f} | {text} |")
    return "\n".join(lines)
