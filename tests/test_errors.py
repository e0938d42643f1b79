"""Broken checkpoints and bad input: a typed error with a one-line message, and nothing on disk changes.

Every case of issue 7 is built from one tiny random Llama-style checkpoint with a
sentencepiece tokenizer, then broken in one way. Each case is checked twice:
through the Python API (error type and message content) and through the command
line (`minielm explain PROMPT --model DIR`: non-zero exit, one `minielm: error:`
line on stderr besides the progress lines, no traceback).

The command-line runs of the whole table are forked from one process that has
already imported torch (about 2 s of CPU per fresh interpreter otherwise); each
fork runs `minielm.cli` as `__main__` exactly as `python -m minielm.cli` does,
with its own stdout, stderr and exit status. `test_runner_matches_python_m`
checks that this gives the same result as a real `python -m minielm.cli`, and the
tests that nothing is written run the real command.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import sentencepiece
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import minielm
from minielm.config import SUPPORTED_MODEL_TYPES
from minielm.errors import (CheckpointError, ConfigError, InputError, MinielmError, NumericalError,
                            TokenizerError)
from minielm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench import random_checkpoint  # noqa: E402

PROMPT = "In the beginning God"
LONG_PROMPT = "In the beginning God created the heaven and the earth"  # more than 8 tokens
CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
] * 10
VOCAB = 320  # 256 byte pieces (byte_fallback), 3 specials, and merges
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))


# ---- building checkpoints ------------------------------------------------------------------------
def train_tokenizer(directory: Path, exact: bool = False) -> None:
    """tokenizer.model in `directory`: sentencepiece BPE with byte fallback, so every character encodes.
    exact: no normalisation at all (identity rule, whitespace kept), so decode(encode(text)) == text."""
    options = dict(normalization_rule_name="identity", remove_extra_whitespaces=False) if exact else {}
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(directory / "tokenizer"), vocab_size=VOCAB,
        model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        minloglevel=2, **options)
    (directory / "tokenizer.vocab").unlink()


def edit_config(directory: Path, **changes) -> None:
    """Change keys of config.json (`...` deletes one)."""
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def edit_tensors(directory: Path, change: Callable[[dict], None]) -> None:
    """Rewrite model.safetensors after `change(tensors)` edits the dict of tensors in place."""
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def set_tensor(name, value):
    return lambda tensors: tensors.__setitem__(name, value)


def fill_tensor(name, value):
    return lambda tensors: tensors[name].fill_(value)


def huge(*names):
    """Weights of 1e300 in float64: finite, but their products overflow."""
    def change(tensors):
        for name in names:
            tensors[name] = torch.full_like(tensors[name], 1e300, dtype=torch.float64)
    return change


def write(name: str, data: bytes | str):
    def change(directory: Path):
        path = directory / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return change


def delete(name: str):
    return lambda directory: (directory / name).unlink()


def truncate(directory: Path) -> None:
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])


def shard_and_lose_one(directory: Path) -> None:
    """Split the weights into two shards with an index file, as Hugging Face does, then delete shard 2."""
    tensors = load_file(directory / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, directory / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "model.safetensors").unlink()
    (directory / "model-00002-of-00002.safetensors").unlink()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random Llama-style checkpoint (d=16, 2 layers, GQA) with a sentencepiece tokenizer."""
    directory = tmp_path_factory.mktemp("base")
    train_tokenizer(directory)
    assert sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).GetPieceSize() == VOCAB
    random_checkpoint(directory, d=16, layers=2, f=32, heads=4, kv_heads=2, vocab=VOCAB)
    return directory


def copy_of(base: Path, target: Path) -> Path:
    shutil.copytree(base, target)
    return target


# ---- the cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    error: type
    fragments: list  # the message must hold each; "{dir}" stands for the checkpoint directory
    breaks: Callable[[Path], None] | None = None  # edits the checkpoint copy
    load: dict = field(default_factory=dict)  # keyword arguments of minielm.load
    run: Callable | None = None  # the failing step after a successful load (None: load fails)
    prompt: str = PROMPT  # for the command line
    skip: str | None = None  # a reason this case cannot run on this machine


def encode(text):
    return lambda model: model.tokenizer.encode(text)


def logits(text):
    return lambda model: model.logits(model.tokenizer.encode(text))


