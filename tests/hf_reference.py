"""Hugging Face float64 oracle for the minielm test suite (test-only code).

Three things live here:

* ``FAMILIES``: tiny random configs, one per architecture feature set that real
  checkpoints use (GQA, llama3/linear/longrope RoPE, partial rotary, q/k norms,
  post-norms, biases, sliding windows, soft-capping, tied embeddings...); at
  least one for every family in minielm/families.py (tests/test_families.py).
* ``save_tiny_checkpoint``: builds such a model with transformers, fills every
  parameter with seeded random values and saves it exactly like a real
  checkpoint (``config.json`` + ``model.safetensors``, optionally sharded).
* ``hf_float64_logits``: the reference logits, computed by transformers' own
  modelling code but entirely in float64.

Why a patch is needed: even when a model is loaded with ``dtype=torch.float64``,
transformers silently computes parts of the forward in float32 (RMSNorm
``.to(torch.float32)`` / ``x.float()``, ``softmax(..., dtype=torch.float32)``,
rotary ``position_ids.float() * inv_freq.float()``, and ``inv_freq`` itself in
the RoPE init functions).  That caps agreement at ~1e-7 instead of ~1e-15.
``float64_everywhere()`` removes those casts without editing any HF code: a
``TorchFunctionMode`` rewrites every float32 request (a ``torch.float32`` dtype
argument, ``Tensor.float()``) into float64, and the default dtype is float64.
The model is *loaded* inside the context too, so ``inv_freq`` (and Gemma's
``embed_scale``) are computed in float64 rather than computed in float32 and
cast up.  ``hf_float64_logits`` then verifies, at the aten level, that no
low-precision tensor took part in the forward.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

# ---------------------------------------------------------------------------
# Tiny configs
# ---------------------------------------------------------------------------

# Token ids valid in every vocab below; max_position_embeddings comfortably
# above the ~16-token test prompts.
_COMMON = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)


def _llama() -> PretrainedConfig:
    # head_dim 16 -> inv_freq wavelengths 6.3, 20, 63, ...: with original_max 32
    # (high/low wavelength cut-offs 8 and 32) llama3 scaling hits all three
    # regimes: kept, smoothed, divided by factor.
    return LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
        **_COMMON)


def _llama_tied() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), **_COMMON)


def _qwen3() -> PretrainedConfig:
    # head_dim 16 != hidden/heads = 8
    return Qwen3Config(
        vocab_size=151, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **_COMMON)


def _gemma2() -> PretrainedConfig:
    # layer types left to the config: every other layer slides, the first one included
    return Gemma2Config(
        vocab_size=136, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=24, sliding_window=4,
        attn_logit_softcapping=2.0,  # scores are O(1): a cap of 2 bends them visibly
        final_logit_softcapping=10.0, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), **_COMMON)


def _gpt2() -> PretrainedConfig:
    # Conv1D matrices, learned positions, LayerNorm and biases everywhere, tanh GELU; n_inner left to 4·d
    return GPT2Config(
        vocab_size=120, n_embd=48, n_layer=2, n_head=4, n_positions=64, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _gpt_neox() -> PretrainedConfig:
    # Pythia: the parallel residual, partial rotary (8 of 16 dimensions), fused q/k/v per head, exact GELU
    return GPTNeoXConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5), **_COMMON)


def _gpt_neox_sequential() -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        use_parallel_residual=False, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25), **_COMMON)


def _gemma3_text() -> PretrainedConfig:
    return Gemma3TextConfig(
        vocab_size=144, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=24,  # attention scale 24**-0.5, not head_dim**-0.5
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=4,
        rope_parameters={
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
        },
        final_logit_softcapping=10.0,  # pre-cap logits are O(5): the cap bends them visibly
        tie_word_embeddings=True,
        **_COMMON)


def _mistral() -> PretrainedConfig:
    return MistralConfig(
        vocab_size=128, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,  # explicit, != 48/4
        sliding_window=5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), **_COMMON)


def _phi3() -> PretrainedConfig:
    # head_dim 16, rotary dim 8 (partial_rotary_factor lives in rope_parameters)
    return Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        **_COMMON)


def _phi3_longrope() -> PretrainedConfig:
    # original_max 8 < prompt length, so HF uses long_factor for the whole
    # sequence; attention factor sqrt(1 + ln(128/8) / ln(8)) scales cos/sin.
    return Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        original_max_position_embeddings=8,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                             original_max_position_embeddings=8,
                             short_factor=[1.0, 1.3, 1.9, 2.6], long_factor=[1.1, 2.5, 4.75, 9.0]),
        **_COMMON)


def _olmo2() -> PretrainedConfig:
    return Olmo2Config(
        vocab_size=176, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0), **_COMMON)


def _qwen2() -> PretrainedConfig:
    return Qwen2Config(
        vocab_size=200, hidden_size=48, intermediate_size=144, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **_COMMON)


def _qwen3_sliding() -> PretrainedConfig:
    # Qwen's sliding layers: those from max_window_layers up (here 1 and 2), once use_sliding_window is set
    return Qwen3Config(
        vocab_size=151, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **_COMMON)


def _llama_mqa() -> PretrainedConfig:
    # one key-value head for all 4 query heads (MQA), head_dim 20 != 48/4
    return LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=20, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), **_COMMON)


def _mistral_no_gqa() -> PretrainedConfig:
    # as many key-value heads as query heads, head_dim 8 != 48/3, a window of 3 over 3 layers, tied
    return MistralConfig(
        vocab_size=128, hidden_size=48, intermediate_size=112, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, head_dim=8, sliding_window=3, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), **_COMMON)


FAMILIES = {
    "llama": _llama,
    "llama_tied": _llama_tied,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "gpt_neox_sequential": _gpt_neox_sequential,
    "gemma3_text": _gemma3_text,
    "mistral": _mistral,
    "phi3": _phi3,
    "phi3_longrope": _phi3_longrope,
    "olmo2": _olmo2,
    "qwen2": _qwen2,
}

# Configurations at the edges that the families above do not reach, for the tests that ask for them
# by name (kept out of FAMILIES, over which most tests run).
EDGE_CASES = {
    "qwen3_sliding": _qwen3_sliding,
    "llama_mqa": _llama_mqa,
    "mistral_no_gqa": _mistral_no_gqa,
}

# ---------------------------------------------------------------------------
# Random checkpoints
# ---------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter with seeded random values (in place).

    * matrices (and embeddings): N(0, 1/fan_in), so activations stay O(1);
    * norm weights: HF initialises them to their neutral value, 1 for ``x * w``
      norms and 0 for Gemma's ``x * (1 + w)``; we keep that centre and add
      N(0, 0.1^2), so a dropped weight or a wrong ``1 + w`` cannot hide;
    * biases (HF initialises them to 0): N(0, 0.1^2).
    """
    gen = torch.Generator().manual_seed(seed)
    for mod_name, module in sorted(model.named_modules()):
        is_norm = "Norm" in type(module).__name__
        for name, p in sorted(module.named_parameters(recurse=False)):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.ndim >= 2:
                value = noise / p.shape[-1] ** 0.5
            elif is_norm:
                centre = p.flatten()[0].item()
                assert centre in (0.0, 1.0) and torch.all(p == centre), f"{mod_name}.{name}: unexpected init"
                value = centre + 0.1 * noise
            else:
                assert name == "bias", f"{mod_name}.{name}: unexpected 1-D parameter"
                value = 0.1 * noise
            p.copy_(value)


