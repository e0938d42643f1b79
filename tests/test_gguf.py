"""GGUF files: every convention of llama.cpp's converter undone, every tensor type dequantized.

Each test writes a random transformers model as GGUF the way convert_hf_to_gguf.py does (permuted
q/k rows for `llama`, Gemma's norms with 1 added, tied embeddings without output.weight), and
compares minielm's logits from the file with Hugging Face's (float64, casts removed) on the
reference: the same model with every weight replaced by its dequantized value, built in HF layout
without minielm's code (tests/gguf_writer.py); and, lest the writer and minielm share a wrong convention, with
transformers' own reading of the same files. The real Gemma 3 270M file is in test_gguf_gemma3.py.
"""

import functools
import itertools

import numpy as np
import pytest
import torch
import gguf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from gguf import GGMLQuantizationType as Q
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config)

from conftest import PROMPT
from gguf_writer import permute, write_gguf
from hf_reference import _LowPrecisionDetector, float64_everywhere, hf_float64_logits, randomize_

import minielm
import minielm.cli
from minielm.gguf import unpermute_rows

EPS = 2.0**-20  # exact in float32, as GGUF stores it
COMMON = dict(vocab_size=128, rms_norm_eps=EPS, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0)

# (transformers config, GGUF architecture): what a GGUF file can express of each family; every
# architecture in minielm.families.GGUF_ARCHITECTURES is run here (tests/test_families.py checks)
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
    "gemma2": (lambda: Gemma2Config(  # every other layer slides, as llama.cpp's fixed pattern has it
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=10.0, tie_word_embeddings=True, rope_parameters=DEFAULT_ROPE, **COMMON), "gemma2"),
    "gpt2": (lambda: GPT2Config(  # Conv1D matrices transposed by the converter, wte copied as the output
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, layer_norm_epsilon=EPS,
        activation_function="gelu_new", bos_token_id=1, eos_token_id=2, pad_token_id=0), "gpt2"),
    "gpt_neox": (lambda: GPTNeoXConfig(  # query_key_value regrouped by the converter as q, k, v rows
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        **{**COMMON, "layer_norm_eps": EPS}), "gptneox"),
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
    model = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float64 if qtype == Q.F64 else torch.float32)
    randomize_(model, seed)  # in float64 for an F64 file: values that float32 cannot hold
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
    assert model.dequantized_from == ([] if qtype in (Q.F32, Q.F16, Q.BF16) else [qtype.name])  # for explain


FAMILY_TYPES = {"mistral": Q.Q5_0, "qwen3": Q.Q8_0, "gemma2": Q.Q8_0, "gpt2": Q.Q8_0, "gpt_neox": Q.Q5_0,
                "gemma3": Q.Q4_0, "qwen2": Q.Q5_1, "olmo2": Q.Q4_1,
                "phi3": Q.Q8_0}


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_family_matches_hf(family, tmp_path):
    path, expected = gguf_and_reference(family, FAMILY_TYPES[family], tmp_path)
    model = minielm.load(path)
    err = relative_error(model.logits(PROMPT), expected)
    print(f"{family} {FAMILY_TYPES[family].name}: logits vs HF {err:.1e}")
    assert err <= 1e-12
    assert minielm.equivalent_linear_map(model, PROMPT).relative_error() < 1e-13


