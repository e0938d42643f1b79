"""The reverse sweep, plainly: how the operators J_t are assembled without autograd.

Freeze every factor A(x*) of a forward pass (minielm/model.py). Each decoder layer is then
two residual sublayers, h ← h + branch(h), whose branch Jacobians are products of frozen
matrices (Pre_t = diag(w̃)/ρ_t of the norm before a branch, for LayerNorm diag(w)/σ_t · C with
C the centring; Post_t that of the norm after it; the identity where a family has none; φ_t
the frozen gate, or a plain MLP's s(z_t)):

    MLP        ∂m_t/∂h_t = Post_t W_D diag(φ_t) W_U Pre_t                 (position-wise)
    attention  ∂a_t/∂h_s = Post_t Σ_heads W_O^h P_h[t,s] W_V^g(h) Pre_s    (mixes positions s ≤ t)

Let G_t = ∂target/∂h_t: a block of r rows per position, (T, r, d). At the top only the
last position is nonzero: G_T = the seed (the frozen final norm's Jacobian for a residual
stream target, the identity for a module's output). Walking down, each sublayer updates

    G_s ← G_s + Σ_t G_t ∂branch_t/∂h_s

(with the parallel residual, GPT-NeoX's, both branches of a layer read the same h: G gains both
at once) and at the bottom J_t = G_t. That is the whole method: `reference_sweep` below, in plain
tensor operations. minielm/fast_sweep.py computes the same thing faster, and is tested
against this one.
"""

from __future__ import annotations

import torch

from .model import Frozen, FrozenLayer, LayerWeights, Model


def reference_sweep(model: Model, frozen: Frozen, seed, layer: int, component: str = "output"):
    """G (T, r, d) = ∂target/∂x_t for the r rows of seed (r, d) = ∂target/∂(point) at the last position.

    The point is the residual stream after `layer` ('output'), or that layer's 'attention' or
    'mlp' output, whose branch alone is taken (no residual path) in its own layer."""
    T, (r, d) = frozen.final_norm.shape[0], seed.shape
    G = seed.new_zeros(T, r, d)  # G_t = ∂target/∂h_t: zero but at the last position
    G[-1] = seed
    for i in reversed(range(layer + 1)):
        w, factors = model.weights["layers"][i], frozen.layers[i]
        target = component if i == layer else "output"  # what the stream above this layer is, for the target
        if model.config.use_parallel_residual:  # h ← h + a(h) + m(h): both branches from the same G
            if target == "output":
                G = G + attention_pullback(model, w, factors, G) + mlp_pullback(model, w, factors, G)
            else:
                G = (attention_pullback if target == "attention" else mlp_pullback)(model, w, factors, G)
            continue
        if target != "attention":  # the MLP sublayer: h ← h + m(h)
            branch = mlp_pullback(model, w, factors, G)
            G = branch if target == "mlp" else G + branch
        branch = attention_pullback(model, w, factors, G)  # the attention sublayer: h ← h + a(h)
        G = branch if target == "attention" else G + branch
    return G  # J_t = G_t


def mlp_pullback(model: Model, w: LayerWeights, factors: FrozenLayer, G):
    """G_t ∂m_t/∂h_t = G_t Post_t W_D diag(φ_t) W_U Pre_t for every position: (T, r, d) -> (T, r, d)."""
    G = model.norm_pullback(G, w.mlp_post_norm, factors.mlp_post_norm)  # G_t Post_t
    hidden = (G @ w.w_down) * factors.gate[:, None, :]  # (T, r, f): G_t W_D diag(φ_t)
    return model.norm_pullback(hidden @ w.w_up, w.mlp_norm, factors.mlp_norm)  # (T, r, d): ... W_U Pre_t


def attention_pullback(model: Model, w: LayerWeights, factors: FrozenLayer, G):
    """Σ_t G_t ∂a_t/∂h_s = Σ_t Σ_h G_t Post_t W_O^h P_h[t,s] W_V^g(h) Pre_s for every source s."""
    c = model.config
    T, r, _ = G.shape
    H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    G = model.norm_pullback(G, w.attn_post_norm, factors.attn_post_norm)  # G_t Post_t
    by_head = (G @ w.wo).view(T, r, H, hd)  # (T, r, H, hd): G_t W_O^h
    mixed = torch.einsum("hts,trhe->srhe", factors.probs, by_head)  # (S, r, H, hd): Σ_t P_h[t,s] G_t W_O^h
    grouped = mixed.reshape(T, r, Hkv, H // Hkv, hd).sum(3)  # (S, r, Hkv, hd): the heads sharing W_V^g summed
    return model.norm_pullback(grouped.reshape(T, r, Hkv * hd) @ w.wv, w.attn_norm, factors.attn_norm)  # (S, r, d)