def linear_map(text):
    return lambda model: minielm.equivalent_linear_map(model, model.tokenizer.encode(text))


Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
CASES = [
    Case("missing_directory", CheckpointError, ["{dir}: no such checkpoint directory"], shutil.rmtree),
    Case("no_config", ConfigError, ["{dir}/config.json: no config.json"], delete("config.json")),
    Case("config_not_json", ConfigError, ["{dir}/config.json: not valid JSON"], write("config.json", '{"model_type":')),
    Case("config_not_object", ConfigError, ["{dir}/config.json: expected a JSON object, got list"],
         write("config.json", "[1, 2]")),
    Case("unknown_model_type", ConfigError,
         ["{dir}/config.json: unsupported model_type 'bert'", "supported: " + ", ".join(SUPPORTED_MODEL_TYPES)],
         lambda d: edit_config(d, model_type="bert")),
    Case("required_key_missing", ConfigError, ["{dir}/config.json: required key 'hidden_size' is missing"],
         lambda d: edit_config(d, hidden_size=...)),
    Case("key_of_wrong_type", ConfigError, ["{dir}/config.json: hidden_size must be a positive integer, got '16'"],
         lambda d: edit_config(d, hidden_size="16")),
    Case("heads_not_dividing", ConfigError, ["num_attention_heads=4 is not a multiple of num_key_value_heads=3"],
         lambda d: edit_config(d, num_key_value_heads=3)),
    Case("tensor_missing", CheckpointError, ["{dir}: tensor 'model.layers.1.mlp.up_proj.weight' is missing"],
         lambda d: edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))),
    Case("tensor_extra", CheckpointError,
         ["{dir}/model.safetensors: unexpected tensor 'model.layers.1.mlp.extra.weight'"],
         lambda d: edit_tensors(d, set_tensor("model.layers.1.mlp.extra.weight", torch.zeros(3)))),
    Case("tensor_wrong_shape", CheckpointError,
         ["{dir}/model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' has shape (16, 8), "
          "expected (16, 16)"],
         lambda d: edit_tensors(d, set_tensor(Q0, torch.zeros(16, 8)))),
    Case("tensor_not_float", CheckpointError, ["tensor 'model.norm.weight' has dtype torch.int32, expected floating"],
         lambda d: edit_tensors(d, set_tensor("model.norm.weight", torch.zeros(16, dtype=torch.int32)))),
    Case("safetensors_truncated", CheckpointError, ["{dir}/model.safetensors: truncated safetensors file"], truncate),
    Case("safetensors_garbage", CheckpointError, ["{dir}/model.safetensors: unreadable safetensors file"],
         write("model.safetensors", bytes(range(256)) * 40)),
    Case("no_weights", CheckpointError, ["{dir}: no *.safetensors weights file"], delete("model.safetensors")),
    Case("index_names_missing_shard", CheckpointError,
         ["{dir}/model.safetensors.index.json: names shard 'model-00002-of-00002.safetensors', which is missing"],
         shard_and_lose_one),
    Case("index_not_json", CheckpointError, ["{dir}/model.safetensors.index.json: not a valid safetensors index"],
         write("model.safetensors.index.json", "{")),
    Case("no_tokenizer", TokenizerError, ["{dir}: no tokenizer.json or tokenizer.model"], delete("tokenizer.model"),
         run=encode(PROMPT)),
    Case("tokenizer_unreadable", TokenizerError, ["{dir}/tokenizer.model: unreadable sentencepiece model"],
         write("tokenizer.model", b"\x00not a model")),
    Case("tokenizer_config_not_json", TokenizerError, ["{dir}/tokenizer_config.json: not valid JSON"],
         write("tokenizer_config.json", "{add_bos_token: false}")),
    Case("empty_prompt_without_bos", TokenizerError, ["{dir}/tokenizer.model: empty prompt", "no BOS token"],
         write("tokenizer_config.json", '{"add_bos_token": false}'), run=encode(""), prompt=""),
    Case("prompt_longer_than_positions", InputError, ["tokens exceed max_position_embeddings=8"],
         lambda d: edit_config(d, max_position_embeddings=8), run=logits(LONG_PROMPT), prompt=LONG_PROMPT),
    Case("unknown_dtype", InputError, ["unsupported dtype 'float8'", "expected one of float64, float32, bfloat16"],
         load=dict(dtype="float8")),
    Case("device_cuda", InputError, ["device 'cuda' is not available"], load=dict(device="cuda"),
         skip="CUDA is available here" if torch.cuda.is_available() else None),
    Case("device_cuda_7", InputError, ["device 'cuda:7' is not available"], load=dict(device="cuda:7"),
         skip="this machine has 8 CUDA devices" if torch.cuda.device_count() > 7 else None),
    Case("device_tpu", InputError, ["unknown device 'tpu'", "expected 'cpu', 'cuda' or 'cuda:N'"],
         load=dict(device="tpu")),
    Case("inf_weight_in_mlp", CheckpointError,
         ["{dir}/model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' holds non-finite weights"],
         lambda d: edit_tensors(d, fill_tensor(DOWN1, math.inf))),
    Case("nan_weight_in_attention", CheckpointError,
         ["{dir}/model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' holds non-finite weights"],
         lambda d: edit_tensors(d, fill_tensor(Q0, math.nan))),
    Case("huge_weight_overflows_in_mlp", NumericalError, ["non-finite values after the MLP of layer 1"],
         lambda d: edit_tensors(d, huge(DOWN1, "model.layers.1.mlp.up_proj.weight")),  # finite weights
         run=logits(PROMPT)),
]
CASE_IDS = [case.name for case in CASES]