# ---- transformers' own GGUF loading as the oracle (issue 26) -------------------------------------------
# The tests above check minielm's reading against tests/gguf_writer.py's reference: a convention wrong in both (q/k
# rows permuted the wrong way, Gemma's norm offset, GPT-2's transposes) would pass them. Here transformers reads the
# same files with its own tensor processors. The architectures it cannot read:
NOT_IN_TRANSFORMERS = {
    "mistral": "the converter writes Mistral as `llama`; transformers loads a Mistral config's GGUF tensors through "
               "gguf-py's name map for 'mistral', which gguf-py does not have (llama covers the q/k permutation)",
    "gpt_neox": "transformers' GGUF loading does not read the gptneox architecture",
    "olmo2": "transformers' GGUF loading does not read the olmo2 architecture",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_the_file_as_minielm_does(family, tmp_path, monkeypatch):
    """minielm's logits from the writer's file are transformers' from the same file (`from_pretrained(..., gguf_file=)`,
    in float64 with its float32 casts removed). transformers reads too little of the metadata (no soft-capping,
    query_pre_attn_scalar, key_length, partial rotary, RoPE scaling, nor GPT-2's context and vocabulary without a
    tokenizer), so it is given the config; the tensors, and what llama.cpp's converter did to them, are its own
    reading. Its 1-D tensors are dequantized to float64, as in test_gguf_gemma3.py: it subtracts Gemma's norm
    offset in the tensor's dtype, which in float32 rounds."""
    if family in NOT_IN_TRANSFORMERS:
        pytest.skip(NOT_IN_TRANSFORMERS[family])
    make_config, arch = FAMILIES[family]
    qtype = {**FAMILY_TYPES, "llama": Q.Q4_K}[family]
    model = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
    randomize_(model, 1)
    path = tmp_path / f"{family}.gguf"
    write_gguf(model, path, arch, qtype, seed=1)
    dequantize = gguf.dequantize  # transformers imports it from the package when it loads
    monkeypatch.setattr(gguf, "dequantize", lambda data, kind: (lambda v: v.astype(np.float64) if v.ndim == 1 else v)(
        dequantize(data, kind)))
    with float64_everywhere():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, config=make_config(),
                                                  dtype=torch.float64, attn_implementation="eager").eval()
    assert all(p.dtype == torch.float64 for p in hf.parameters())
    detector = _LowPrecisionDetector()
    with torch.no_grad(), float64_everywhere(), detector:
        expected = hf(input_ids=torch.tensor([PROMPT]), use_cache=False).logits[0]
    assert not detector.offenders, sorted(set(detector.offenders))[:5]
    err = relative_error(minielm.load(path).logits(PROMPT), expected)
    print(f"{family} {qtype.name}: logits vs transformers' GGUF loading {err:.1e}")
    assert err <= 1e-12


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


def test_llama3_rope_factors(tmp_path):
    """Llama 3.1's RoPE scaling, stored by the converter as a float32 factor per frequency (rope_freqs):
    the frequencies are HF's llama3 ones to float32 round-off of those factors."""
    from hf_reference import load_hf_float64
    from minielm.rope import inverse_frequencies

    rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32)
    config = FAMILIES["llama"][0]()
    config.rope_parameters = rope
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, 0)
    write_gguf(model, tmp_path / "llama3.gguf", "llama", Q.F32)
    model.save_pretrained(tmp_path / "hf")
    expected = load_hf_float64(tmp_path / "hf").model.rotary_emb.inv_freq
    loaded = minielm.load(tmp_path / "llama3.gguf").config
    ours, scale = inverse_frequencies(loaded, loaded.rope_parameters["full_attention"], 100, torch.float64, "cpu")
    assert scale == 1.0
    err = ((ours - expected).abs() / expected).max().item()
    print(f"llama3 RoPE from rope_freqs: frequencies vs HF {err:.1e}")
    assert err < 1e-6 and not torch.allclose(expected, 1.0 / 10000.0 ** (torch.arange(0, 64, 2) / 64.0).double())


def test_streamed_equals_loaded(tmp_path):
    path, _ = gguf_and_reference("llama", Q.Q4_K, tmp_path)
    loaded, streamed = minielm.load(path), minielm.load(path, stream=True)
    assert torch.equal(loaded.logits(PROMPT), streamed.logits(PROMPT))
    assert torch.equal(minielm.equivalent_linear_map(loaded, PROMPT).operators,
                       minielm.equivalent_linear_map(streamed, PROMPT).operators)


