"""The decoder, from embedding to logits, every operation written as A(x)·x.

Read this file top to bottom. Each nonlinear operation is a function that
computes a factor A from its input and returns both A·x and A:

    RMSNorm     N(h) = diag(w̃)/ρ(h) · h                  A = 1/ρ(h)        (T, 1)
    LayerNorm   N(h) = diag(w)/σ(h) · C h + b             A = 1/σ(h)        (T, 1)   C = I − 11ᵀ/d
    attention   o_t = Σ_s P[t,s] W_V u_s                  A = P             (H, T, S)
    gated MLP   W_D (φ(W_G u) ⊙ W_U u)                    A = φ(W_G u)      (T, f)
    plain MLP   W_out (s(z) ⊙ z) + b_out, z = W_in u + b  A = s(z)          (T, f)   φ(z) = z·s(z)

Hand a function its factor back (`frozen=`) and it skips computing it: the
operation becomes linear in its input. Running the whole forward pass with the
factors recorded for one input x* ("frozen") is therefore a linear map of the
input embeddings that reproduces the model's output at x* exactly (affine where
the checkpoint has biases: they are constants); that map is what `minielm.sweep`
assembles (read `reference_sweep` there next). Embedding scale, learned
positions, RoPE, projections and residual adds are linear already. Which norm,
MLP and positions a family uses is data (minielm/families.py).

Shapes: T tokens in this call, S = cached + T keys, d = hidden_size,
H / Hkv query / key-value heads of size hd, f = intermediate_size, V = vocab.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from . import checks, generation
from .config import Config
from .errors import InputError, NumericalError, TokenizerError, show
from .families import ACTIVATION_FACTORS, ACTIVATIONS
from .generation import KVCache
from .progress import progress
from .rope import apply_rotary, rotation


# ---- the weights of a layer --------------------------------------------------------------
@dataclass
class LayerWeights:
    """One decoder layer's weights under minielm's short names (minielm/families.py maps each family's
    Hugging Face names onto these), in the compute dtype. None where the family has no such tensor.
    Shapes (`shapes` states them for a config): d = hidden_size, f = intermediate_size, H / Hkv query /
    key-value heads of size hd; Hugging Face's (out, in) layout."""

    wq: torch.Tensor  # (H·hd, d)    queries
    wk: torch.Tensor  # (Hkv·hd, d)  keys
    wv: torch.Tensor  # (Hkv·hd, d)  values
    wo: torch.Tensor  # (d, H·hd)    the heads' outputs back to the stream
    w_up: torch.Tensor  # (f, d)     the MLP's branch that carries the signal (a plain MLP's W_in)
    w_down: torch.Tensor  # (d, f)   (a plain MLP's W_out)
    w_gate: torch.Tensor | None = None  # (f, d) a gated MLP's gate branch, through φ
    attn_norm: torch.Tensor | None = None  # (d,) the RMSNorm before attention (families with pre_norms)
    attn_post_norm: torch.Tensor | None = None  # (d,) the RMSNorm on attention's output (post_norms)
    mlp_norm: torch.Tensor | None = None  # (d,) before the MLP
    mlp_post_norm: torch.Tensor | None = None  # (d,) on the MLP's output
    q_norm: torch.Tensor | None = None  # (hd,) per head, or (H·hd,) over the whole projection (qk_norm)
    k_norm: torch.Tensor | None = None  # (hd,) per head, or (Hkv·hd,)
    bq: torch.Tensor | None = None  # (H·hd,)  biases (Qwen 2: q, k, v; attention_bias: all four)
    bk: torch.Tensor | None = None  # (Hkv·hd,)
    bv: torch.Tensor | None = None  # (Hkv·hd,)
    bo: torch.Tensor | None = None  # (d,)
    attn_norm_bias: torch.Tensor | None = None  # (d,) LayerNorm biases
    mlp_norm_bias: torch.Tensor | None = None  # (d,)
    b_up: torch.Tensor | None = None  # (f,) a plain MLP's biases
    b_down: torch.Tensor | None = None  # (d,)

    @staticmethod
    def shapes(config: Config) -> dict:
        """Short name -> shape of each tensor a layer may hold (q/k norms: None without qk_norm)."""
        d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
        q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
        q_norm, k_norm = {"head": ((hd,), (hd,)), "full": ((q,), (kv,))}.get(config.qk_norm, (None, None))
        return {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q),
                "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f),
                "attn_norm": (d,), "attn_post_norm": (d,), "mlp_norm": (d,), "mlp_post_norm": (d,),
                "q_norm": q_norm, "k_norm": k_norm, "bq": (q,), "bk": (kv,), "bv": (kv,), "bo": (d,),
                "attn_norm_bias": (d,), "mlp_norm_bias": (d,), "b_up": (f,), "b_down": (d,)}

    def tensors(self) -> list:
        """The tensors this layer has."""
        return [t for t in vars(self).values() if t is not None]


