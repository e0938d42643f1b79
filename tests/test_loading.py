"""Loading what is on disk, and only what is sound: safetensors headers, files that change under a
run, non-finite weights, a tokenizer that belongs to another model.

The safetensors fuzzing compares minielm with a reference reading of the format written here
from its specification (the header's JSON, dtypes, shapes, and data offsets that tile the data
exactly): a header the specification rejects must give a CheckpointError, one it accepts must
give exactly the bytes it declares. A file truncated or rewritten during a run is exercised in
child processes, since the failure it guards against (SIGBUS on a mapped file) kills the process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import minielm
from minielm.checkpoint import SafetensorsSource
from minielm.errors import CheckpointError, TokenizerError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench import random_checkpoint  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
IDS = [1, 17, 5, 88, 2, 41]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A tiny random Llama-style checkpoint in bfloat16 (d=32, 3 layers, untied), no tokenizer."""
    directory = tmp_path_factory.mktemp("small")
    random_checkpoint(directory, d=32, layers=3, f=64, heads=4, kv_heads=2, vocab=128, dtype=torch.bfloat16,
                      tied=False)
    return directory


# ---- fuzzing safetensors headers ---------------------------------------------------------------
# The reference reading: what the safetensors format accepts, and what the bytes then mean.
SPEC_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
             "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
             "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
READABLE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


def is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64


def spec_reading(data: bytes):
    """{name: (dtype string, shape, raw bytes)} if `data` is a valid safetensors file, else None."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 100_000_000:
        return None
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return None
    body, spans, tensors = data[8 + n:], [], {}
    for name, entry in header.items():
        if not (isinstance(entry, dict) and entry.get("dtype") in SPEC_BITS and isinstance(entry.get("shape"), list)
                and all(map(is_count, entry["shape"])) and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2 and all(map(is_count, entry["data_offsets"]))):
            return None
        begin, end = entry["data_offsets"]
        bits = math.prod(entry["shape"]) * SPEC_BITS[entry["dtype"]]
        if begin > end or bits % 8 or end - begin != bits // 8:
            return None
        spans.append((begin, end))
        tensors[name] = (entry["dtype"], tuple(entry["shape"]), body[begin:end])
    position = 0
    for begin, end in sorted(spans):  # the data is tiled exactly: no hole, no overlap, nothing after
        if begin != position:
            return None
        position = end
    return tensors if position == len(body) else None


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def base_file() -> tuple[dict, bytes]:
    """The header and data of a small valid file with tensors of four dtypes."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen, dtype=torch.float64),
               "h": torch.randn(2, 3, generator=gen).to(torch.bfloat16), "i": torch.arange(6, dtype=torch.int32)}
    data = bytes(save_file_bytes(tensors))
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def save_file_bytes(tensors) -> bytes:
    from safetensors.torch import save
    return save(tensors)


BASE_HEADER, BASE_BODY = base_file()
NAMES = sorted(BASE_HEADER)
numbers = st.one_of(st.integers(-3, len(BASE_BODY) + 9), st.integers(2**63, 2**65),
                    st.floats(0, len(BASE_BODY), allow_nan=False), st.booleans(), st.none(), st.text(max_size=3))
