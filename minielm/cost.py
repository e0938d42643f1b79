"""What the computations cost: matmul flops and bytes as functions of the shapes.

Counts are 2 × multiply-adds of the matrix products, which dominate; the
elementwise work is O(T·d + T·f) a layer and left out. So are the norms'
diagonals in the sweep, folded into a weight or applied to G's rows, whichever
`fast_sweep.norms_fold_pays` picks: the same GEMMs follow either way.
`tests/test_cost.py` checks these formulas against torch's own flop counter on
the real code.

Notation: T tokens, d = hidden_size, f = intermediate_size, L layers,
H / Hkv heads of size hd, V = vocab, b = bytes per number (8 in float64).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .fast_sweep import (ATTENTION, ATTENTION_FROM_LAST, MLP, MLP_AT_LAST, PARALLEL, PARALLEL_AT_LAST, Step,
                         explicit_mlp_pays, low_rank_pays, plan)


@dataclass
class Shape:
    d: int
    f: int
    L: int
    H: int
    Hkv: int
    hd: int
    V: int
    biases: bool = False  # value or output biases: the map then also runs the frozen pass at 0 (its affine part)
    parallel: bool = False  # the parallel residual (GPT-NeoX)
    gated: bool = True  # a gated MLP (three f × d matrices); a plain one has two (GPT-2, GPT-NeoX)

    @classmethod
    def of(cls, config) -> Shape:
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size,
                   config.affine, bool(config.use_parallel_residual), config.family_spec.mlp == "gated")

    @property
    def layer_params(self) -> int:
        q, kv = self.H * self.hd, self.Hkv * self.hd
        return self.d * (2 * q + 2 * kv) + (3 if self.gated else 2) * self.d * self.f

    @property
    def params(self) -> int:
        return self.L * self.layer_params + 2 * self.V * self.d


def forward_flops(s: Shape, T: int, frozen: bool = False) -> int:
    """One forward pass over T tokens (logits at the last position only).

    Frozen (the matrix-free A v): P is given, so queries, keys and scores are skipped.
    """
    q, kv = s.H * s.hd, s.Hkv * s.hd
    projections = 2 * T * s.d * (kv + q) + (0 if frozen else 2 * T * s.d * (q + kv))
    attention = 2 * s.H * T * T * s.hd * (1 if frozen else 2)
    mlp = 2 * T * s.d * s.f * (3 if s.gated and not frozen else 2)  # frozen: the gate φ(W_G u) is given
    return s.L * (projections + attention + mlp) + (0 if frozen else 2 * s.d * s.V)


def frozen_product_flops(s: Shape, T: int) -> int:
    """The matrix-free A v for one input: the frozen forward pass, its top layer at the last
    position only (Frozen.at_last_position): there only W_V reads every source."""
    q, kv = s.H * s.hd, s.Hkv * s.hd
    top = 2 * T * s.d * kv + 2 * s.H * T * s.hd + 2 * s.d * q + 4 * s.d * s.f
    return forward_flops(replace(s, L=s.L - 1), T, frozen=True) + top


def mlp_sweep_flops(s: Shape, positions: int, r: int) -> int:
    """One MLP sublayer of the sweep: explicit W_D diag(φ_t) W_U or factored, as the fast sweep chooses."""
    if explicit_mlp_pays(s.d, s.f, r):
        return positions * (2 * s.d * s.f * s.d + 2 * r * s.d * s.d)
    return positions * 4 * r * s.d * s.f


def step_flops(s: Shape, T: int, r: int, step: Step) -> int:
    """One step of the fast sweep's plan, carrying r rows (see minielm.fast_sweep)."""
    kv = s.Hkv * s.hd
    if step.form == MLP_AT_LAST:
        return mlp_sweep_flops(s, 1, r)
    if step.form == MLP:
        return mlp_sweep_flops(s, T, r)
    heads_from_last = 2 * r * s.d * s.H * s.hd + 2 * s.H * T * r * s.hd  # G_T W_O, then mixing by P
    if step.form == ATTENTION_FROM_LAST:
        return heads_from_last + 2 * T * r * kv * s.d  # W_V for every source
    if step.form == ATTENTION:
        return 2 * T * r * s.d * s.H * s.hd + 2 * s.H * T * T * r * s.hd + 2 * T * r * kv * s.d
    if step.form in (PARALLEL_AT_LAST, PARALLEL):  # both branches, side by side
        at_last = step.form == PARALLEL_AT_LAST
        return (step_flops(s, T, r, Step(MLP_AT_LAST if at_last else MLP, step.layer))
                + step_flops(s, T, r, Step(ATTENTION_FROM_LAST if at_last else ATTENTION, step.layer)))
    # ATTENTION_FROM_LAST_AND_LOW_RANK_MLP: the last position in full, the sources s < T as C_s R_s
    return (heads_from_last + 2 * r * kv * s.d + mlp_sweep_flops(s, 1, r)
            + 2 * kv * s.d * s.f + (T - 1) * (2 * kv * s.f * s.d + 2 * r * kv * s.d))  # W_V'W_D; R_s; C_s R_s


