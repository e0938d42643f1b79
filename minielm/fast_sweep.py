"""The reverse sweep, fast: the same mathematics as minielm.sweep, arranged for speed and memory.

`fast_sweep` computes exactly what `minielm.sweep.reference_sweep` computes (the tests hold
them together to round-off on every family and target); read that one first. What this one
adds is named here, once, with why it pays and when it applies:

1. Norms folded into the weights (`mlp_operands`, `attention_operands`). A frozen RMSNorm is
   diag(w̃)/ρ_t: a fixed diagonal times one scalar per token. The scalar goes into the per-token
   factor already there (the MLP gate, the attention probabilities), always. The diagonal folds
   into the adjacent weight matrix (n × d), so the sweep never rescales the large G, where G
   is large: folding costs n·d multiplies and a new matrix at every sweep, applying the
   diagonal to the rows of G that meet it costs rows·d (`norms_fold_pays`: fold when rows ≥ n).
   All operators (r = d rows) fold; a Lanczos step's few rows (b at T positions, against an
   f × d MLP weight) take the diagonal on their rows. A frozen LayerNorm, diag(w)/σ_t · C,
   goes alike: its centring C is one more fixed matrix, taken with the diagonal
   (Model.norm_after, Model.norm_before; on rows, Model.norm_after).
2. Live positions. At the top of the sweep G is nonzero at the last position only, until the
   target layer's attention spreads it over every source. The target layer's MLP therefore
   runs on one position ("mlp at last") and its attention reads one query ("attention from
   last"). Always, in the target's own layer.
3. The explicit MLP (`explicit_mlp_pays`). Through an MLP, r rows cost 4·r·d·f flops
   factored through the f-wide hidden layer, or 2·d²·f + 2·r·d² with M_t = W_D diag(φ_t) W_U
   built first. For r = d rows (all operators) and f > d the second wins. Chosen per call.
4. The low-rank MLP below the top attention (`low_rank_pays`, "attention from last, MLP
   below in low rank"). Below the target's attention every source s < T receives exactly
   C_s W_V' (rank Hkv·hd), so the MLP below can act on the small factor:
   C_s W_V' (I + M_s) = C_s R_s with R_s = W_V' + (W_V' W_D) diag(φ_s) W_U. It pays when
   Hkv·hd is small next to d and the rows are many (the dense map on GQA models). Not with
   the parallel residual, where the MLP does not sit below the attention.
5. Grouped-query attention by GEMM (`heads`, `mix`). The heads that share a key-value head
   are mixed by one GEMM per key-value head, which also sums them: no loop over query heads.
6. Scratch reuse (`Scratch`). The sweep's temporaries take the same few shapes over and
   over; allocated once and reused, they cost no allocation and no fresh pages (the kernel
   zero-fills each new page) after the first layer, and the peak stays at one block's work.
7. Row blocks (`sweep_in_blocks`). The d output rows are independent: sweeping r of them at
   a time bounds memory by the block, and a finished block can be written out at once.

`plan` lists the sublayers a sweep goes through and the form each takes (with the parallel
residual, GPT-NeoX's, both branches of a layer in one step); the sweep runs it, and the cost model (minielm.cost) counts the flops of the same plan, so the two cannot
drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model import Frozen, FrozenLayer, LayerWeights, Model
from .progress import progress


# ---- what pays ----------------------------------------------------------------------------
def explicit_mlp_pays(d: int, f: int, r: int) -> bool:
    """Whether r rows go through an MLP faster as G_t M_t, with M_t = W_D diag(φ_t) W_U built
    once (2·d²·f flops, then 2·r·d²), than factored through the f-wide hidden layer (4·r·d·f)."""
    return d * f + r * d < 2 * r * f


def norms_fold_pays(f: int, rows: int) -> bool:
    """Whether a norm's diagonal (and a LayerNorm's centring) next to an MLP goes faster folded into its
    f × d weight (f·d multiplies, and a new f × d matrix, every sweep) than applied to the `rows` rows of
    G it meets there (positions × r rows, d wide: rows·d multiplies). The products are the same GEMMs
    either way (minielm.cost counts them alike)."""
    return rows >= f


def low_rank_pays(d: int, f: int, kv: int, r: int) -> bool:
    """Whether carrying a source's r rows as C_s W_V' (rank kv = Hkv·hd) through an MLP beats the
    full d-column form: 2·kv·f·d flops a position against min(explicit, factored)."""
    return kv * f < min(d * f + r * d, 2 * r * f)


# ---- the plan: which sublayers, in which form -------------------------------------------------
MLP_AT_LAST = "mlp at last"  # G lives at the last position only
MLP = "mlp"  # every position
ATTENTION_FROM_LAST = "attention from last"  # one query (the last) spreads G over every source
ATTENTION = "attention"  # every query, every source
ATTENTION_FROM_LAST_AND_LOW_RANK_MLP = "attention from last, MLP below in low rank"  # optimization 4
PARALLEL_AT_LAST = "attention from last beside mlp at last"  # the parallel residual (GPT-NeoX), at the top
PARALLEL = "attention beside mlp"  # the parallel residual: both branches read the same h


@dataclass(frozen=True)
class Step:
    """One sublayer of the sweep: its form, its layer (for the low-rank form: the attention's;
    the MLP below is layer - 1), and whether the residual path is kept (G ← G (I + B)) or not
    (G ← G B: a module target's own branch)."""

    form: str
    layer: int
    residual: bool = True


def plan(T: int, layer: int, component: str, low_rank: bool, parallel: bool = False) -> list:
    """The steps from the target (the residual stream after `layer`, or that layer's 'attention'
    or 'mlp' output) down to the inputs. `low_rank`: whether optimization 4 pays (`low_rank_pays`);
    `parallel`: the parallel residual, whose two branches read the same stream."""
    if parallel:
        own = {"output": Step(PARALLEL_AT_LAST, layer), "attention": Step(ATTENTION_FROM_LAST, layer, residual=False),
               "mlp": Step(MLP_AT_LAST, layer, residual=False)}[component]
        return [own] + [Step(PARALLEL, i) for i in range(layer - 1, -1, -1)]
    steps = []
    if component != "attention":  # the target layer's MLP, at the last position (a module target: alone)
        steps.append(Step(MLP_AT_LAST, layer, residual=component != "mlp"))
    fused = component != "attention" and layer > 0 and T > 1 and low_rank
    if fused:  # the target layer's attention and the MLP below it, together
        steps.append(Step(ATTENTION_FROM_LAST_AND_LOW_RANK_MLP, layer))
    else:
        steps.append(Step(ATTENTION_FROM_LAST, layer, residual=component != "attention"))
    for i in range(layer - 1, -1, -1):
        if not (fused and i == layer - 1):
            steps.append(Step(MLP, i))
        steps.append(Step(ATTENTION, i))
    return steps


# ---- scratch memory ------------------------------------------------------------------------
SCRATCH_BYTES = 64 * 2**20  # the scratch budget of a sublayer; a larger block gets an eighth of its own size


class Scratch:
    """Named scratch tensors, allocated once and reused by every sublayer, layer and block
    (optimization 6). `count(numbers, most)` says how many items of that many numbers fit in
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
# the last one at the top of the sweep, all of them below the first attention sublayer
# (optimization 2). The norms fold into the weights and the per-token factors (optimization 1).
def folded_mlp(model: Model, w: LayerWeights, factors: FrozenLayer, live):
    """W_D (d, f), W_U (f, d) with the norms' diagonals (and a LayerNorm's centring) folded in, and
    the gate (T', f) times the norms' 1/ρ: Post_t W_D diag(φ_t) W_U Pre_t = W_D' diag(φ'_t) W_U'."""
    return mlp_operands(model, w, factors, live, math.inf)[:3]