LAYER_FIELDS = tuple(f.name for f in fields(LayerWeights))  # a layer's weights by name, in a fixed order


# ---- the frozen factors ----------------------------------------------------------------
@dataclass
class FrozenLayer:
    """The factors A(x*) of one decoder layer; None where the layer has no such operation."""

    attn_norm: torch.Tensor | None = None  # (T, 1) 1/ρ of the pre-attention norm
    probs: torch.Tensor | None = None  # (H, T, S) attention probabilities P
    attn_post_norm: torch.Tensor | None = None  # (T, 1) 1/ρ of the post-attention norm
    mlp_norm: torch.Tensor | None = None  # (T, 1) 1/ρ of the pre-MLP norm
    gate: torch.Tensor | None = None  # (T, f) φ(W_G u), the frozen gate of the MLP
    mlp_post_norm: torch.Tensor | None = None  # (T, 1) 1/ρ of the post-MLP norm

    def at_last_query(self) -> FrozenLayer:
        """The factors that act at the last position only: a frozen pass through this layer then
        continues the stream at that position alone (the sources are still normed and read in full)."""
        def last(a):
            return None if a is None else a[..., -1:, :]
        return FrozenLayer(self.attn_norm, last(self.probs), last(self.attn_post_norm), last(self.mlp_norm),
                           last(self.gate), last(self.mlp_post_norm))


@dataclass
class Frozen:
    """The factors of a whole forward pass: one FrozenLayer per layer, and the final norm's."""

    layers: list = field(default_factory=list)
    final_norm: torch.Tensor | None = None  # (T, 1)

    def at_last_position(self) -> Frozen:
        """These factors, with the top layer's cut to the last position: a frozen pass then
        computes y_T alone, and skips the top layer's work at the other T - 1 positions."""
        return Frozen(self.layers[:-1] + [self.layers[-1].at_last_query()], self.final_norm[-1:])


@dataclass
class States:
    """Every intermediate state of a forward pass, each (T, d) per layer, by component: the
    residual stream after each layer ('output'), and what each layer's attention and MLP
    added to it ('attention', 'mlp')."""

    output: list = field(default_factory=list)
    attention: list = field(default_factory=list)
    mlp: list = field(default_factory=list)

    def __getitem__(self, component: str) -> list:
        return getattr(self, component)


# ---- the operations --------------------------------------------------------------------
def rms_norm(h, weight, offset, eps, inv_rho=None):
    """N(h) = (offset + w) ⊙ h / ρ(h),  ρ(h) = sqrt(mean(h²) + eps).

    A(h) = diag(offset + w) / ρ(h): one scalar 1/ρ per row, times a fixed diagonal.
    h: (..., n) -> (..., n), and 1/ρ: (..., 1).
    """
    if inv_rho is None:
        inv_rho = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h * inv_rho * (offset + weight), inv_rho


def layer_norm(h, weight, bias, eps, inv_sigma=None):
    """N(h) = w ⊙ (h − mean(h)) / σ(h) + b,  σ(h) = sqrt(mean((h − mean(h))²) + eps).

    A(h) = diag(w) / σ(h) · C, with C = I − 11ᵀ/n the centring (linear: it stays on the path);
    the bias b is a constant. One scalar 1/σ per row is frozen.
    h: (..., n) -> (..., n), and 1/σ: (..., 1).
    """
    centred = h - h.mean(-1, keepdim=True)  # C h
    if inv_sigma is None:
        inv_sigma = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return centred * inv_sigma * weight + bias, inv_sigma


def linear(x, weight, bias=None):
    """x W^T (+ b): Hugging Face stores weights as (out, in)."""
    y = x @ weight.T
    return y if bias is None else y + bias