def test_f64_tensors_are_read_exactly(tmp_path):
    """F64 (every tensor here, norms included) is read as the stored doubles: logits as HF's on the
    very same float64 weights, to round-off; a rounding through float32 would be off by ~1e-7."""
    path, expected = gguf_and_reference("llama", Q.F64, tmp_path)
    model = minielm.load(path, stream=True)
    source = model.weights["layers"].source
    assert all(source.info(name)[1] == torch.float64 for name in source.names())
    embed = source.get("model.embed_tokens.weight")
    assert embed.dtype == torch.float64 and not torch.equal(embed, embed.float().double())
    err = relative_error(model.logits(PROMPT), expected)
    print(f"llama F64: logits vs HF {err:.1e}")
    assert err <= 1e-13 and model.dequantized_from == []


@pytest.mark.parametrize("stream", [False, True])
def test_the_embedding_is_read_a_block_of_rows_at_a_time(tmp_path, monkeypatch, stream):
    """As for safetensors (test_loading.py): the embedding and the unembedding (Q4_K blocks here) are read, dequantized
    and cast a block of rows at a time, never whole, and give the model read whole."""
    from test_loading import reads_of
    from minielm.gguf import GGUFSource

    path, _ = gguf_and_reference("llama", Q.Q4_K, tmp_path)
    whole = minielm.load(path, stream=stream)
    monkeypatch.setattr(minielm.checkpoint, "BLOCK_BYTES", 5 * 256 * 4)  # 5 rows of d = 256, dequantized to float32
    reads = reads_of(monkeypatch, GGUFSource)
    model = minielm.load(path, stream=stream)
    top = [size for name, size in reads if name in ("model.embed_tokens.weight", "lm_head.weight")]
    assert len(top) >= 2 * 128 // 5 and max(top) <= 5 * 256 * 4, top
    for name in ("embed", "lm_head"):
        assert torch.equal(model.weights[name], whole.weights[name])
    assert torch.equal(model.logits(PROMPT), whole.logits(PROMPT))


