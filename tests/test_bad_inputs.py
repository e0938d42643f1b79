"""Bad input, as a hostile user would type it, through the Python API and the command line (issue 11).

One table per surface. Every row must end in the error class it names, with a one-line
message holding each fragment (the argument or flag, the value, what is allowed), and
the checkpoint directory must be byte-for-byte what it was. Command-line rows also need
exit status 2, one `... error: ...` line on stderr, nothing on stdout and no traceback;
rows marked `before_load` must fail before the model is loaded at all (the loader is
watched). Most command-line rows run `minielm.cli.main` in this process; a handful at
the end run the real command, for what only a real process shows: a closed pipe, a
full disk, argparse's own exit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import minielm
import minielm.cli
from minielm.errors import InputError, NumericalError, OutputError, TokenizerError
from minielm.interpret import decode_input, decode_output, layer_table, stable_rank, stacked_svd, token_shares
from minielm.layer_maps import all_layer_maps
from minielm.steering import steer, steering_edit, steering_operator
from minielm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench import random_checkpoint  # noqa: E402

PROMPT = "And God said"
D, LAYERS, VOCAB, POSITIONS = 48, 2, 320, 64  # the checkpoint below
NAN, INF = math.nan, math.inf


def digest(directory: Path) -> dict:
    """sha256 of every file under a directory, by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tiny_with_tokenizer, tmp_path_factory) -> Path:
    """The session's tiny Llama-style checkpoint with its sentencepiece tokenizer (d=48, 2 layers,
    vocabulary 320), with max_position_embeddings lowered to 64 so that position limits are cheap to hit."""
    directory = tmp_path_factory.mktemp("bad_inputs") / "ckpt"
    shutil.copytree(tiny_with_tokenizer, directory)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = POSITIONS
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def model(ckpt):
    return minielm.load(ckpt)


@pytest.fixture(scope="module")
def mismatched(ckpt, tmp_path_factory):
    """A model with vocabulary 256 holding a tokenizer of 320 pieces. minielm.load may refuse such a
    pair outright; the model is put together by hand so that the token-id path is tested on its own."""
    directory = tmp_path_factory.mktemp("mismatch")
    random_checkpoint(directory, d=16, layers=1, f=32, heads=2, kv_heads=1, vocab=256)
    model = minielm.load(directory)
    model._tokenizer = load_tokenizer(ckpt)
    return model


@pytest.fixture
def unchanged(ckpt):
    """Asserts, after the test, that the checkpoint directory is byte-for-byte unchanged."""
    before = digest(ckpt)
    yield
    assert digest(ckpt) == before


# ---- the Python API -------------------------------------------------------------------------------
@dataclass
class Api:
    name: str
    call: Callable  # (model, ids, ckpt) -> anything; must raise
    error: type
    fragments: tuple  # each must be in the message