@pytest.fixture(scope="module")
def case_dirs(base, tmp_path_factory) -> dict:
    """case name -> a copy of the base checkpoint, broken as the case says."""
    root = tmp_path_factory.mktemp("cases")
    dirs = {}
    for case in CASES:
        dirs[case.name] = copy_of(base, root / case.name)
        if case.breaks is not None:
            case.breaks(dirs[case.name])
    return dirs


def assert_message(err: BaseException, case: Case, directory: Path) -> None:
    message = str(err)
    assert "\n" not in message and "\r" not in message
    for fragment in case.fragments:
        assert fragment.format(dir=directory) in message


# ---- through the Python API ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_api(case, case_dirs):
    if case.skip:
        pytest.skip(case.skip)
    directory = case_dirs[case.name]
    if case.run is None:
        with pytest.raises(MinielmError) as info:
            minielm.load(directory, **case.load)
    else:
        model = minielm.load(directory, **case.load)  # loading works: the fault shows in the step after
        with pytest.raises(MinielmError) as info:
            case.run(model)
    assert type(info.value) is case.error
    assert_message(info.value, case, directory)


def test_no_tokenizer_numerical_work(case_dirs):
    """Without a tokenizer the model still runs on token ids: logits, operators, autograd."""
    model = minielm.load(case_dirs["no_tokenizer"])
    ids = [1, 17, 5, 88, 2]
    assert model.logits(ids).shape == (5, VOCAB)
    assert minielm.equivalent_linear_map(model, ids).relative_error() < 1e-13
    with pytest.raises(TokenizerError, match="no tokenizer"):
        model.generate("text")


def test_prompt_longer_than_positions_as_ids(case_dirs):
    model = minielm.load(case_dirs["prompt_longer_than_positions"])
    for run in (model.logits, lambda ids: minielm.equivalent_linear_map(model, ids),
                lambda ids: minielm.detached_jacobian(model, ids)):
        with pytest.raises(InputError, match="9 tokens exceed max_position_embeddings=8"):
            run(list(range(9)))
    with pytest.raises(InputError, match="exceed max_position_embeddings=8"):
        model.generate_ids([1, 2, 3], max_new_tokens=6)


@pytest.mark.parametrize("dtype", ["int32", torch.int64, torch.complex64, 3, None, "float"])
def test_other_bad_dtypes(base, dtype):
    with pytest.raises(InputError, match="unsupported dtype .*; expected one of float64, float32"):
        minielm.load(base, dtype=dtype)


@pytest.mark.parametrize("device", ["", "nonsense:0", None, 3.5, "meta"])
def test_other_bad_devices(base, device):
    with pytest.raises(InputError, match="device"):
        minielm.load(base, device=device)


def test_path_that_is_a_file_or_not_a_path(base):
    with pytest.raises(CheckpointError, match="config.json: is a file; expected a checkpoint directory"):
        minielm.load(base / "config.json")
    with pytest.raises(InputError, match="checkpoint path must be a str or a path, got int"):
        minielm.load(3)


