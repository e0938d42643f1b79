"""The model families minielm reads, as data: one `Family` entry per decoder, keyed by config.json's `model_type`.

Everything that differs between Llama, Mistral, Qwen 2 and 3, Gemma 2 and 3, Phi-3, OLMo 2, GPT-2
and GPT-NeoX (Pythia) is stated here and nowhere else: the tensors a layer holds, where they are and
what minielm calls them, which norms sit where, the MLP's and the positions' kind, how the
embeddings are scaled, which biases exist, the defaults and key spellings of the family's config.json, how its layers' attention types follow from that file, and what llama.cpp
did to it on the way into a GGUF file. `config.py`, `checkpoint.py` and `gguf.py` read these
fields; no module compares a model_type with a family's name (tests/test_families.py checks).

Adding a family whose operations minielm already has (an RMSNorm, with or without an offset; q/k
norms; a gated MLP with an activation in ACTIVATIONS; RoPE) is one new entry in FAMILIES plus its
tests: a tiny Hugging Face config in tests/hf_reference.py (test_families.py asks for one), and a
case in tests/test_gguf.py if it names a GGUF architecture. A family that needs an operation
minielm does not have needs model.py too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The MLP activations φ, by config.json's hidden_act: the one list of those minielm supports.
ACTIVATIONS = {
    "silu": F.silu,  # φ(g) = g·σ(g)
    "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh"),  # φ(g) = g·Φ̃(g), tanh approximation
    "gelu_new": lambda g: F.gelu(g, approximate="tanh"),  # GPT-2's name for the same
    "gelu": F.gelu,  # φ(g) = g·Φ(g), Φ the normal distribution function
}


def tanh_gelu_factor(z):
    """s(z) = ½(1 + tanh(√(2/π)(z + 0.044715 z³))): the tanh GELU is z·s(z)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z * z * z)))


def gelu_factor(z):
    """s(z) = Φ(z) = ½(1 + erf(z/√2)): the exact GELU is z·s(z)."""
    return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))


# A plain (not gated) MLP computes φ(z) = z·s(z): s(z) is its frozen factor, the role the gate plays
# in a gated MLP (and no division by z is ever needed). By hidden_act, for the activations that have one.
ACTIVATION_FACTORS = {"gelu_pytorch_tanh": tanh_gelu_factor, "gelu_new": tanh_gelu_factor, "gelu": gelu_factor}


# ---- Hugging Face's per-layer tensor names ---------------------------------------------
# Hugging Face name (below "model.layers.{i}.") -> minielm's short name (see checkpoint.expected_shapes):
#   attn_norm, attn_post_norm, mlp_norm, mlp_post_norm  (RMSNorm weights)
#   wq, wk, wv, wo, bq, bk, bv, bo  (attention projections and their biases)
#   q_norm, k_norm  (RMSNorm weights on queries and keys)
#   w_gate, w_up, w_down  (the gated MLP)
# A fused tensor maps to a tuple of short names, and is split by rows in that order.
LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",  # Llama's name for the norm before the MLP
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
QK_NORMS = {"self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm"}
# The biases, present where a config asks for them (Config.qkv_bias, Config.o_bias).
QKV_BIASES = {"self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv"}
O_BIAS = {"self_attn.o_proj.bias": "bo"}


# ---- what a family is ---------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFConventions:
    """How a family is stored in a GGUF file: its architecture name, and what llama.cpp's converter
    (convert_hf_to_gguf.py) changed or left out that a reader must undo or supply.

    One convention holds for every family and is not a field: llama.cpp's RMSNorm multiplies by
    the stored weight, so a family with a norm offset (Gemma's 1 + w) is stored with the offset
    added, and the reader subtracts `Family.norm_offset` again.
    """

    architecture: str  # general.architecture
    qk_rows_permuted: bool = False  # q/k rows reordered for llama.cpp's interleaved RoPE (llama)
    sliding_window_model_type: str | None = None  # a file with a sliding window is this model_type
    sliding_window_unused: bool = False  # the file carries a sliding_window that the model does not use
    # llama.cpp's built-ins (llama-model.cpp), which the metadata may not state:
    sliding_window_pattern: int | None = None  # every n-th layer is global, unless the file lists one flag a layer
    rope_local_base_freq: float | None = None  # the sliding layers' RoPE base
    query_pre_attn_scalar: Callable[[dict], float] | None = None  # from the config.json dict read so far
    # the SentencePiece tokenizer (tokenizer.ggml.model "llama"), where it differs from Llama 2's:
    whitespace_tokens_spelled_with_spaces: bool = False  # not with "▁", as in the vocabulary proper
    merges_ranked_by_position: bool = False  # not by the file's scores
    no_space_prefix: bool = False  # no "▁" before the text, whatever tokenizer.ggml.add_space_prefix says
    space_prefix_before_every_stretch: bool = False  # "▁" before each stretch of text, even after a special token