def mlp_operands(model: Model, w: LayerWeights, factors: FrozenLayer, live, rows):
    """W_D, the gate times the norms' 1/ρ, W_U, and the norms' weights left for G's rows (post, pre; None
    where folded or absent): each diagonal is folded into its weight where that pays for `rows` rows of G
    (`norms_fold_pays`), else applied to the rows, G_t diag(w̃_post) (C) before W_D and (· W_U) diag(w̃_pre) (C)
    after W_U: the same matrices, multiplied in another order."""
    W_D, W_U, post, pre = w.w_down, w.w_up, None, None
    gate = factors.gate[live]
    if factors.mlp_post_norm is not None:
        gate = gate * factors.mlp_post_norm[live]
        if norms_fold_pays(W_D.shape[1], rows):
            W_D = model.norm_before(W_D, w.mlp_post_norm)
        else:
            post = w.mlp_post_norm
    if factors.mlp_norm is not None:
        gate = gate * factors.mlp_norm[live]
        if norms_fold_pays(W_U.shape[0], rows):
            W_U = model.norm_after(W_U, w.mlp_norm)
        else:
            pre = w.mlp_norm
    return W_D, gate, W_U, post, pre


def folded_attention(model: Model, w: LayerWeights, factors: FrozenLayer, live):
    """W_O (d, H*hd), W_V (Hkv*hd, d) with the norms' diagonals (and centring) folded in, and P
    (H, T', S) times the post-norm's 1/ρ of each query and the pre-norm's 1/ρ of each source."""
    return attention_operands(model, w, factors, live, math.inf, math.inf)[:3]


