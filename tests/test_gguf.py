"""GGUF files: every convention of llama.cpp's converter undone, every tensor type dequantized.

Each test writes a random transformers model as GGUF the way convert_hf_to_gguf.py does (permuted
q/k rows for `llama`, Gemma's norms with 1 added, tied embeddings without output.weight), and
compares minielm's logits from the file with Hugging Face's (float64, casts removed) on the
reference: the same model with every weight replaced by its dequantized value, built in HF layout
without minielm's code (tests/gguf_writer.py). The real Gemma 3 270M file is in test_gguf_gemma3.py.
"""

import numpy as np
import pytest
import torch
import gguf
from gguf import GGMLQuantizationType as Q
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Olmo2Config,
                          Phi3Config, Qwen2Config, Qwen3Config)

from conftest import PROMPT
from gguf_writer import permute, write_gguf
from hf_reference import hf_float64_logits, randomize_

import minielm
from minielm.gguf import unpermute_rows

EPS = 2.0**-20  # exact in float32, as GGUF stores it
COMMON = dict(vocab_size=128, rms_norm_eps=EPS, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0)

# (transformers config, GGUF architecture): what a GGUF file can express of each family
FAMILIES = {
    # d = 256 so that the K types' 256-wide super-blocks fit the rows
    "llama": (lambda: LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=DEFAULT_ROPE,
                                  **COMMON), "llama"),
    "mistral": (lambda: MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, sliding_window=5, tie_word_embeddings=False,
                                      rope_parameters=DEFAULT_ROPE, **COMMON), "llama"),
    "qwen3": (lambda: Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **COMMON), "qwen3"),
    "gemma3": (lambda: Gemma3TextConfig(  # six layers: llama.cpp's fixed pattern makes the sixth global
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4, final_logit_softcapping=10.0,
        tie_word_embeddings=True,
        rope_parameters={"sliding_attention": DEFAULT_ROPE,
                         "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0)},
        **COMMON), "gemma3"),
    "qwen2": (lambda: Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=False,
                                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **COMMON), "qwen2"),
    "olmo2": (lambda: Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=False,
                                  rope_parameters=dict(rope_type="default", rope_theta=500000.0), **COMMON), "olmo2"),
    "phi3": (lambda: Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, tie_word_embeddings=False,
                                rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                     partial_rotary_factor=0.5), **COMMON), "phi3"),
}


def gguf_and_reference(family, qtype, directory, seed=0):
    """Write the family's random model as GGUF in `qtype`; return (the .gguf path, HF float64 reference logits)."""
    make_config, arch = FAMILIES[family]
    model = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
    randomize_(model, seed)
    path = directory / f"{family}-{qtype.name}.gguf"
    reference = write_gguf(model, path, arch, qtype, seed)
    model = model.to(torch.float64)
    model.load_state_dict(reference)
    model.save_pretrained(directory / "reference")
    return path, hf_float64_logits(directory / "reference", PROMPT)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_llama_every_type_matches_hf(qtype, tmp_path):
    """Every matrix in `qtype`, q/k rows permuted as the converter does: logits as HF on the dequantized weights."""
    path, expected = gguf_and_reference("llama", qtype, tmp_path)
    model = minielm.load(path)
    err = relative_error(model.logits(PROMPT), expected)
    print(f"llama {qtype.name}: logits vs HF {err:.1e}")
    assert err <= 1e-12


FAMILY_TYPES = {"mistral": Q.Q5_0, "qwen3": Q.Q8_0, "gemma3": Q.Q4_0, "qwen2": Q.Q5_1, "olmo2": Q.Q4_1,
                "phi3": Q.Q8_0}


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_family_matches_hf(family, tmp_path):
    path, expected = gguf_and_reference(family, FAMILY_TYPES[family], tmp_path)
    model = minielm.load(path)
    err = relative_error(model.logits(PROMPT), expected)
    print(f"{family} {FAMILY_TYPES[family].name}: logits vs HF {err:.1e}")
    assert err <= 1e-12
    assert minielm.equivalent_linear_map(model, PROMPT).relative_error() < 1e-13


def test_config_from_metadata(tmp_path):
    """What the metadata says (and llama.cpp's Gemma 3 built-ins) arrives in the Config."""
    path, _ = gguf_and_reference("gemma3", Q.Q8_0, tmp_path)
    config = minielm.load(path).config
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.sliding_window == 4 and config.query_pre_attn_scalar == 16
    assert config.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert config.rope_parameters["full_attention"]["factor"] == 8.0
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert config.final_logit_softcapping == 10.0 and config.tie_word_embeddings


def test_streamed_equals_loaded(tmp_path):
    path, _ = gguf_and_reference("llama", Q.Q4_K, tmp_path)
    loaded, streamed = minielm.load(path), minielm.load(path, stream=True)
    assert torch.equal(loaded.logits(PROMPT), streamed.logits(PROMPT))
    assert torch.equal(minielm.equivalent_linear_map(loaded, PROMPT).operators,
                       minielm.equivalent_linear_map(streamed, PROMPT).operators)


def test_unpermute_inverts_the_converters_permute():
    rows = torch.arange(4 * 16 * 3, dtype=torch.float32).reshape(4 * 16, 3)
    permuted = torch.from_numpy(permute(rows.numpy(), 4))
    assert not torch.equal(permuted, rows)
    assert torch.equal(unpermute_rows(permuted, 4), rows)


def test_not_gguf_is_one_line_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(minielm.CheckpointError, match="not a readable GGUF file"):
        minielm.load(bad)