mutations = st.one_of(
    st.tuples(st.just("offsets"), st.sampled_from(NAMES), st.lists(numbers, min_size=0, max_size=3)),
    st.tuples(st.just("offset_ints"), st.sampled_from(NAMES), st.tuples(st.integers(0, len(BASE_BODY) + 4),
                                                                        st.integers(0, len(BASE_BODY) + 4))),
    st.tuples(st.just("swap_offsets"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("shape"), st.sampled_from(NAMES), st.lists(st.one_of(st.integers(-1, 7), numbers),
                                                                 max_size=3)),
    st.tuples(st.just("dtype"), st.sampled_from(NAMES),
              st.one_of(st.sampled_from(sorted(SPEC_BITS)), st.text(max_size=4), st.integers(0, 3))),
    st.tuples(st.just("drop_key"), st.sampled_from(NAMES), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("extra_key"), st.sampled_from(NAMES), st.text(max_size=5)),
    st.tuples(st.just("drop_tensor"), st.sampled_from(NAMES), st.none()),
    st.tuples(st.just("metadata"), st.none(), st.dictionaries(st.text(max_size=3),
                                                              st.one_of(st.text(max_size=3), st.integers()),
                                                              max_size=2)),
    st.tuples(st.just("body"), st.none(), st.integers(-40, 8)),  # cut (negative) or extend the data
    st.tuples(st.just("header_length"), st.none(), st.integers(-6, 6)),
    st.tuples(st.just("header_padding"), st.none(), st.sampled_from([b" ", b"  \n", b"\x00", b"x", b"{"])),
)


def mutated_file(steps) -> bytes:
    header, body, length_change, padding = copy.deepcopy(BASE_HEADER), BASE_BODY, 0, b""
    for kind, name, value in steps:
        entry = header.get(name) if name else None
        if kind in ("offsets", "shape", "dtype", "offset_ints") and isinstance(entry, dict):
            entry[{"offsets": "data_offsets", "offset_ints": "data_offsets"}.get(kind, kind)] = list(value) \
                if isinstance(value, tuple) else value
        elif kind == "swap_offsets" and all("data_offsets" in (header.get(n) or {}) for n in (name, value)):
            header[name]["data_offsets"], header[value]["data_offsets"] = \
                header[value]["data_offsets"], header[name]["data_offsets"]
        elif kind == "drop_key" and isinstance(entry, dict):
            entry.pop(value, None)
        elif kind == "extra_key" and isinstance(entry, dict):
            entry["x" + value] = 1
        elif kind == "drop_tensor":
            header.pop(name, None)
        elif kind == "metadata":
            header["__metadata__"] = value
        elif kind == "body":
            body = body[:len(body) + value] if value < 0 else body + bytes(value)
        elif kind == "header_length":
            length_change = value
        elif kind == "header_padding":
            padding = value
    text = json.dumps(header).encode() + padding
    return max(0, len(text) + length_change).to_bytes(8, "little") + text + body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(mutations, min_size=1, max_size=3))
def test_fuzzed_header_is_a_clean_error_or_the_declared_bytes(steps, tmp_path):
    data = mutated_file(steps)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expected = spec_reading(data)
    try:
        source = SafetensorsSource(tmp_path)
        read = {name: (source.info(name), source.get(name)) for name in source.names()}
    except CheckpointError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        unreadable = expected is not None and any(dtype not in READABLE for dtype, _, _ in expected.values())
        assert expected is None or unreadable, f"a valid file was rejected: {err}"
        return
    assert expected is not None, "an invalid file was accepted"
    assert set(read) == set(expected)
    for name, ((shape, dtype), tensor) in read.items():
        spec_dtype, spec_shape, spec_bytes = expected[name]
        assert (shape, dtype) == (spec_shape, READABLE[spec_dtype]) == (tuple(tensor.shape), tensor.dtype)
        assert as_bytes(tensor) == spec_bytes, f"tensor {name!r} differs from the bytes its header declares"