def attention_operands(model: Model, w: LayerWeights, factors: FrozenLayer, live, query_rows, source_rows):
    """W_O, P times the norms' 1/ρ, W_V, and the norms' weights left for G's rows (post, pre; None where
    folded or absent), as `mlp_operands`: the post-norm's diagonal meets `query_rows` rows of G (before
    W_O), the pre-norm's `source_rows` rows (after W_V)."""
    W_O, W_V, P, post, pre = w.wo, w.wv, factors.probs[:, live], None, None
    scales = []  # the per-token 1/ρ: of each query (T', 1), of each source (1, S)
    if factors.attn_post_norm is not None:
        scales.append(factors.attn_post_norm[live])
        if norms_fold_pays(W_O.shape[1], query_rows):
            W_O = model.norm_before(W_O, w.attn_post_norm)
        else:
            post = w.attn_post_norm
    if factors.attn_norm is not None:
        scales.append(factors.attn_norm[: P.shape[-1]].T)
        if norms_fold_pays(W_V.shape[0], source_rows):
            W_V = model.norm_after(W_V, w.attn_norm)
        else:
            pre = w.attn_norm
    if scales:  # their (T', S) product first, so that P is copied once
        P = P * math.prod(scales)[None]
    return W_O, P, W_V, post, pre


def normed_rows(model: Model, G, norm, scratch: Scratch, name: str):
    """Rows G (n, d) times a norm's diagonal (and centring), G diag(w̃) (C), in scratch; G itself without a norm."""
    return G if norm is None else model.norm_after(G, norm, out=scratch.get(name, *G.shape))


def add_product(model: Model, target, X, W, norm, scratch: Scratch, residual=True):
    """target += X W, then times the norm's diagonal (and centring) if given: (X W) diag(w̃) (C); without
    `residual`, target = that. target (n, d), X (n, k), W (k, d)."""
    if norm is None:
        return torch.addmm(target, X, W, out=target) if residual else torch.mm(X, W, out=target)
    Y = torch.mm(X, W, out=scratch.get("X W", *target.shape))
    model.norm_after(Y, norm, out=Y)
    return target.add_(Y) if residual else target.copy_(Y)


def mlp_sublayer(model: Model, i: int, factors: FrozenLayer, G, live, scratch: Scratch, residual=True):
    """G_t <- G_t (I + M_t) at the live positions, M_t = Post_t W_D diag(φ_t) W_U Pre_t;
    without `residual`, G_t <- G_t M_t (the MLP module's own map)."""
    w = model.weights["layers"][i]
    (r, d), f, first = G.shape[1:], w.w_down.shape[1], live.start
    if explicit_mlp_pays(d, f, r):
        W_D, gate, W_U = folded_mlp(model, w, factors, live)
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
        return
    W_D, gate, W_U, post, pre = mlp_operands(model, w, factors, live, (live.stop - live.start) * r)
    step = scratch.count(r * f, gate.shape[0])  # positions at a time: the hidden (step·r, f) fits
    for a in range(0, gate.shape[0], step):
        b = min(a + step, gate.shape[0])
        Ga = G[first + a:first + b].view(-1, d)  # ((b-a)·r, d)
        X = torch.mm(normed_rows(model, Ga, post, scratch, "G Post"), W_D,
                     out=scratch.get("G W_D", (b - a) * r, f))  # ((b-a)·r, f): G_t Post_t W_D
        X.view(b - a, r, f).mul_(gate[a:b, None, :])  # · diag(φ_t)
        add_product(model, Ga, X, W_U, pre, scratch, residual)  # G_t += G_t W_D diag(φ_t) W_U Pre_t


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
    (T, r, d) = G.shape
    W_O, P, W_V, post, pre = attention_operands(model, model.weights["layers"][i], factors, slice(None), T * r, T * r)
    kv = W_V.shape[0]
    n = scratch.count(T * (d + 2 * W_O.shape[1] + 2 * kv), r)  # rows at a time
    for a in range(0, r, n):
        rows = G if n >= r else scratch.get("rows", T, min(n, r - a), d).copy_(G[:, a:a + n])  # (T, n, d)
        normed = normed_rows(model, rows.view(-1, d), post, scratch, "G Post").view(rows.shape)
        C = mix(heads(normed, W_O, model.config.num_attention_heads, scratch), P,
                model.config.num_key_value_heads, scratch)  # (T, n, kv)
        add_product(model, rows.view(-1, d), C.view(-1, kv), W_V, pre, scratch)  # G_s += C_s W_V Pre_s
        if n < r:
            G[:, a:a + n].copy_(rows)