@dataclass(frozen=True)
class Family:
    """One decoder family: what its checkpoints hold and how its layers compute.

    The operation fields name what model.py implements: norm "rms" or "layer", mlp "gated" or
    "plain", position "rope" or "learned", hidden_act one of ACTIVATIONS (a plain MLP's also in
    ACTIVATION_FACTORS), qk_norm None, "head" or "full".
    """

    model_type: str  # config.json's model_type
    layer_tensors: dict  # Hugging Face per-layer tensor name -> short name(s), as above
    # -- where the tensors are, and how they are laid out
    prefixes: tuple = ("model.", "model.language_model.", "language_model.model.")  # the decoder's, tried in order
    layers_name: str = "layers"  # "{prefix}{layers_name}.{i}." before each layer's tensors
    top_tensors: dict = field(default_factory=lambda: {"embed_tokens.weight": "embed", "norm.weight": "final_norm"})
    unembedding: str = "lm_head.weight"  # outside the prefix; absent when tied
    conv1d: bool = False  # layer matrices stored (in, out), GPT-2's Conv1D: transposed on reading
    fused_per_head: bool = False  # a fused q/k/v interleaved per head (H, 3, hd), GPT-NeoX's, not stacked
    ignored_suffixes: tuple = ()  # buffers that old checkpoints saved (causal masks), not weights
    # -- the decoder's operations
    norm: str = "rms"  # "rms": RMSNorm; "layer": LayerNorm, with a bias
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): Gemma stores w - 1
    scale_embeddings: bool = False  # embedding rows multiplied by sqrt(hidden_size) (Gemma)
    qk_norm: str | None = None  # RMSNorm on queries and keys: per "head", or over the "full" projection
    pre_norms: bool = True  # a norm before each sublayer
    post_norms: bool = False  # a norm on each sublayer's output, before the residual add
    mlp: str = "gated"  # "gated": W_D (φ(W_G u) ⊙ W_U u); "plain": W_out φ(W_in u + b_in) + b_out
    hidden_act: str = "silu"  # the activation when config.json names none
    position: str = "rope"  # "rope", or "learned": a position embedding row added to each input vector
    mlp_bias: bool = False  # the MLP's projections have biases (a plain MLP's always do)
    attn_logit_softcapping: bool = False  # scores soft-capped, cap·tanh(s/cap), as config.json's key says (Gemma 2)
    qkv_bias: bool | None = None  # q, k, v biases: always (True), never (False), or None: as attention_bias says
    o_bias: bool | None = None  # the output projection's bias, likewise
    # -- reading config.json
    config_defaults: dict = field(default_factory=dict)  # for keys the file leaves out or sets to null
    key_aliases: dict = field(default_factory=dict)  # the family's spelling of a key -> minielm's (Config's) name
    # Which key decides the sliding-window layers when the file lists no layer_types:
    #   None: none slide.  "sliding_window": all slide when it is set.
    #   "sliding_window_pattern": every pattern-th layer is global, the others slide.
    #   "use_sliding_window": only when it is true, the layers from max_window_layers on slide; and
    #                         the file's own layer_types are read only then too.
    sliding_layers: str | None = None
    intermediate_size_factor: int | None = None  # intermediate_size left out or null: this × hidden_size
    parallel_residual_default: bool = False  # use_parallel_residual when config.json leaves it out
    multimodal_model_type: str | None = None  # an image-text checkpoint whose text_config holds this decoder
    # -- reading GGUF
    gguf: GGUFConventions | None = None


def llama_cpp_gemma3_query_scalar(raw: dict) -> int:
    """llama.cpp's Gemma 3 scales the scores by key_length^-1/2, except for the 27B (62 layers),
    by (hidden_size / heads)^-1/2, as the 27B's own config.json (query_pre_attn_scalar 168) says."""
    if raw["num_hidden_layers"] == 62:
        return raw["hidden_size"] // raw["num_attention_heads"]
    return raw["head_dim"]


