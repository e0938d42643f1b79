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

The d rows of the target are independent: each is swept down on its own, with
the same frozen factors. So the sweep runs on blocks of rows (all d at once by
default), a block can be written out as soon as it is done (`out=`), and the
ranks of a distributed run each take their own rows. Memory is the block's G,
one layer, and a fixed amount of scratch reused by every sublayer.

`detached_jacobian` computes the same operators through autograd, from a
forward pass whose factors are frozen: an independent path for checking.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checks, operators_file
from .cost import Shape, explicit_mlp_pays, low_rank_pays
from .distributed import barrier, check_same_prompt, gather_rows, on_every_rank, rank_and_size, rows_of
from .errors import InputError, OutputError
from .model import Frozen, FrozenLayer, Model, times_transposed
from .progress import progress


# ---- scratch memory ------------------------------------------------------------------------
SCRATCH_BYTES = 64 * 2**20  # the scratch budget of a sublayer; a larger block gets an eighth of its own size


class Scratch:
    """Named scratch tensors, allocated once and reused by every sublayer, layer and block.

    A sweep's temporaries (the heads of G W_O, the mixed sources, an MLP's d × d matrix, ...)
    take the same few shapes over and over. Taken from here rather than allocated each time,
    they cost no allocation and no fresh pages after the first layer, and the peak stays at
    one block's work. `count(numbers, most)` says how many items of that many numbers fit in
    the budget: the sweep takes rows or positions that many at a time. The budget bounds the
    buffers of one sublayer; the different sublayers' buffers are all kept (about 2.5 × the
    budget in all, measured).
    """

    def __init__(self, like: torch.Tensor, budget: int):
        self.like, self.budget, self.tensors = like, budget, {}

    def get(self, name: str, *shape) -> torch.Tensor:
        n = math.prod(shape)
        if name not in self.tensors or self.tensors[name].numel() < n:
            self.tensors.pop(name, None)  # the smaller one goes before the larger one comes
            self.tensors[name] = self.like.new_empty(n)
        return self.tensors[name][:n].view(shape)

    def count(self, numbers: int, most: int) -> int:
        return max(1, min(most, self.budget // max(1, numbers * self.like.element_size())))


def scratch_for(like: torch.Tensor, block_numbers: int) -> Scratch:
    """The scratch of a sweep whose G (T, r, d) holds `block_numbers` numbers: SCRATCH_BYTES,
    or an eighth of G if larger."""
    return Scratch(like, max(SCRATCH_BYTES, block_numbers * like.element_size() // 8))


# ---- one residual sublayer, backwards -----------------------------------------------------
# G (T, r, d) is updated in place. `live` is the slice of positions where G is nonzero: only
# the last one at the top of the sweep, all of them below the first attention sublayer.
#
# The norms' frozen factors are diag(w̃) / ρ_t: a fixed diagonal times one scalar per
# token. The diagonal folds into the adjacent weight matrix and the scalar into the
# per-token factor already there (the MLP gate, the attention probabilities), so the
# sweep never rescales the large G.
def folded_mlp(model: Model, w: dict, factors: FrozenLayer, live):
    """W_D (d, f), W_U (f, d) with the norms' diagonals folded in, and the gate (T', f)
    times the norms' 1/ρ: Post_t W_D diag(φ_t) W_U Pre_t = W_D' diag(φ'_t) W_U'."""
    offset, W_D, W_U, gate = model.config.norm_offset, w["w_down"], w["w_up"], factors.gate[live]
    if w.get("mlp_post_norm") is not None:
        W_D, gate = (offset + w["mlp_post_norm"])[:, None] * W_D, gate * factors.mlp_post_norm[live]
    if w.get("mlp_norm") is not None:
        W_U, gate = W_U * (offset + w["mlp_norm"]), gate * factors.mlp_norm[live]
    return W_D, gate, W_U


def folded_attention(model: Model, w: dict, factors: FrozenLayer, live):
    """W_O (d, H*hd), W_V (Hkv*hd, d) with the norms' diagonals folded in, and P (H, T', S)
    times the post-norm's 1/ρ of each query and the pre-norm's 1/ρ of each source."""
    offset, W_O, W_V, P = model.config.norm_offset, w["wo"], w["wv"], factors.probs[:, live]
    scales = []  # the per-token 1/ρ: of each query (T', 1), of each source (1, S)
    if w.get("attn_post_norm") is not None:
        W_O = (offset + w["attn_post_norm"])[:, None] * W_O
        scales.append(factors.attn_post_norm[live])
    if w.get("attn_norm") is not None:
        W_V = W_V * (offset + w["attn_norm"])
        scales.append(factors.attn_norm[: P.shape[-1]].T)
    if scales:  # their (T', S) product first, so that P is copied once
        P = P * math.prod(scales)[None]
    return W_O, P, W_V


def mlp_sublayer(model: Model, i: int, factors: FrozenLayer, G, live, scratch: Scratch, residual=True):
    """G_t <- G_t (I + M_t) at the live positions, M_t = Post_t W_D diag(φ_t) W_U Pre_t;
    without `residual`, G_t <- G_t M_t (the MLP module's own map)."""
    W_D, gate, W_U = folded_mlp(model, model.weights["layers"][i], factors, live)
    (r, d), f, first = G.shape[1:], W_D.shape[1], live.start
    if explicit_mlp_pays(d, f, r):
        step = scratch.count(f * d + d * d, min(gate.shape[0], -(-2048 // d)))  # positions whose M_t one GEMM builds
        for a in range(0, gate.shape[0], step):
            c = min(step, gate.shape[0] - a)
            scaled = torch.mul(W_U[:, None, :], gate[a:a + c].T[:, :, None],
                               out=scratch.get("diag(φ) W_U", f, c, d))  # (f, c, d): diag(φ_t) W_U side by side
            M = torch.mm(W_D, scaled.view(f, c * d), out=scratch.get("M", d, c * d)).view(d, c, d)  # M_t = M[:, k]
            for k, t in enumerate(range(first + a, first + a + c)):
                if residual:
                    M[:, k].diagonal().add_(1)  # I + M_t
                G[t].copy_(torch.mm(G[t], M[:, k], out=scratch.get("G M", r, d)))  # (r, d): G_t (I + M_t)
    else:
        step = scratch.count(r * f, gate.shape[0])  # positions at a time: the hidden (step·r, f) fits
        for a in range(0, gate.shape[0], step):
            b = min(a + step, gate.shape[0])
            Ga = G[first + a:first + b].view(-1, d)  # ((b-a)·r, d)
            X = torch.mm(Ga, W_D, out=scratch.get("G W_D", (b - a) * r, f))  # ((b-a)·r, f): G_t W_D
            X.view(b - a, r, f).mul_(gate[a:b, None, :])  # · diag(φ_t)
            if residual:
                torch.addmm(Ga, X, W_U, out=Ga)  # G_t += G_t W_D diag(φ_t) W_U, the addition fused into the GEMM
            else:
                torch.mm(X, W_U, out=Ga)


def heads(G, W_O, H: int, scratch: Scratch):
    """G_t W_O^h for every head, by head: (H, T', r, hd), from G (T', r, d)."""
    (T_, r, d), hd = G.shape, W_O.shape[1] // H
    A = torch.mm(G.view(-1, d), W_O, out=scratch.get("G W_O", T_ * r, H * hd))  # (T'·r, H·hd): one GEMM
    by_head = scratch.get("heads", H, T_, r, hd)
    by_head.copy_(A.view(T_, r, H, hd).permute(2, 0, 1, 3))  # (H, T', r, hd)
    return by_head


def mix(by_head, P, Hkv: int, scratch: Scratch):
    """C_s = Σ_t Σ_h P_h[t,s] (G_t W_O^h), the query heads that share a key-value head summed (GQA):
    (S, r, Hkv·hd), from the heads (H, T', r, hd) and P (H, T', S). One GEMM per key-value head."""
    (H, T_, r, hd), S = by_head.shape, P.shape[-1]
    g = H // Hkv  # query heads per key-value head
    C = scratch.get("mixed", Hkv, S, r * hd)
    for k in range(Hkv):
        group = slice(k * g, (k + 1) * g)
        torch.mm(P[group].reshape(g * T_, S).T, by_head[group].reshape(g * T_, r * hd), out=C[k])  # (S, r·hd)
    if Hkv == 1:
        return C.view(S, r, hd)
    by_source = scratch.get("mixed by source", S, r, Hkv * hd)
    by_source.view(S, r, Hkv, hd).copy_(C.view(Hkv, S, r, hd).permute(1, 2, 0, 3))
    return by_source


def attention_sublayer(model: Model, i: int, factors: FrozenLayer, G, scratch: Scratch):
    """G_s <- G_s + Σ_t Σ_h G_t W_O^h P_h[t,s] W_V^g(h) for every source s (all positions live).

    Rows are independent, so they go n at a time: the head-sized temporaries, (T, n, H·hd)
    and larger than G's own rows when H·hd > d (Gemma 3), stay within the scratch budget.
    """
    W_O, P, W_V = folded_attention(model, model.weights["layers"][i], factors, slice(None))
    (T, r, d), kv = G.shape, W_V.shape[0]
    n = scratch.count(T * (d + 2 * W_O.shape[1] + 2 * kv), r)  # rows at a time
    for a in range(0, r, n):
        rows = G if n >= r else scratch.get("rows", T, min(n, r - a), d).copy_(G[:, a:a + n])  # (T, n, d)
        C = mix(heads(rows, W_O, model.config.num_attention_heads, scratch), P,
                model.config.num_key_value_heads, scratch)  # (T, n, kv)
        target = rows.view(-1, d)
        torch.addmm(target, C.view(-1, kv), W_V, out=target)  # G_s += C_s W_V'
        if n < r:
            G[:, a:a + n].copy_(rows)


def attention_from_last(model: Model, i: int, factors: FrozenLayer, G, scratch: Scratch, residual=True):
    """The attention sublayer when G is nonzero at the last position only (the top of the sweep):
    every source s receives C_s W_V' with C_s = Σ_h P_h[T,s] G_T W_O^h, a chunk of sources at a time.
    Without `residual`, G_T is replaced by its own share (the attention module's own map)."""
    T, r, d = G.shape
    W_O, P, W_V = folded_attention(model, model.weights["layers"][i], factors, slice(T - 1, T))
    by_head = heads(G[-1:], W_O, model.config.num_attention_heads, scratch)  # (H, 1, r, hd)
    if not residual:
        G[-1].zero_()
    step = scratch.count(2 * r * W_V.shape[0], T)
    for a in range(0, T, step):
        C = mix(by_head, P[:, :, a:a + step], model.config.num_key_value_heads, scratch)  # (c, r, kv)
        target = G[a:a + step].view(-1, d)
        torch.addmm(target, C.view(-1, W_V.shape[0]), W_V, out=target)  # G_s += C_s W_V'


def attention_and_mlp_from_last(model: Model, frozen: Frozen, i: int, G, scratch: Scratch):
    """The top attention sublayer (layer i) and the MLP below it (layer i - 1), when G is nonzero
    at the last position only.

    Every source s < T then receives exactly C_s W_V' (rank Hkv·hd), so the MLP below acts on
    the small factor: C_s W_V' (I + M_s) = C_s R_s with R_s = W_V' + (W_V' W_D) diag(φ_s) W_U,
    2·kv·f·d flops a position instead of about 2·d²·f. The last position, which also carries
    the residual path, goes the full way.
    """
    (T, r, d), j = G.shape, i - 1
    H, Hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    W_O, P, W_V = folded_attention(model, model.weights["layers"][i], frozen.layers[i], slice(T - 1, T))
    by_head = heads(G[-1:], W_O, H, scratch)  # (H, 1, r, hd)
    torch.addmm(G[-1], mix(by_head, P[:, :, T - 1:], Hkv, scratch)[0], W_V, out=G[-1])  # G_T += C_T W_V'
    mlp_sublayer(model, j, frozen.layers[j], G, slice(T - 1, T), scratch)  # G_T (I + M_T)
    W_D, gate, W_U = folded_mlp(model, model.weights["layers"][j], frozen.layers[j], slice(0, T - 1))
    VD = W_V @ W_D  # (kv, f)
    (kv, f) = VD.shape
    step = scratch.count(r * kv + kv * d + kv * f, T - 1)  # sources at a time: C, R and W_V' W_D diag(φ_s) fit
    for a in range(0, T - 1, step):
        b = min(a + step, T - 1)
        C = mix(by_head, P[:, :, a:b], Hkv, scratch)  # (b-a, r, kv)
        scaled = torch.mul(VD, gate[a:b, None, :], out=scratch.get("W_V' W_D diag(φ)", b - a, kv, f))
        R = torch.mm(scaled.view(-1, f), W_U, out=scratch.get("R", (b - a) * kv, d)).view(b - a, kv, d)
        R += W_V  # (b-a, kv, d): R_s = W_V' + W_V' W_D diag(φ_s) W_U, one GEMM for the chunk
        torch.bmm(C, R, out=G[a:b])  # (b-a, r, d): G_s = C_s R_s


# ---- the sweep ----------------------------------------------------------------------------
def pull_back(model: Model, frozen: Frozen, seed, layer: int, component: str, scratch: Scratch | None = None):
    """G (T, r, d) at the inputs, from seed (r, d) = ∂target/∂(point) at the last position.

    The point is the residual stream after `layer` (component 'output'), or the
    output of that layer's 'attention' or 'mlp' module, whose branch alone is applied first.
    """
    T, (r, d) = frozen.final_norm.shape[0], seed.shape
    if scratch is None:  # G is the result
        G = seed.new_zeros(T, r, d)
        scratch = scratch_for(G, G.numel())
    else:  # one block of many: G is taken from the scratch, and valid until the next block
        G = scratch.get("G", T, r, d).zero_()
    G[-1] = seed
    mlp_done = False  # the MLP below the top attention, when the low-rank form has carried G through it
    for i in progress(range(layer, -1, -1), "sweep", layer + 1):
        # In the target's own layer G is nonzero at the last position only, and a module target
        # takes its branch alone; its attention spreads G over every position below.
        own = i == layer
        live = slice(T - 1, T) if own else slice(0, T)
        if (not own or component != "attention") and not mlp_done:
            mlp_sublayer(model, i, frozen.layers[i], G, live, scratch, residual=not (own and component == "mlp"))
        mlp_done = False
        if not own:
            attention_sublayer(model, i, frozen.layers[i], G, scratch)
        elif i > 0 and T > 1 and component != "attention" and low_rank_pays(Shape.of(model.config), r):
            attention_and_mlp_from_last(model, frozen, i, G, scratch)
            mlp_done = True
        else:
            attention_from_last(model, i, frozen.layers[i], G, scratch, residual=component != "attention")
    return G


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
    if model.config.affine:
        residual0, attn0, mlp0, _ = trace(model, torch.zeros_like(x), frozen)
    else:  # without biases the frozen pass is linear: exactly 0 at x = 0, so it is not run
        residual0 = attn0 = mlp0 = [torch.zeros_like(x)] * model.config.num_hidden_layers
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
        return self.unembedded(self.reconstruct())

    def probabilities(self) -> torch.Tensor:
        """Next-token probabilities (V,) from the reconstruction."""
        return torch.softmax(self.logits(), dim=-1)

    def model_probabilities(self) -> torch.Tensor:
        """The model's own next-token probabilities for the same target: (V,)."""
        return torch.softmax(self.unembedded(self.output), dim=-1)

    def unembedded(self, y) -> torch.Tensor:
        """Logits (V,) of a vector y (d,) of this target: a residual-stream target, with its model."""
        if self.model is None:
            raise InputError("logits need the model: minielm.load_operators(path, model)")
        if self.target.startswith(("attention", "mlp")):
            raise InputError(f"logits are defined for residual-stream targets, not {self.target!r}")
        return self.model.unembed(y.to(self.model.device))  # a file's map is on the CPU

    def _repr_html_(self) -> str | None:  # Jupyter: tokens by share of y, each J_t's spectrum (minielm.report)
        if self.model is None:  # loaded from a file without its model: nothing to decode tokens with,
            return None  # so Jupyter falls back to the plain repr
        from .report import map_html
        return map_html(self)


BLOCK_BYTES = 2**30  # with out=: rows are swept in blocks of about this many bytes of G


def equivalent_linear_map(model: Model, ids, layer: int | None = None, component: str = "output",
                          out=None, block: int | None = None, distributed: bool = False):
    """The per-token operators J_t (T, d, d) of the frozen model for the prompt `ids`.

    By default y is the final-normed hidden state at the last position (what the
    unembedding reads). With `layer=L`: the residual stream after layer L with the
    final norm applied, as in Golden (2025); with `component='attention'` or
    'mlp' too: that module's output at the last position (no norm).
    No autograd is used: this works under torch.inference_mode().

    Memory: the operators, one layer, and the sweep's scratch (64 MiB, or an eighth of
    the block). `block=r` sweeps r of the d output rows at a time (default: all of them).
    With `out=PATH` the operators go to a safetensors file a block at a time (default
    blocks of about 1 GiB) and come back memory-mapped (`minielm.load_operators`): for
    maps larger than memory. With `distributed=True`, under torchrun, the rows are split
    over the ranks (see minielm.distributed): rank 0 returns the map and the others None,
    or with `out=` every rank writes its rows and all return the file's map.
    """
    ids = checked_ids(model, ids)
    layer, component = checked_target(model, layer, component)
    block = checks.optional_integer("block", block, 1, why="output rows swept at a time")
    distributed = checks.boolean("distributed", distributed)
    out = None if out is None else checked_out(model, out)
    rank, ranks = rank_and_size(distributed)
    if distributed:
        c = model.config
        check_same_prompt(ids, (layer, ("output", "attention", "mlp").index(component), c.hidden_size,
                                c.num_hidden_layers, c.vocab_size, model.dtype.itemsize), model.device)
    x, frozen, states, states0 = traced(model, ids)
    y, bias, final_scale = target_values(model, states, states0, layer, component)
    (T, d), name = x.shape, target_name(model, layer, component)
    # the seed ∂y/∂(point): the frozen final norm, or the identity on a module's output
    seed = torch.diag(final_scale) if component == "output" else torch.eye(d, dtype=x.dtype, device=x.device)
    rows = rows_of(rank, ranks, d)  # this process's output rows: all of them unless distributed
    if out is None:
        operators = sweep_in_blocks(model, frozen, seed[rows], layer, component, block)
        operators = gather_rows(operators, d, rank, ranks) if distributed else operators
        return None if operators is None else EquivalentLinearMap(model, ids, operators, x, y, bias, frozen, name)
    partial, failed = f"{out}.partial", None
    try:
        if rank == 0:
            try:
                operators_file.create(partial, T, d, x.dtype, {"target": name, "model": str(model.directory)},
                                      ids, x, y, bias)
            except Exception as error:
                failed = error
        if not on_every_rank(distributed, failed is None, x.device):  # the other ranks stop too, rather than wait
            raise failed or OutputError(f"{out}: rank 0 could not create the file")
        block = block or max(1, BLOCK_BYTES // (T * d * x.element_size()))
        try:
            sweep_in_blocks(model, frozen, seed[rows], layer, component, block,
                            write=lambda a, G: operators_file.write_rows(partial, rows.start + a, G))
        except Exception as error:  # a full disk on one rank: every rank stops, and rank 0 removes the file
            failed = error
        if not on_every_rank(distributed, failed is None, x.device):
            raise failed or OutputError(f"{out}: another rank could not write its rows")
        if rank == 0:
            os.replace(partial, out)
    except BaseException:  # an error or an interrupt leaves no half-written file behind
        if rank == 0 and os.path.isfile(partial):
            os.remove(partial)
        raise
    barrier(distributed)
    elm = operators_file.load_operators(out)
    elm.model, elm.frozen = model, frozen
    return elm


def checked_out(model: Model, out) -> str:
    """`out` as the real path the operators will be written to (beside it as .partial, then renamed
    over it: so a link's target, never a device), or an error: not a file path, not a regular file,
    or a file of the checkpoint that `model` was loaded from."""
    if not isinstance(out, (str, os.PathLike)) or os.fspath(out) in ("", b"") or "\0" in str(os.fspath(out)):
        raise InputError(f"out must be a file path, got {out!r}")
    if os.path.exists(out) and not os.path.isfile(out):
        raise OutputError(f"out={out}: not a regular file (a directory, a device or a pipe); "
                          "the operators are written into a file and mapped back from it")
    if model.directory is not None and checks.overwrites(Path(out), Path(model.directory)):
        raise OutputError(f"out={out}: would overwrite the checkpoint being read ({model.directory}); "
                          "write it somewhere else")
    return os.path.realpath(out)


def sweep_in_blocks(model: Model, frozen: Frozen, seed, layer: int, component: str, block: int | None,
                    write=None):
    """The sweep for the rows of `seed` (r, d), `block` rows at a time, sharing one scratch.
    Each block's G (T, b, d) goes to write(a, G) if given, else into one (T, r, d) tensor."""
    r, d = seed.shape
    T = frozen.final_norm.shape[0]
    block = min(block or r, r) or 1
    if block == r and write is None:
        return pull_back(model, frozen, seed, layer, component)  # one block: its G is the result
    scratch = scratch_for(seed, T * block * d)
    operators = None if write is not None else seed.new_empty(T, r, d)
    for a in range(0, r, block):
        G = pull_back(model, frozen, seed[a:a + block], layer, component, scratch)
        if write is None:
            operators[:, a:a + block] = G
        else:
            write(a, G)
    return operators


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

    One row-vector reverse sweep per module (r = 1): 2L sweeps, the one from layer ℓ
    costing about (ℓ + 1)/L of a forward pass, so this is cheap even where the full
    operators are not.
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
    scratch = Scratch(x, SCRATCH_BYTES)
    for layer in progress(reversed(range(model.config.num_hidden_layers)), "reverse pass", model.config.num_hidden_layers):
        factors = frozen.layers[layer]
        y, bias, final_scale = target_values(model, states, states0, layer, "output")
        N = x.new_zeros(T, d, d)  # this layer's targets, at the last position only
        N[-1] = torch.diag(final_scale)
        maps[(layer, "output")] = (y, bias)
        # MLP sublayer: carry G and N through it, then seed the MLP module's own target
        mlp_sublayer(model, layer, factors, G, every, scratch)
        mlp_sublayer(model, layer, factors, N, last, scratch)
        M = x.new_zeros(T, d, d)
        M[-1] = eye
        mlp_sublayer(model, layer, factors, M, last, scratch, residual=False)
        N = torch.cat([N, M], dim=1)
        maps[(layer, "mlp")] = target_values(model, states, states0, layer, "mlp")[:2]
        # attention sublayer: spread N over the positions, then seed the attention module's target
        attention_sublayer(model, layer, factors, G, scratch)
        attention_from_last(model, layer, factors, N, scratch)
        A = x.new_zeros(T, d, d)
        A[-1] = eye
        attention_from_last(model, layer, factors, A, scratch, residual=False)
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
        add(layer, "attention", D[-1].clone())  # a copy: a view would keep all of D (T, T, d, d)
        K = K + D
        # MLP: B_t = Post_t W_D diag(φ_t) W_U Pre_t, one d × d matrix per position
        B = (w["w_down"][None] * f.gate[:, None, :]) @ w["w_up"]  # (T, d, d)
        pre = diagonal(w.get("mlp_norm"), f.mlp_norm)
        post = diagonal(w.get("mlp_post_norm"), f.mlp_post_norm)
        B = B if pre is None else B * pre.transpose(1, 2)
        B = B if post is None else B * post
        D = B[:, None] @ K  # (T, T, d, d)
        add(layer, "mlp", D[-1].clone())
        K = K + D
        final_scale = target_values(model, states, states0, layer, "output")[2]  # the final norm, frozen here
        add(layer, "output", K[-1] * final_scale[:, None])
    return result
