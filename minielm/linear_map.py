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

from . import checks
from .errors import InputError
from .model import Frozen, FrozenLayer, Model, times_transposed
from .progress import progress


# ---- one residual branch, backwards -------------------------------------------------------
# The norms' frozen factors are diag(w̃) / ρ_t: a fixed diagonal times one scalar per
# token. The diagonal folds into the adjacent weight matrix and the scalar into the
# per-token factor already there (the MLP gate, the attention probabilities), so the
# sweep never rescales the large G.
def folded_mlp(model: Model, w: dict, factors: FrozenLayer, rows):
    """W_D (d, f), W_U (f, d) with the norms' diagonals folded in, and the gate (T', f)
    times the norms' 1/ρ: Post_t W_D diag(φ_t) W_U Pre_t = W_D' diag(φ'_t) W_U'."""
    offset, W_D, W_U, gate = model.config.norm_offset, w["w_down"], w["w_up"], factors.gate[rows]
    if w.get("mlp_post_norm") is not None:
        W_D, gate = (offset + w["mlp_post_norm"])[:, None] * W_D, gate * factors.mlp_post_norm[rows]
    if w.get("mlp_norm") is not None:
        W_U, gate = W_U * (offset + w["mlp_norm"]), gate * factors.mlp_norm[rows]
    return W_D, gate, W_U


def folded_attention(model: Model, w: dict, factors: FrozenLayer, rows):
    """W_O (d, H*hd), W_V (Hkv*hd, d) with the norms' diagonals folded in, and P (H, T', S)
    times the post-norm's 1/ρ of each query and the pre-norm's 1/ρ of each source."""
    offset, W_O, W_V, P = model.config.norm_offset, w["wo"], w["wv"], factors.probs[:, rows]
    if w.get("attn_post_norm") is not None:
        W_O, P = (offset + w["attn_post_norm"])[:, None] * W_O, P * factors.attn_post_norm[rows][None]
    if w.get("attn_norm") is not None:
        W_V, P = W_V * (offset + w["attn_norm"]), P * factors.attn_norm[: P.shape[-1]].T[None]
    return W_O, P, W_V