def test_index_naming_a_shard_outside_the_directory(base, tmp_path):
    directory = copy_of(base, tmp_path / "ckpt")
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}))
    with pytest.raises(CheckpointError, match="expected a \\*.safetensors file name inside the checkpoint directory"):
        minielm.load(directory)


def test_same_tensor_in_two_files(base, tmp_path):
    directory = copy_of(base, tmp_path / "ckpt")
    shutil.copy(directory / "model.safetensors", directory / "model-copy.safetensors")
    with pytest.raises(CheckpointError, match="is in both model-copy.safetensors and model.safetensors"):
        minielm.load(directory)


@pytest.mark.parametrize("text, fragment", [("\ud800", "a lone surrogate"), (b"bytes", "expected text (str)"),
                                            (None, "expected text (str)")])
def test_text_that_cannot_be_tokenized(base, text, fragment):
    tokenizer = minielm.load(base).tokenizer
    with pytest.raises(TokenizerError, match=re.escape(fragment)) as info:
        tokenizer.encode(text)
    assert str(base / "tokenizer.model") in str(info.value)


def test_token_ids_outside_the_vocabulary(base):
    model = minielm.load(base)
    outside = f"token id {VOCAB} at position 1 is outside the model's vocabulary \\[0, {VOCAB}\\)$"
    with pytest.raises(InputError, match=outside):
        model.logits([1, VOCAB])
    with pytest.raises(InputError, match="token id -1"):
        minielm.equivalent_linear_map(model, [-1, 2])
    with pytest.raises(TokenizerError, match=f"token id {VOCAB + 5} .*\\[0, {VOCAB}\\)"):
        model.tokenizer.decode([5, VOCAB + 5])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        model.tokenizer.token(-3)
    with pytest.raises(TokenizerError, match="expected integer token ids"):
        model.tokenizer.decode(["a"])


def test_add_bos_token_must_be_a_boolean(base, tmp_path):
    directory = copy_of(base, tmp_path / "ckpt")
    (directory / "tokenizer_config.json").write_text('{"add_bos_token": "false"}')
    with pytest.raises(TokenizerError, match="add_bos_token must be true or false, got 'false'"):
        minielm.load(directory)


def test_messages_are_one_line():
    err = CheckpointError("a\nb\r\n  c")
    assert str(err) == "a b c" and isinstance(err, MinielmError)


def test_stream_with_unaligned_layout(base, tmp_path):
    """A header padded by two bytes misaligns every tensor: tensors are read, not mapped, so
    loading and streaming both work and agree."""
    directory = copy_of(base, tmp_path / "ckpt")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].rstrip() + b"  "
    header += b" " * ((-(8 + len(header)) % 8) + 2)  # data now starts at 2 (mod 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])
    assert torch.equal(minielm.load(directory).logits([1, 2, 3]), minielm.load(base).logits([1, 2, 3]))
    assert torch.equal(minielm.load(directory, stream=True).logits([1, 2, 3]), minielm.load(base).logits([1, 2, 3]))
    with pytest.raises(InputError, match="stream must be True or False"):
        minielm.load(base, stream="yes")




# ---- non-float64 analysis: the achieved error, measured ---------------------------------------------
@pytest.mark.parametrize("dtype, low, high", [("float32", 1e-10, 1e-3), ("bfloat16", 1e-5, 0.2)])
def test_reduced_precision_reports_its_error(base, dtype, low, high):
    reference = minielm.load(base)
    exact = minielm.equivalent_linear_map(reference, reference.tokenizer.encode(PROMPT))
    model = minielm.load(base, dtype=dtype)
    elm = minielm.equivalent_linear_map(model, model.tokenizer.encode(PROMPT))
    error = elm.relative_error()
    assert elm.operators.dtype == getattr(torch, dtype)
    assert isinstance(error, float) and math.isfinite(error)
    assert low < error < high  # a real, measured round-off of the dtype, not a claimed zero
    assert error > 1e3 * exact.relative_error()