@pytest.mark.parametrize("kind_name, kind", [("I8", np.int8), ("I32", np.int32)])
def test_an_integer_tensor_is_refused_at_load(tmp_path, monkeypatch, kind_name, kind):
    """A type gguf-py cannot dequantize (I8 ... I64): a one-line CheckpointError naming the tensor
    and its type, from the plan check, before any tensor is read."""
    add_tensor = gguf.GGUFWriter.add_tensor

    def integer_wq(writer, name, data, *args, **kwargs):
        if name == "blk.0.attn_q.weight":
            data, kwargs = np.zeros(gguf.quants.dequantize(data, kwargs["raw_dtype"]).shape, kind), {}
        return add_tensor(writer, name, data, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", integer_wq)
    model = AutoModelForCausalLM.from_config(FAMILIES["qwen3"][0](), dtype=torch.float32)
    write_gguf(model, tmp_path / "int.gguf", "qwen3", Q.Q8_0)
    with pytest.raises(minielm.CheckpointError) as info:
        minielm.load(tmp_path / "int.gguf", stream=True)
    assert str(info.value) == (f"{tmp_path / 'int.gguf'}: tensor 'model.layers.0.self_attn.q_proj.weight' "
                               f"(blk.0.attn_q.weight) has GGUF type {kind_name}, which minielm does not read; "
                               f"expected F64, F32, F16, BF16 or a quantized type that gguf-py dequantizes")


@pytest.fixture
def streamed_qwen3(tmp_path):
    """A small GGUF file (Qwen 3, Q8_0), loaded streamed, reading its layers at every use (a resident model
    reads them once), and run once: (path, model)."""
    model = AutoModelForCausalLM.from_config(FAMILIES["qwen3"][0](), dtype=torch.float32)
    randomize_(model, 0)
    write_gguf(model, tmp_path / "qwen3.gguf", "qwen3", Q.Q8_0)
    streamed = minielm.load(tmp_path / "qwen3.gguf", stream=True)
    streamed.weights["layers"].resident = False
    streamed.logits(PROMPT)
    return tmp_path / "qwen3.gguf", streamed


@pytest.mark.parametrize("change, what", [
    ("rewrite", "it was rewritten"),
    ("rewrite_keeping_mtime", "its status-change time moved: rewritten with the modification time restored, or its "
                              "permissions changed"),
])
def test_a_streamed_gguf_rewritten_during_the_run_is_named(streamed_qwen3, change, what):
    """The file is mapped: a rewrite in place would show through the mapping, old and new weights mixed.
    Each read compares the file with what it was at opening, as for safetensors (test_loading.py)."""
    import test_loading

    path, model = streamed_qwen3
    getattr(test_loading, change)(path)
    with pytest.raises(minielm.CheckpointError) as info:
        model.logits(PROMPT)
    assert str(info.value) == (f"{path}: the file changed on disk during this run ({what}; reading tensor "
                               f"'model.layers.0.input_layernorm.weight'); load the checkpoint again")


# A file cut under a streamed run: before a tensor's read (the check before it sees the cut), or between that
# check and the read (a short read). Each is one line naming the tensor; in a child process, since a read
# past the end of a mapped file would be SIGBUS, which would end pytest itself.
CUT_CHILD = """
import os, sys, minielm, minielm.gguf
path, when = sys.argv[1], sys.argv[2]
model = minielm.load(path, stream=True)
model.weights["layers"].resident = False  # each use reads the file again
model.logits([1, 17, 5, 88])
if when == "between runs":
    os.truncate(path, os.path.getsize(path) // 2)
else:  # under a read: the file passes the check before the read, then is cut to nothing
    check = minielm.gguf.check_unchanged

    def check_then_cut(path, stamp, name):
        check(path, stamp, name)
        os.truncate(path, 0)

    minielm.gguf.check_unchanged = check_then_cut
try:
    model.logits([1, 17, 5, 88])
except minielm.CheckpointError as err:
    sys.exit(str(err))
"""


@pytest.mark.parametrize("when", ["between runs", "under a read"])
def test_a_streamed_gguf_cut_during_the_run_is_named(streamed_qwen3, when):
    import os
    import subprocess
    import sys

    path, _ = streamed_qwen3
    size = path.stat().st_size
    result = subprocess.run([sys.executable, "-c", CUT_CHILD, str(path), when], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])  # not -SIGBUS
    what = (f"it was truncated to {size // 2} bytes from {size}; reading tensor 'model.layers.0.input_layernorm.weight'"
            if when == "between runs" else "it now ends inside tensor 'blk.0.attn_norm.weight'")
    assert result.stderr == f"{path}: the file changed on disk during this run ({what}); load the checkpoint again\n"


