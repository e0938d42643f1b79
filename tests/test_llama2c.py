"""Tests on a real trained llama2.c checkpoint (stories260K).

Three independent views of the same weights must agree:

* tests/llama2c_reference.py: numpy, float64, llama2.c's own layout (interleaved RoPE);
* transformers.LlamaForCausalLM on the converted directory (rotate_half RoPE), float32;
* minielm on the converted directory, float64  (relative agreement 1e-12).
"""

import hashlib
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = ROOT / "tests" / "data" / "stories260K" / "stories260K.bin"  # karpathy/tinyllamas, MIT: see the README beside it
CONVERTER = ROOT / "tools" / "llama2c_to_hf.py"

# A fixed prompt: BOS, then ids spread over [0, 512) including both ends.
IDS = [1, 403, 407, 261, 378, 11, 2, 500, 0, 511, 73, 73, 256, 29, 340, 458, 301, 62, 120, 9]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conv = _load("llama2c_to_hf", CONVERTER)
ref = _load("llama2c_reference", pathlib.Path(__file__).with_name("llama2c_reference.py"))


def rel_err(a, b):
    """max |a - b| / max |b|, the agreement measure used throughout."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories260K_hf")
    conv.convert(str(BIN), str(out))
    return out


@pytest.fixture(scope="module")
def ref_logits():
    return ref.forward_logits(str(BIN), IDS)            # float64, (T, vocab)


# (a) the converted directory --------------------------------------------------

def test_convert_config_and_tensors(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    expected = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    for key, value in expected.items():
        assert cfg[key] == value, key

    shapes = {"model.embed_tokens.weight": (512, 64), "model.norm.weight": (64,)}
    for i in range(5):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (64,),
            p + "post_attention_layernorm.weight": (64,),
            p + "self_attn.q_proj.weight": (64, 64),
            p + "self_attn.k_proj.weight": (32, 64),    # 4 kv heads * head_size 8
            p + "self_attn.v_proj.weight": (32, 64),
            p + "self_attn.o_proj.weight": (64, 64),
            p + "mlp.gate_proj.weight": (172, 64),
            p + "mlp.up_proj.weight": (172, 64),
            p + "mlp.down_proj.weight": (64, 172),
        })
    with safe_open(str(hf_dir / "model.safetensors"), "np") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
    assert got == shapes                                 # and no lm_head: it is tied


def test_permutation_is_the_hf_permute():
    """Our row reordering equals HF's convert_llama_weights_to_hf.permute."""
    n_heads, dim1, dim2 = 4, 32, 5
    w = np.arange(dim1 * dim2, dtype=np.float32).reshape(dim1, dim2)
    hf = torch.from_numpy(w).view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)
    assert np.array_equal(conv.interleaved_to_halves(w, n_heads), hf.numpy())


def test_checkpoint_is_the_one_its_readme_names():
    """The file in the repository is karpathy's, byte for byte: its sha256 is the one recorded beside it."""
    recorded = re.search(r"sha256\*\*: `([0-9a-f]{64})`", (BIN.parent / "README.md").read_text()).group(1)
    assert hashlib.sha256(BIN.read_bytes()).hexdigest() == recorded


# (b) sanity of the numpy reference --------------------------------------------

def test_reference_sanity(ref_logits):
    assert ref_logits.shape == (len(IDS), 512) and ref_logits.dtype == np.float64
    assert np.all(np.isfinite(ref_logits))

    # The file's own RoPE tables (written by llama2.c's exporter) are the
    # cos/sin the reference recomputes: theta 10000, pair i of a head uses
    # frequency theta^(-2i/head_size).
    cfg, w = ref.load_checkpoint(str(BIN))
    hs = cfg["head_size"]
    angle = np.outer(np.arange(cfg["seq_len"]), 10000.0 ** (-np.arange(0, hs, 2) / hs))
    assert np.max(np.abs(w["freq_cis_real"] - np.cos(angle))) < 1e-5
    assert np.max(np.abs(w["freq_cis_imag"] - np.sin(angle))) < 1e-5

    # The same computation in float32 stays within float32 rounding.
    assert rel_err(ref.forward_logits(str(BIN), IDS, np.float32), ref_logits) < 1e-5

    # Greedy continuation from BOS does not depend on the dtype.
    assert ref.greedy((cfg, w), [1], 12) == ref.greedy(ref.load_checkpoint(str(BIN), np.float32), [1], 12)