ML = minielm.equivalent_linear_map
API = [
    # load
    Api("load_empty_path", lambda m, ids, c: minielm.load(""), InputError, ("path is empty",)),
    Api("load_int_path", lambda m, ids, c: minielm.load(3), InputError, ("path", "got int")),
    Api("load_bytes_path", lambda m, ids, c: minielm.load(bytes(str(c), "utf-8")), InputError, ("path", "bytes")),
    Api("load_dtype_name", lambda m, ids, c: minielm.load(c, dtype="float8"), InputError,
        ("dtype 'float8'", "float64")),
    Api("load_dtype_int", lambda m, ids, c: minielm.load(c, dtype=torch.int64), InputError, ("dtype torch.int64",)),
    Api("load_device", lambda m, ids, c: minielm.load(c, device="tpu"), InputError, ("device 'tpu'", "cpu")),
    Api("load_stream_text", lambda m, ids, c: minielm.load(c, stream="yes"), InputError,
        ("stream must be True or False", "'yes'")),
    Api("load_stream_int", lambda m, ids, c: minielm.load(c, stream=1), InputError, ("stream", "got 1")),
    # token ids: logits, embed, check_ids
    Api("logits_booleans", lambda m, ids, c: m.logits([True, False]), InputError, ("ids[0]", "True", "boolean")),
    Api("logits_none", lambda m, ids, c: m.logits(None), InputError, ("ids", "NoneType")),
    Api("logits_text", lambda m, ids, c: m.logits("And God"), InputError, ("ids", "'And God'", "tokenizer.encode")),
    Api("logits_bytes", lambda m, ids, c: m.logits(b"And"), InputError, ("ids", "bytes", "b'And'")),
    Api("logits_empty", lambda m, ids, c: m.logits([]), InputError, ("ids is empty",)),
    Api("logits_float_id", lambda m, ids, c: m.logits([1, 2.0]), InputError, ("ids[1]", "2.0", "integer")),
    Api("logits_id_too_large", lambda m, ids, c: m.logits([1, VOCAB]), InputError,
        (f"token id {VOCAB}", f"[0, {VOCAB})")),
    Api("logits_negative_id", lambda m, ids, c: m.logits([-1, 2]), InputError, ("token id -1", "position 0")),
    Api("logits_float_tensor", lambda m, ids, c: m.logits(torch.tensor([1.0, 2.0])), InputError,
        ("ids", "torch.float32", "integer")),
    Api("logits_2d_tensor", lambda m, ids, c: m.logits(torch.tensor([[1, 2]])), InputError, ("ids", "(1, 2)")),
    Api("logits_bool_tensor", lambda m, ids, c: m.logits(torch.tensor([True])), InputError, ("ids", "torch.bool")),
    Api("logits_int", lambda m, ids, c: m.logits(7), InputError, ("ids", "int 7")),
    Api("logits_too_long", lambda m, ids, c: m.logits([1] * (POSITIONS + 1)), InputError,
        (f"{POSITIONS + 1} tokens", f"max_position_embeddings={POSITIONS}")),
    Api("embed_numpy_bool", lambda m, ids, c: m.embed([np.bool_(True)]), InputError, ("ids[0]", "boolean")),
    Api("check_ids_float_array", lambda m, ids, c: m.check_ids(np.array([1.5])), InputError, ("ids", "float64")),
    # generate
    Api("generate_bytes", lambda m, ids, c: m.generate(b"And God"), InputError, ("prompt", "bytes", "decode")),
    Api("generate_none", lambda m, ids, c: m.generate(None), InputError, ("prompt", "NoneType")),
    Api("generate_dict", lambda m, ids, c: m.generate({"text": PROMPT}), InputError, ("prompt", "dict")),
    Api("generate_negative_tokens", lambda m, ids, c: m.generate(PROMPT, max_new_tokens=-1), InputError,
        ("max_new_tokens", "-1", f"[0, {POSITIONS}]")),
    Api("generate_runaway_tokens", lambda m, ids, c: m.generate(PROMPT, max_new_tokens=10**12), InputError,
        ("max_new_tokens", "1000000000000")),
    Api("generate_past_positions", lambda m, ids, c: m.generate(PROMPT, max_new_tokens=POSITIONS), InputError,
        ("max_new_tokens=64", "exceed max_position_embeddings=64")),
    Api("generate_bool_tokens", lambda m, ids, c: m.generate(PROMPT, max_new_tokens=True), InputError,
        ("max_new_tokens", "True", "boolean")),
    Api("generate_float_tokens", lambda m, ids, c: m.generate(PROMPT, max_new_tokens=2.5), InputError,
        ("max_new_tokens", "2.5")),
    Api("generate_nan_temperature", lambda m, ids, c: m.generate(PROMPT, temperature=NAN), InputError,
        ("temperature", "nan", "finite")),
    Api("generate_negative_temperature", lambda m, ids, c: m.generate(PROMPT, temperature=-0.5), InputError,
        ("temperature", "-0.5", ">= 0")),
    Api("generate_text_temperature", lambda m, ids, c: m.generate(PROMPT, temperature="hot"), InputError,
        ("temperature", "'hot'")),
    Api("generate_zero_top_k", lambda m, ids, c: m.generate(PROMPT, top_k=0), InputError, ("top_k", "got 0")),
    Api("generate_bool_top_k", lambda m, ids, c: m.generate(PROMPT, top_k=True), InputError, ("top_k", "True")),
    Api("generate_huge_seed", lambda m, ids, c: m.generate(PROMPT, seed=2**70), InputError,
        ("seed", str(2**70), "2**64")),
    Api("generate_negative_seed", lambda m, ids, c: m.generate(PROMPT, seed=-1), InputError, ("seed", "-1")),
    Api("generate_edit_not_callable", lambda m, ids, c: m.generate(PROMPT, edit=5), InputError, ("edit", "int")),
    Api("generate_ids_float_temperature", lambda m, ids, c: m.generate_ids(ids, temperature=INF), InputError,
        ("temperature", "inf")),
    # equivalent_linear_map
    Api("map_component_without_layer", lambda m, ids, c: ML(m, ids, component="mlp"), InputError,
        ("component='mlp' needs a layer", "[0, 2)")),
    Api("map_unknown_component", lambda m, ids, c: ML(m, ids, component="foo"), InputError,
        ("component", "'foo'", "'attention'")),
    Api("map_unknown_component_with_layer", lambda m, ids, c: ML(m, ids, layer=0, component="MLP"), InputError,
        ("component", "'MLP'")),
    Api("map_bool_layer", lambda m, ids, c: ML(m, ids, layer=True), InputError, ("layer", "True", "boolean")),
    Api("map_layer_too_large", lambda m, ids, c: ML(m, ids, layer=LAYERS), InputError, ("layer", "[-2, 2)", "got 2")),
    Api("map_layer_too_small", lambda m, ids, c: ML(m, ids, layer=-3), InputError, ("layer", "got -3")),
    Api("map_float_layer", lambda m, ids, c: ML(m, ids, layer=1.0), InputError, ("layer", "1.0")),
    Api("map_no_model", lambda m, ids, c: ML(None, ids), InputError, ("model", "Model", "NoneType")),
    Api("map_no_ids", lambda m, ids, c: ML(m, None), InputError, ("ids", "NoneType")),
    # detached_jacobian, attribution, all_layer_maps
    Api("jacobian_bool_ids", lambda m, ids, c: minielm.detached_jacobian(m, [True]), InputError, ("ids[0]", "True")),
    Api("jacobian_model_path", lambda m, ids, c: minielm.detached_jacobian(str(c), ids), InputError,
        ("model", "str")),
    Api("attribution_token_too_large", lambda m, ids, c: minielm.attribution(m, ids, token=VOCAB), InputError,
        ("token", f"[0, {VOCAB})", f"got {VOCAB}")),
    Api("attribution_bool_token", lambda m, ids, c: minielm.attribution(m, ids, token=True), InputError,
        ("token", "True")),
    Api("attribution_negative_token", lambda m, ids, c: minielm.attribution(m, ids, token=-1), InputError,
        ("token", "-1")),
    Api("all_layer_maps_mode", lambda m, ids, c: all_layer_maps(m, ids, mode="sideways"), InputError,
        ("mode", "'sideways'", "'reverse'")),
    Api("all_layer_maps_empty", lambda m, ids, c: all_layer_maps(m, []), InputError, ("ids is empty",)),
    # singular_vectors
    Api("svd_zero_k", lambda m, ids, c: minielm.singular_vectors(m, ids, k=0), InputError, ("k", f"[1, {D}]")),
    Api("svd_k_too_large", lambda m, ids, c: minielm.singular_vectors(m, ids, k=D + 1), InputError,
        ("k", f"got {D + 1}")),
    Api("svd_bool_k", lambda m, ids, c: minielm.singular_vectors(m, ids, k=True), InputError, ("k", "True")),
    Api("svd_token_position", lambda m, ids, c: minielm.singular_vectors(m, ids, token=len(ids)), InputError,
        ("token", "a position in the", "-token prompt")),
    Api("svd_positions_empty", lambda m, ids, c: minielm.singular_vectors(m, ids, positions=[]), InputError,
        ("positions", "non-empty list", "got []")),
    Api("svd_positions_int", lambda m, ids, c: minielm.singular_vectors(m, ids, positions=1), InputError,
        ("positions", "list of positions", "got 1")),
    Api("svd_positions_past", lambda m, ids, c: minielm.singular_vectors(m, ids, positions=[1, 99]), InputError,
        ("positions[1]", "got 99", "-token prompt")),
    Api("svd_positions_twice", lambda m, ids, c: minielm.singular_vectors(m, ids, positions=[1, -len(ids) + 1]),
        InputError, ("positions", "position 1 twice")),
    Api("svd_positions_and_token", lambda m, ids, c: minielm.singular_vectors(m, ids, token=0, positions=[1]),
        InputError, ("token and positions",)),
    Api("svd_zero_tol", lambda m, ids, c: minielm.singular_vectors(m, ids, tol=0), InputError, ("tol", "> 0")),
    Api("svd_nan_tol", lambda m, ids, c: minielm.singular_vectors(m, ids, tol=NAN), InputError, ("tol", "nan")),
    Api("svd_steps_below_k", lambda m, ids, c: minielm.singular_vectors(m, ids, k=4, max_steps=2), InputError,
        ("max_steps", "got 2", "at least k")),
    Api("svd_huge_seed", lambda m, ids, c: minielm.singular_vectors(m, ids, seed=2**70), InputError, ("seed",)),
    # steering
    Api("steer_bytes_concept", lambda m, ids, c: steer(m, b"the sea", PROMPT, 1, 1.0), InputError,
        ("concept", "bytes")),
    Api("steer_bytes_prompt", lambda m, ids, c: steer(m, "the sea", b"And", 1, 1.0), InputError,
        ("prompt", "bytes")),
    Api("steer_layer_out_of_range", lambda m, ids, c: steer(m, "the sea", PROMPT, LAYERS, 1.0), InputError,
        ("layer", "[0, 2)", "got 2")),
    Api("steer_nan_scale", lambda m, ids, c: steer(m, "the sea", PROMPT, 1, NAN), InputError, ("scale", "nan")),
    Api("steer_bool_scale", lambda m, ids, c: steer(m, "the sea", PROMPT, 1, True), InputError, ("scale", "True")),
    Api("steer_negative_tokens", lambda m, ids, c: steer(m, "the sea", PROMPT, 1, 1.0, max_new_tokens=-3),
        InputError, ("max_new_tokens", "-3")),
    Api("steering_operator_negative_layer", lambda m, ids, c: steering_operator(m, "the sea", -1), InputError,
        ("layer", "got -1")),
    Api("steering_edit_not_square", lambda m, ids, c: steering_edit(torch.zeros(3, 4, dtype=torch.float64), 0, 1.0),
        InputError, ("operator", "(3, 4)")),
    Api("steering_edit_bool_layer", lambda m, ids, c: steering_edit(torch.eye(3), True, 1.0), InputError,
        ("layer", "True")),
    Api("steering_overflowing_scale", lambda m, ids, c: steer(m, "the sea", PROMPT, 0, 1e308, max_new_tokens=2),
        NumericalError, ("steering at layer 0", "1e+308")),
    # interpret helpers
    Api("stacked_svd_zero_k", lambda m, ids, c: stacked_svd(ML(m, ids), 0), InputError, ("k", "got 0")),
    Api("stacked_svd_not_a_map", lambda m, ids, c: stacked_svd(torch.zeros(2, 3, 3), 1), InputError,
        ("elm", "EquivalentLinearMap", "Tensor")),
    Api("decode_output_wrong_shape", lambda m, ids, c: decode_output(m, torch.zeros(5, dtype=torch.float64)),
        InputError, ("u", f"({D},)", "(5,)")),
    Api("decode_input_zero_n", lambda m, ids, c: decode_input(m, torch.ones(D, dtype=torch.float64), 0), InputError,
        ("n", "got 0")),
    Api("layer_table_zero_k", lambda m, ids, c: layer_table(m, ids, k=0), InputError, ("k", "got 0")),
    Api("stable_rank_vector", lambda m, ids, c: stable_rank(torch.zeros(3)), InputError, ("J", "(3,)")),
    Api("token_shares_none", lambda m, ids, c: token_shares(None), InputError, ("elm", "NoneType")),
    # raw exceptions that escaped (issue 26): NotImplementedError, OSError, TypeError, IndexError
    Api("ids_on_meta", lambda m, ids, c: m.logits(torch.tensor([1, 2], device="meta")), InputError,
        ("ids", "meta device", "no values")),
    Api("load_name_too_long", lambda m, ids, c: minielm.load(c / ("a" * 300)), InputError,
        ("checkpoint path", "too long", "300 bytes")),
    Api("load_path_too_long", lambda m, ids, c: minielm.load("/".join(["a" * 200] * 30)), InputError,
        ("checkpoint path", "too long")),
    Api("out_name_too_long", lambda m, ids, c: ML(m, ids, out=c.parent / ("a" * 300)), OutputError,
        ("out", "too long", "300 bytes")),
    Api("out_partial_name_too_long", lambda m, ids, c: ML(m, ids, out=c.parent / ("a" * 250)), OutputError,
        ("out", ".partial", "too long", "258 bytes")),
    Api("edit_wrong_signature", lambda m, ids, c: m.generate(PROMPT, 2, edit=lambda h: h), InputError,
        ("edit", "edit(i, h, x)", "3 arguments")),
    Api("edit_returns_none", lambda m, ids, c: m.generate(PROMPT, 2, edit=lambda i, h, x: None), InputError,
        ("edit", "returned None", "layer 0", "tensor")),
    Api("edit_returns_wrong_shape", lambda m, ids, c: m.generate(PROMPT, 2, edit=lambda i, h, x: h[:1]), InputError,
        ("edit", "layer 0", "shape (1, 48)", "the shape of h")),
    Api("edit_returns_wrong_dtype", lambda m, ids, c: m.generate(PROMPT, 2, edit=lambda i, h, x: h.float()),
        InputError, ("edit", "torch.float32", "torch.float64")),
    Api("edit_makes_nan", lambda m, ids, c: m.generate(PROMPT, 2, edit=lambda i, h, x: h * NAN if i == 0 else h),
        NumericalError, ("non-finite values", "edit", "after layer 0")),
]