def save_tiny_checkpoint(case: str, directory, seed: int = 0, dtype: torch.dtype = torch.float32,
                         max_shard_size: str | int | None = None) -> None:
    """Build the tiny ``case`` model, randomise it and ``save_pretrained`` it.

    ``max_shard_size`` (e.g. ``"20KB"``) yields a sharded checkpoint with
    ``model.safetensors.index.json``.
    """
    model = AutoModelForCausalLM.from_config({**FAMILIES, **EDGE_CASES}[case](), dtype=torch.float32)
    randomize_(model, seed)
    model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(Path(directory), safe_serialization=True, **kwargs)


# ---------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------


class _Float32RequestsToFloat64(TorchFunctionMode):
    """Turn every explicit float32 request in Python code into float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:  # x.float()
            func = torch.Tensor.double
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_everywhere():
    """Scoped patch: float64 default dtype and no float32 casts; restored on exit."""
    old_default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _Float32RequestsToFloat64():
            yield
    finally:
        torch.set_default_dtype(old_default)


class _LowPrecisionDetector(TorchDispatchMode):
    """Record every aten op whose inputs or outputs include a non-float64 float tensor."""

    def __init__(self):
        super().__init__()
        self.offenders: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.offenders.append(f"{func}: {t.dtype} {tuple(t.shape)}")
        return out


def _check_buffers(model: torch.nn.Module) -> None:
    """Parameters/buffers are float64, and non-integer buffers (``inv_freq``,
    ``embed_scale``...) were computed in float64: not exactly float32-representable."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            assert t.dtype == torch.float64, f"{name} is {t.dtype}"
    for name, b in model.named_buffers():
        if b.is_floating_point() and not torch.all(b == b.round()):
            assert torch.any(b != b.float().double()), f"buffer {name} was computed in float32"


def load_hf_float64(directory) -> torch.nn.Module:
    """The HF model of a checkpoint, loaded in float64 under ``float64_everywhere``."""
    with float64_everywhere():
        model = AutoModelForCausalLM.from_pretrained(
            Path(directory), dtype=torch.float64, attn_implementation="eager")
    model.eval()
    _check_buffers(model)
    return model


@torch.no_grad()
def hf_float64_logits(directory, ids: list[int], *, check: bool = True) -> torch.Tensor:
    """Reference logits, shape (len(ids), vocab), float64, all-float64 computation.

    With ``check`` (default) raises if any low-precision tensor took part.
    """
    model = load_hf_float64(directory)
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    detector = _LowPrecisionDetector()
    with float64_everywhere(), detector:
        logits = model(input_ids=input_ids, use_cache=False).logits[0]
    if check and detector.offenders:
        raise AssertionError("low-precision tensors in the float64 reference:\n  "
                             + "\n  ".join(sorted(set(detector.offenders))))
    assert logits.dtype == torch.float64
    return logits


def assert_no_low_precision(directory, ids: list[int]) -> None:
    """Raise if the float64 reference touches any float32/16 tensor."""
    hf_float64_logits(directory, ids, check=True)


@torch.no_grad()
def hf_float32_logits(directory, ids: list[int]) -> torch.Tensor:
    """Plain, unpatched transformers in float32 (for loose sanity comparisons)."""
    model = AutoModelForCausalLM.from_pretrained(
        Path(directory), dtype=torch.float32, attn_implementation="eager").eval()
    return model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0]


def check_reference(directory, ids: list[int], rtol: float = 1e-4) -> torch.Tensor:
    """All self-checks of the oracle; returns the float64 logits.

    The patch must not change semantics: patched float64 logits agree with
    stock float32 HF to ``rtol`` (relative to the largest logit).
    """
    ref = hf_float64_logits(directory, ids, check=True)
    f32 = hf_float32_logits(directory, ids).double()
    err = ((ref - f32).abs().max() / ref.abs().max()).item()
    assert err < rtol, f"float64 reference vs float32 HF: relative error {err:.2e}"
    return ref