# ---- bad metadata: one line naming the key, from the API and the command line -------------------
def write_zero_heads(monkeypatch, path):
    """attention.head_count = 0 (with key_length present: d / heads must not be computed)."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count", lambda writer, count: writer.add_uint32(
        "qwen3.attention.head_count", 0))
    write_gguf(AutoModelForCausalLM.from_config(FAMILIES["qwen3"][0]()), path, "qwen3", Q.Q8_0)


def write_linear_rope_without_factor(monkeypatch, path):
    """rope.scaling.type = linear, no rope.scaling.factor (Gemma 3's global layers scale linearly)."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_scaling_factor", lambda writer, factor: None)
    write_gguf(AutoModelForCausalLM.from_config(FAMILIES["gemma3"][0]()), path, "gemma3", Q.Q8_0)


def write_long_rope_factors_only(monkeypatch, path):
    """Phi-3 longrope: rope_factors_long.weight, and no rope_factors_short.weight."""
    write_gguf(AutoModelForCausalLM.from_config(FAMILIES["phi3"][0]()), path, "phi3", Q.Q8_0,
               extra_tensors={"rope_factors_long.weight": np.ones(4, np.float32)})


@pytest.mark.parametrize("write, error, message", [
    (write_zero_heads, minielm.ConfigError,
     "GGUF metadata key qwen3.attention.head_count must be a positive integer, got 0"),
    (write_linear_rope_without_factor, minielm.ConfigError,
     "GGUF metadata key gemma3.rope.scaling.factor is missing (gemma3.rope.scaling.type is linear)"),
    (write_long_rope_factors_only, minielm.CheckpointError,
     "tensor 'rope_factors_short.weight' is missing (longrope needs both rope_factors_long and rope_factors_short)"),
], ids=["zero heads", "linear rope without factor", "long rope factors only"])
def test_bad_metadata_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, write, error, message):
    from minielm import cli

    path = tmp_path / "bad.gguf"
    write(monkeypatch, path)
    with pytest.raises(error) as info:
        minielm.load(path)
    assert str(info.value) == f"{path}: {message}"
    assert cli.main(["generate", "In the beginning", "--model", str(path)]) == 2
    assert capsys.readouterr().err == f"minielm: error: {path}: {message}\n"


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


# ---- tokenizers from the metadata ---------------------------------------------------------------
TEXTS = ["In the beginning God created the heaven", "  two  spaces\tand a tab\nnew line",
         "Grüße, 東京! 🙂 1234567",
         "And God said, Let there be light: and there was light.<eos>"]


# sentencepiece reads these as plain text; llama.cpp and transformers match the special tokens whole
WITH_SPECIAL_TOKENS = ["a</s> b", "</s>\nhi", "x</s>In", "an <unk> word"]


def write_tokenizer_gguf(path, kind, tokens, types, scores=None, merges=None, pre=None, space_prefix=True,
                         arch="llama"):
    """A GGUF file holding only a vocabulary, under the keys convert_hf_to_gguf.py writes."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if kind == "llama":
        writer.add_unk_token_id(0)
        writer.add_add_space_prefix(space_prefix)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def both_tokenizers(path):
    from transformers import AutoTokenizer
    from minielm.gguf import gguf_tokenizer, read_gguf

    return gguf_tokenizer(read_gguf(path), path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def sentencepiece_gguf(tmp_path, arch="llama"):
    """A SentencePiece BPE model trained on a few verses, and a GGUF file of its vocabulary and scores
    as llama.cpp stores them: (sentencepiece processor, GGUF path)."""
    import sentencepiece
    from conftest import TEXT

    (tmp_path / "corpus.txt").write_text(TEXT * 3)
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spm"), vocab_size=300, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama 2's tokenizer.model
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    n = sp.GetPieceSize()
    types = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 5 if sp.IsUnused(i) else 1
             for i in range(n)]
    path = tmp_path / "spm.gguf"
    write_tokenizer_gguf(path, "llama", [sp.IdToPiece(i) for i in range(n)], types, [sp.GetScore(i) for i in range(n)],
                         arch=arch)
    return sp, path


def test_sentencepiece_vocabulary(tmp_path):
    """A SentencePiece BPE model's vocabulary and scores (Llama 2 style) as llama.cpp stores them:
    encodes as sentencepiece itself does, and as transformers' GGUF tokenizer."""
    sp, path = sentencepiece_gguf(tmp_path)
    ours, theirs = both_tokenizers(path)
    for text in TEXTS + WITH_SPECIAL_TOKENS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        if text in WITH_SPECIAL_TOKENS:
            continue
        if "  " not in text:  # sentencepiece splits at every space before merging; llama.cpp does not
            assert ids == [sp.bos_id()] + sp.EncodeAsIds(text), text
        assert ours.decode(ids[1:]) == sp.DecodeIds(ids[1:])