def mlp_branch(model: Model, i: int, factors: FrozenLayer, G, rows, residual=False):
    """Σ of G_t · Post_t W_D diag(φ_t) W_U Pre_t over the positions in `rows`: (T', r, d).
    With `residual`, G_t plus that, the addition fused into the last GEMM.

    Applied factored (two GEMMs through the f-wide hidden layer, 4·r·d·f flops a
    position) or through the explicit d × d matrices W_D diag(φ_t) W_U (2·d²·f to
    build, 2·r·d² to apply), whichever costs less: explicit wins for r = d when f > d.
    """
    W_D, gate, W_U = folded_mlp(model, model.weights["layers"][i], factors, rows)
    G = G[rows]
    (T_, r, d), f = G.shape, W_D.shape[1]
    explicit = d * f + r * d < 2 * r * f
    out = torch.empty_like(G)
    step = max(1, T_ * d // f)  # positions at a time: the (step, ·, f) temporaries stay within G's size
    for a in range(0, T_, step):
        g, Ga = gate[a:a + step, None, :], G[a:a + step]  # (step, 1, f), (step, r, d)
        if explicit:  # (step, d, d) operators W_D diag(φ_t) W_U, then one (r×d)(d×d) product per position
            M = (W_D[None] * g) @ W_U
            torch.baddbmm(Ga, Ga, M, beta=1 if residual else 0, out=out[a:a + step])
        else:  # factored: (r×d)(d×f), scale by φ, (r×f)(f×d)
            X = ((Ga @ W_D) * g).flatten(0, 1)  # (step·r, f)
            torch.addmm(Ga.flatten(0, 1), X, W_U, beta=1 if residual else 0, out=out[a:a + step].flatten(0, 1))
    return out


def attention_mix(model: Model, i: int, factors: FrozenLayer, G, rows):
    """C (S, r, Hkv*hd) and W_V' (Hkv*hd, d): the attention branch is C_s W_V' for every source s.

    C_s = Σ_t G_t W_O^h P_h[t,s], with the query heads that share a key-value head
    summed before W_V (GQA).
    """
    config = model.config
    H, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    W_O, P, W_V = folded_attention(model, model.weights["layers"][i], factors, rows)
    Gr = G[rows]
    T_, r = Gr.shape[0], Gr.shape[1]
    A = (Gr @ W_O).view(T_, r, Hkv, H // Hkv, hd)  # (T', r, Hkv, G, hd): G_t W_O^h
    C = torch.einsum("kgts,trkge->srke", P.reshape(Hkv, H // Hkv, T_, -1), A)  # (S, r, Hkv, hd): mix over t, sum the group
    return C.reshape(C.shape[0], r, Hkv * hd), W_V


def attention_branch(model: Model, i: int, factors: FrozenLayer, G, rows, into=None):
    """Σ_t G_t · Post_t W_O^h P_h[t,s] W_V^g(h) Pre_s for every source s: (S, r, d).
    With `into` (a contiguous (T, r, d) tensor, G itself in the sweep), added to it in place.
    """
    C, W_V = attention_mix(model, i, factors, G, rows)
    (S, r, kv), d = C.shape, W_V.shape[1]
    if into is None:
        return (C.view(S * r, kv) @ W_V).view(S, r, d)  # (S, r, d)
    target = into[:S].view(S * r, d)
    torch.addmm(target, C.view(S * r, kv), W_V, out=target)  # G_s += C_s W_V, the addition fused into the GEMM
    return into[:S]


def low_rank_pays(model: Model, r: int) -> bool:
    """Whether carrying a source's rows as C_s W_V' (rank Hkv·hd) through an MLP beats the full
    d-column form: 2·kv·f·d flops a position against min(explicit, factored)."""
    d, f = model.config.hidden_size, model.config.intermediate_size
    kv = model.config.num_key_value_heads * model.config.head_dim
    return kv * f < min(d * f + r * d, 2 * r * f)


def spread_from_the_top(model: Model, frozen: Frozen, G, attention_layer: int, mlp_layer: int):
    """The top attention sublayer and the MLP below it, when G is nonzero at the last position only.

    Every source s < T then receives exactly G_s = C_s W_V' (rank Hkv·hd), so the MLP
    below acts on the small factor: G_s (I + M_s) = C_s R_s with
    R_s = W_V' + (W_V' W_D) diag(φ_s) W_U, 2·kv·f·d flops a position instead of about
    2·d²·f. The last position, which also carries the residual path, goes the full way.
    """
    T = G.shape[0]
    C, W_V = attention_mix(model, attention_layer, frozen.layers[attention_layer], G, slice(T - 1, T))
    G[-1] += C[-1] @ W_V
    G[-1:] = mlp_branch(model, mlp_layer, frozen.layers[mlp_layer], G, slice(T - 1, T), residual=True)
    W_D, gate, W_U = folded_mlp(model, model.weights["layers"][mlp_layer], frozen.layers[mlp_layer], slice(0, T - 1))
    VD = W_V @ W_D  # (kv, f)
    (kv, d), f = W_V.shape, W_D.shape[1]
    step = max(1, (T - 1) * d // f)  # positions at a time: the (step, kv, f) temporary stays small
    for a in range(0, T - 1, step):
        b = min(a + step, T - 1)
        R = ((VD[None] * gate[a:b, None, :]).view(-1, f) @ W_U).view(b - a, kv, d) + W_V  # (step, kv, d): R_s
        torch.bmm(C[a:b], R, out=G[a:b])  # (step, r, d): C_s R_s
    return G


def sweep_down(model: Model, frozen: Frozen, G, rows, stages):
    """Carry G (T, r, d) down through `stages`, [(layer, 'mlp' | 'attention'), ...] top first.

    `rows` is the slice of positions where G is nonzero: only the last one at
    the top, all of them below the first attention sublayer.
    """
    T, stages = G.shape[0], list(stages)
    k = 0
    while k < len(stages):
        i, kind = stages[k]
        if kind == "mlp" and rows == slice(0, T):
            G = mlp_branch(model, i, frozen.layers[i], G, rows, residual=True)
        elif kind == "mlp":
            G[rows] += mlp_branch(model, i, frozen.layers[i], G, rows)
        elif k + 1 < len(stages) and rows != slice(0, T) and T > 1 and low_rank_pays(model, G.shape[1]):
            G = spread_from_the_top(model, frozen, G, i, stages[k + 1][0])
            rows, k = slice(0, T), k + 1
        else:
            attention_branch(model, i, frozen.layers[i], G, rows, into=G)
            rows = slice(0, T)
        k += 1
    return G


def pull_back(model: Model, frozen: Frozen, seed, layer: int, component: str):
    """G (T, r, d) at the inputs, from seed (r, d) = ∂target/∂(point) at the last position.

    The point is the residual stream after `layer` (component 'output'), or the
    output of that layer's 'attention' or 'mlp' module, whose branch is applied first.
    """
    T, (r, d) = frozen.final_norm.shape[0], seed.shape
    G = seed.new_zeros(T, r, d)
    G[-1] = seed
    rows = slice(T - 1, T)
    if component == "mlp":
        G[rows] = mlp_branch(model, layer, frozen.layers[layer], G, rows)
    elif component == "attention":
        D = attention_branch(model, layer, frozen.layers[layer], G, rows)
        G.zero_()
        G[: D.shape[0]] = D
        rows = slice(0, D.shape[0])
    return sweep_down(model, frozen, G, rows, stages_below(layer, component))


def stages_below(layer: int, kind: str):
    """The sublayers under a point, top first: below `kind` of `layer` ('output' = above the MLP)."""
    order = [(i, k) for i in range(layer, -1, -1) for k in ("mlp", "attention")]
    start = {"output": 0, "mlp": 1, "attention": 2}[kind]
    return order[start:]


# ---- the frozen forward, with every intermediate state ---------------------------------------
def trace(model: Model, x, frozen: Frozen | None = None):
    """The forward pass on x (T, d), keeping every intermediate state: the residual
    stream after each layer, and each layer's attention and MLP outputs, each (T, d);
    and the factors. With `frozen` given the pass is linear in x, and its value at
    x = 0 is the affine part (nonzero only for checkpoints with biases)."""
    positions = torch.arange(x.shape[0], device=x.device)
    residual, attn, mlp, layers = [], [], [], []
    h = x
    for i in progress(range(model.config.num_hidden_layers), "forward"):
        h, factors, (a, m) = model.block(i, h, positions, frozen.layers[i] if frozen else None)
        residual.append(h)
        attn.append(a)
        mlp.append(m)
        layers.append(factors)
    _, inv_rho = model.norm(h, model.weights["final_norm"], frozen.final_norm if frozen else None)
    return residual, attn, mlp, Frozen(layers, inv_rho)


def traced(model: Model, ids):
    """x (T, d), the factors, and every intermediate state by component ('output' = the residual
    stream after each layer, 'attention', 'mlp'), at x and at 0 (the affine part)."""
    x = model.embed(ids)  # (T, d)
    residual, attn, mlp, frozen = trace(model, x)
    residual0, attn0, mlp0, _ = trace(model, torch.zeros_like(x), frozen)
    return x, frozen, {"output": residual, "attention": attn, "mlp": mlp}, \
        {"output": residual0, "attention": attn0, "mlp": mlp0}


def target_values(model: Model, states, states0, layer: int, component: str):
    """y and b of a target at the last position, and for a layer's output the frozen final
    norm diag(w̃)/ρ as a vector (d,) (None for a module, whose output is taken as it is)."""
    if component != "output":
        return states[component][layer][-1], states0[component][layer][-1], None
    final_w = model.weights["final_norm"]
    # y = N_f(h^ℓ_T): the final norm, its 1/ρ frozen at this layer's own residual stream
    y, inv_rho = model.norm(states["output"][layer][-1], final_w)
    bias = model.norm(states0["output"][layer][-1], final_w, inv_rho)[0]
    return y, bias, (model.config.norm_offset + final_w) * inv_rho


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
        error = self.reconstruct().double() - self.output.double()  # measured in float64 whatever the dtype
        return float(torch.linalg.vector_norm(error) / torch.linalg.vector_norm(self.output.double()))

    def logits(self) -> torch.Tensor:
        """Next-token logits (V,) from the reconstruction (final-normed targets only)."""
        if self.target.startswith(("attention", "mlp")):
            raise InputError(f"logits are defined for residual-stream targets, not {self.target!r}")
        return self.model.unembed(self.reconstruct())

    def probabilities(self) -> torch.Tensor:
        """Next-token probabilities (V,) from the reconstruction."""
        return torch.softmax(self.logits(), dim=-1)

    def model_probabilities(self) -> torch.Tensor:
        """The model's own next-token probabilities for the same target: (V,)."""
        return torch.softmax(self.model.unembed(self.output), dim=-1)

    def _repr_html_(self) -> str:  # Jupyter: tokens by share of y, each J_t's spectrum (minielm.report)
        from .report import map_html
        return map_html(self)


def equivalent_linear_map(model: Model, ids, layer: int | None = None, component: str = "output") -> EquivalentLinearMap:
    """The per-token operators J_t (T, d, d) of the frozen model for the prompt `ids`.

    By default y is the final-normed hidden state at the last position (what the
    unembedding reads). With `layer=L`: the residual stream after layer L with the
    final norm applied, as in Golden (2025); with `component='attention'` or
    'mlp' too: that module's output at the last position (no norm).
    No autograd is used: this works under torch.inference_mode().
    """
    ids = checked_ids(model, ids)
    layer, component = checked_target(model, layer, component)
    x, frozen, states, states0 = traced(model, ids)
    y, bias, final_scale = target_values(model, states, states0, layer, component)
    # the seed ∂y/∂(point): the frozen final norm, or the identity on a module's output
    seed = torch.diag(final_scale) if component == "output" else torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    operators = pull_back(model, frozen, seed, layer, component)
    return EquivalentLinearMap(model, ids, operators, x, y, bias, frozen, target_name(model, layer, component))


def checked_ids(model: Model, ids) -> list:
    """`model` is a Model and `ids` its token ids (a list of ints), or an InputError."""
    checks.instance("model", model, Model, "from minielm.load")
    return model.check_ids(ids)


def checked_target(model: Model, layer, component):
    """(layer, component) of a target, checked: layer None is the model's output (component 'output'
    only); a layer in [-L, L) counts from the bottom, or from the top when negative."""
    component = checks.one_of("component", component, ("output", "attention", "mlp"))
    L = model.config.num_hidden_layers
    if layer is None:
        if component != "output":
            raise InputError(f"component={component!r} needs a layer: pass layer=L with L in [0, {L})")
        return L - 1, "output"
    return checks.integer("layer", layer, -L, L, why=f"the model has {L} layers; negative counts from the top") % L, \
        component


def target_name(model: Model, layer: int, component: str) -> str:
    """'final' (the model's output), 'layer ℓ' (residual stream after ℓ), 'attention ℓ' or 'mlp ℓ'."""
    if component == "output":
        return "final" if layer == model.config.num_hidden_layers - 1 else f"layer {layer}"
    return f"{component} {layer}"


def detached_jacobian(model: Model, ids) -> torch.Tensor:
    """J_t (T, d, d) by autograd: the Jacobian of the frozen forward pass at x*.

    The factors A(x*) are computed once without gradients and handed back to the
    forward pass, which is the same as detaching them: only the linear path
    carries gradient. Vectorized over the d outputs, as in Golden (2025).
    """
    ids = checked_ids(model, ids)
    with torch.no_grad():
        x = model.embed(ids)
        _, frozen = model.forward(x)

    def last_output(inputs):
        return model.forward(inputs, frozen)[0][-1]  # (d,)

    J = torch.autograd.functional.jacobian(last_output, x, vectorize=True)  # (d, T, d)
    return J.permute(1, 0, 2).contiguous()  # (T, d, d)


# ---- exact attribution ----------------------------------------------------------------------------
@dataclass
class Attribution:
    """A logit split exactly by (source token, layer, component).

    The sum identity: `attr.total()` equals `attr.logit` to round-off, and
        total() = table.sum() + embedding.sum() + bias.sum();
    `table.sum()` alone is NOT the logit: it leaves out the direct path of the last
    token's own embedding (`embedding`) and the modules' constant parts (`bias`).

    z = u_c · y, with y = N_f(h^L_T) and h^L_T = x_T + Σ_ℓ (attention_ℓ + mlp_ℓ)_T.
    Each module output is itself linear in the inputs, so
        z = embedding[T] + Σ_{s,ℓ,k} table[s, ℓ, k] + Σ_{ℓ,k} bias[ℓ, k]
    to round-off. `z` is the logit before any final soft-capping.
    """

    token: int
    logit: float  # z, from the model's own forward pass
    table: torch.Tensor  # (T, L, 2): source s, layer ℓ, component (0 attention, 1 MLP)
    embedding: torch.Tensor  # (T,): the direct path x_s -> y (only the last position is nonzero)
    bias: torch.Tensor  # (L, 2): the affine parts of the modules (zero without biases)

    def total(self) -> float:
        """table.sum() + embedding.sum() + bias.sum(): the logit, to round-off."""
        return float(self.table.sum() + self.embedding.sum() + self.bias.sum())

    def __repr__(self) -> str:
        T, L, _ = self.table.shape
        return (f"Attribution(token={self.token}, logit={self.logit:.6g}, table=({T}, {L}, 2), "
                f"total()={self.total():.6g} = table.sum() {float(self.table.sum()):.6g} "
                f"+ embedding.sum() {float(self.embedding.sum()):.6g} + bias.sum() {float(self.bias.sum()):.6g})")

    def _repr_html_(self) -> str:  # Jupyter: the table as a heatmap, with the identity (minielm.report)
        from .report import attribution_html
        return attribution_html(self)


def attribution(model: Model, ids, token: int | None = None) -> Attribution:
    """Split the logit of `token` (default: the top next token) over sources, layers and modules.

    One row-vector reverse sweep per module (r = 1): 2L sweeps costing about a
    forward pass each, so this is cheap even where the full operators are not.
    """
    ids = checked_ids(model, ids)
    token = checks.optional_integer("token", token, 0, model.config.vocab_size, why="the vocabulary")
    x, frozen, states, states0 = traced(model, ids)
    T, L = x.shape[0], model.config.num_hidden_layers
    y, _, final_scale = target_values(model, states, states0, L - 1, "output")
    logits = times_transposed(y, model.weights["lm_head"])  # (V,), before soft-capping
    token = int(logits.argmax()) if token is None else token
    # u = ∂z/∂h^L_T: the unembedding row through the frozen final norm.
    w_token = model.weights["lm_head"][token].to(x.device, x.dtype)  # (d,)
    u = w_token * final_scale  # (d,)
    table = x.new_zeros(T, L, 2)
    bias = x.new_zeros(L, 2)
    for layer in progress(range(L), "attribution"):
        for k, component in enumerate(("attention", "mlp")):
            G = pull_back(model, frozen, u[None, :], layer, component)  # (T, 1, d)
            table[:, layer, k] = torch.einsum("tj,tj->t", G[:, 0, :], x)
            bias[layer, k] = u @ states0[component][layer][-1]
    embedding = x.new_zeros(T)
    embedding[-1] = u @ x[-1]
    return Attribution(token, float(logits[token]), table, embedding, bias)


# ---- every layer and module at once --------------------------------------------------------------
def all_layer_maps(model: Model, ids, mode: str = "auto") -> dict:
    """{(layer, component): EquivalentLinearMap} for every layer's output (final norm applied)
    and every attention and MLP module, in one pass over the layers.

    Two passes can serve, and `mode='auto'` picks the cheaper by T and L:
    the reverse pass carries d rows for each target above it, about 1.5·L²·T
    row-blocks in all; the forward pass carries ∂h_t/∂x_s for every pair of
    positions, about L·T² blocks, so it wins for short prompts on deep models
    (T < 1.5 (L + 1)).
    """
    mode = checks.one_of("mode", mode, ("auto", "reverse", "forward"))
    ids = checked_ids(model, ids)
    T, L = len(ids), model.config.num_hidden_layers
    if mode == "forward" or (mode == "auto" and T < 1.5 * (L + 1)):
        return forward_layer_maps(model, ids)
    return reverse_layer_maps(model, ids)


def reverse_layer_maps(model: Model, ids) -> dict:
    """All layer and module maps in ONE reverse pass over the layers.

    Each layer's weights and factors are visited once: the pass carries the row
    blocks of every target above, and seeds the targets of a layer as it reaches
    it (targets still at the last position only are kept apart until an attention
    sublayer spreads them over all positions). The flops equal those of separate
    sweeps, but the GEMMs are taller and the weights are read once.
    """
    ids = checked_ids(model, ids)
    x, frozen, states, states0 = traced(model, ids)
    T, d = x.shape
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    every, last = slice(0, T), slice(T - 1, T)
    G = x.new_zeros(T, 0, d)  # targets already spread over all positions
    order, maps = [], {}  # (layer, component) per block of d rows in G
    for layer in progress(reversed(range(model.config.num_hidden_layers)), "reverse pass", model.config.num_hidden_layers):
        factors = frozen.layers[layer]
        y, bias, final_scale = target_values(model, states, states0, layer, "output")
        N = x.new_zeros(T, d, d)  # this layer's targets, at the last position only
        N[-1] = torch.diag(final_scale)
        maps[(layer, "output")] = (y, bias)
        # MLP sublayer: carry G and N through it, then seed the MLP module's own target
        G[every] += mlp_branch(model, layer, factors, G, every)
        N[last] += mlp_branch(model, layer, factors, N, last)
        seed = x.new_zeros(T, d, d)
        seed[-1] = eye
        N = torch.cat([N, x.new_zeros(T, d, d)], dim=1)
        N[-1, d:] = mlp_branch(model, layer, factors, seed, last)[0]
        maps[(layer, "mlp")] = target_values(model, states, states0, layer, "mlp")[:2]
        # attention sublayer: spread N over the positions, then seed the attention module's target
        G += attention_branch(model, layer, factors, G, every)
        N += attention_branch(model, layer, factors, N, last)
        A = attention_branch(model, layer, factors, seed, last)
        maps[(layer, "attention")] = target_values(model, states, states0, layer, "attention")[:2]
        G = torch.cat([G, N, A], dim=1)
        order += [(layer, "output"), (layer, "mlp"), (layer, "attention")]
    result = {}
    for block, key in enumerate(order):
        y, bias = maps[key]
        name = target_name(model, *key)
        result[key] = EquivalentLinearMap(model, ids, G[:, block * d:(block + 1) * d], x, y, bias, frozen, name)
    return result


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
    K[torch.arange(T), torch.arange(T)] = torch.eye(d, dtype=x.dtype, device=x.device)
    result = {}

    def diagonal(weight, inv_rho):  # (T, d, 1): diag(w̃)/ρ_t as a row scale, or None
        return None if weight is None else ((config.norm_offset + weight) * inv_rho)[:, :, None]

    def add(layer, component, operators):  # operators (T, d, d): ∂target/∂x_s, read off the last row
        y, bias, _ = target_values(model, states, states0, layer, component)
        result[(layer, component)] = EquivalentLinearMap(model, ids, operators, x, y, bias, frozen,
                                                         target_name(model, layer, component))

    for layer in progress(range(config.num_hidden_layers), "forward pass of ∂h/∂x"):
        w, f = model.weights["layers"][layer], frozen.layers[layer]
        # attention: V[u, s] = W_V Pre_u K[u, s], mixed over u by P, then W_O and Post_t
        pre = diagonal(w.get("attn_norm"), f.attn_norm)
        Vk = w["wv"] @ (K if pre is None else K * pre[:, None])  # (T, T, Hkv*hd, d)
        P = f.probs.view(Hkv, H // Hkv, T, T)
        O = torch.einsum("kgtu,uskec->tskgec", P, Vk.view(T, T, Hkv, hd, d)).reshape(T, T, H * hd, d)
        D = w["wo"] @ O  # (T, T, d, d)
        post = diagonal(w.get("attn_post_norm"), f.attn_post_norm)
        D = D if post is None else D * post[:, None]
        add(layer, "attention", D[-1])
        K = K + D
        # MLP: B_t = Post_t W_D diag(φ_t) W_U Pre_t, one d × d matrix per position
        B = (w["w_down"][None] * f.gate[:, None, :]) @ w["w_up"]  # (T, d, d)
        pre = diagonal(w.get("mlp_norm"), f.mlp_norm)
        post = diagonal(w.get("mlp_post_norm"), f.mlp_post_norm)
        B = B if pre is None else B * pre.transpose(1, 2)
        B = B if post is None else B * post
        D = B[:, None] @ K  # (T, T, d, d)
        add(layer, "mlp", D[-1])
        K = K + D
        final_scale = target_values(model, states, states0, layer, "output")[2]  # the final norm, frozen here
        add(layer, "output", K[-1] * final_scale[:, None])
    return result