def sweep_flops(s: Shape, T: int, r: int, layer: int | None = None, component: str = "output") -> int:
    """The reverse sweep carrying r rows (r = d: all operators J_t; r = 1: one uᵀJ_t), from the
    target (default: the model's output), by the same plan the fast sweep runs."""
    low_rank = low_rank_pays(s.d, s.f, s.Hkv * s.hd, r)
    steps = plan(T, s.L - 1 if layer is None else layer, component, low_rank, s.parallel)
    return sum(step_flops(s, T, r, step) for step in steps)


def assembly_flops(s: Shape, T: int) -> int:
    """All T operators J_t (d × d): one sweep with r = d rows."""
    return sweep_flops(s, T, s.d)


def lanczos_flops(s: Shape, T: int, steps: int, block: int = 1) -> int:
    """`steps` block Golub–Kahan steps of b = `block` rows (minielm.spectra.block_lanczos).

    Each step: a frozen pass to the last position over b inputs (A V) and a b-row sweep (Aᵀ U) from the
    final norm's Jacobian, and the new blocks made orthogonal to the bases so far, projected twice (8·b·rows·n flops against
    a basis of `rows` vectors of length n), then reduced to b new rows (2·b²·n). At step j the
    left basis holds (j − 1)·b rows of length d and the right one j·b rows of length n = T·d.
    The small SVDs, the residuals and the final Ritz vectors are left out.
    """
    b, m, n = block, steps, T * s.d
    seeds = 2 * b * s.d * s.d  # the b rows uᵀ ∂y/∂h^L_T through the final norm's Jacobian (d × d)
    products = m * (b * frozen_product_flops(s, T) + seeds + sweep_flops(s, T, b))
    left = 4 * b * b * s.d * m * (m - 1) + 2 * b * b * s.d * m  # 8·b·d·Σ_j (j − 1)·b, and 2·b²·d a step
    right = 4 * b * b * n * m * (m + 1) + 2 * b * b * n * (m + 1)  # 8·b·n·Σ_j j·b, 2·b²·n a step and the start
    return products + left + right


def assembly_bytes(s: Shape, T: int, b: int = 8, rows: int | None = None) -> dict:
    """Memory of the analytic assembly of `rows` of the d output rows (default all; a rank's share
    under torchrun): the operators held, one layer's weights, the sweep's scratch (64 MiB or an
    eighth of the block, see fast_sweep.Scratch), and the frozen factors (P and the gates of
    every layer) with the traced states (each layer's three outputs at x, and at 0 with biases)."""
    rows = s.d if rows is None else rows
    operators = T * rows * s.d * b
    return {"operators": operators, "one_layer": s.layer_params * b, "weights": s.params * b,
            "scratch": max(64 * 2**20, operators // 8),
            "factors": s.L * (s.H * T * T + T * s.f) * b, "states": (6 if s.biases else 3) * s.L * T * s.d * b}


def streamed_bytes(s: Shape, file_bytes: int = 2) -> int:
    """Weights read from the file per pass over the layers (bf16: 2 bytes a number). A map reads
    them twice: the forward pass at x and the sweep; three times with biases, whose affine part
    takes a frozen pass at 0."""
    return s.L * s.layer_params * file_bytes
