"""Every layer's and every module's map of one prompt, in one pass over the layers.

The maps `minielm.equivalent_linear_map(model, ids, layer=ℓ, component=...)` gives one at a
time, all 3·L of them at the cost of about one or two: each layer's weights and factors are
visited once. Two passes can serve (see `all_layer_maps`); both use the fast sweep's
sublayers (minielm/fast_sweep.py). The reverse one carries any rows (`reverse_pass`): the d
rows of the identity for every operator, or the one row the exact attribution needs.
"""

from __future__ import annotations

import torch

from . import checks
from .fast_sweep import (SCRATCH_BYTES, Scratch, attention_from_last, attention_sublayer, folded_attention,
                         folded_mlp, mlp_sublayer)
from .linear_map import EquivalentLinearMap, checked_ids, equivalent_linear_map, target_name, target_values, traced
from .model import Model
from .progress import progress


def all_layer_maps(model: Model, ids, mode: str = "auto") -> dict:
    """{(layer, component): EquivalentLinearMap} for every layer's output (final norm applied)
    and every attention and MLP module, in one pass over the layers.

    Two passes can serve, and `mode='auto'` picks the cheaper by T and L:
    the reverse pass carries d rows for each target above it, about 1.5·L²·T
    row-blocks in all; the forward pass carries ∂h_t/∂x_s for every pair of
    positions, about L·T² blocks, so it wins for short prompts on deep models
    (T < 1.5 (L + 1)). With the parallel residual (GPT-NeoX) each map is made on its own instead.
    """
    mode = checks.one_of("mode", mode, ("auto", "reverse", "forward"))
    ids = checked_ids(model, ids)
    T, L = len(ids), model.config.num_hidden_layers
    if model.config.use_parallel_residual:  # both passes follow the sequential wiring: one map at a time
        return {(layer, component): equivalent_linear_map(model, ids, layer, component)
                for layer in range(L) for component in ("output", "mlp", "attention")}
    if mode == "forward" or (mode == "auto" and T < 1.5 * (L + 1)):
        return forward_layer_maps(model, ids)
    return reverse_layer_maps(model, ids)


def reverse_layer_maps(model: Model, ids) -> dict:
    """All layer and module maps in ONE reverse pass over the layers (`reverse_pass` with the d rows
    of the identity: every row of every operator)."""
    ids = checked_ids(model, ids)
    x, frozen, states, states0 = traced(model, ids)
    d = x.shape[1]
    G, order = reverse_pass(model, frozen, states, states0, torch.eye(d, dtype=x.dtype, device=x.device))
    result = {}
    for block, key in enumerate(order):
        y, bias = target_values(model, states, states0, *key)[:2]
        name = target_name(model, *key)
        result[key] = EquivalentLinearMap(model, ids, G[:, block * d:(block + 1) * d], x, y, bias, frozen, name)
    return result