def test_phi3_vocabulary_prefixes_every_stretch_of_text(tmp_path):
    """Phi-3's sentencepiece vocabulary puts "▁" before a leading space and after a special token
    (<|user|>\nhi): as sentencepiece does for text without special tokens, and as transformers'
    GGUF tokenizer does for a phi3 file. Llama 2 style prefixes the very start only."""
    sp, path = sentencepiece_gguf(tmp_path, arch="phi3")
    ours, theirs = both_tokenizers(path)
    for text in TEXTS + [" leading space", "  two"] + WITH_SPECIAL_TOKENS:
        ids = ours.encode(text)
        if text not in WITH_SPECIAL_TOKENS:
            assert ids == [sp.bos_id()] + sp.EncodeAsIds(text), text
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids), text


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_vocabulary(tmp_path, pre):
    """A byte-level BPE vocabulary with merges (Qwen, Llama 3 style): encodes as transformers' GGUF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from conftest import TEXT

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([TEXT] * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = __import__("json").loads(bpe.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    path = tmp_path / "bpe.gguf"
    write_tokenizer_gguf(path, "gpt2", tokens, [3, 3, 3] + [1] * (len(tokens) - 3), merges=merges, pre=pre)
    ours, theirs = both_tokenizers(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids), text


# ---- the tensor table and the tokenizer arrays, checked as llama.cpp checks them (issue 26) -------------
def corrupted(path, change):
    """The GGUF file at `path`, its tensor table edited in place by change({name: tensor}) through gguf-py's
    writable reader: each tensor's field parts are (name length, name, n_dims, dims, type, offset)."""
    reader = gguf.GGUFReader(path, "r+")
    change({t.name: t.field.parts for t in reader.tensors})
    reader.data.flush()
    del reader
    return path


def swap_offsets(parts, a, b):
    parts[a][5][0], parts[b][5][0] = int(parts[b][5][0]), int(parts[a][5][0])


CORRUPTIONS = {  # each loaded silently with other weights, and another answer; llama.cpp refuses each
    "offset pointing at another tensor's bytes": (
        lambda p: p["blk.0.attn_k.weight"][5].__setitem__(0, int(p["blk.0.attn_q.weight"][5][0])),
        "'blk.0.attn_k.weight': its bytes .* overlap those of 'blk.0.attn_q.weight'"),
    "offset moved by 64 bytes": (lambda p: p["blk.0.attn_q.weight"][5].__setitem__(0, int(p["blk.0.attn_q.weight"][5][0]) + 64),
                                 "'blk.0.attn_q.weight': starts 64 bytes after the end of"),
    "offset moved by 2 bytes": (lambda p: p["blk.0.attn_q.weight"][5].__setitem__(0, int(p["blk.0.attn_q.weight"][5][0]) + 2),
                                "'blk.0.attn_q.weight': offset .* is not a multiple of general.alignment = 32"),
    "two offsets swapped": (lambda p: swap_offsets(p, "blk.0.attn_q.weight", "blk.0.attn_output.weight"),
                            "'blk.0.attn_q.weight': its bytes .* overlap those of|starts .* after the end of"),
    "F32 data labelled F16": (lambda p: p["blk.0.ffn_up.weight"][4].__setitem__(0, int(Q.F16)),
                              "starts .* bytes after the end of 'blk.0.ffn_up.weight'"),
    "F32 data labelled BF16": (lambda p: p["blk.1.ffn_down.weight"][4].__setitem__(0, int(Q.BF16)),
                               "after the end of 'blk.1.ffn_down.weight'"),
    "the last tensor's F32 data labelled F16": (lambda p: p[list(p)[-1]][4].__setitem__(0, int(Q.F16)),
                                                "bytes after the data of its last tensor"),
}


