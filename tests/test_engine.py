"""The engine against Hugging Face: float64 logits of every family to relative 1e-12."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import DEVICES, PROMPT
from hf_reference import FAMILIES, float64_everywhere, hf_float64_logits, load_hf_float64, save_tiny_checkpoint

import minielm


def relative(a, b):
    return float((a.cpu() - b.cpu()).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(FAMILIES))
@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_hugging_face(case, device, checkpoints, references):
    model = minielm.load(checkpoints[case], dtype=torch.float64, device=device)
    logits = model.logits(PROMPT)
    assert logits.shape == (len(PROMPT), model.config.vocab_size)
    assert logits.dtype == torch.float64 and logits.device.type == device
    assert relative(logits, references[case]) < 1e-12


def test_sharded_bf16_checkpoint(tmp_path):
    """A sharded bf16 checkpoint (with the index file) loads and is cast to float64 exactly."""
    save_tiny_checkpoint("qwen3", tmp_path, seed=3, dtype=torch.bfloat16, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = minielm.load(tmp_path)
    assert relative(model.logits(PROMPT), hf_float64_logits(tmp_path, PROMPT)) < 1e-12


def test_float32_compute_dtype(checkpoints, references):
    model = minielm.load(checkpoints["llama"], dtype="float32")
    logits = model.logits(PROMPT)
    assert logits.dtype == torch.float32
    assert relative(logits.double(), references["llama"]) < 1e-5


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "mistral"])
def test_kv_cache_matches_full_forward(case, checkpoints):
    """Feeding the prompt in pieces through the cache gives the same logits as one pass."""
    model = minielm.load(checkpoints[case])
    full = model.logits(PROMPT)
    cache = minielm.model.KVCache(model.config.num_hidden_layers)
    pieces = [PROMPT[:7], PROMPT[7:8], PROMPT[8:]]
    outs = [model.unembed(model.forward(model.embed(p), cache=cache)[0]) for p in pieces]
    assert relative(torch.cat(outs), full) < 1e-13


@pytest.mark.parametrize("case", ["gemma3_text", "phi3_longrope"])
def test_greedy_generation_follows_argmax(case, checkpoints):
    """Each greedy token is the argmax of a full (uncached) forward over the sequence so far: across
    the sliding window, and across longrope's switch to the long factors (at 8 tokens), where the
    cached keys go stale."""
    model = minielm.load(checkpoints[case])
    new = model.generate_ids(PROMPT[:5], max_new_tokens=12)
    sequence = PROMPT[:5]
    for token in new:
        assert token == int(model.logits(sequence)[-1].argmax())
        sequence = sequence + [token]


@pytest.mark.parametrize("case", list(FAMILIES))
def test_greedy_generation_matches_hugging_face(case, checkpoints):
    """Greedy tokens equal transformers' cached greedy `generate` in float64, from a short prompt and
    from one past the windows: the cache crosses the sliding windows (4, 5) and longrope's original
    context (8) on the way, and stops at the same EOS.

    Longrope is compared with transformers' generate without a cache, every step a full forward pass:
    where the sequence crosses the original context, Phi-3 drops its cache and recomputes, and
    transformers 5.17 (the GPU machine's) then ran the last token alone; 5.23 runs them all."""
    model, hf = minielm.load(checkpoints[case]), load_hf_float64(checkpoints[case])
    for prompt in (PROMPT[:3], PROMPT):
        new = model.generate_ids(prompt, max_new_tokens=20)
        with float64_everywhere(), torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                              use_cache=case != "phi3_longrope", pad_token_id=0)
        assert new == out[0, len(prompt):].tolist(), prompt


def test_generation_stops_at_generation_config_eos(tmp_path, checkpoints):
    """An instruct model lists its end of turn in generation_config.json only (Gemma 3: config.json says
    <eos>, generation_config.json [<eos>, <end_of_turn>]): generation stops there, as transformers' does."""
    shutil.copytree(checkpoints["llama"], tmp_path / "llama")
    free = minielm.load(tmp_path / "llama").generate_ids(PROMPT[:3], 20)
    stop = [free[9], free[5]]
    (tmp_path / "llama" / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    new = minielm.load(tmp_path / "llama").generate_ids(PROMPT[:3], 20)
    hf = load_hf_float64(tmp_path / "llama")
    with float64_everywhere(), torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT[:3]]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert len(new) < 20 and new[-1] in stop and new == out[0, 3:].tolist()