@pytest.fixture(scope="module")
def ids(model):
    return model.tokenizer.encode(PROMPT)


def one_line(error: BaseException, fragments) -> None:
    message = str(error)
    assert "\n" not in message and message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("row", API, ids=[row.name for row in API])
def test_api(row, model, ids, ckpt, unchanged):
    with pytest.raises(row.error) as info:
        row.call(model, ids, ckpt)
    assert type(info.value) is row.error
    one_line(info.value, row.fragments)


@pytest.mark.parametrize("call", [lambda m: m.logits(m.tokenizer.encode("In the beginning God created")),
                                  lambda m: m.generate("In the beginning God created", max_new_tokens=2),
                                  lambda m: minielm.equivalent_linear_map(m, m.tokenizer.encode("the light"))],
                         ids=["logits", "generate", "linear_map"])
def test_tokenizer_larger_than_the_vocabulary(mismatched, call):
    """Typed text whose ids the model does not have: the message names the tokenizer/vocabulary
    mismatch, not only an id out of range."""
    with pytest.raises(TokenizerError) as info:
        call(mismatched)
    one_line(info.value, ("outside the model's vocabulary [0, 256)", "has 320 ids",
                          "config.json says vocab_size=256", "does not match"))


def test_ids_within_a_mismatched_vocabulary_still_run(mismatched):
    """The mismatch is named only when an id actually falls outside: ids the model has run as usual."""
    assert mismatched.logits([1, 5, 9]).shape == (3, 256)