def llama_cpp_gemma2_query_scalar(raw: dict) -> int:
    """llama.cpp's Gemma 2 scales the scores by key_length^-1/2, except for the 27B (46 layers), by
    (hidden_size / heads)^-1/2, as the 27B's own config.json (query_pre_attn_scalar 144) says."""
    if raw["num_hidden_layers"] == 46:
        return raw["hidden_size"] // raw["num_attention_heads"]
    return raw["head_dim"]


LLAMA = Family(
    "llama", LLAMA_LAYER,
    gguf=GGUFConventions("llama", qk_rows_permuted=True, sliding_window_model_type="mistral"))

MISTRAL = Family(  # in GGUF, a llama with a sliding window (LLAMA's gguf.sliding_window_model_type)
    "mistral", LLAMA_LAYER, sliding_layers="sliding_window")

QWEN2 = Family(
    "qwen2", LLAMA_LAYER, qkv_bias=True, o_bias=False, sliding_layers="use_sliding_window",
    gguf=GGUFConventions("qwen2", sliding_window_unused=True))

QWEN3 = Family(
    "qwen3", {**LLAMA_LAYER, **QK_NORMS}, qk_norm="head", sliding_layers="use_sliding_window",
    gguf=GGUFConventions("qwen3", sliding_window_unused=True))

GEMMA_NORMS = {  # four norms a layer: before and after each sublayer
    "post_attention_layernorm.weight": "attn_post_norm",  # Gemma's name for the norm after attention
    "pre_feedforward_layernorm.weight": "mlp_norm",
    "post_feedforward_layernorm.weight": "mlp_post_norm",
}
GEMMA_TOKENIZER = dict(  # as transformers' GGUF converter and Gemma's own tokenizer.json have them
    whitespace_tokens_spelled_with_spaces=True, merges_ranked_by_position=True, no_space_prefix=True)

GEMMA2 = Family(
    "gemma2", {**LLAMA_LAYER, **GEMMA_NORMS},
    norm_offset=1.0, scale_embeddings=True, post_norms=True, hidden_act="gelu_pytorch_tanh",
    attn_logit_softcapping=True,
    config_defaults=dict(  # transformers' Gemma2Config defaults that real config.json files omit
        vocab_size=256000, head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000.0, query_pre_attn_scalar=256,
        sliding_window=4096, sliding_window_pattern=2, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=2, eos_token_id=1),
    key_aliases={"hidden_activation": "hidden_act"},
    sliding_layers="sliding_window_pattern",  # every other layer slides, the first one included
    gguf=GGUFConventions(
        "gemma2", sliding_window_pattern=2, query_pre_attn_scalar=llama_cpp_gemma2_query_scalar, **GEMMA_TOKENIZER))

GEMMA3_TEXT = Family(
    "gemma3_text",
    {**LLAMA_LAYER, **QK_NORMS, **GEMMA_NORMS},
    norm_offset=1.0, scale_embeddings=True, qk_norm="head", post_norms=True, hidden_act="gelu_pytorch_tanh",
    config_defaults=dict(  # transformers' Gemma3TextConfig defaults that real config.json files omit
        vocab_size=262208, head_dim=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6, tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=2, eos_token_id=1),
    key_aliases={"hidden_activation": "hidden_act"},
    sliding_layers="sliding_window_pattern",
    multimodal_model_type="gemma3",
    gguf=GGUFConventions(
        "gemma3", sliding_window_pattern=6, rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=llama_cpp_gemma3_query_scalar, **GEMMA_TOKENIZER))

PHI3 = Family(
    "phi3",
    {  # fused projections, split by rows in this order
        "input_layernorm.weight": "attn_norm",
        "self_attn.qkv_proj.weight": ("wq", "wk", "wv"),
        "self_attn.o_proj.weight": "wo",
        "post_attention_layernorm.weight": "mlp_norm",
        "mlp.gate_up_proj.weight": ("w_gate", "w_up"),
        "mlp.down_proj.weight": "w_down",
    },
    sliding_layers="sliding_window",
    gguf=GGUFConventions("phi3", space_prefix_before_every_stretch=True))