# (c) minielm against the reference: the main test ------------------------------

def test_minielm_matches_reference(hf_dir, ref_logits):
    import minielm                                     # fails until the engine lands

    model = minielm.load(str(hf_dir), dtype=torch.float64)
    logits = model.logits(IDS)
    assert tuple(logits.shape) == (len(IDS), 512)
    assert logits.dtype == torch.float64
    assert rel_err(logits.detach().numpy(), ref_logits) < 1e-12
    # greedy generation (minielm's KV cache, one token a step) continues as the reference does
    cfg, w = ref.load_checkpoint(str(BIN))
    assert [1] + model.generate_ids([1], 12) == ref.greedy((cfg, w), [1], 12)


def test_minielm_reconstruction_on_a_trained_model(hf_dir):
    """The equivalent linear map of a real trained checkpoint reconstructs its output exactly."""
    import minielm

    model = minielm.load(str(hf_dir), dtype=torch.float64)
    elm = minielm.equivalent_linear_map(model, IDS)
    assert elm.relative_error() < 1e-13
    probs = torch.softmax(model.logits(IDS)[-1], dim=-1)
    assert torch.allclose(elm.probabilities(), probs, rtol=0, atol=1e-14)


# (d) transformers against the reference: proves the converter ------------------

def test_transformers_matches_reference(hf_dir, ref_logits):
    import transformers                                  # test-only dependency

    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.tensor([IDS])).logits[0].double().numpy()
    assert rel_err(hf, ref_logits) < 1e-4

    # Negative control: without the q/k permutation the logits are clearly off
    # (RoPE is the identity at position 0, so only later positions differ).
    _, raw = conv.read_llama2c(str(BIN))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.copy_(torch.from_numpy(raw["wq"][i].copy()))
            layer.self_attn.k_proj.weight.copy_(torch.from_numpy(raw["wk"][i].copy()))
        unpermuted = model(torch.tensor([IDS])).logits[0].double().numpy()
    assert rel_err(unpermuted, ref_logits) > 1e-2


# (e) refusal of bad input -------------------------------------------------------

def test_converter_refuses_bad_input(tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(BIN.read_bytes()[:-1000])
    with pytest.raises(conv.ConversionError, match="truncated"):
        conv.convert(str(truncated), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()              # nothing written

    # The CLI says so in one line, without a traceback, and exits non-zero.
    run = subprocess.run([sys.executable, str(CONVERTER), str(truncated), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "truncated" in run.stderr and "Traceback" not in run.stderr

    # A missing file and a non-empty output directory are refused too.
    with pytest.raises(conv.ConversionError, match="no such file"):
        conv.convert(str(tmp_path / "missing.bin"), str(tmp_path / "out"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(conv.ConversionError, match="not empty"):
        conv.convert(str(BIN), str(busy))
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]


def test_unshared_classifier(tmp_path):
    """A negative vocab_size means a separate classifier follows the RoPE tables."""
    raw = bytearray(BIN.read_bytes())
    raw[20:24] = np.int32(-512).tobytes()                 # header field 6: vocab_size
    embedding = np.frombuffer(bytes(raw[28:28 + 512 * 64 * 4]), "<f4")
    classifier = 2.0 * embedding                          # exact in float32
    unshared = tmp_path / "unshared.bin"
    unshared.write_bytes(bytes(raw) + classifier.astype("<f4").tobytes())

    cfg = conv.convert(str(unshared), str(tmp_path / "out"))
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 512
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        assert np.array_equal(f.get_tensor("lm_head.weight"), classifier.reshape(512, 64))
    # Doubling the classifier doubles the logits, exactly.
    ids = IDS[:4]
    assert np.array_equal(ref.forward_logits(str(unshared), ids), 2.0 * ref.forward_logits(str(BIN), ids))