def gated_mlp(u, w, activation, gate=None):
    """W_D (φ(W_G u) ⊙ W_U u).

    A(u) = W_D diag(φ(W_G u)) W_U: the gate branch is frozen, the up branch carries the signal.
    u: (T, d) -> (T, d); gate: (T, f).
    """
    if gate is None:
        gate = activation(linear(u, w.w_gate))  # (T, f)
    up = linear(u, w.w_up)  # (T, f)
    return linear(gate * up, w.w_down), gate  # (T, d)


def plain_mlp(u, w, factor, s=None):
    """W_out φ(z) + b_out with z = W_in u + b_in and φ(z) = z · s(z) (GELU: s = Φ, or its tanh form).

    A(u) = W_out diag(s(z)) W_in: s is frozen, the role the gate plays in a gated MLP; z carries the
    signal (no division by z is ever needed). u: (T, d) -> (T, d); s: (T, f).
    """
    z = linear(u, w.w_up, w.b_up)  # (T, f)
    if s is None:
        s = factor(z)  # (T, f)
    return linear(s * z, w.w_down, w.b_down), s  # (T, d)


def causal_mask(query_pos, key_pos, window=None):
    """(T, S) True where query t may attend to key s: s ≤ t, and t - s < window when sliding."""
    allowed = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        allowed &= query_pos[:, None] - key_pos[None, :] < window
    return allowed


def attention_probabilities(u, w, config, layer_type, positions, cache=None, layer=None, rotary=None):
    """P: (H, T, S), softmax over keys of the scaled query-key scores.

    Everything that shapes P lives here: q/k biases and norms, RoPE, the score
    scale and soft-capping, the causal and sliding-window masks. With P frozen,
    none of it is part of the linear map. `rotary`: the RoPE tables (cos, sin) of these
    positions for this layer type, if the caller has them (Model.forward makes them once a pass).
    """
    T, H, Hkv, hd = u.shape[0], config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = linear(u, w.wq, w.bq)  # (T, H*hd)
    k = linear(u, w.wk, w.bk)  # (T, Hkv*hd)
    eps, offset = config.norm_eps, config.norm_offset
    if config.qk_norm == "full":  # OLMo 2: one norm over the whole projection
        q, _ = rms_norm(q, w.q_norm, offset, eps)
        k, _ = rms_norm(k, w.k_norm, offset, eps)
    q, k = q.view(T, H, hd), k.view(T, Hkv, hd)
    if config.qk_norm == "head":  # Qwen 3, Gemma 3: a norm per head
        q, _ = rms_norm(q, w.q_norm, offset, eps)
        k, _ = rms_norm(k, w.k_norm, offset, eps)
    if config.family_spec.position == "rope":  # learned positions (GPT-2) are in the input vectors already
        cos, sin = rotary or rotation(config, config.rope_parameters[layer_type], positions, u.dtype)  # (T, rotary_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        k = cache.extend("keys", layer, k)  # (S, Hkv, hd)
    S, G = k.shape[0], H // Hkv  # G query heads share one key-value head
    scores = torch.einsum("tkgd,skd->kgts", q.view(T, Hkv, G, hd), k).reshape(H, T, S)
    scores = scores * config.attention_scale
    cap = config.attn_logit_softcapping
    if cap:  # Gemma 2: cap·tanh(scores / cap), inside P, so frozen with it
        scores = cap * torch.tanh(scores / cap)
    key_pos = torch.arange(S, device=u.device)
    window = config.sliding_window if layer_type == "sliding_attention" else None
    scores = scores.masked_fill(~causal_mask(positions, key_pos, window), float("-inf"))
    return torch.softmax(scores, dim=-1)  # (H, T, S), in the compute dtype


def attention(u, w, config, layer_type, positions, cache=None, layer=None, probs=None, rotary=None):
    """o_t = Σ_{s≤t} P[t,s] W_V u_s per head, then W_O.  A(u) = P.

    u: (T, d) -> (T, d); probs: (H, T, S). With P given, u may be a batch (..., T, d), and P
    may hold the last Tq queries only, (H, Tq, S): the output is then theirs, (..., Tq, d).
    `rotary`: the RoPE tables, if the caller has them (see attention_probabilities).
    """
    T, H, Hkv, hd = u.shape[-2], config.num_attention_heads, config.num_key_value_heads, config.head_dim
    batch = u.shape[:-2]  # () for one input; (b,) for a batch of inputs through the frozen pass
    if probs is None:
        probs = attention_probabilities(u, w, config, layer_type, positions, cache, layer, rotary)
    elif cache is not None:
        raise InputError("a frozen forward pass cannot extend a KV cache")
    v = linear(u, w.wv, w.bv).view(*batch, T, Hkv, hd)  # (..., T, Hkv, hd)
    if cache is not None:
        v = cache.extend("values", layer, v)  # (S, Hkv, hd)
    (Tq, S), G = probs.shape[1:], H // Hkv  # Tq queries: T, or fewer with frozen factors of the last ones
    o = torch.einsum("kgts,...skd->...tkgd", probs.view(Hkv, G, Tq, S), v)  # (..., Tq, Hkv, G, hd)
    return linear(o.reshape(*batch, Tq, H * hd), w.wo, w.bo), probs  # (..., Tq, d)