@pytest.fixture
def f32_qwen3(tmp_path):
    """A small Qwen 3 GGUF file, every tensor F32, and its logits as written."""
    model = AutoModelForCausalLM.from_config(FAMILIES["qwen3"][0](), dtype=torch.float32)
    randomize_(model, 0)
    write_gguf(model, tmp_path / "qwen3.gguf", "qwen3", Q.F32)
    return tmp_path / "qwen3.gguf"


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_tensor_table_is_refused_naming_the_tensor_and_the_rule(case, f32_qwen3, capsys):
    change, message = CORRUPTIONS[case]
    minielm.load(f32_qwen3).logits(PROMPT)  # the file as written loads
    corrupted(f32_qwen3, change)
    for stream in (False, True):
        with pytest.raises(minielm.CheckpointError, match=message) as info:
            minielm.load(f32_qwen3, stream=stream)
        assert str(info.value).startswith(f"{f32_qwen3}: ") and "\n" not in str(info.value)
    assert minielm.cli.main(["generate", "hi", "--model", str(f32_qwen3), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minielm: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("key", ["tokenizer.ggml.scores", "tokenizer.ggml.token_type"])
def test_tokenizer_arrays_of_another_length_than_the_vocabulary_are_refused(key, tmp_path):
    """300 scores (or token types) for 4096 tokens: once read as they came, the prompt became other tokens."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(4093)]
    scores, types = [-float(i) for i in range(4096)], [2, 3, 3] + [1] * 4093
    if key == "tokenizer.ggml.scores":
        scores = scores[:300]
    else:
        types = types[:300]
    path = tmp_path / "vocabulary.gguf"
    write_tokenizer_gguf(path, "llama", tokens, types, scores)
    from minielm.gguf import read_gguf

    with pytest.raises(minielm.CheckpointError, match=f"{key} holds 300 values for the 4096 tokens of "
                                                      "tokenizer.ggml.tokens"):
        read_gguf(path)


def test_a_gguf_without_a_tokenizer_says_so(f32_qwen3):
    """Text asked of a GGUF file with no tokenizer.ggml.* keys: the message speaks of the GGUF's metadata (it
    said "no tokenizer.json or tokenizer.model", files a GGUF never has)."""
    with pytest.raises(minielm.TokenizerError) as info:
        minielm.load(f32_qwen3).tokenizer
    message = str(info.value)
    assert str(f32_qwen3) in message and "no tokenizer metadata" in message and "tokenizer.ggml.tokens" in message
    assert "tokenizer.json" not in message, message


def test_a_gguf_cut_short_is_called_truncated(f32_qwen3, tmp_path):
    """A GGUF cut anywhere, in its header, its tensor table or its data, is "truncated" (it was "not a
    readable GGUF file (When changing to a larger dtype, its size must be a divisor ...)", numpy's words)."""
    data = f32_qwen3.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (0, 3, 10, 30, 100, 1000, len(data) // 2, len(data) - 1):
        cut.write_bytes(data[:size])
        with pytest.raises(minielm.CheckpointError) as info:
            minielm.load(cut)
        assert str(info.value).startswith(f"{cut}: truncated GGUF file ({size} bytes"), (size, str(info.value))


@pytest.mark.parametrize("key", ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.unknown_token_id"])
def test_a_special_token_id_outside_the_vocabulary_names_its_key(key, tmp_path, capsys):
    """bos_token_id = 99999 in a file of 128 tokens: the key is named (it was "token id 99999 at position 0
    is outside the model's vocabulary", as if the prompt or the model were at fault)."""
    model = AutoModelForCausalLM.from_config(FAMILIES["qwen3"][0](), dtype=torch.float32)
    randomize_(model, 0)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(97 + i) for i in range(26)] + [f"t{i}" for i in range(99)]
    V = gguf.GGUFValueType
    metadata = {"tokenizer.ggml.model": ("llama", V.STRING), "tokenizer.ggml.tokens": (tokens, V.ARRAY),
                "tokenizer.ggml.scores": ([-float(i) for i in range(128)], V.ARRAY),
                "tokenizer.ggml.token_type": ([2, 3, 3] + [1] * 125, V.ARRAY),
                "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.unknown_token_id": (0, V.UINT32),
                "tokenizer.ggml.add_bos_token": (True, V.BOOL)}
    path = tmp_path / "special.gguf"
    write_gguf(model, path, "qwen3", Q.F32, metadata=metadata)
    assert minielm.cli.main(["generate", "hi", "--model", str(path), "--max-new-tokens", "1"]) == 0
    metadata[key] = (99999, V.UINT32)
    write_gguf(model, path, "qwen3", Q.F32, metadata=metadata)
    capsys.readouterr()
    assert minielm.cli.main(["generate", "hi", "--model", str(path), "--max-new-tokens", "1"]) == 2
    assert capsys.readouterr().err == (f"minielm: error: {path}: {key} = 99999 is not a token of the file's "
                                       "vocabulary (tokenizer.ggml.tokens holds 128 tokens, ids [0, 128))\n")


# ---- fuzzing the header and the tensor table, as tests/test_loading.py fuzzes safetensors headers ------
FUZZ_IDS = [1, 5, 9, 3, 7]


@functools.cache
def fuzz_base(directory) -> tuple:
    """A small F32 Qwen 3 file: (its bytes, its logits, [(start, length, part)] of every field of its
    tensor table: name length, name, dimension count, dimensions, type, offset)."""
    model = AutoModelForCausalLM.from_config(FAMILIES["qwen3"][0](), dtype=torch.float32)
    randomize_(model, 0)
    path = directory / "base.gguf"
    write_gguf(model, path, "qwen3", Q.F32)
    reader = gguf.GGUFReader(path)
    table = []
    for tensor in reader.tensors:
        start = tensor.field.offset
        for part, kind in zip(tensor.field.parts, ("name_length", "name", "n_dims", "dims", "type", "offset")):
            table.append((start, part.nbytes, kind))
            start += part.nbytes
    return path.read_bytes(), minielm.load(path).logits(FUZZ_IDS), reader.data_offset, table


gguf_edits = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 10**6), st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 40))),
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),  # anywhere in header and table
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.none()),
)
fuzzed_files = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(gguf_edits, min_size=1, max_size=3))
def test_fuzzed_gguf_header_is_a_clean_error_or_the_right_logits(edits, tmp_path_factory):
    """Random edits of a tensor table's fields (offsets, types, dimensions, names) and byte flips anywhere
    before the data: a MinielmError, or, where only the table was edited, exactly the logits as written
    (llama.cpp's checks leave no edit of the table that loads as another model). A flip in the metadata may
    make another valid model (a rope_freq_base): it must still load or fail as a MinielmError, no other way."""
    data, logits, data_offset, table = fuzz_base(tmp_path_factory.getbasetemp())
    data, metadata_touched = bytearray(data), False
    for kind, where, value in sorted(edits, key=lambda edit: edit[0] == "cut"):  # cuts last
        if kind == "field":
            start, length, _ = table[where % len(table)]
            data[start:start + length] = (value % 2**(8 * length)).to_bytes(length, "little")
        elif kind == "byte":
            data[where % data_offset] = value
            metadata_touched |= where % data_offset < table[0][0]
        else:
            del data[where % (len(data) + 1):]
    path = tmp_path_factory.getbasetemp() / f"fuzzed{next(fuzzed_files)}.gguf"
    path.write_bytes(data)
    try:
        model = minielm.load(path)
        got = model.logits(FUZZ_IDS)
    except minielm.MinielmError as err:
        assert str(err) and "\n" not in str(err)
        event(f"refused: {' '.join(str(err).removeprefix(f'{path}: ').split()[:3])}")
        return
    finally:
        path.unlink()
    event("loaded")
    if not metadata_touched:
        assert torch.equal(got, logits), f"a fuzzed tensor table loaded as another model: {edits}"