def test_a_bad_generation_config_is_named(tmp_path, checkpoints):
    shutil.copytree(checkpoints["llama"], tmp_path / "llama")
    (tmp_path / "llama" / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(minielm.errors.ConfigError, match="generation_config.json: eos_token_id must be"):
        minielm.load(tmp_path / "llama")


def test_sampling_is_seeded(checkpoints):
    model = minielm.load(checkpoints["llama"])
    a = model.generate_ids(PROMPT[:3], 15, temperature=1.0, top_k=20, seed=7)
    b = model.generate_ids(PROMPT[:3], 15, temperature=1.0, top_k=20, seed=7)
    c = model.generate_ids(PROMPT[:3], 15, temperature=1.0, top_k=20, seed=8)
    assert a == b and a != c
    top1 = model.generate_ids(PROMPT[:3], 8, temperature=1.0, top_k=1, seed=7)
    assert top1 == model.generate_ids(PROMPT[:3], 8)  # top-1 sampling is greedy


def test_unseeded_sampling_draws_afresh(checkpoints):
    """Without a seed each call samples anew from torch's global generator (not from one fixed seed,
    which gave the same "sample" on every call); torch.manual_seed makes it reproducible."""
    model = minielm.load(checkpoints["llama"])
    torch.manual_seed(0)
    a = model.generate_ids(PROMPT[:3], 15, temperature=1.0)
    b = model.generate_ids(PROMPT[:3], 15, temperature=1.0)
    torch.manual_seed(0)
    assert a != b and model.generate_ids(PROMPT[:3], 15, temperature=1.0) == a


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_temperature_is_greedy_in_low_precision(dtype, checkpoints):
    """A temperature that rounds to 0 in the compute dtype (1e-50 in float32) is the greedy limit, not
    0 / 0 = nan at the largest logit and a crash in torch.multinomial."""
    model = minielm.load(checkpoints["llama"], dtype=dtype)
    greedy = model.generate_ids(PROMPT[:3], 8)
    assert model.generate_ids(PROMPT[:3], 8, temperature=1e-50, seed=0) == greedy


def closed_form_rotary(theta: float, dim: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Default RoPE's cos and sin tables (T, dim) in numpy float64, rotate_half layout: the angle of
    position p in pair i (and i + dim/2) is p θ^(-2i/dim)."""
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles), np.sin(angles)


def rounded_once(table: torch.Tensor, exact: torch.Tensor) -> bool:
    """Whether each entry of `table` (any float dtype) is within half a unit in its last place of the
    float64 `exact` (+ 1e-12 for the last bits of two float64 computations): `exact` rounded once."""
    info = torch.finfo(table.dtype)
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(table.double().abs().clamp(min=info.tiny))))
    return bool(((table.double() - exact).abs() <= ulp / 2 + 1e-12).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rotary_tables_are_float64_rounded_once(dtype, checkpoints):
    """In bfloat16, positions above 256 are not integers and the angles would lose whole radians: the cos and
    sin tables of a low-precision model are the float64 ones, rounded once. The float64 table is numpy's
    closed form, from the config's rope_theta and head_dim (a default-RoPE family: no scaling). The
    control: angles computed in float32 give tables that are not within that rounding of it."""
    from minielm.rope import rotation

    config = minielm.load(checkpoints["llama_tied"]).config
    params = config.rope_parameters[config.layer_types[0]]
    assert params["rope_type"] == "default" and params["partial_rotary_factor"] == 1.0
    positions = torch.arange(0, 4000, 7)
    cos64, sin64 = map(torch.from_numpy, closed_form_rotary(params["rope_theta"], config.head_dim, positions.numpy()))
    cos, sin = rotation(config, params, positions, dtype)
    assert cos.dtype == sin.dtype == dtype and cos.shape == sin.shape == cos64.shape
    assert rounded_once(cos, cos64) and rounded_once(sin, sin64)
    # the control: float32 angles (positions and frequencies in float32), then rounded to dtype
    inv_freq32 = params["rope_theta"] ** (-torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    angles32 = positions.float()[:, None] * inv_freq32[None, :]
    angles32 = torch.cat([angles32, angles32], dim=-1)
    assert not rounded_once(angles32.cos().to(dtype), cos64) and not rounded_once(angles32.sin().to(dtype), sin64)
