"""Exact attribution: a logit split by (source token, layer, module), summing to it to round-off.

Each module's output is linear in the inputs once the factors are frozen, so its share of
the logit is one row-vector sweep (minielm/fast_sweep.py) from that module: gradient-times-
input made exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks
from .fast_sweep import fast_sweep
from .layer_maps import reverse_pass
from .linear_map import checked_ids, target_values, traced
from .model import Model, on_device, times_transposed
from .progress import progress


@dataclass
class Attribution:
    """A logit split exactly by (source token, layer, component).

    The sum identity: `attr.total()` equals `attr.logit` to round-off, and
        total() = table.sum() + embedding.sum() + bias.sum() + norm_bias;
    `table.sum()` alone is NOT the logit: it leaves out the direct path of the last
    token's own embedding (`embedding`), the modules' constant parts (`bias`) and the
    final LayerNorm's bias (`norm_bias`).

    z = w_c · y, with y = N_f(h^L_T) = N'_f h^L_T + b_f (N'_f frozen; b_f the final LayerNorm's
    bias, 0 for RMSNorm) and h^L_T = x_T + Σ_ℓ (attention_ℓ + mlp_ℓ)_T. Each module output is
    itself linear (affine, with biases) in the inputs, so with u = w_c N'_f
        z = embedding[T] + Σ_{s,ℓ,k} table[s, ℓ, k] + Σ_{ℓ,k} bias[ℓ, k] + norm_bias
    to round-off. The inputs x_s include learned position rows (GPT-2), so a source's cells carry its
    position's share too. `z` is the logit before any final soft-capping.
    """

    token: int
    logit: float  # z, from the model's own forward pass
    table: torch.Tensor  # (T, L, 2): source s, layer ℓ, component (0 attention, 1 MLP)
    embedding: torch.Tensor  # (T,): the direct path x_s -> y (only the last position is nonzero)
    bias: torch.Tensor  # (L, 2): the affine parts of the modules (zero without biases)
    norm_bias: float = 0.0  # w_c · b_f: the final LayerNorm's bias (zero for RMSNorm)

    def total(self) -> float:
        """table.sum() + embedding.sum() + bias.sum() + norm_bias: the logit, to round-off."""
        return float(self.table.sum() + self.embedding.sum() + self.bias.sum()) + self.norm_bias

    def __repr__(self) -> str:
        T, L, _ = self.table.shape
        return (f"Attribution(token={self.token}, logit={self.logit:.6g}, table=({T}, {L}, 2), "
                f"total()={self.total():.6g} = table.sum() {float(self.table.sum()):.6g} "
                f"+ embedding.sum() {float(self.embedding.sum()):.6g} + bias.sum() {float(self.bias.sum()):.6g}"
                + (f" + norm_bias {self.norm_bias:.6g}" if self.norm_bias else "") + ")")


def attribution(model: Model, ids, token: int | None = None) -> Attribution:
    """Split the logit of `token` (default: the top next token) over sources, layers and modules.

    The row u · ∂(module output)/∂x_s of every module, for the one row u = ∂z/∂h^L_T: all 2L of them
    in one reverse pass over the layers carrying a row per module (minielm.layer_maps.reverse_pass),
    about the cost of one single-row sweep, so this is cheap even where the full operators are not.
    With the parallel residual, which that pass does not follow, one single-row sweep per module.
    """
    ids = checked_ids(model, ids)
    token = checks.optional_integer("token", token, 0, model.config.vocab_size, why="the vocabulary")
    x, frozen, states, states0 = traced(model, ids)
    T, L = x.shape[0], model.config.num_hidden_layers
    y, _, seed = target_values(model, states, states0, L - 1, "output")
    logits = times_transposed(y, model.weights["lm_head"])  # (V,), before soft-capping
    token = int(logits.argmax()) if token is None else token
    # u = ∂z/∂h^L_T: the unembedding row through the frozen final norm.
    w_token = on_device(model.weights["lm_head"][token], x.device, x.dtype)  # (d,)
    u = w_token @ seed  # (d,)
    rows = module_rows(model, frozen, states, states0, u)  # {(layer, component): (T, d)}
    table = x.new_zeros(T, L, 2)
    bias = x.new_zeros(L, 2)
    for layer in range(L):
        for k, component in enumerate(("attention", "mlp")):
            table[:, layer, k] = torch.einsum("tj,tj->t", rows[(layer, component)], x)
            bias[layer, k] = u @ states0[component][layer][-1]
    embedding = x.new_zeros(T)
    embedding[-1] = u @ x[-1]
    b_f = model.final_norm(torch.zeros_like(x[-1]), frozen.final_norm[-1])[0]  # the frozen final norm at 0
    return Attribution(token, float(logits[token]), table, embedding, bias, float(w_token @ b_f))


def module_rows(model: Model, frozen, states, states0, u) -> dict:
    """{(layer, component): u · ∂(that module's output at T)/∂x_s, (T, d)} for every attention and MLP."""
    L = model.config.num_hidden_layers
    if model.config.use_parallel_residual:
        return {(layer, c): fast_sweep(model, frozen, u[None, :], layer, c)[:, 0]
                for layer in progress(range(L), "attribution") for c in ("attention", "mlp")}
    G, order = reverse_pass(model, frozen, states, states0, u[None, :])  # (T, 3L, d): one row per target
    return {key: G[:, i] for i, key in enumerate(order)}