OLMO2 = Family(
    "olmo2",
    {  # norms only after each sublayer
        **{k: v for k, v in LLAMA_LAYER.items() if "layernorm" not in k}, **QK_NORMS,
        "post_attention_layernorm.weight": "attn_post_norm",
        "post_feedforward_layernorm.weight": "mlp_post_norm",
    },
    qk_norm="full", pre_norms=False, post_norms=True,
    gguf=GGUFConventions("olmo2"))


GPT2 = Family(
    "gpt2",
    {  # Conv1D matrices, stored (in, out); c_attn holds q, k and v side by side
        "ln_1.weight": "attn_norm", "ln_1.bias": "attn_norm_bias",
        "attn.c_attn.weight": ("wq", "wk", "wv"), "attn.c_attn.bias": ("bq", "bk", "bv"),
        "attn.c_proj.weight": "wo", "attn.c_proj.bias": "bo",
        "ln_2.weight": "mlp_norm", "ln_2.bias": "mlp_norm_bias",
        "mlp.c_fc.weight": "w_up", "mlp.c_fc.bias": "b_up",
        "mlp.c_proj.weight": "w_down", "mlp.c_proj.bias": "b_down",
    },
    prefixes=("transformer.", ""),  # the original checkpoints have no prefix
    layers_name="h",
    top_tensors={"wte.weight": "embed", "wpe.weight": "positions", "ln_f.weight": "final_norm",
                 "ln_f.bias": "final_norm_bias"},
    conv1d=True, ignored_suffixes=(".attn.bias", ".attn.masked_bias"),
    norm="layer", mlp="plain", hidden_act="gelu_new", position="learned", mlp_bias=True, qkv_bias=True, o_bias=True,
    config_defaults=dict(  # transformers' GPT2Config defaults
        vocab_size=50257, max_position_embeddings=1024, layer_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=50256, eos_token_id=50256),
    key_aliases={"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                 "n_inner": "intermediate_size", "n_positions": "max_position_embeddings",
                 "activation_function": "hidden_act", "layer_norm_epsilon": "layer_norm_eps"},
    intermediate_size_factor=4,
    gguf=GGUFConventions("gpt2"))  # the converter transposed the Conv1D matrices, and copied wte to output

GPT_NEOX = Family(
    "gpt_neox",
    {  # query_key_value holds, for each head in turn, its q, k and v rows
        "input_layernorm.weight": "attn_norm", "input_layernorm.bias": "attn_norm_bias",
        "attention.query_key_value.weight": ("wq", "wk", "wv"), "attention.query_key_value.bias": ("bq", "bk", "bv"),
        "attention.dense.weight": "wo", "attention.dense.bias": "bo",
        "post_attention_layernorm.weight": "mlp_norm", "post_attention_layernorm.bias": "mlp_norm_bias",
        "mlp.dense_h_to_4h.weight": "w_up", "mlp.dense_h_to_4h.bias": "b_up",
        "mlp.dense_4h_to_h.weight": "w_down", "mlp.dense_4h_to_h.bias": "b_down",
    },
    prefixes=("gpt_neox.",),
    top_tensors={"embed_in.weight": "embed", "final_layer_norm.weight": "final_norm",
                 "final_layer_norm.bias": "final_norm_bias"},
    unembedding="embed_out.weight",
    fused_per_head=True, ignored_suffixes=(".attention.bias", ".attention.masked_bias"),
    norm="layer", mlp="plain", hidden_act="gelu", mlp_bias=True,
    config_defaults=dict(  # transformers' GPTNeoXConfig defaults
        layer_norm_eps=1e-5, attention_bias=True, partial_rotary_factor=0.25, rope_theta=10_000.0,
        tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=0, eos_token_id=2),
    key_aliases={"rotary_pct": "partial_rotary_factor", "rotary_emb_base": "rope_theta"},
    parallel_residual_default=True,
    gguf=GGUFConventions("gptneox"))  # the converter regrouped query_key_value as all q, all k, all v rows


def by_model_type(*families: Family) -> dict:
    """model_type -> Family, each family under its own model_type and, after it, its multimodal one's."""
    table = {}
    for family in families:
        table[family.model_type] = family
        if family.multimodal_model_type is not None:
            table[family.multimodal_model_type] = family
    return table


FAMILIES = by_model_type(LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3_TEXT, PHI3, OLMO2, GPT2, GPT_NEOX)
# GGUF general.architecture -> the Family stored under it
GGUF_ARCHITECTURES = {f.gguf.architecture: f for f in FAMILIES.values() if f.gguf is not None}
