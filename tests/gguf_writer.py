"""Test-only GGUF writer: a random Hugging Face model written the way llama.cpp's converter writes it.

`write_gguf` takes a transformers model (random weights), stores every matrix in the chosen
GGUF type and writes the file with gguf-py's GGUFWriter, doing what convert_hf_to_gguf.py does:
q/k rows permuted for the `llama` architecture, Gemma's norm weights with 1 added, no
`output.weight` when the embeddings are tied, the metadata under llama.cpp's keys.

It also returns the *reference*: the same model with every weight replaced by its dequantized
value, in Hugging Face layout, computed without the permutation (quantization works on rows, so
permuting rows commutes with it) and without minielm's code. Loading the file with minielm must
give this model's logits.
"""

from __future__ import annotations

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as Q

K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf-py cannot quantize these: their blocks are written directly
# where each K block keeps its float16 super-block scales d (and dmin): byte offsets
K_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def stored(weight: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """The rows of a float32 (out, in) matrix as the file stores them in `qtype` (F64: float64 as given)."""
    if qtype == Q.F64:  # gguf-py neither quantizes nor dequantizes it: the doubles themselves
        return weight.astype(np.float64)
    if qtype not in K_TYPES:
        return gguf.quants.quantize(weight, qtype)
    # random K blocks, their scales set so that the dequantized rows have about the matrix's spread
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = weight.shape
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[qtype]:
        data[:, :, offset:offset + 2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    unit = gguf.quants.dequantize(data.reshape(rows, -1), qtype).std()
    scale = rng.uniform(0.5, 1.5, size=(rows, cols // block)).astype(np.float16) * np.float16(weight.std() / unit)
    for offset in K_SCALE_OFFSETS[qtype]:
        data[:, :, offset:offset + 2] = scale[..., None].view(np.uint8)
    return data.reshape(rows, -1)


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, on stored rows (of values or of block bytes)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_gguf(model, path, arch: str, qtype, seed: int = 0, metadata=None, extra_tensors=None) -> dict:
    """Write `model` (a transformers CausalLM) to `path` as GGUF; return the reference state dict (float64).
    `metadata` {key: (value, GGUFValueType)} and `extra_tensors` {name: array} are written besides."""
    config = model.config
    rng = np.random.default_rng(seed)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, config, arch, metadata or {})
    reference = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{names.get_name(module)}.{suffix}"
        value = tensor.detach().to(torch.float64 if qtype == Q.F64 else torch.float32).numpy()
        conv1d = arch == "gpt2" and value.ndim == 2 and module.endswith(("c_attn", "c_proj", "c_fc"))
        if conv1d:  # GPT2Model.modify_tensors: Conv1D (in, out) stored as (out, in)
            value = np.ascontiguousarray(value.T)
        if arch == "gptneox" and module.endswith("query_key_value"):  # GPTNeoXModel.modify_tensors: q, k, v rows
            heads = config.num_attention_heads
            value = np.ascontiguousarray(value.reshape(heads, 3, -1, *value.shape[1:]).swapaxes(0, 1)
                                         .reshape(value.shape))
            if value.ndim == 1:  # the bias, as the converter writes it; its reference in HF's interleaved order
                reference[hf_name] = tensor.detach().double()
                writer.add_tensor(gguf_name, value)
                continue
        if value.ndim == 1:  # norms and biases: F32, as the converter keeps 1-D tensors (F64 in an F64 file)
            if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
                value = value + np.float32(1.0)  # the converter's norm_shift, in float32
                reference[hf_name] = torch.from_numpy(value).double() - 1.0
            else:
                reference[hf_name] = torch.from_numpy(value).double()
            writer.add_tensor(gguf_name, value)
            continue
        data = stored(value, qtype, rng)
        values = data if qtype == Q.F64 else gguf.quants.dequantize(data, qtype)
        reference[hf_name] = torch.from_numpy(values).double().reshape(value.shape)
        if conv1d:
            reference[hf_name] = reference[hf_name].T.contiguous()
        if arch == "gptneox" and module.endswith("query_key_value"):  # back to HF's per-head order
            heads = config.num_attention_heads
            reference[hf_name] = reference[hf_name].reshape(3, heads, -1, value.shape[1]).transpose(0, 1) \
                .reshape(value.shape).contiguous()
        if arch == "gpt2" and gguf_name == "token_embd.weight":  # the converter copies it as the output too
            writer.add_tensor("output.weight", data, raw_dtype=qtype)
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            data = permute(data, heads)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    if config.tie_word_embeddings:
        embedding = next(k for k in reference if k.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight")))
        reference["lm_head.weight"] = reference[embedding]
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, config.head_dim))
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def _write_metadata(writer, config, arch: str, extra: dict) -> None:
    """The hyperparameters under llama.cpp's keys, as convert_hf_to_gguf.py writes them."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if arch in ("gpt2", "gptneox"):  # LayerNorm
        writer.add_layer_norm_eps(config.layer_norm_epsilon if arch == "gpt2" else config.layer_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "gptneox":
        writer.add_parallel_residual(config.use_parallel_residual)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch != "gpt2":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": 10000.0}  # GPT-2: no RoPE
    full = rope.get("full_attention", rope)
    writer.add_rope_freq_base(full["rope_theta"])
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    partial = full.get("partial_rotary_factor")
    if partial:
        writer.add_rope_dimension_count(int(head_dim * partial))
    if getattr(config, "sliding_window", None) and arch in ("gemma2", "gemma3", "llama"):
        writer.add_sliding_window(config.sliding_window)
    if getattr(config, "attn_logit_softcapping", None) and arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    for key, value in extra.items():
        writer.add_key_value(key, value[0], value[1])


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: Llama 3's per-frequency divisors, float32."""
    import math

    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
