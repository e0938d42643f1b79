"""Steering with an equivalent linear map: a concept prompt's operator, applied to new text.

For a concept prompt c and a layer ℓ, take the operators J^ℓ_t of c to the
residual stream after layer ℓ (final norm applied, as in Golden 2025) and sum
them: S = Σ_t J^ℓ_t (d × d) is the concept's linear response to an input
placed at every one of its positions. While generating new text, each position
p's input vector x_p is mapped to a steering vector S x_p, rescaled to the norm
of that position's hidden state h_p, and added with weight λ:

    h_p <- h_p + λ ‖h_p‖ S x_p / ‖S x_p‖          after layer ℓ, at every position

Where: the operator's output lives in the residual stream *after* layer ℓ, so
that is where it is added. (Golden's code adds it at the input of layer ℓ, one
layer earlier than the space the operator maps into.) λ = 0 leaves the model
unchanged.
"""

from __future__ import annotations

import torch

from . import checks
from .errors import InputError, NumericalError
from .linear_map import equivalent_linear_map
from .model import Model


def steering_operator(model: Model, concept: str, layer: int) -> torch.Tensor:
    """S = Σ_t J^ℓ_t for the concept prompt: (d, d)."""
    checks.instance("model", model, Model, "from minielm.load")
    layer = steering_layer(model, layer)
    ids = model.tokenizer.encode(checks.text("concept", concept))
    return equivalent_linear_map(model, ids, layer=layer).operators.sum(0)


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
        if i != layer or scale == 0:
            return h
        push = x @ operator.T  # (T, d): S x_p for every position of this call
        push = push / torch.linalg.vector_norm(push, dim=-1, keepdim=True).clamp_min(1e-300)
        h = h + scale * torch.linalg.vector_norm(h, dim=-1, keepdim=True) * push
        if not bool(torch.isfinite(h).all()):  # name the steering, not the layer above that would see it
            raise NumericalError(f"non-finite values after steering at layer {layer} with scale {scale:g}")
        return h

    return edit


def steer(model: Model, concept: str, prompt: str, layer: int, scale: float, max_new_tokens: int = 30,
          temperature: float = 0.0, top_k: int | None = None, seed: int | None = None) -> str:
    """The continuation of `prompt` with the concept's layer-`layer` operator added to the stream."""
    checks.instance("model", model, Model, "from minielm.load")
    layer, scale = steering_layer(model, layer), checks.real("scale", scale)
    checks.text("concept", concept)
    checks.prompt("prompt", prompt)
    model.check_sampling(max_new_tokens, temperature, top_k, seed)
    edit = steering_edit(steering_operator(model, concept, layer), layer, scale)
    return model.generate(prompt, max_new_tokens, temperature, top_k, seed, edit=edit)
