"""The equivalent linear map: one d × d operator J_t per input token.

Freeze every factor A(x*) of a forward pass (see model.py). The network is then
linear in its input vectors, and its output at the last position is

    y = Σ_t J_t x_t (+ b when the checkpoint has biases),   J_t = ∂y/∂x_t with A frozen,

exactly: the sum reproduces the model's own y to float64 round-off.

The operators are assembled analytically by a reverse sweep, with no autograd.
Let G_t = ∂(target)/∂h_t, a stack of row blocks (T, r, d): r = d rows for full
operators, r = 1 for a single direction u (then uᵀJ_t for all t costs about
one forward pass). Walking down the layers, each residual sublayer
h -> h + branch(h) updates G_t <- G_t + Σ_t' G_t' ∂branch_t'/∂h_t, where the
branch Jacobians are products of frozen matrices:

    MLP        Post_t W_D diag(φ_t) W_U Pre_t                       (position-wise)
    attention  Σ_heads Post_t W_O^h P_h[t,s] W_V^g(h) Pre_s          (mixes positions s ≤ t)

with Pre_t = diag(w̃)/ρ_t of the pre-norm and Post_t that of the post-norm (the
identity where a family has none). At the bottom, J_t = G_t.

`detached_jacobian` computes the same operators through autograd, from a
forward pass whose factors are frozen: an independent path for checking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .model import Frozen, FrozenLayer, Model


# ---- one residual branch, backwards -------------------------------------------------------
def norm_scale(model: Model, weight, inv_rho, rows):
    """diag(offset + w) / ρ_t for the given rows, as a (T', 1, d) column scale; None without a norm."""
    if weight is None:
        return None
    return ((model.config.norm_offset + weight) * inv_rho[rows])[:, None, :]


def scaled(G, scale):
    return G if scale is None else G * scale


def mlp_branch(model: Model, i: int, factors: FrozenLayer, G, rows):
    """Σ of G_t · Post_t W_D diag(φ_t) W_U Pre_t over the positions in `rows`: (T', r, d).

    Applied factored (two GEMMs through the f-wide hidden layer) or, when f > d
    and there are many rows, through the explicit d × d matrices W_D diag(φ_t) W_U.
    """
    w = model.weights["layers"][i]
    G = scaled(G[rows], norm_scale(model, w.get("mlp_post_norm"), factors.mlp_post_norm, rows))
    gate = factors.gate[rows]  # (T', f)
    d, f, r = w["w_down"].shape[0], w["w_down"].shape[1], G.shape[1]
    if r > d and f > d:  # explicit: (T', d, d) operators, then one (r×d)(d×d) product per position
        M = (w["w_down"][None] * gate[:, None, :]) @ w["w_up"]  # (T', d, d)
        D = G @ M
    else:  # factored: (r×d)(d×f), scale by φ, (r×f)(f×d)
        D = ((G @ w["w_down"]) * gate[:, None, :]) @ w["w_up"]  # (T', r, d)
    return scaled(D, norm_scale(model, w.get("mlp_norm"), factors.mlp_norm, rows))


def attention_branch(model: Model, i: int, factors: FrozenLayer, G, rows):
    """Σ_t G_t · Post_t W_O^h P_h[t,s] W_V^g(h) Pre_s for every source s: (S, r, d).

    The query heads that share a key-value head are summed before W_V (GQA).
    """
    config, w = model.config, model.weights["layers"][i]
    H, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    G = scaled(G[rows], norm_scale(model, w.get("attn_post_norm"), factors.attn_post_norm, rows))
    T_, r = G.shape[0], G.shape[1]
    A = (G @ w["wo"]).view(T_, r, Hkv, H // Hkv, hd)  # (T', r, Hkv, G, hd): G_t W_O^h
    P = factors.probs[:, rows].reshape(Hkv, H // Hkv, T_, -1)  # (Hkv, G, T', S)
    C = torch.einsum("kgts,trkge->srke", P, A)  # (S, r, Hkv, hd): mix over t, sum over the group
    D = C.reshape(C.shape[0], r, Hkv * hd) @ w["wv"]  # (S, r, d)
    return scaled(D, norm_scale(model, w.get("attn_norm"), factors.attn_norm, slice(0, D.shape[0])))


def sweep_down(model: Model, frozen: Frozen, G, rows, stages):
    """Carry G (T, r, d) down through `stages`, [(layer, 'mlp' | 'attention'), ...] top first.

    `rows` is the slice of positions where G is nonzero: only the last one at
    the top, all of them below the first attention sublayer.
    """
    for i, kind in stages:
        if kind == "mlp":
            G[rows] += mlp_branch(model, i, frozen.layers[i], G, rows)
        else:
            D = attention_branch(model, i, frozen.layers[i], G, rows)
            G[: D.shape[0]] += D
            rows = slice(0, D.shape[0])
    return G


def stages_below(layer: int, kind: str):
    """The sublayers under a point, top first: below `kind` of `layer` ('output' = above the MLP)."""
    order = [(i, k) for i in range(layer, -1, -1) for k in ("mlp", "attention")]
    start = {"output": 0, "mlp": 1, "attention": 2}[kind]
    return order[start:]


# ---- the frozen forward, with every intermediate state ---------------------------------------
def frozen_states(model: Model, x, frozen: Frozen):
    """Run the frozen (linear) forward on x (T, d): the residual stream after each layer, and
    each layer's attention and MLP outputs, every one (T, d). Its value at x = 0 is the affine part."""
    positions = torch.arange(x.shape[0], device=x.device)
    residual, attn, mlp = [], [], []
    h = x
    for i in range(model.config.num_hidden_layers):
        h, _, (a, m) = model.block(i, h, positions, frozen.layers[i])
        residual.append(h)
        attn.append(a)
        mlp.append(m)
    return residual, attn, mlp


# ---- the public object -----------------------------------------------------------------------
@dataclass
class EquivalentLinearMap:
    """y = Σ_t J_t x_t + b for one prompt, with everything needed to check and read it."""

    model: Model
    ids: list
    operators: torch.Tensor  # (T, d, d): J_t
    inputs: torch.Tensor  # (T, d): x_t, the vectors entering the first block
    output: torch.Tensor  # (d,): y, the target computed by the model itself
    bias: torch.Tensor  # (d,): b, the affine part (zero for bias-free checkpoints)
    frozen: Frozen
    target: str = "final"  # what y is: "final", or "layer L", "attention L", "mlp L"

    def reconstruct(self) -> torch.Tensor:
        """Σ_t J_t x_t + b: (d,)."""
        return torch.einsum("tij,tj->i", self.operators, self.inputs) + self.bias

    def relative_error(self) -> float:
        """‖Σ_t J_t x_t + b − y‖ / ‖y‖."""
        return float(torch.linalg.vector_norm(self.reconstruct() - self.output) / torch.linalg.vector_norm(self.output))

    def logits(self) -> torch.Tensor:
        """Next-token logits (V,) from the reconstruction (final-normed targets only)."""
        if self.target == "mlp" or self.target.startswith(("attention", "mlp")):
            raise InputError(f"logits are defined for residual-stream targets, not {self.target!r}")
        return self.model.unembed(self.reconstruct())

    def probabilities(self) -> torch.Tensor:
        """Next-token probabilities (V,) from the reconstruction."""
        return torch.softmax(self.logits(), dim=-1)

    def model_probabilities(self) -> torch.Tensor:
        """The model's own next-token probabilities for the same target: (V,)."""
        return torch.softmax(self.model.unembed(self.output), dim=-1)


def equivalent_linear_map(model: Model, ids, layer: int | None = None, component: str = "output") -> EquivalentLinearMap:
    """The per-token operators J_t (T, d, d) of the frozen model for the prompt `ids`.

    By default y is the final-normed hidden state at the last position (what the
    unembedding reads). With `layer=L`: the residual stream after layer L with the
    final norm applied, as in Golden (2025); with `component='attention'` or
    'mlp' too: that module's output at the last position (no norm).
    No autograd is used: this works under torch.inference_mode().
    """
    ids = model.check_ids(ids)
    L = model.config.num_hidden_layers
    if layer is None:
        layer, component = L - 1, "output"
    if not (isinstance(layer, int) and -L <= layer < L):
        raise InputError(f"layer must be an integer in [0, {L}), got {layer!r}")
    if component not in ("output", "attention", "mlp"):
        raise InputError(f"component must be 'output', 'attention' or 'mlp', got {component!r}")
    layer %= L
    x = model.embed(ids)  # (T, d)
    T, d = x.shape
    y_all, frozen = model.forward(x)
    residual, attn, mlp = frozen_states(model, x, frozen)
    zeros = torch.zeros_like(x)
    residual0, attn0, mlp0 = frozen_states(model, zeros, frozen)  # the affine part, when biases exist
    last = slice(T - 1, T)
    final_w = model.weights["final_norm"]

    G = torch.zeros(T, d, d, dtype=x.dtype, device=x.device)
    if component == "output":
        # y = N_f(h^L_T), with the final norm's 1/ρ frozen at this layer's own residual stream.
        inv_rho = (residual[layer] if layer < L - 1 else None)
        y, inv_rho = model.norm(residual[layer][-1], final_w) if inv_rho is not None else (y_all[-1], frozen.final_norm[-1])
        G[-1] = torch.diag((model.config.norm_offset + final_w) * inv_rho)
        bias = model.norm(residual0[layer][-1], final_w, inv_rho)[0]
        target = "final" if layer == L - 1 else f"layer {layer}"
    else:
        # y = the module's output at the last position: seed with the identity and apply the branch alone.
        G[-1] = torch.eye(d, dtype=x.dtype, device=x.device)
        branch = mlp_branch if component == "mlp" else attention_branch
        D = branch(model, layer, frozen.layers[layer], G, last)
        G.zero_()
        if component == "mlp":
            G[-1] = D[0]
        else:
            G[: D.shape[0]] = D
            last = slice(0, D.shape[0])
        y = (mlp if component == "mlp" else attn)[layer][-1]
        bias = (mlp0 if component == "mlp" else attn0)[layer][-1]
        target = f"{component} {layer}"
    stages = stages_below(layer, component)
    operators = sweep_down(model, frozen, G, last, stages)
    return EquivalentLinearMap(model, ids, operators, x, y, bias, frozen, target)


def detached_jacobian(model: Model, ids) -> torch.Tensor:
    """J_t (T, d, d) by autograd: the Jacobian of the frozen forward pass at x*.

    The factors A(x*) are computed once without gradients and handed back to the
    forward pass, which is the same as detaching them: only the linear path
    carries gradient. Vectorized over the d outputs, as in Golden (2025).
    """
    ids = model.check_ids(ids)
    with torch.no_grad():
        x = model.embed(ids)
        _, frozen = model.forward(x)

    def last_output(inputs):
        return model.forward(inputs, frozen)[0][-1]  # (d,)

    J = torch.autograd.functional.jacobian(last_output, x, vectorize=True)  # (d, T, d)
    return J.permute(1, 0, 2).contiguous()  # (T, d, d)