# ---- the model --------------------------------------------------------------------------
class Model:
    """A decoder-only language model held as plain tensors in one compute dtype."""

    def __init__(self, config: Config, weights: dict, tokenizer=None, directory=None, dtype=None, device=None,
                 eos_token_id=None):
        self.config = config
        # generation stops at these: generation_config.json's where the checkpoint has one, else config.json's
        self.eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
        self.weights = weights  # streamed models keep embed/lm_head in the file's dtype, layers cast on access
        self._tokenizer = tokenizer
        self.directory = directory
        self.dtype = dtype or weights["embed"].dtype  # the one compute dtype
        self.device = torch.device(device) if device is not None else weights["embed"].device
        self.activation = ACTIVATIONS[config.hidden_act]  # φ of a gated MLP
        self.activation_factor = ACTIVATION_FACTORS.get(config.hidden_act)  # s of a plain one: φ(z) = z·s(z)
        self._fingerprint = None  # of the weights: fingerprint(), computed when first asked

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.directory is not None and str(self.directory).endswith(".gguf"):  # a file: no tokenizer files
                raise TokenizerError(f"{self.directory}: the GGUF file has no tokenizer metadata "
                                     "(tokenizer.ggml.model and tokenizer.ggml.tokens); pass token ids instead of text")
            raise TokenizerError(f"{self.directory}: no tokenizer.json or tokenizer.model")
        return self._tokenizer

    def parameters(self) -> list:
        """Every weight tensor once (the tied unembedding is the embedding)."""
        return [tensor for _, tensor in self.named_weights()]

    def fingerprint(self) -> str:
        """sha256 of every weight (by name, with its shape and its bytes in the compute dtype): what an
        operators file records of the model that made it. Computed once and kept: a streamed model reads
        each layer once for it, and agrees with the same checkpoint loaded whole (its layers are taken
        field by field, as LayerWeights names them, whatever order the file holds them in). A weight
        changed in place afterwards is not seen."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in self.named_weights():
                tensor = tensor.detach().to("cpu", self.dtype).contiguous()
                digest.update(f"{name} {list(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def named_weights(self):
        """(name, tensor) of every weight once, in a fixed order: the top-level ones, then each layer's."""
        tied = self.weights["lm_head"] is self.weights["embed"] or self.config.tie_word_embeddings
        for name in ("embed", "positions", "final_norm", "final_norm_bias") + (() if tied else ("lm_head",)):
            if self.weights.get(name) is not None:
                yield name, self.weights[name]
        for i, layer in enumerate(self.weights["layers"]):
            for field_name in LAYER_FIELDS:
                tensor = getattr(layer, field_name)
                if tensor is not None:
                    yield f"layers.{i}.{field_name}", tensor

    # -- embedding to logits ----------------------------------------------------------------
    def embed(self, ids, start: int = 0) -> torch.Tensor:
        """x_t = E[id_t] (· sqrt(d) for Gemma; + P[t] for learned positions, GPT-2's, t counted from
        `start`): (T, d), the vectors entering the first block."""
        ids = self.check_ids(ids)
        E = self.weights["embed"]
        x = on_device(E[torch.tensor(ids, device=E.device)], self.device, self.dtype)  # (T, d)
        check_finite(x, None, "embedding")
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if self.config.family_spec.position == "learned":
            x = x + on_device(self.weights["positions"][start:start + len(ids)], self.device, self.dtype)  # (T, d)
        return x

    def norm(self, h, weight, inv_rho=None, bias=None):
        """The family's norm with this model's eps: RMSNorm (with Gemma's 1 + w), or LayerNorm (with its bias).
        Returns N(h) and the frozen factor, 1/ρ or 1/σ (T, 1)."""
        if self.config.family_spec.norm == "layer":
            return layer_norm(h, weight, bias, self.config.norm_eps, inv_rho)
        return rms_norm(h, weight, self.config.norm_offset, self.config.norm_eps, inv_rho)

    def mlp(self, u, w, gate=None):
        """The family's MLP: gated, W_D (φ(W_G u) ⊙ W_U u), or plain, W_out φ(W_in u + b_in) + b_out.
        Returns its output (T, d) and its frozen factor (T, f): φ(W_G u), or s(z) of φ(z) = z·s(z)."""
        if self.config.family_spec.mlp == "plain":
            return plain_mlp(u, w, self.activation_factor, gate)
        return gated_mlp(u, w, self.activation, gate)

    def block(self, i, h, positions, frozen=None, cache=None, finite: FiniteChecks | None = None, rotary=None):
        """Decoder layer i: h -> h + N'(Attn(N(h))) -> h + N'(MLP(N(h))), or with the parallel
        residual (GPT-NeoX) h -> h + Attn(N₁(h)) + MLP(N₂(h)).

            sequential:  h ──┬──────────────(+)──┬──────────────(+)──>
                             └─ N ─ Attn ─ N' ─┘  └─ N ─ MLP ─ N' ─┘
            parallel:    h ──┬────────────────────────(+)──>
                             ├─ N₁ ─ Attn ─────────────┤
                             └─ N₂ ─ MLP ──────────────┘

        N is the pre-norm, N' the post-norm, each where the family has it (config.pre_norms,
        config.post_norms, from minielm/families.py); the identity elsewhere.
        Returns the new residual stream (T, d), this layer's factors, and the two
        branch outputs (attention, MLP) that were added to the stream. Its values are checked
        finite after each branch: noted in `finite` (read at the end of the forward pass), or here.
        `rotary`: the pass's RoPE tables by layer type (Model.rotary_tables), if made already.
        """
        checked_here = finite is None
        finite = FiniteChecks() if checked_here else finite
        w, config = self.weights["layers"][i], self.config
        given = frozen or FrozenLayer()
        out = FrozenLayer()
        layer_type = config.layer_types[i]

        pre, post = config.pre_norms, config.post_norms  # the family's norms: before and/or after each branch
        u, out.attn_norm = self.norm(h, w.attn_norm, given.attn_norm, w.attn_norm_bias) if pre else (h, None)
        a, out.probs = attention(u, w, config, layer_type, positions, cache, i, given.probs,
                                 (rotary or {}).get(layer_type))  # (T, d)
        a, out.attn_post_norm = self.norm(a, w.attn_post_norm, given.attn_post_norm) if post else (a, None)
        h_in = h[..., -a.shape[-2]:, :]  # the stream goes on at the query positions (all, unless frozen fewer)
        h = h_in + a
        finite.note(h, f"after the attention of layer {i}")

        u = h_in if config.use_parallel_residual else h  # the parallel residual: both branches read the same h
        u, out.mlp_norm = self.norm(u, w.mlp_norm, given.mlp_norm, w.mlp_norm_bias) if pre else (u, None)  # (T, d)
        m, out.gate = self.mlp(u, w, given.gate)  # (T, d)
        m, out.mlp_post_norm = self.norm(m, w.mlp_post_norm, given.mlp_post_norm) if post else (m, None)
        h = h + m
        finite.note(h, f"after the MLP of layer {i}")
        if checked_here:
            finite.raise_first()
        return h, out, (a, m)

    def forward(self, x, frozen: Frozen | None = None, cache: KVCache | None = None, edit=None,
                states: States | None = None):
        """Input vectors x (T, d) -> final-normed hidden states y (T, d), and the factors used.

        With `frozen` given, every factor is taken from it: the pass is then linear in x,
        and x may be a batch of inputs (..., T, d), all run through the same frozen factors.
        `edit(i, h, x) -> h`, if given, may change the residual stream after each layer i,
        and with i = -1 the stream entering layer 0 (steering uses it).
        `states`, if given, receives every intermediate state (see States).
        Non-finite values are a NumericalError naming the first layer and branch (or edit) that
        made them, raised at the end of the pass (see FiniteChecks).
        """
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + x.shape[-2], device=x.device)  # (T,)
        rotary = self.rotary_tables(positions, start + x.shape[-2]) if frozen is None else None
        finite = FiniteChecks()
        h, layers = (x if edit is None else edited(edit, -1, x, x, finite)), []
        for i in progress(range(self.config.num_hidden_layers), "forward", show=False if cache else None):
            h, factors, (a, m) = self.block(i, h, positions, frozen.layers[i] if frozen else None, cache, finite,
                                            rotary)
            h = h if edit is None else edited(edit, i, h, x, finite)
            layers.append(factors)
            if states is not None:
                states.output.append(h)
                states.attention.append(a)
                states.mlp.append(m)
        if cache is not None:
            cache.length += x.shape[0]
        y, inv_rho = self.final_norm(h, frozen.final_norm if frozen else None)
        finite.note(y, "after the final norm")
        finite.raise_first()
        return y, Frozen(layers, inv_rho)

    def rotary_tables(self, positions, seq_len: int) -> dict:
        """The RoPE tables (cos, sin), each (T, rotary_dim), for positions (T,) of a sequence of seq_len, by
        layer type: made once a pass, not once a layer (longrope's factors cross from the host to the device
        to make them). Empty for learned positions (GPT-2)."""
        if self.config.family_spec.position != "rope":
            return {}
        return {kind: rotation(self.config, self.config.rope_parameters[kind], positions, self.dtype, seq_len)
                for kind in set(self.config.layer_types)}

    def final_norm(self, h, inv_rho=None):
        """N_f(h): the final norm (its 1/ρ frozen if given), and its factor."""
        return self.norm(h, self.weights["final_norm"], inv_rho, self.weights.get("final_norm_bias"))

    def final_norm_jacobian(self, inv_rho) -> torch.Tensor:
        """∂y/∂h at one position with the final norm's factor frozen, (d, d): diag(w̃_f)/ρ, or for
        LayerNorm diag(w_f)/σ · C. The one place that knows the final norm's frozen form: every target
        of a residual stream, and every row uᵀ pulled back from y (uᵀ ∂y/∂h), starts here.
        inv_rho: (1,) or (1, 1), the frozen factor of that position."""
        d = self.config.hidden_size
        eye = torch.eye(d, dtype=self.dtype, device=self.device)
        return self.norm_pullback(eye[None], self.weights["final_norm"], inv_rho.reshape(1, 1))[0]

    def norm_pullback(self, G, weight, inv_rho):
        """G_t N'_t for row blocks G (T, r, d): the frozen norm's Jacobian N'_t = diag(w̃)/ρ_t (RMSNorm) or
        diag(w)/σ_t · C (LayerNorm; C = I − 11ᵀ/d removes each row's mean) applied on the right of each
        position's rows. G itself where the layer has no such norm (no frozen factor: the identity)."""
        return G if inv_rho is None else self.norm_after(G * inv_rho[:, None, :], weight)  # G_t/ρ_t, then diag, C

    def norm_after(self, W, weight, out=None):
        """W diag(w̃) (· C for LayerNorm): a matrix W (n, d) that reads a norm's output, the norm's
        diagonal (and centring) folded in; its 1/ρ_t stays with the per-token factors. Rows of G
        (n, d) take the norm's Jacobian the same way. Written to `out` if given (W itself: in place)."""
        W = torch.mul(W, self.config.norm_offset + weight, out=out)
        return W.sub_(W.mean(-1, keepdim=True)) if self.config.family_spec.norm == "layer" else W

    def norm_before(self, W, weight):
        """diag(w̃) (C for LayerNorm) W: a matrix W (d, n) whose output a norm reads, folded likewise."""
        if self.config.family_spec.norm == "layer":
            W = W - W.mean(0, keepdim=True)
        return (self.config.norm_offset + weight)[:, None] * W

    def unembed(self, y) -> torch.Tensor:
        """Logits W_U y (soft-capped where the config says so): (..., d) -> (..., V)."""
        logits = times_transposed(y, self.weights["lm_head"])
        check_finite(logits, None, "unembedding")
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def logits(self, ids) -> torch.Tensor:
        """Next-token logits at every position: token ids (T) -> (T, V)."""
        y, _ = self.forward(self.embed(ids))
        return self.unembed(y)

    # -- generation (minielm/generation.py) ---------------------------------------------------
    def generate(self, prompt, max_new_tokens=20, temperature=0.0, top_k=None, seed=None, edit=None) -> str:
        """The continuation of `prompt` as text, without the prompt (the `generate` command prints both;
        see minielm.generation.generate)."""
        return generation.generate(self, prompt, max_new_tokens, temperature, top_k, seed, edit)

    def generate_ids(self, ids, max_new_tokens=20, temperature=0.0, top_k=None, seed=None, edit=None) -> list:
        """The new token ids, with a KV cache (see minielm.generation.generate_ids)."""
        return generation.generate_ids(self, ids, max_new_tokens, temperature, top_k, seed, edit)

    def check_sampling(self, max_new_tokens, temperature, top_k, seed, edit=None):
        """The generation settings, checked: (max_new_tokens, temperature, top_k, seed) as plain numbers."""
        return generation.check_sampling(self.config, max_new_tokens, temperature, top_k, seed, edit)

    def check_ids(self, ids) -> list:
        """Token ids as a list of ints, each in the vocabulary; at least one, at most the positions.
        Text, bytes, booleans and floats are refused (see minielm.checks.token_ids)."""
        return checks.token_ids(ids, self.config.vocab_size, self.config.max_position_embeddings,
                                self.tokenizer_mismatch())

    def tokenizer_mismatch(self) -> str:
        """'' when the tokenizer's ids fit the model's vocabulary; else a clause naming the mismatch,
        for messages about ids out of the vocabulary (they then come from the tokenizer)."""
        tokenizer, vocab = self._tokenizer, self.config.vocab_size
        if tokenizer is None or getattr(tokenizer, "vocab_size", 0) <= vocab:
            return ""
        return (f": the tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} ids but config.json says "
                f"vocab_size={vocab}, so the tokenizer does not match this model")


