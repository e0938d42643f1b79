"""What the computations cost: matmul flops and bytes as functions of the shapes.

Counts are 2 × multiply-adds of the matrix products, which dominate; the
elementwise work is O(T·d + T·f) a layer and left out. `tests/test_cost.py`
checks these formulas against torch's own flop counter on the real code.

Notation: T tokens, d = hidden_size, f = intermediate_size, L layers,
H / Hkv heads of size hd, V = vocab, b = bytes per number (8 in float64).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Shape:
    d: int
    f: int
    L: int
    H: int
    Hkv: int
    hd: int
    V: int

    @classmethod
    def of(cls, config) -> Shape:
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size)

    @property
    def layer_params(self) -> int:
        q, kv = self.H * self.hd, self.Hkv * self.hd
        return self.d * (2 * q + 2 * kv) + 3 * self.d * self.f

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
    mlp = 2 * T * s.d * s.f * (2 if frozen else 3)  # frozen: the gate φ(W_G u) is given
    return s.L * (projections + attention + mlp) + (0 if frozen else 2 * s.d * s.V)


def sweep_flops(s: Shape, T: int, r: int) -> int:
    """The reverse sweep carrying r rows (r = d: all operators J_t; r = 1: one uᵀJ_t)."""
    flops, rows = 0, 1  # rows: positions where G is nonzero (only the last at the top)
    for _ in range(s.L):
        if s.d * s.f + r * s.d < 2 * r * s.f:  # explicit W_D diag(φ_t) W_U, as linear_map chooses
            flops += rows * (2 * s.d * s.f * s.d + 2 * r * s.d * s.d)
        else:
            flops += rows * 4 * r * s.d * s.f
        flops += 2 * rows * r * s.d * s.H * s.hd  # G_t W_O
        flops += 2 * s.H * rows * T * r * s.hd  # mixing over positions by P
        flops += 2 * T * r * s.Hkv * s.hd * s.d  # W_V, after summing each GQA group
        rows = T
    return flops


def assembly_flops(s: Shape, T: int) -> int:
    """All T operators J_t (d × d): one sweep with r = d rows."""
    return sweep_flops(s, T, s.d)


def lanczos_flops(s: Shape, T: int, steps: int) -> int:
    """`steps` Golub–Kahan steps: a frozen forward (A v) and a one-row sweep (Aᵀ u) each,
    plus full reorthogonalization against the bases (2·(T·d + d)·steps a step)."""
    per_step = forward_flops(s, T, frozen=True) + sweep_flops(s, T, 1)
    return steps * per_step + 2 * steps * steps * (T * s.d + s.d) * 2


def assembly_bytes(s: Shape, T: int, b: int = 8) -> dict:
    """Memory of the analytic assembly: the operator state, one layer's weights, the largest temporary."""
    return {"operators": T * s.d * s.d * b, "one_layer": s.layer_params * b, "weights": s.params * b,
            "temporary": T * s.d * max(s.d, s.H * s.hd) * b}
