"""Rotary position embeddings (RoPE), in Hugging Face's `rotate_half` layout.

RoPE is linear in the vector it rotates, and it acts only on queries and keys,
which enter the attention probabilities P. With P frozen it therefore drops
out of the equivalent linear map altogether; it matters only for computing P.

The tables are computed in float64 and rounded once to the compute dtype: in
bfloat16, positions above 256 are not even integers, and the angles would lose
whole radians.
Supported `rope_type`s: default, linear, llama3 (Llama 3.1+), longrope (Phi-3/4).
"""

from __future__ import annotations

import math

import torch


def rotary_dim(config, params: dict) -> int:
    """How many leading dimensions of each head rotate (Phi's partial rotary)."""
    return int(config.head_dim * params["partial_rotary_factor"])


def inverse_frequencies(config, params: dict, seq_len: int, dtype, device) -> tuple[torch.Tensor, float]:
    """(rotary_dim/2,) angular frequencies, and the factor cos and sin are scaled by."""
    dim = rotary_dim(config, params)
    exponents = torch.arange(0, dim, 2, dtype=dtype, device=device) / dim
    inv_freq = 1.0 / params["rope_theta"] ** exponents
    kind = params["rope_type"]
    if kind == "linear":  # positions divided by `factor`
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":  # low frequencies divided by `factor`, high ones kept, a smooth ramp between
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        ramp = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        return (1 - ramp) * inv_freq / factor + ramp * inv_freq, 1.0
    if kind == "longrope":  # per-frequency factors, the long ones beyond the original context
        old_len = original_length(config, params)
        long = seq_len > old_len
        factors = torch.tensor(params["long_factor" if long else "short_factor"], dtype=dtype, device=device)
        scale = params.get("factor") or config.max_position_embeddings / old_len
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(old_len))
        return inv_freq / factors, attention_factor
    return inv_freq, 1.0


def original_length(config, params: dict) -> int:
    """longrope's original_max_position_embeddings: its short factors serve sequences up to this length."""
    return params.get("original_max_position_embeddings") or config.original_max_position_embeddings


def rotation_switches(config) -> set:
    """Sequence lengths L past which every position rotates differently: longrope's original context,
    where the short factors give way to the long ones (for all positions, the earlier ones too)."""
    used = [config.rope_parameters[t] for t in set(config.layer_types)]
    return {original_length(config, p) for p in used
            if p["rope_type"] == "longrope" and p["short_factor"] != p["long_factor"]}


def rotation(config, params: dict, positions: torch.Tensor, dtype, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (T, rotary_dim), for integer positions (T,) of a sequence of `seq_len`
    (default: the largest position + 1, read from `positions`; Model.forward gives it, as reading it
    would make the host wait for the device)."""
    if seq_len is None:
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
    inv_freq, scale = inverse_frequencies(config, params, seq_len, torch.float64, positions.device)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, rotary_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, rotary_dim): rotate_half pairs i and i + dim/2
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head of x (T, heads, hd); the rest pass through."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    rot = rot * cos[:, None, :] + rotate_half(rot) * sin[:, None, :]
    return torch.cat([rot, rest], dim=-1)