# ---- through the command line ---------------------------------------------------------------------
# One process imports minielm.cli (and torch) once, then forks a child per run. The child points fds 1
# and 2 at its own files and executes minielm/cli.py as __main__, as `python -m minielm.cli` does; an
# exception that escapes is printed by sys.excepthook and exits 1, as the interpreter would.
RUNNER = r"""
import argparse, json, os, runpy, sys
import minielm, minielm.interpret  # what minielm.cli imports (torch above all), but not minielm.cli itself
runs, pids = json.load(sys.stdin), {}
for run in runs:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(run[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["minielm"] + run["args"]
            try:
                runpy.run_module("minielm.cli", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (exit.code is not None)
                if not isinstance(exit.code, (int, type(None))):
                    print(exit.code, file=sys.stderr)
            except BaseException:
                sys.excepthook(*sys.exc_info())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    pids[pid] = run["name"]
codes = {}
while pids:
    pid, status = os.wait()
    codes[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_many(runs: dict, workdir: Path) -> dict:
    """name -> argument list, run through the forking runner (or one interpreter each without fork)."""
    if not hasattr(os, "fork"):
        return {name: run_cli(args, workdir) for name, args in runs.items()}
    jobs = [dict(name=name, args=args, stdout=str(workdir / f"{name}.out"), stderr=str(workdir / f"{name}.err"))
            for name, args in runs.items()]
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(jobs), capture_output=True, text=True,
                          env=ENV, cwd=workdir, timeout=600)
    assert done.returncode == 0, done.stderr
    codes = json.loads(done.stdout)
    return {job["name"]: Result(codes[job["name"]], Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text())
            for job in jobs}


def run_cli(args: list, cwd: Path) -> Result:
    """A real `python -m minielm.cli ARGS`."""
    done = subprocess.run([sys.executable, "-m", "minielm.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)
    return Result(done.returncode, done.stdout, done.stderr)


def cli_args(case: Case, directory: Path) -> list:
    args = ["explain", case.prompt, "--model", str(directory)]
    for key, value in case.load.items():
        args += [f"--{key}", value]
    return args


@pytest.fixture(scope="module")
def cli(base, case_dirs, tmp_path_factory) -> dict:
    """name -> Result of the command line on every case, and on a few runs that succeed."""
    runs = {case.name: cli_args(case, case_dirs[case.name]) for case in CASES if not case.skip}
    runs["debug_after"] = ["explain", PROMPT, "--model", str(case_dirs["no_config"]), "--debug"]
    runs["debug_before"] = ["--debug", "explain", PROMPT, "--model", str(case_dirs["no_config"])]
    for dtype in ("float32", "bfloat16"):
        runs[f"{dtype}_json"] = ["explain", PROMPT, "--model", str(base), "--dtype", dtype, "--json"]
    runs["float32_text"] = ["explain", PROMPT, "--model", str(base), "--dtype", "float32"]
    return run_many(runs, tmp_path_factory.mktemp("cli"))


def assert_clean_failure(result: Result) -> str:
    """Exit code 2, nothing on stdout, no traceback, and stderr exactly one error line; returns it.
    (Progress lines are shown only on a terminal, which a test's stderr is not.)"""
    assert "Traceback" not in result.stdout + result.stderr
    assert result.code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minielm: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cli(case, case_dirs, cli):
    if case.skip:
        pytest.skip(case.skip)
    line = assert_clean_failure(cli[case.name])
    for fragment in case.fragments:
        assert fragment.format(dir=case_dirs[case.name]) in line


@pytest.mark.parametrize("where", ["after", "before"])
def test_cli_debug_shows_the_traceback(cli, where):
    result = cli[f"debug_{where}"]
    assert result.code != 0 and "Traceback" in result.stderr and "ConfigError: " in result.stderr


def test_runner_matches_python_m(case_dirs, cli, tmp_path):
    """The forking runner and a real `python -m minielm.cli` give the same exit code and output."""
    case = next(c for c in CASES if c.name == "no_tokenizer")
    real = run_cli(cli_args(case, case_dirs[case.name]), tmp_path)
    forked = cli[case.name]
    strip_times = lambda text: re.sub(r"\(\d+\.\d\d s\)", "(t)", text)  # noqa: E731
    assert (real.code, real.stdout, strip_times(real.stderr)) == (forked.code, forked.stdout,
                                                                  strip_times(forked.stderr))


def test_cli_float32_reports_the_achieved_error(cli):
    result = cli["float32_json"]
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dtype"] == "float32"
    assert 1e-10 < report["relative_error"] < 1e-3
    text = cli["float32_text"]
    assert text.code == 0 and "float32: not exact" in text.stdout


def test_cli_bfloat16_explain(cli):
    result = cli["bfloat16_json"]
    assert "Traceback" not in result.stderr
    assert result.code == 0
    assert json.loads(result.stdout)["relative_error"] > 1e-5


# ---- nothing is written into a checkpoint directory ------------------------------------------------
def snapshot(directory: Path) -> dict:
    """Every path under directory (and itself): kind, size, mode, mtime, and sha256 of the contents."""
    state = {}
    for path in [directory, *sorted(directory.rglob("*"))]:
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(directory))] = (stat.S_IFMT(info.st_mode), info.st_size,
                                                   stat.S_IMODE(info.st_mode), info.st_mtime_ns, digest)
    return state


