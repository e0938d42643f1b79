"""out=: the operators written block by block into one safetensors file, read back memory-mapped."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES, PROMPT
from safetensors import safe_open

import minielm
import minielm.operators_file


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["llama", "gemma3_text", "qwen2"])
def test_file_equals_memory(case, device, checkpoints, tmp_path):
    if device == "cuda":
        assert not torch.backends.cuda.matmul.allow_tf32  # float64 only; no TF32 anywhere
    model = minielm.load(checkpoints[case], device=device)
    whole = minielm.equivalent_linear_map(model, PROMPT)
    path = tmp_path / "ops.safetensors"
    written = minielm.equivalent_linear_map(model, PROMPT, out=path, block=7)  # blocks of 7 rows of d
    assert not (tmp_path / "ops.safetensors.partial").exists()
    scale = float(whole.operators.abs().max())
    loaded = minielm.load_operators(path, model)
    whole_cpu = {k: getattr(whole, k).cpu() for k in ("operators", "inputs", "output", "bias")}
    for elm in (written, loaded):
        assert float((elm.operators - whole_cpu["operators"]).abs().max()) <= 1e-14 * scale
        assert all(torch.equal(getattr(elm, k), whole_cpu[k]) for k in ("inputs", "output", "bias"))
        assert elm.ids == PROMPT and elm.target == "final"
        assert elm.relative_error() < 1e-13
    assert torch.allclose(loaded.probabilities().cpu(), whole.probabilities().cpu(), rtol=0, atol=1e-14)
    with safe_open(str(path), "pt") as f:  # a plain safetensors file
        assert torch.equal(f.get_tensor("operators"), loaded.operators)
    before = path.read_bytes()
    loaded.operators[0] += 1  # copy-on-write: the file does not change
    assert path.read_bytes() == before


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OSError("No space left on device")])
def test_a_write_cut_short_leaves_no_file(stop, checkpoints, tmp_path, monkeypatch):
    """An interrupt or an error after the first block: no operators file and no .partial; an old file stays."""
    model = minielm.load(checkpoints["llama"])
    path = tmp_path / "ops.safetensors"
    path.write_bytes(b"an older file")
    write_rows, blocks = minielm.operators_file.write_rows, []

    def cut_short(*args):
        if blocks:
            raise stop
        blocks.append(write_rows(*args))

    monkeypatch.setattr(minielm.operators_file, "write_rows", cut_short)
    with pytest.raises(type(stop)):
        minielm.equivalent_linear_map(model, PROMPT, out=path, block=7)
    assert blocks and path.read_bytes() == b"an older file" and not (tmp_path / "ops.safetensors.partial").exists()


def test_blocks_in_memory_and_module_targets(checkpoints):
    model = minielm.load(checkpoints["gemma3_text"])
    for layer, component in ((1, "mlp"), (1, "attention"), (0, "output")):
        whole = minielm.equivalent_linear_map(model, PROMPT, layer=layer, component=component).operators
        blocks = minielm.equivalent_linear_map(model, PROMPT, layer=layer, component=component, block=5).operators
        assert float((blocks - whole).abs().max()) <= 1e-14 * float(whole.abs().max())


def test_refusals(checkpoints, tmp_path):
    model = minielm.load(checkpoints["llama"])
    path = tmp_path / "ops.safetensors"
    minielm.equivalent_linear_map(model, PROMPT, out=path)
    with pytest.raises(minielm.InputError, match="another model"):
        minielm.load_operators(path, minielm.load(checkpoints["mistral"]))
    (tmp_path / "short.safetensors").write_bytes(path.read_bytes()[:-8])
    with pytest.raises(minielm.InputError, match="truncated"):
        minielm.load_operators(tmp_path / "short.safetensors")
    with pytest.raises(minielm.InputError, match="block"):
        minielm.equivalent_linear_map(model, PROMPT, block=0)


def test_cli_writes_the_file(tiny_with_tokenizer, tmp_path):
    path = tmp_path / "ops.safetensors"
    result = subprocess.run([sys.executable, "-m", "minielm.cli", "operators", "In the beginning", "--model",
                             str(tiny_with_tokenizer), "--out", str(path), "--block", "10"],
                            capture_output=True, text=True, check=True)
    assert "reconstruction error" in result.stdout
    model = minielm.load(tiny_with_tokenizer)
    ids = model.tokenizer.encode("In the beginning")
    expected = minielm.equivalent_linear_map(model, ids).operators
    assert torch.allclose(minielm.load_operators(path, model).operators, expected, rtol=0, atol=1e-14)


def test_out_through_a_symlink_and_onto_what_is_not_a_file(checkpoints, tmp_path):
    """A symlink's target gets the operators and the link stays; a pipe (or a device: /dev/null) is
    refused before any work and left as it was: renaming the .partial file over it would replace it."""
    model = minielm.load(checkpoints["llama"])
    target, link = tmp_path / "target.safetensors", tmp_path / "link.safetensors"
    target.write_bytes(b"old")
    link.symlink_to(target)
    elm = minielm.equivalent_linear_map(model, PROMPT, out=link)
    assert link.is_symlink() and elm.relative_error() < 1e-13
    assert torch.equal(minielm.load_operators(target).operators, elm.operators)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(minielm.OutputError, match="not a regular file"):
        minielm.equivalent_linear_map(model, PROMPT, out=pipe)
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "pipe", "target.safetensors"]


def with_header(path, edit, data_change=lambda data: data, name="edited.safetensors"):
    """The operators file at `path` rewritten (as `name`) with its header entries changed by edit(entries)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    entries = json.loads(raw[8:8 + n])
    edit(entries)
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    edited = path.with_name(name)
    edited.write_bytes(len(text).to_bytes(8, "little") + text + data_change(raw[8 + n:]))
    return edited