def attention_from_last(model: Model, i: int, factors: FrozenLayer, G, scratch: Scratch, residual=True):
    """The attention sublayer when G is nonzero at the last position only (the top of the sweep):
    every source s receives C_s W_V' with C_s = Σ_h P_h[T,s] G_T W_O^h, a chunk of sources at a time.
    Without `residual`, G_T is replaced by its own share (the attention module's own map)."""
    T, r, d = G.shape
    W_O, P, W_V, post, pre = attention_operands(model, model.weights["layers"][i], factors, slice(T - 1, T), r, T * r)
    by_head = heads(normed_rows(model, G[-1], post, scratch, "G Post")[None], W_O,
                    model.config.num_attention_heads, scratch)  # (H, 1, r, hd)
    if not residual:
        G[-1].zero_()
    step = scratch.count(2 * r * W_V.shape[0], T)
    for a in range(0, T, step):
        C = mix(by_head, P[:, :, a:a + step], model.config.num_key_value_heads, scratch)  # (c, r, kv)
        add_product(model, G[a:a + step].view(-1, d), C.view(-1, W_V.shape[0]), W_V, pre, scratch)  # G_s += C_s W_V'


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


def parallel_sublayers(model: Model, i: int, factors: FrozenLayer, G, scratch: Scratch, from_last: bool):
    """G_t <- G_t + G_t M_t + Σ_t' G_t' ∂a_t'/∂h_t: the parallel residual, both branches from the same G
    (`from_last`: G nonzero at the last position only, the top of the sweep). The MLP's share goes to a
    buffer the size of G first, as the attention overwrites G: this form holds G twice."""
    T = G.shape[0]
    live = slice(T - 1, T) if from_last else slice(0, T)
    X = scratch.get("parallel MLP", *G.shape)
    X[live] = G[live]
    mlp_sublayer(model, i, factors, X, live, scratch, residual=False)  # X_t = G_t M_t
    (attention_from_last if from_last else attention_sublayer)(model, i, factors, G, scratch)  # G + G ∂a/∂h
    G[live] += X[live]


# ---- the sweep ----------------------------------------------------------------------------
@torch.no_grad()  # no gradient flows through a sweep: a streamed model's layers then share their cast buffers
def fast_sweep(model: Model, frozen: Frozen, seed, layer: int, component: str, scratch: Scratch | None = None):
    """G (T, r, d) at the inputs, from seed (r, d) = ∂target/∂(point) at the last position: the
    rows of every J_t, as minielm.sweep.reference_sweep computes them, by the steps of `plan`.

    Without `scratch` G is the result; with one (a block of many), G is taken from it and is
    valid until the next block."""
    T, (r, d) = frozen.final_norm.shape[0], seed.shape
    if scratch is None:
        G = seed.new_zeros(T, r, d)
        scratch = scratch_for(G, G.numel())
    else:
        G = scratch.get("G", T, r, d).zero_()
    G[-1] = seed
    c = model.config
    low_rank = low_rank_pays(d, c.intermediate_size, c.num_key_value_heads * c.head_dim, r)
    last, every = slice(T - 1, T), slice(0, T)
    steps = plan(T, layer, component, low_rank, c.use_parallel_residual)
    for step in progress(steps, "sweep", unit="sublayer"):
        i, factors = step.layer, frozen.layers[step.layer]
        if step.form == MLP_AT_LAST:
            mlp_sublayer(model, i, factors, G, last, scratch, step.residual)
        elif step.form == MLP:
            mlp_sublayer(model, i, factors, G, every, scratch)
        elif step.form == ATTENTION_FROM_LAST:
            attention_from_last(model, i, factors, G, scratch, step.residual)
        elif step.form == ATTENTION:
            attention_sublayer(model, i, factors, G, scratch)
        elif step.form == ATTENTION_FROM_LAST_AND_LOW_RANK_MLP:
            attention_and_mlp_from_last(model, frozen, i, G, scratch)
        else:
            parallel_sublayers(model, i, factors, G, scratch, from_last=step.form == PARALLEL_AT_LAST)
    return G


# ---- rows in blocks (optimization 7) --------------------------------------------------------
def sweep_in_blocks(model: Model, frozen: Frozen, seed, layer: int, component: str, block: int | None,
                    write=None):
    """The sweep for the rows of `seed` (r, d), `block` rows at a time, sharing one scratch.
    Each block's G (T, b, d) goes to write(a, G) if given, else into one (T, r, d) tensor."""
    r, d = seed.shape
    T = frozen.final_norm.shape[0]
    block = min(block or r, r) or 1
    if block == r and write is None:
        return fast_sweep(model, frozen, seed, layer, component)  # one block: its G is the result
    scratch = scratch_for(seed, T * block * d)
    operators = None if write is not None else seed.new_empty(T, r, d)
    for a in range(0, r, block):
        G = fast_sweep(model, frozen, seed[a:a + block], layer, component, scratch)
        if write is None:
            operators[:, a:a + block] = G
        else:
            write(a, G)
    return operators