# ---- the command line -----------------------------------------------------------------------------
@dataclass
class Cli:
    name: str
    args: list  # "{ckpt}" and "{tmp}" are filled in
    error: str | None  # the error class named by the row (None: argparse's usage error)
    fragments: tuple
    before_load: bool = True  # must fail before minielm.load is called


CLI = [
    Cli("model_empty", ["generate", PROMPT, "--model", ""], "InputError", ("--model", "''")),
    Cli("model_blank", ["explain", PROMPT, "--model", "  "], "InputError", ("--model", "'  '")),
    Cli("dtype", ["explain", PROMPT, "--dtype", "float8"], "InputError", ("dtype 'float8'",)),
    Cli("device", ["explain", PROMPT, "--device", "tpu"], "InputError", ("device 'tpu'",)),
    Cli("plot_existing_directory", ["explain", PROMPT, "--plot", "{tmp}"], "OutputError",
        ("--plot", "{tmp}", "is a directory")),
    Cli("plot_missing_directory", ["layers", PROMPT, "--plot", "{tmp}/missing/x.png"], "OutputError",
        ("--plot", "{tmp}/missing", "does not exist")),
    Cli("plot_parent_is_a_file", ["explain", PROMPT, "--plot", "{tmp}/file.txt/x.png"], "OutputError",
        ("--plot", "file.txt", "is not a directory")),
    Cli("plot_read_only", ["explain", PROMPT, "--plot", "/sys/minielm-plot.png"], "OutputError",
        ("--plot /sys/minielm-plot.png", "cannot write")),
    Cli("plot_empty", ["explain", PROMPT, "--plot", ""], "OutputError", ("--plot needs a file name",)),
    Cli("plot_format", ["explain", PROMPT, "--plot", "{tmp}/x.foo"], "InputError", ("'foo'", "png")),
    Cli("k_zero", ["explain", PROMPT, "-k", "0"], "InputError", ("-k", "got 0", f"[1, {D}]")),
    Cli("k_negative", ["explain", PROMPT, "-k", "-3"], "InputError", ("-k", "got -3")),
    Cli("k_too_large", ["explain", PROMPT, "-k", "1000"], "InputError", ("-k", "got 1000", "hidden_size")),
    Cli("k_not_integer", ["explain", PROMPT, "-k", "two"], None, ("-k", "'two'")),
    Cli("skip_positions_text", ["explain", PROMPT, "--skip-positions", "bos"], "InputError",
        ("--skip-positions", "comma-separated", "'bos'")),
    Cli("skip_positions_negative", ["explain", PROMPT, "--skip-positions", "0,-1"], "InputError",
        ("--skip-positions", "got -1")),
    Cli("skip_positions_past_positions", ["explain", PROMPT, "--skip-positions", str(POSITIONS)], "InputError",
        ("--skip-positions", f"[0, {POSITIONS})", f"got {POSITIONS}")),
    Cli("skip_positions_past_the_prompt", ["explain", PROMPT, "--skip-positions", "40"], "InputError",
        ("--skip-positions", "got 40", "-token prompt"), before_load=False),
    Cli("skip_positions_every_one", ["explain", PROMPT, "--skip-positions", ",".join(map(str, range(10)))], "InputError",
        ("--skip-positions", "leaves out every position"), before_load=False),
    Cli("layer_too_large", ["steer", PROMPT, "--concept", "sea", "--layer", "2"], "InputError",
        ("--layer", "[0, 2)", "got 2")),
    Cli("layer_negative", ["steer", PROMPT, "--concept", "sea", "--layer", "-1"], "InputError", ("--layer", "-1")),
    Cli("layer_not_integer", ["steer", PROMPT, "--concept", "sea", "--layer", "1.5"], None, ("--layer", "'1.5'")),
    Cli("layer_boolean", ["steer", PROMPT, "--concept", "sea", "--layer", "True"], None, ("--layer", "'True'")),
    Cli("scale_nan", ["steer", PROMPT, "--concept", "sea", "--layer", "1", "--scale", "nan"], "InputError",
        ("--scale", "nan", "finite")),
    Cli("scale_inf", ["steer", PROMPT, "--concept", "sea", "--layer", "1", "--scale", "inf"], "InputError",
        ("--scale", "inf")),
    Cli("scale_overflow", ["steer", PROMPT, "--concept", "sea", "--layer", "0", "--scale", "1e308",
                           "--max-new-tokens", "2"], "NumericalError", ("steering at layer 0",), before_load=False),
    Cli("steer_tokens_zero", ["steer", PROMPT, "--concept", "sea", "--layer", "1", "--max-new-tokens", "0"],
        "InputError", ("--max-new-tokens", "got 0")),
    Cli("tokens_zero", ["generate", PROMPT, "--max-new-tokens", "0"], "InputError", ("--max-new-tokens", "got 0")),
    Cli("tokens_negative", ["generate", PROMPT, "--max-new-tokens", "-5"], "InputError",
        ("--max-new-tokens", "got -5")),
    Cli("tokens_runaway", ["generate", PROMPT, "--max-new-tokens", str(10**9)], "InputError",
        ("--max-new-tokens", "1000000000", f"[1, {POSITIONS - 1}]")),
    Cli("tokens_absurd", ["generate", PROMPT, "--max-new-tokens", str(10**12)], "InputError",
        ("--max-new-tokens", "1000000000000")),
    Cli("tokens_past_positions", ["generate", PROMPT, "--max-new-tokens", str(POSITIONS - 1)], "InputError",
        ("exceed max_position_embeddings=64",), before_load=False),
    Cli("temperature_nan", ["generate", PROMPT, "--temperature", "nan"], "InputError",
        ("--temperature", "nan", ">= 0")),
    Cli("temperature_negative", ["generate", PROMPT, "--temperature", "-1"], "InputError",
        ("--temperature", "-1.0")),
    Cli("temperature_inf", ["generate", PROMPT, "--temperature", "inf"], "InputError", ("--temperature", "inf")),
    Cli("seed_huge", ["generate", PROMPT, "--seed", str(2**70)], "InputError", ("--seed", str(2**70), "2**64")),
    Cli("seed_negative", ["generate", PROMPT, "--seed", "-1"], "InputError", ("--seed", "-1")),
    Cli("seed_expression", ["generate", PROMPT, "--seed", "2**70"], None, ("--seed", "'2**70'")),
    Cli("top_k_zero", ["generate", PROMPT, "--top-k", "0"], "InputError", ("--top-k", "got 0")),
    Cli("top_k_negative", ["generate", PROMPT, "--top-k", "-2"], "InputError", ("--top-k", "got -2")),
    Cli("unknown_command", ["explian", PROMPT], None, ("'explian'",)),
    Cli("missing_prompt", ["generate"], "InputError", ("no prompt",)),
    Cli("missing_concept", ["steer", PROMPT, "--layer", "1"], "InputError", ("concept",)),
    Cli("surrogate_prompt", ["explain", "\ud800"], "TokenizerError", ("lone surrogate",), before_load=False),
    Cli("out_name_too_long", ["operators", PROMPT, "--out", "{tmp}/" + "a" * 300], "OutputError",
        ("--out", "too long", "300 bytes")),
    Cli("html_name_too_long", ["explain", PROMPT, "--html", "{tmp}/" + "a" * 250], "OutputError",
        ("--html", "too long", "temporary name")),
    Cli("plot_name_too_long", ["layers", PROMPT, "--plot", "{tmp}/" + "a" * 300], "OutputError",
        ("--plot", "too long", "300 bytes")),
    Cli("model_name_too_long", ["explain", PROMPT, "--model", "{tmp}/" + "a" * 300], "InputError",
        ("checkpoint path", "too long")),
    Cli("missing_model_directory", ["explain", PROMPT, "--model", "{tmp}/nothing"], "CheckpointError",
        ("{tmp}/nothing", "no such checkpoint directory"), before_load=False),
]
CLASSES = {name: getattr(minielm, name) for name in
           ("InputError", "OutputError", "NumericalError", "TokenizerError", "CheckpointError")}