def reverse_pass(model: Model, frozen, states, states0, rows) -> tuple:
    """rows · ∂target/∂x_s for every layer and module target, in ONE reverse pass over the layers.

    rows (r, d): r = d (the identity) gives every operator; one row u gives what the exact attribution
    needs, u · (each module's output), for the cost of about one sweep. Each layer's weights and factors
    are visited (and its norms folded in) once: the pass carries the row blocks of every target above,
    and seeds the targets of a layer as it reaches it (targets still at the last position only are
    kept apart until an attention sublayer spreads them over all positions). The flops equal those of
    separate sweeps, but the GEMMs are taller and the weights are read once.
    Returns G (T, 3L·r, d), block i holding the rows of target order[i] = (layer, component); a layer
    output's rows are rows · (the frozen final norm's Jacobian) · ∂h^ℓ_T/∂x_s.
    """
    T, (r, d) = frozen.final_norm.shape[0], rows.shape
    every, last = slice(0, T), slice(T - 1, T)
    G = rows.new_zeros(T, 0, d)  # targets already spread over all positions
    order = []  # (layer, component) per block of r rows in G
    scratch = Scratch(rows, SCRATCH_BYTES)
    for layer in progress(reversed(range(model.config.num_hidden_layers)), "reverse pass", model.config.num_hidden_layers):
        factors = frozen.layers[layer]
        N = rows.new_zeros(T, r, d)  # this layer's targets, at the last position only
        N[-1] = rows @ target_values(model, states, states0, layer, "output")[2]
        # MLP sublayer: carry G and N through it, then seed the MLP module's own target
        mlp_sublayer(model, layer, factors, G, every, scratch)
        mlp_sublayer(model, layer, factors, N, last, scratch)
        M = rows.new_zeros(T, r, d)
        M[-1] = rows
        mlp_sublayer(model, layer, factors, M, last, scratch, residual=False)
        N = torch.cat([N, M], dim=1)
        # attention sublayer: spread N over the positions, then seed the attention module's target
        attention_sublayer(model, layer, factors, G, scratch)
        attention_from_last(model, layer, factors, N, scratch)
        A = rows.new_zeros(T, r, d)
        A[-1] = rows
        attention_from_last(model, layer, factors, A, scratch, residual=False)
        G = torch.cat([G, N, A], dim=1)
        order += [(layer, "output"), (layer, "mlp"), (layer, "attention")]
    return G, order


def forward_layer_maps(model: Model, ids) -> dict:
    """All layer and module maps in ONE forward pass, carrying K[t, s] = ∂h_t/∂x_s.

    Each residual sublayer adds its branch, applied to K from the left:
        MLP        K[t] += Post_t W_D diag(φ_t) W_U Pre_t K[t]
        attention  K[t] += Post_t Σ_h W_O^h Σ_u P_h[t,u] W_V^g(h) Pre_u K[u]
    and the targets are read off the last row: a module's increment at t = T,
    or the final norm applied to K[T] after a layer. Memory T²·d², so for short prompts.
    """
    ids = checked_ids(model, ids)
    config = model.config
    x, frozen, states, states0 = traced(model, ids)
    T, d = x.shape
    H, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    K = torch.zeros(T, T, d, d, dtype=x.dtype, device=x.device)  # K[t, s] = ∂h_t/∂x_s
    diagonal = torch.arange(T, device=x.device)
    K[diagonal, diagonal] = torch.eye(d, dtype=x.dtype, device=x.device)
    result = {}

    def add(layer, component, operators):  # operators (T, d, d): ∂target/∂x_s, read off the last row
        y, bias, _ = target_values(model, states, states0, layer, component)
        result[(layer, component)] = EquivalentLinearMap(model, ids, operators, x, y, bias, frozen,
                                                         target_name(model, layer, component))

    for layer in progress(range(config.num_hidden_layers), "forward pass of ∂h/∂x"):
        w, f = model.weights["layers"][layer], frozen.layers[layer]
        # attention: V[u, s] = W_V' K[u, s], mixed over u by P' (the norms folded in), then W_O'
        W_O, P, W_V = folded_attention(model, w, f, slice(0, T))
        Vk = W_V @ K  # (T, T, Hkv*hd, d)
        O = torch.einsum("kgtu,uskec->tskgec", P.view(Hkv, H // Hkv, T, T), Vk.view(T, T, Hkv, hd, d))
        D = W_O @ O.reshape(T, T, H * hd, d)  # (T, T, d, d)
        add(layer, "attention", D[-1].clone())  # a copy: a view would keep all of D (T, T, d, d)
        K = K + D
        # MLP: B_t = Post_t W_D diag(φ_t) W_U Pre_t = W_D' diag(φ'_t) W_U', one d × d matrix per position
        W_D, gate, W_U = folded_mlp(model, w, f, slice(0, T))
        B = (W_D[None] * gate[:, None, :]) @ W_U  # (T, d, d)
        D = B[:, None] @ K  # (T, T, d, d)
        add(layer, "mlp", D[-1].clone())
        K = K + D
        seed = target_values(model, states, states0, layer, "output")[2]  # the final norm, frozen here
        add(layer, "output", seed @ K[-1])
    return result