def use_everything(directory: Path, workdir: Path) -> None:
    """Load, run, assemble, cross-check and explain, through the API and the real command line."""
    model = minielm.load(directory)
    ids = model.tokenizer.encode(PROMPT)
    model.logits(ids)
    elm = minielm.equivalent_linear_map(model, ids)
    assert elm.relative_error() < 1e-13
    minielm.equivalent_linear_map(model, ids, layer=0, component="attention")
    minielm.detached_jacobian(model, ids)
    minielm.attribution(model, ids)
    model.generate(PROMPT, max_new_tokens=3)
    minielm.load(directory, dtype="float32").logits(ids)
    result = run_cli(["explain", PROMPT, "--model", str(directory)], workdir)
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    assert "reconstruction" in result.stdout


def test_checkpoint_untouched(base, tmp_path):
    directory = copy_of(base, tmp_path / "ckpt")
    before = snapshot(directory)
    use_everything(directory, tmp_path)
    assert snapshot(directory) == before


def test_read_only_checkpoint(base, tmp_path):
    """Everything works on a read-only directory. (As root, chmod does not stop writes: the snapshot does.)"""
    directory = copy_of(base, tmp_path / "ckpt")
    paths = [*directory.iterdir(), directory]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        before = snapshot(directory)
        use_everything(directory, tmp_path)
        assert snapshot(directory) == before
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)


# ---- tokenizer round trips -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exact_tokenizer(tmp_path_factory):
    """A sentencepiece tokenizer with no normalisation and byte fallback: every text round-trips."""
    directory = tmp_path_factory.mktemp("exact_tokenizer")
    train_tokenizer(directory, exact=True)
    return load_tokenizer(directory)


@pytest.fixture(scope="module")
def tokenizer(base):
    """The base checkpoint's tokenizer: sentencepiece's default NFKC normalisation, whitespace folded."""
    return load_tokenizer(base)


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # any text but lone surrogates


@PROPERTY
@given(text=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=40))
def test_exact_tokenizer_round_trip(exact_tokenizer, text):
    """decode(encode(text)) == text for all text but sentencepiece's own space mark '▁' (decoded as a space)."""
    ids = exact_tokenizer.encode(text)
    assert ids[0] == exact_tokenizer.bos_id == 1
    assert all(0 <= i < VOCAB for i in ids)
    assert exact_tokenizer.decode(ids[1:]) == text


@PROPERTY
@given(words=st.lists(st.text(st.characters(min_codepoint=ord("A"), max_codepoint=ord("z"),
                                            categories=("Lu", "Ll")), min_size=1, max_size=8), max_size=8))
def test_round_trip_of_normalised_text(tokenizer, words):
    """Letters separated by single spaces are left alone by the normalisation, so they round-trip."""
    text = " ".join(words)
    assert tokenizer.decode(tokenizer.encode(text)[1:]) == text


@PROPERTY
@given(text=TEXT)
def test_normalisation_is_a_fixed_point(tokenizer, text):
    """Any text encodes to ids in the vocabulary; the decoded text (its normal form) round-trips exactly."""
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and all(0 <= i < VOCAB for i in ids)
    normal = tokenizer.decode(ids[1:])
    assert tokenizer.decode(tokenizer.encode(normal)[1:]) == normal


@PROPERTY
@given(text=st.text(max_size=20))  # including lone surrogates
def test_encode_raises_only_tokenizer_error(tokenizer, text):
    try:
        ids = tokenizer.encode(text)
    except TokenizerError as err:
        assert "\n" not in str(err) and "surrogate" in str(err)
    else:
        assert all(0 <= i < VOCAB for i in ids)