def fill(text: str, ckpt: Path, tmp: Path) -> str:
    return text.replace("{ckpt}", str(ckpt)).replace("{tmp}", str(tmp))


@pytest.mark.parametrize("row", CLI, ids=[row.name for row in CLI])
def test_cli(row, ckpt, tmp_path, capsys, monkeypatch, unchanged):
    (tmp_path / "file.txt").write_text("a file, not a directory")
    args = [fill(a, ckpt, tmp_path) for a in row.args]
    if "--model" not in args and row.args[0] in ("explain", "layers", "steer", "generate", "check"):
        args += ["--model", str(ckpt)]
    loads, real_load = [], minielm.cli.load
    monkeypatch.setattr(minielm.cli, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    if row.error is None:  # argparse's usage errors exit from inside parse_args
        with pytest.raises(SystemExit) as info:
            minielm.cli.main(args)
        code = info.value.code
    else:
        code = minielm.cli.main(args)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minielm") and "error: " in lines[0], err
    for fragment in row.fragments:
        assert fill(fragment, ckpt, tmp_path) in lines[0], lines[0]
    if row.error is not None:  # the class: --debug re-raises what main printed
        with pytest.raises(CLASSES[row.error]) as info:
            minielm.cli.main(["--debug", *args])
        assert str(info.value) in lines[0]
    if row.before_load:
        assert not loads, "the model was loaded before the bad flag was caught"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"], "an output file was left behind"


# ---- real processes: what only a real command shows -----------------------------------------------
def run(args, timeout=300, **popen):
    popen = popen or dict(capture_output=True)
    return subprocess.run([sys.executable, "-m", "minielm.cli", *args], text=True, timeout=timeout, **popen)


def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "error: " in lines[0], result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_real_processes_fail_cleanly(ckpt, tmp_path, unchanged):
    assert_one_error_line(run(["generate", PROMPT, "--model", ""]), "--model", "''")
    assert_one_error_line(run(["generate", PROMPT, "--model", str(ckpt), "--max-new-tokens", str(10**12)]),
                          "--max-new-tokens")
    assert_one_error_line(run(["explain", PROMPT, "--model", str(ckpt), "--plot", str(tmp_path)]), "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_an_output_error(ckpt, tmp_path, unchanged):
    """stdout, a plot and an HTML report on /dev/full: ENOSPC, one line, exit 2; and /dev/full is still
    the device (a file written beside it and renamed over it would replace the device node)."""
    if not stat.S_ISCHR(os.stat("/dev/full").st_mode if Path("/dev/full").exists() else 0):
        pytest.skip("no /dev/full device on this system")
    with open("/dev/full", "w") as full:
        result = run(["generate", PROMPT, "--model", str(ckpt), "--max-new-tokens", "2"], stdout=full,
                     stderr=subprocess.PIPE)
    assert_one_error_line(result, "standard output", "No space left on device")
    result = run(["layers", PROMPT, "--model", str(ckpt), "--plot", "/dev/full"])
    assert_one_error_line(result, "--plot /dev/full", "No space left on device")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    result = run(["explain", PROMPT, "--model", str(ckpt), "--html", "/dev/full"])
    assert_one_error_line(result, "--html /dev/full", "No space left on device")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_outputs_through_a_symlink_replace_its_target(ckpt, tmp_path):
    """--plot and --html named by a symlink: the file it points to gets the new contents, the link stays."""
    for flag, command, start in (("--plot", "layers", b"\x89PNG"), ("--html", "explain", b"<!DOCTYPE")):
        target, link = tmp_path / f"target{flag}", tmp_path / f"link{flag}"
        target.write_bytes(b"old")
        link.symlink_to(target)
        assert minielm.cli.main([command, PROMPT, "--model", str(ckpt), flag, str(link), "--quiet"]) == 0
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert target.read_bytes().startswith(start)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link--html", "link--plot", "target--html",
                                                          "target--plot"]


def test_html_and_plot_to_standard_output(ckpt):
    """--html /dev/stdout and --plot /dev/stdout, stdout a pipe: written into the pipe (not beside it and
    renamed, which would replace the link /dev/stdout, or fail where /proc/self/fd/1 names no file)."""
    if not Path("/dev/stdout").exists():
        pytest.skip("no /dev/stdout on this system")
    for flag, command, start in (("--html", "explain", b"<!DOCTYPE html>"), ("--plot", "layers", b"\x89PNG")):
        result = subprocess.run([sys.executable, "-m", "minielm", command, PROMPT, "--model", str(ckpt), flag,
                                 "/dev/stdout"], capture_output=True, timeout=300)
        assert result.returncode == 0 and result.stderr == b"", result.stderr
        assert result.stdout.startswith(start)
    assert os.path.islink("/dev/stdout") or not os.path.isfile("/dev/stdout")


def test_closed_pipe_is_an_output_error(ckpt):
    """`minielm ... | head -0`: the reader is gone before the output is written."""
    child = subprocess.Popen([sys.executable, "-m", "minielm.cli", "generate", PROMPT, "--model", str(ckpt),
                              "--max-new-tokens", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    stderr = child.stderr.read()
    assert child.wait(timeout=300) == 2
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.splitlines() == ["minielm: error: standard output was closed before all output was written "
                                   "(broken pipe)"]


def test_import_minielm_imports_no_torch():
    """`import minielm` loads nothing heavy (its names are imported on first use), so that the command's
    entry point is running before torch starts loading."""
    result = subprocess.run([sys.executable, "-c", "import sys, minielm; print(sorted(sys.modules.keys() & "
                             "{'torch', 'numpy', 'minielm.cli'}), minielm.InputError.__module__)"],
                            capture_output=True, text=True, timeout=300)
    assert result.stdout == "[] minielm.errors\n", result.stderr


def test_ctrl_c_while_torch_is_imported_is_one_line(monkeypatch, capsys):
    """The command's entry point (minielm/__main__.py) turns an interrupt during the imports into its one line."""
    import builtins

    import minielm.__main__

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "cli":  # `from .cli import main`: torch and the rest load here
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert minielm.__main__.main(["generate", PROMPT]) == 130
    assert capsys.readouterr().err == "minielm: interrupted\n"


def test_ctrl_c_in_a_real_process(ckpt):
    """SIGINT 0.2 s after the start, while torch is still loading (about 1.5 s here): one line, exit 130.

    The child gets SIGINT's default disposition back: a suite started in the background by a
    shell without job control inherits SIGINT ignored, and the child then never sees it."""
    child = subprocess.Popen([sys.executable, "-m", "minielm", "generate", PROMPT, "--model", str(ckpt)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=300)
    assert (child.returncode, stderr) == (130, "minielm: interrupted\n")


def test_ctrl_c_at_any_moment_of_startup(ckpt):
    """SIGINT at delays across the whole startup window (torch imports numpy 0.3-0.6 s in, where a
    Ctrl-C was swallowed: the command ran on, or blamed an intact GGUF file for a half-imported numpy).
    The prompt is `-` on a pipe nobody writes to, so the command is still running at every delay: the
    only right answer is the one line and exit 130."""
    for delay in (0.1, 0.3, 0.4, 0.5, 0.6, 0.8, 1.2):
        child = subprocess.Popen([sys.executable, "-m", "minielm", "generate", "-", "--model", str(ckpt)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
        assert (delay, child.returncode, stderr) == (delay, 130, "minielm: interrupted\n")


def test_plot_without_a_suffix_is_written_where_named(ckpt, tmp_path):
    """A plot path with no suffix gets exactly that name (PNG), never 'NAME.png' beside it."""
    assert minielm.cli.main(["layers", PROMPT, "--model", str(ckpt), "--plot", str(tmp_path / "figure")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["figure"]
    assert (tmp_path / "figure").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_good_flags_still_run(ckpt, capsys):
    """The checks refuse only bad values: the limits themselves are accepted."""
    ids = minielm.load(ckpt).tokenizer.encode(PROMPT)
    most = POSITIONS - len(ids)
    assert minielm.cli.main(["generate", PROMPT, "--model", str(ckpt), "--max-new-tokens", str(most),
                             "--temperature", "1e-320", "--top-k", "1000", "--seed", str(2**64 - 1)]) == 0
    assert capsys.readouterr().out.startswith(PROMPT)
    assert minielm.cli.main(["explain", PROMPT, "--model", str(ckpt), "-k", str(D), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["decoded"]) == D
    assert minielm.cli.main(["steer", PROMPT, "--model", str(ckpt), "--concept", "the sea", "--layer", "1",
                             "--scale", "0", "--max-new-tokens", "1"]) == 0
    assert "steered" in capsys.readouterr().out


# ---- no hang: a missing peer, a pipe with no writer, an endless file (issue 26) ---------------------
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}


@pytest.mark.parametrize("variables, fragments", [
    ({"RANK": "abc"}, ("RANK", "'abc'", "integer")),
    ({"RANK": "3", "WORLD_SIZE": "2"}, ("RANK", "got 3", "[0, 2)", "WORLD_SIZE")),
    ({"RANK": "-1"}, ("RANK", "got -1")),
    ({"WORLD_SIZE": "0"}, ("WORLD_SIZE", "got 0")),
    ({"WORLD_SIZE": "2.5"}, ("WORLD_SIZE", "'2.5'")),
    ({"MASTER_PORT": "99999"}, ("MASTER_PORT", "got 99999", "[1, 65535]")),
    ({"MASTER_PORT": "http"}, ("MASTER_PORT", "'http'")),
    ({"MASTER_ADDR": "no-such-host.invalid"}, ("MASTER_ADDR", "'no-such-host.invalid'", "cannot be resolved")),
    ({"MINIELM_DISTRIBUTED_TIMEOUT": "0"}, ("MINIELM_DISTRIBUTED_TIMEOUT", "got 0")),
], ids=["rank_text", "rank_past_world", "rank_negative", "world_zero", "world_float", "port_too_large",
        "port_text", "address_unresolvable", "timeout_zero"])
def test_distributed_variables_are_checked_before_any_work(variables, fragments, ckpt, tmp_path, monkeypatch,
                                                           capsys):
    """torchrun's variables, set by hand and wrong: one line naming the variable before the model loads (they
    were internal errors, or a wait without end in init_process_group)."""
    for name, value in {**TORCHRUN, **variables}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(minielm.cli, "load", lambda *a, **k: pytest.fail("loaded before the variables were checked"))
    out = tmp_path / "ops.safetensors"
    assert minielm.cli.main(["operators", PROMPT, "--model", str(ckpt), "--out", str(out), "--distributed"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    for fragment in fragments:
        assert fragment in captured.err, captured.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank", [0, 1], ids=["rank_0_waits_for_peer", "rank_1_finds_no_master"])
def test_distributed_without_its_peer_times_out_in_one_line(rank, ckpt, tmp_path):
    """WORLD_SIZE=2 and one process: rank 0 waited for the second one for ever, rank 1 for a rank 0;
    now the wait ends after MINIELM_DISTRIBUTED_TIMEOUT seconds with one line naming the variables
    (torch's own C++ log of the retries is not shown)."""
    env = {**os.environ, **TORCHRUN, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": str(29540 + rank),
           "MINIELM_DISTRIBUTED_TIMEOUT": "2"}
    out = tmp_path / "ops.safetensors"
    started = time.monotonic()
    result = run(["operators", PROMPT, "--model", str(ckpt), "--out", str(out), "--distributed"], env=env,
                 capture_output=True, timeout=120)
    assert_one_error_line(result, "WORLD_SIZE=2", f"RANK={rank}", "MASTER_ADDR", "MINIELM_DISTRIBUTED_TIMEOUT=2")
    assert time.monotonic() - started < 60
    assert list(tmp_path.iterdir()) == []


def test_prompt_file_fifo_without_a_writer_is_refused(ckpt, tmp_path, monkeypatch, capsys):
    """A named pipe nobody writes to: the wait for its first byte is bounded (it blocked for ever in open)."""
    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    monkeypatch.setattr(minielm.cli, "PIPE_WAIT_S", 0.5)

    def hung(signum, frame):
        raise AssertionError("--prompt-file on a FIFO without a writer hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        code = minielm.cli.main(["generate", "--prompt-file", str(fifo), "--model", str(ckpt)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(fifo) in err and "nothing was written" in err and "0.5 s" in err


def test_prompt_file_from_a_pipe_is_still_read(ckpt, tmp_path, capsys):
    """A pipe with a writer (as `--prompt-file <(echo ...)` gives) is read as before."""
    read, write = os.pipe()
    os.write(write, PROMPT.encode() + b"\n")
    os.close(write)
    try:
        assert minielm.cli.main(["generate", "--prompt-file", f"/proc/self/fd/{read}", "--model", str(ckpt),
                                 "--max-new-tokens", "1"]) == 0
    finally:
        os.close(read)
    assert capsys.readouterr().out.startswith(PROMPT)


def test_endless_prompt_file_is_refused_by_its_size(ckpt, monkeypatch, capsys):
    """--prompt-file /dev/zero: the bytes read are bounded (it was a MemoryError, exit 1)."""
    monkeypatch.setattr(minielm.cli, "PROMPT_LIMIT_BYTES", 2**20)
    assert minielm.cli.main(["generate", "--prompt-file", "/dev/zero", "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "/dev/zero" in err and "more than 1 MiB" in err, err


def test_closed_stdin_is_one_line(ckpt):
    """`minielm generate - <&-`: no stdin at all (it was an internal AttributeError)."""
    result = run(["generate", "-", "--model", str(ckpt)], capture_output=True, stdin=subprocess.DEVNULL,
                 preexec_fn=lambda: os.close(0))
    assert_one_error_line(result, "stdin", "closed")


# ---- messages that named the wrong thing (issue 26) -----------------------------------------------
@pytest.mark.parametrize("change, word", [(b"\0", "longer"), (-1, "shorter")])
def test_an_operators_file_of_the_wrong_length_says_which_way(change, word, model, ids, tmp_path):
    """One byte more was called "truncated (N bytes, the header describes N-1)"."""
    path = tmp_path / "ops.safetensors"
    ML(model, ids, out=path)
    data = path.read_bytes()
    path.write_bytes(data + change if isinstance(change, bytes) else data[:change])
    with pytest.raises(InputError) as info:
        minielm.load_operators(path, model)
    one_line(info.value, (str(path), f"1 byte {word} than its header describes", f"{len(data) - (change == -1)}"))
    if word == "longer":
        assert "truncated" not in str(info.value)


def test_a_cache_ref_that_is_a_symlink_loop_is_named(tmp_path, monkeypatch):
    """refs/main linking to itself: named as a loop (it read as a model not in the cache)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--name" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").symlink_to(refs / "main")
    with pytest.raises(minielm.CheckpointError) as info:
        minielm.load("org/name")
    one_line(info.value, (str(refs / "main"), "symbolic link loop"))


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv, to read as a user without override")
def test_a_safetensors_file_that_may_not_be_read_says_so(ckpt, tmp_path):
    """A weights file without read permission was "unreadable safetensors file (No such file or directory)".
    Root reads every file, so the load runs without the capabilities that override file permissions."""
    shutil.copytree(ckpt, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").chmod(0)
    script = ("import sys, minielm\ntry:\n    minielm.load(sys.argv[1])\n"
              "except minielm.CheckpointError as error:\n    print(error)")
    result = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c",
                             script, str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert "model.safetensors: cannot open the safetensors file (Permission denied)" in result.stdout, \
        (result.stdout, result.stderr)