def times_transposed(y, W, chunk=16384):
    """y Wᵀ: (..., d) -> (..., rows). A weight kept in a lower-precision file dtype (streamed
    models) is cast to y's dtype and device a block of rows at a time."""
    if W.dtype == y.dtype and W.device == y.device:
        return y @ W.T
    return torch.cat([y @ on_device(W[i:i + chunk], y.device, y.dtype).T for i in range(0, W.shape[0], chunk)], dim=-1)


def on_device(t, device, dtype) -> torch.Tensor:
    """t in `dtype` on `device`: copied in its own dtype, then cast there. A copy to a GPU that also
    changed the dtype would cast on the CPU first, and move 4x the bytes of a bf16 weight in float64."""
    return t.to(device).to(dtype)


def edited(edit, i, h, x, finite: FiniteChecks):
    """edit(i, h, x), checked: a tensor of h's shape and dtype (here), finite (noted in `finite`). A hook's
    mistake is named with the layer, rather than surfacing as a raw error, or as non-finite values blamed
    on the next layer. A hook may name itself for that message (`edit.blame`, as steering's do)."""
    where = "before layer 0" if i < 0 else f"after layer {i}"
    result = edit(i, h, x)
    if not isinstance(result, torch.Tensor):
        raise InputError(f"the edit hook returned {show(result, 40)} {where}; it must return a tensor of the "
                         f"shape of h, {tuple(h.shape)}")
    if result.shape != h.shape or result.dtype != h.dtype:
        raise InputError(f"the edit hook returned a {result.dtype} tensor of shape {tuple(result.shape)} {where}; "
                         f"it must return one of the shape of h, {tuple(h.shape)}, and its dtype, {h.dtype}")
    blame = getattr(edit, "blame", None)
    finite.note(result, f"after {blame}" if blame else f"returned by the edit hook {where}")
    return result


class FiniteChecks:
    """Whether values stayed finite, noted during a forward pass and read once, at its end: reading
    each on the host where it is made would make the host wait for the device after every layer (a
    GPU then idles while the next layer's work is queued). The first place noted whose values are
    not finite is named, as an immediate check would have named it; the layers above it have run
    on non-finite values meanwhile, and their results are dropped with the error."""

    def __init__(self):
        self.noted = []  # (all of its values finite: a 0-d bool tensor on the compute device, place)

    def note(self, h, place: str):
        self.noted.append((torch.isfinite(h).all(), place))

    def raise_first(self):
        """NumericalError naming the first place noted that is not finite; one read on the host."""
        if self.noted and not bool(torch.stack([ok for ok, _ in self.noted]).all()):
            place = next(place for ok, place in self.noted if not ok)
            raise NumericalError(f"non-finite values {place}")


def check_finite(h, layer, operation):
    """NumericalError naming where values first stopped being finite (layer None: outside the layers)."""
    if not bool(torch.isfinite(h).all()):
        where = f"the {operation}" if layer is None else f"the {operation} of layer {layer}"
        raise NumericalError(f"non-finite values after {where}")