EDITS = {  # a header edited by hand: each once loaded wrong numbers or raised a traceback
    "bias read from output's bytes": (lambda e: e["bias"].update(data_offsets=e["output"]["data_offsets"]),
                                      lambda data: data[:-64 * 8]),
    "operators said float32": (lambda e: e["operators"].update(dtype="F32"), None),
    "operators of another shape": (lambda e: e["operators"].update(shape=[8, 128, 64]), None),
    "an unknown dtype": (lambda e: e["operators"].update(dtype="Q9"), None),
    "no operators": (lambda e: e.pop("operators"), None),
    "no offsets": (lambda e: e["ids"].pop("data_offsets"), None),
    "a target that is not a string": (lambda e: e["__metadata__"].update(target=3), None),
    "a target that is no target": (lambda e: e["__metadata__"].update(target="bogus"), None),
    "metadata a list": (lambda e: e.update(__metadata__=["minielm-operators"]), None),
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_header_edited_by_hand_is_refused(edit, operators_path):
    change, data_change = EDITS[edit]
    edited = with_header(operators_path, change, data_change or (lambda data: data))
    with pytest.raises(minielm.InputError, match="damaged operators file|not a minielm operators file"):
        minielm.load_operators(edited)


def test_a_header_nested_too_deep_is_refused(tmp_path):
    path = tmp_path / "deep.safetensors"
    path.write_bytes((100_000).to_bytes(8, "little") + b"[" * 100_000)
    with pytest.raises(minielm.InputError, match="cannot read an operators file"):
        minielm.load_operators(path)


@pytest.fixture(scope="module")
def operators_path(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("operators") / "ops.safetensors"
    minielm.equivalent_linear_map(minielm.load(checkpoints["llama"]), PROMPT, out=path)
    assert minielm.load_operators(path).relative_error() < 1e-13  # the file as written loads
    return path


def test_out_never_overwrites_the_checkpoint_being_read(checkpoints, tmp_path):
    """out= onto the weights the model was loaded from (or anywhere in its directory) is refused, as the
    command line's --out is: renamed over them, the operators had replaced the checkpoint."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for file in checkpoints["llama"].iterdir():
        (checkpoint / file.name).write_bytes(file.read_bytes())
    before = {file.name: file.read_bytes() for file in checkpoint.iterdir()}
    model = minielm.load(checkpoint)
    (tmp_path / "link").symlink_to(checkpoint)
    for out in (checkpoint / "model.safetensors", tmp_path / "link" / "config.json", checkpoint / "new.safetensors"):
        with pytest.raises(minielm.OutputError, match="would overwrite the checkpoint being read"):
            minielm.equivalent_linear_map(model, PROMPT, out=out)
    assert {file.name: file.read_bytes() for file in checkpoint.iterdir()} == before


def test_out_with_a_null_byte_is_an_input_error(checkpoints, tmp_path):
    with pytest.raises(minielm.InputError, match="out must be a file path"):
        minielm.equivalent_linear_map(minielm.load(checkpoints["llama"]), PROMPT, out=f"{tmp_path}/a\0b")


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_write_cut_short_while_creating_the_file_leaves_no_file(stop, checkpoints, tmp_path, monkeypatch):
    """An interrupt or a full disk while the header and the small tensors are written (the file already
    created): no .partial left behind, and an old file at the path stays."""
    model = minielm.load(checkpoints["llama"])
    path = tmp_path / "ops.safetensors"
    path.write_bytes(b"an older file")

    def cut_short(fd, data, offset):  # the first write of a tensor, after the header
        assert os.fstat(fd).st_size > 0  # create() has made the file
        raise stop

    monkeypatch.setattr(os, "pwrite", cut_short)
    with pytest.raises(KeyboardInterrupt if isinstance(stop, KeyboardInterrupt) else minielm.OutputError):
        minielm.equivalent_linear_map(model, PROMPT, out=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.safetensors"] and path.read_bytes() == b"an older file"


@pytest.mark.parametrize("model", ["a checkpoint path", 3])
def test_a_model_that_is_no_model_is_an_input_error(model, operators_path):
    with pytest.raises(minielm.InputError, match="model must be a Model"):  # it was an AttributeError
        minielm.load_operators(operators_path, model)


def test_a_model_without_the_targets_layer_or_the_stored_ids_is_another_model(checkpoints, operators_path):
    """The file's target layer past the model's layers, or a stored id past its vocabulary: refused as
    another model's operators, naming the file (they had loaded, or failed naming no file)."""
    model = minielm.load(checkpoints["llama"])
    past_the_layers = with_header(operators_path, lambda e: e["__metadata__"].update(target="layer 99"),
                                  name="layer 99.safetensors")
    id_past_the_vocabulary = with_header(operators_path, lambda e: None,
                                         lambda data: (10**9).to_bytes(8, "little") + data[8:])
    for path in (past_the_layers, id_past_the_vocabulary):
        minielm.load_operators(path)  # without a model there is nothing to compare with
        with pytest.raises(minielm.InputError, match=f"{path}: these operators .* were computed with another model"):
            minielm.load_operators(path, model)


def test_operators_of_a_model_that_differs_only_past_the_embedding_are_refused(checkpoints, tmp_path):
    """The file holds a fingerprint of the weights that made it (issue 26): a model with the same embedding
    and one MLP weight scaled by 1.1 is refused, naming the file (it was accepted, its probabilities off
    by up to 0.005); the same weights, loaded again or streamed, are accepted. A file written before the
    fingerprint (none in its metadata) is still compared by its embedding alone."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ops.safetensors"
    minielm.equivalent_linear_map(minielm.load(checkpoints["llama"]), PROMPT, out=path)
    other = tmp_path / "other"
    other.mkdir()
    for file in checkpoints["llama"].iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    weights = load_file(other / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] *= 1.1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(minielm.InputError, match=f"{path}: these operators .* were computed with another model"):
        minielm.load_operators(path, minielm.load(other))
    for model in (minielm.load(checkpoints["llama"]), minielm.load(checkpoints["llama"], stream=True)):
        assert minielm.load_operators(path, model).relative_error() < 1e-13
    older = with_header(path, lambda e: e["__metadata__"].pop("weights"), name="older.safetensors")
    minielm.load_operators(older, minielm.load(checkpoints["llama"]))


# ---- a file cut while its map is in use (issue 26) ----------------------------------------------------
CUT_AFTER_LOADING = """
import os, sys, torch, minielm
checkpoint, path, how = sys.argv[1:]
model = minielm.load(checkpoint)
if how == "load_operators":
    minielm.equivalent_linear_map(model, {prompt}, out=path)
    elm = minielm.load_operators(path, model)
else:  # the map that equivalent_linear_map(out=) returns
    elm = minielm.equivalent_linear_map(model, {prompt}, out=path)
os.truncate(path, os.path.getsize(path) // 3)  # cut in place: the operators' bytes are gone from the file
try:
    print(repr(float(elm.operators.sum())), repr(elm.relative_error()))  # touches every J_t
except minielm.MinielmError as error:
    print(f"error: {{error}}")
"""


@pytest.mark.parametrize("how", ["load_operators", "out="])
def test_a_file_cut_after_loading_never_kills_the_process(how, checkpoints, tmp_path):
    """The map was memory-mapped: a file truncated in place (truncate, `cp other ops.safetensors`) while its map
    was in use ended the process with SIGBUS, nothing said. Now the map's values are those of the file as it was
    loaded, or one line says the file changed; never a signal."""
    model = minielm.load(checkpoints["llama"])
    expected = minielm.equivalent_linear_map(model, PROMPT)
    path = tmp_path / "ops.safetensors"
    child = subprocess.run([sys.executable, "-c", CUT_AFTER_LOADING.format(prompt=PROMPT), str(checkpoints["llama"]),
                            str(path), how], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])  # -7: SIGBUS
    line = child.stdout.strip()
    if line.startswith("error: "):
        assert f"{path}: " in line and "changed on disk" in line and "\n" not in line
    else:
        total, error = map(float, line.split())
        assert abs(total - float(expected.operators.sum())) <= 1e-12 * float(expected.operators.abs().sum())
        assert error < 1e-13


def test_a_file_cut_while_it_is_read_is_one_error(checkpoints, tmp_path, monkeypatch):
    """Cut between its header and its copy (the moment load_operators reads it): one line saying the file changed.
    The copy the map is made from has no name: nothing is left beside the file."""
    model = minielm.load(checkpoints["llama"])
    path = tmp_path / "ops.safetensors"
    minielm.equivalent_linear_map(model, PROMPT, out=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.safetensors"]
    copy_bytes = minielm.operators_file.copy_bytes

    def cut_first(source, target):
        os.truncate(path, os.path.getsize(path) // 2)
        copy_bytes(source, target)

    monkeypatch.setattr(minielm.operators_file, "copy_bytes", cut_first)
    with pytest.raises(minielm.MinielmError, match=r"the file changed on disk during this run \(it was truncated to "
                                                   r"\d+ bytes from \d+; reading tensor 'operators'\); load the "
                                                   r"operators again"):
        minielm.load_operators(path, model)