def test_a_cut_safetensors_file_is_called_truncated_naming_the_tensor_cut(tmp_path):
    """A safetensors file cut anywhere says "truncated" and names the first tensor cut short (the library's
    words came out: "header too small", "incomplete metadata, file not fully covered")."""
    save_file({"a": torch.zeros(4), "b": torch.ones(8)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    n = 8 + int.from_bytes(data[:8], "little")  # where the data begins: a's 16 bytes, then b's 32
    path = tmp_path / "model.safetensors"
    for size, said in ((0, "shorter than the 8 bytes"), (5, "shorter than the 8 bytes"),
                       (8, f"its header alone ends at byte {n}"), (n - 1, f"its header alone ends at byte {n}"),
                       (n, "tensor 'a' is the first cut short"), (n + 15, "tensor 'a' is the first cut short"),
                       (n + 16, "tensor 'b' is the first cut short"), (n + 47, "tensor 'b' is the first cut short")):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError) as info:
            SafetensorsSource(tmp_path)
        assert str(info.value).startswith(f"{path}: truncated safetensors file ({size} bytes, ") and \
            said in str(info.value), (size, str(info.value))


def test_the_reference_reading_of_the_base_file():
    """The fuzzing's oracle reads the unmutated file as the safetensors library saved it."""
    tensors = spec_reading(mutated_file([]))
    assert sorted(tensors) == NAMES and tensors["w"][:2] == ("F32", (3, 4))


def header_and_body(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


@pytest.mark.parametrize("offsets", ["overlapping", "floats"])
def test_a_header_pointing_one_tensor_at_anothers_bytes_is_rejected(small, tmp_path, offsets):
    """Issue 11's example: layer 1's q_proj declared over layer 0's bytes (or float offsets) must not load."""
    directory = shutil.copytree(small, tmp_path / "ckpt")
    header, body = header_and_body(directory / "model.safetensors")
    q0, q1 = (header[f"model.layers.{i}.self_attn.q_proj.weight"] for i in (0, 1))
    if offsets == "overlapping":
        q1["data_offsets"] = q0["data_offsets"]
    else:
        q1["data_offsets"] = [float(o) for o in q1["data_offsets"]]
    write_header(directory / "model.safetensors", header, body)
    with pytest.raises(CheckpointError, match=f"{directory / 'model.safetensors'}: unreadable safetensors file"):
        minielm.load(directory)


# ---- non-finite weights, named by tensor ----------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                                    "model.layers.2.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight"])
def test_non_finite_weight_is_named_by_tensor(small, tmp_path, tensor, stream):
    directory = shutil.copytree(small, tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    tensors[tensor].view(-1)[3] = math.nan
    save_file(tensors, directory / "model.safetensors")
    message = f"{directory / 'model.safetensors'}: tensor '{tensor}' holds non-finite weights (1 of "
    if stream and ".layers." in tensor:  # a streamed layer is checked when it is first read
        model = minielm.load(directory, stream=True)
        with pytest.raises(CheckpointError) as info:
            model.logits(IDS)
    else:
        with pytest.raises(CheckpointError) as info:
            minielm.load(directory, stream=stream)
    assert message in str(info.value) and "nan at index" in str(info.value)


def test_fused_phi3_tensor_with_inf_is_named_when_streamed(tmp_path):
    """A fused tensor is read once per use and its parts cast together; an inf in it names it."""
    from hf_reference import save_tiny_checkpoint

    save_tiny_checkpoint("phi3", tmp_path, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.self_attn.qkv_proj.weight"][-1, -1] = -math.inf
    save_file(tensors, tmp_path / "model.safetensors")
    model = minielm.load(tmp_path, stream=True)
    with pytest.raises(CheckpointError, match="tensor 'model.layers.1.self_attn.qkv_proj.weight' holds non-finite"):
        model.logits(IDS)


def test_weight_beyond_the_compute_dtype_is_named(small, tmp_path):
    """1e300 is finite in float64 and infinite in float32: named at load in float32, fine in float64."""
    directory = shutil.copytree(small, tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].double()
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e300
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'model.layers.1.mlp.up_proj.weight' holds 1e\\+300, beyond "
                                              "the range of torch.float32"):
        minielm.load(directory, dtype="float32")
    assert minielm.load(directory).weights["layers"][1].w_up[0, 0] == 1e300


# ---- the embedding read a block of rows at a time (issue 26) ---------------------------------------
def reads_of(monkeypatch, source_class) -> list:
    """[(hf name, bytes)] of every tensor that `source_class`'s get and rows return from now on."""
    reads = []
    for method in {"get", "rows"} & set(dir(source_class)):
        real = getattr(source_class, method)

        def spy(self, name, *rows, real=real):
            tensor = real(self, name, *rows)
            reads.append((name, tensor.numel() * tensor.element_size()))
            return tensor
        monkeypatch.setattr(source_class, method, spy)
    return reads


@pytest.mark.parametrize("stream", [False, True])
def test_the_embedding_is_never_read_whole(small, monkeypatch, stream):
    """A 15 GB bf16 embedding was read whole in the file's dtype, checked (torch.isfinite's temporaries of the whole)
    and then cast: in float64 the 15 GB and the 60 GB were held at once, and under --stream the 15 GB more than once.
    Now no read of the embedding or the unembedding returns more than a block (BLOCK_BYTES, here 3 rows), and the
    model is the one read whole."""
    whole = minielm.load(small, stream=stream)
    monkeypatch.setattr(minielm.checkpoint, "BLOCK_BYTES", 3 * 32 * 2)  # 3 rows of d = 32 in bf16
    reads = reads_of(monkeypatch, SafetensorsSource)
    model = minielm.load(small, stream=stream)
    top = [size for name, size in reads if name in ("model.embed_tokens.weight", "lm_head.weight")]
    assert len(top) >= 2 * 128 // 3 and max(top) <= 3 * 32 * 2, top
    for name in ("embed", "lm_head"):
        assert model.weights[name].dtype == (torch.bfloat16 if stream else torch.float64)
        assert torch.equal(model.weights[name], whole.weights[name])
    assert torch.equal(model.logits(IDS), whole.logits(IDS))


def test_a_non_finite_embedding_value_is_counted_over_every_block(small, tmp_path, monkeypatch):
    """Read in blocks, a non-finite embedding is still named with its count over the whole tensor and its index."""
    directory = shutil.copytree(small, tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.embed_tokens.weight"][[5, 77, 120], [1, 2, 3]] = torch.tensor([math.inf, math.nan, -math.inf],
                                                                                 dtype=torch.bfloat16)
    save_file(tensors, directory / "model.safetensors")
    monkeypatch.setattr(minielm.checkpoint, "BLOCK_BYTES", 10 * 32 * 2)
    with pytest.raises(CheckpointError) as info:
        minielm.load(directory)
    assert str(info.value) == (f"{directory / 'model.safetensors'}: tensor 'model.embed_tokens.weight' holds "
                               f"non-finite weights (3 of 4096, the first inf at index [5, 1]); the checkpoint is corrupt")


# ---- a tokenizer that belongs to another model ---------------------------------------------------
def word_level_tokenizer(path: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


@pytest.mark.parametrize("size, ok", [(128, True), (100, True), (129, False), (5000, False)])
def test_tokenizer_json_ids_beyond_vocab_size_are_named_at_load(small, tmp_path, size, ok):
    directory = shutil.copytree(small, tmp_path / "ckpt")
    word_level_tokenizer(directory / "tokenizer.json", size)
    if ok:
        assert minielm.load(directory).tokenizer.encode(f"w{size - 1}") == [size - 1]
        return
    with pytest.raises(TokenizerError) as info:
        minielm.load(directory)
    assert str(info.value) == (f"{directory / 'tokenizer.json'}: the tokenizer has token ids up to {size - 1}, but "
                               f"{directory / 'config.json'} says vocab_size=128: the tokenizer and the weights do "
                               f"not belong to the same model")


def test_added_token_beyond_vocab_size_is_named(small, tmp_path):
    """An added (special) token counts: its id is what the tokenizer emits."""
    from tokenizers import AddedToken, Tokenizer

    directory = shutil.copytree(small, tmp_path / "ckpt")
    word_level_tokenizer(directory / "tokenizer.json", 128)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<extra>")])  # id 128
    tokenizer.save(str(directory / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="token ids up to 128, but .* says vocab_size=128"):
        minielm.load(directory)


def test_sentencepiece_vocabulary_beyond_vocab_size_is_named(tmp_path):
    """The shipped tokenizer (4096 pieces) with weights for 4000 ids: named on the command line too."""
    shutil.copy(minielm.load().directory / "tokenizer.model", tmp_path / "tokenizer.model")
    random_checkpoint(tmp_path, d=16, layers=1, f=32, heads=2, kv_heads=1, vocab=4000)
    result = subprocess.run([sys.executable, "-m", "minielm.cli", "explain", "In the beginning", "--model",
                             str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"minielm: error: {tmp_path / 'tokenizer.model'}: the tokenizer has token ids up to 4095, but "
        f"{tmp_path / 'config.json'} says vocab_size=4000: the tokenizer and the weights do not belong to the "
        f"same model"]


# ---- a file that changes during a run -------------------------------------------------------------
CHANGES = """
import os
from pathlib import Path

def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)

def flip_last_half(path: Path) -> None:
    \"\"\"Same size, other bytes: the last half's top bits flipped, written in place.\"\"\"
    data = bytearray(path.read_bytes())
    half = len(data) // 2
    data[half:] = bytes(b ^ 0x80 for b in data[half:])
    with open(path, "r+b") as f:
        f.write(data)

def rewrite(path: Path) -> None:
    \"\"\"Rewritten in place, with a later modification time.\"\"\"
    flip_last_half(path)
    later = path.stat().st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(later, later))

def rewrite_keeping_mtime(path: Path) -> None:
    \"\"\"Rewritten in place, the modification time put back (`cp -p`, `rsync -t --inplace`, `touch -r`).\"\"\"
    before = path.stat()
    flip_last_half(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
"""
exec(CHANGES)

# The child runs the real command line; `minielm.cli.load` is wrapped so that the file changes at a
# known moment: right after the model is loaded, before the run reads its layers.
CLI_CHILD = CHANGES + """
import sys
import minielm.cli

change, loaded = globals()[sys.argv[1]], minielm.cli.load

def load_then_change(path, **kwargs):
    model = loaded(path, **kwargs)
    change(Path(path) / "model.safetensors")
    return model

minielm.cli.load = load_then_change
sys.exit(minielm.cli.main(sys.argv[2:]))
"""


def run_cli_child(change: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI_CHILD, change, *args], capture_output=True, text=True, env=ENV)


@pytest.fixture
def shipped_copy(tmp_path) -> Path:
    """The shipped model (bfloat16 on disk), copied so that it can be broken."""
    return shutil.copytree(minielm.load().directory, tmp_path / "kjv-tiny")


@pytest.mark.parametrize("change, fragment", [
    ("truncate", "the file changed on disk during this run (it was truncated to 7869848 bytes from 15739696; reading tensor"),
    ("rewrite", "the file changed on disk during this run (it was rewritten; reading tensor"),
    ("rewrite_keeping_mtime", "the file changed on disk during this run (its status-change time moved: rewritten "
                              "with the modification time restored, or its permissions changed; reading tensor"),
])
def test_checkpoint_changed_during_a_streamed_run(shipped_copy, change, fragment):
    result = run_cli_child(change, "explain", "In the beginning", "--model", str(shipped_copy), "--stream")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])  # not -SIGBUS
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"minielm: error: {shipped_copy / 'model.safetensors'}: ") and fragment in line


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_loaded_model_does_not_depend_on_the_file(shipped_copy, change):
    """Without streaming (here bfloat16 on a bfloat16 file, where a cast is no copy), the weights are the
    process's own: the file changing after load changes nothing in the run."""
    args = ["generate", "In the beginning", "--model", str(shipped_copy), "--dtype", "bfloat16",
            "--max-new-tokens", "12"]
    reference = subprocess.run([sys.executable, "-m", "minielm.cli", *args], capture_output=True, text=True,
                               env=ENV, check=True)
    result = run_cli_child(change, *args)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout == reference.stdout and len(reference.stdout) > 20


@pytest.mark.parametrize("resident", [True, False])
def test_a_resident_streamed_model_does_not_depend_on_the_file_after_reading_it(shipped_copy, resident):
    """A streamed model that keeps its layers (the shipped one fits) reads each tensor once: a file cut
    after the first pass changes nothing, as for a model loaded whole. One that reads its layers again at
    every use checks the file at every read."""
    model = minielm.load(shipped_copy, stream=True)
    model.weights["layers"].resident = resident
    reference = model.logits(IDS)
    truncate(shipped_copy / "model.safetensors")
    if resident:
        assert torch.equal(model.logits(IDS), reference)
    else:
        with pytest.raises(CheckpointError, match="the file changed on disk during this run .it was truncated"):
            model.logits(IDS)


# Here another process truncates the file while the streamed run goes on, at a moment not chosen.
STREAM_CHILD = """
import sys, torch, minielm
model = minielm.load(sys.argv[1], stream=True)
model.weights["layers"].resident = False  # each use reads its layer again (a resident model reads it once)
reference = model.logits([1, 17, 5, 88])
print("ready", flush=True)
try:
    for _ in range(100000):
        assert torch.equal(model.logits([1, 17, 5, 88]), reference)
except minielm.CheckpointError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
sys.exit(3)
"""


def test_truncated_by_another_process_during_a_streamed_run(shipped_copy):
    child = subprocess.Popen([sys.executable, "-c", STREAM_CHILD, str(shipped_copy)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    assert child.stdout.readline().strip() == "ready"
    truncate(shipped_copy / "model.safetensors")
    _, stderr = child.communicate(timeout=300)
    assert child.returncode != -signal.SIGBUS
    assert child.returncode == 2, (child.returncode, stderr[-2000:])
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"{shipped_copy / 'model.safetensors'}: the file changed on disk during this run (it was "
                           f"truncated to 7869848 bytes from 15739696; reading tensor ")
