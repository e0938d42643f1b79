"""Many devices: 2 and 3 ranks under torchrun (gloo, CPU) split the output rows, evenly or not; gathered,
and written into one file, the operators equal one process's to round-off."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPT

import minielm

RANK_SCRIPT = """
import sys, torch, minielm
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
model = minielm.load(sys.argv[1])
gathered = minielm.equivalent_linear_map(model, {ids}, distributed=True)
assert (gathered is None) == (rank != 0)
on_file = minielm.equivalent_linear_map(model, {ids}, out=sys.argv[2], block=5, distributed=True)
if rank == 0:
    torch.save(gathered.operators, sys.argv[3])
assert on_file.relative_error() < 1e-13
try:  # rank 0 cannot create the file: every rank stops with an error, none waits for it
    minielm.equivalent_linear_map(model, {ids}, out=sys.argv[2] + "/no/such/folder/ops.safetensors", distributed=True)
except Exception as error:
    print(f"rank {{rank}} stopped: {{type(error).__name__}}: {{error}}", flush=True)
torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def four_wide(tmp_path_factory):
    """A random Llama-style checkpoint with d = 4: five ranks leave the last one no row."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from bench import random_checkpoint

    path = tmp_path_factory.mktemp("four_wide")
    random_checkpoint(path, d=4, layers=2, f=8, heads=2, kv_heads=1, vocab=128, seed=1)
    return {"four_wide": path}


@pytest.mark.parametrize("case, ranks", [("llama", 2), ("gemma3_text", 2), ("llama", 3),  # d = 64: 22, 22, 20 rows
                                         ("four_wide", 5)])  # d = 4: 1, 1, 1, 1, 0 rows
def test_ranks_equal_one_process(case, ranks, checkpoints, four_wide, tmp_path):
    checkpoints = {**checkpoints, **four_wide}
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(ids=PROMPT))
    out, gathered = tmp_path / "operators.safetensors", tmp_path / "gathered.pt"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                          str(script), str(checkpoints[case]), str(out), str(gathered)],
                         check=True, capture_output=True, text=True, timeout=300)
    assert "rank 0 stopped: OutputError" in run.stdout and "cannot write the operators" in run.stdout, run.stdout
    assert all(f"rank {k} stopped: OutputError" in run.stdout for k in range(1, ranks)), run.stdout
    assert "rank 0 could not create the file" in run.stdout
    model = minielm.load(checkpoints[case])
    one = minielm.equivalent_linear_map(model, PROMPT).operators
    scale = float(one.abs().max())
    for operators in (torch.load(gathered), minielm.load_operators(out, model).operators):
        assert operators.shape == one.shape
        assert float((operators - one).abs().max()) <= 1e-14 * scale


def test_distributed_needs_a_process_group(checkpoints):
    model = minielm.load(checkpoints["llama"])
    with pytest.raises(minielm.InputError, match="init_process_group"):
        minielm.equivalent_linear_map(model, PROMPT, distributed=True)


MISMATCH_SCRIPT = """
import sys, torch, minielm
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
model = minielm.load(sys.argv[1])
ids = {ids}
for label, kwargs in (("prompt", dict(ids=ids if rank == 0 else ids[:-1] + [ids[-1] + 1])),
                      ("layer", dict(ids=ids, layer=None if rank == 0 else 0)),
                      ("component", dict(ids=ids, layer=1, component="mlp" if rank == 0 else "attention")),
                      ("layer, out=", dict(ids=ids, layer=None if rank == 0 else 0, out=sys.argv[2]))):
    try:
        minielm.equivalent_linear_map(model, distributed=True, **kwargs)
        print(f"rank {{rank}} {{label}}: computed", flush=True)
    except minielm.InputError as error:
        print(f"rank {{rank}} {{label}}: refused: {{error}}", flush=True)
torch.distributed.destroy_process_group()
"""


def test_ranks_given_different_prompts_or_targets_are_refused(checkpoints, tmp_path):
    """Every rank refuses a prompt or a target (layer, component) that differs between the ranks: the
    rows of different maps put together had given one map, silently wrong."""
    script = tmp_path / "rank.py"
    script.write_text(MISMATCH_SCRIPT.format(ids=PROMPT))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(checkpoints["llama"]), str(tmp_path / "ops.safetensors")],
                         check=True, capture_output=True, text=True, timeout=300)
    for rank in (0, 1):
        assert f"rank {rank} prompt: refused: distributed=True: the ranks were given different prompts" in run.stdout
        for label in ("layer", "component", "layer, out="):
            assert f"rank {rank} {label}: refused: distributed=True: the ranks were given different targets" \
                in run.stdout, run.stdout
    assert not list(tmp_path.glob("ops.safetensors*"))


FULL_DISK_SCRIPT = """
import sys, torch, minielm, minielm.operators_file
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
model = minielm.load(sys.argv[1])
write_rows = minielm.operators_file.write_rows

def full_on_rank_1(path, a, G):
    if rank == 1:
        raise minielm.OutputError(f"{{path}}: cannot write the operators (No space left on device)")
    write_rows(path, a, G)

minielm.operators_file.write_rows = full_on_rank_1
try:
    minielm.equivalent_linear_map(model, {ids}, out=sys.argv[2], block=5, distributed=True)
except minielm.MinielmError as error:
    print(f"rank {{rank}} stopped: {{type(error).__name__}}: {{error}}", flush=True)
torch.distributed.destroy_process_group()
"""


def test_a_rank_that_cannot_write_stops_every_rank(checkpoints, tmp_path):
    """A full disk on rank 1: every rank stops with a one-line error (rank 0 had waited at a barrier
    for rank 1, then failed with gloo's 'Connection reset by peer'), and no .partial file is left."""
    script = tmp_path / "rank.py"
    script.write_text(FULL_DISK_SCRIPT.format(ids=PROMPT))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(checkpoints["llama"]), str(tmp_path / "ops.safetensors")],
                         check=True, capture_output=True, text=True, timeout=300)
    assert "rank 1 stopped: OutputError" in run.stdout and "No space left on device" in run.stdout, run.stdout
    assert "rank 0 stopped: OutputError" in run.stdout and "another rank could not write its rows" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.py"]


def test_the_command_under_torchrun(tiny_with_tokenizer, tmp_path):
    """`minielm operators --distributed` under torchrun: one report line (rank 0's), and the file holds
    one process's operators."""
    out = tmp_path / "ops.safetensors"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "minielm.cli", "operators", "In the beginning", "--model", str(tiny_with_tokenizer),
                          "--out", str(out), "--block", "10", "--distributed", "--quiet"],
                         check=True, capture_output=True, text=True, timeout=300)
    assert run.stdout.count("reconstruction error") == 1, run.stdout
    model = minielm.load(tiny_with_tokenizer)
    one = minielm.equivalent_linear_map(model, model.tokenizer.encode("In the beginning")).operators
    assert float((minielm.load_operators(out, model).operators - one).abs().max()) <= 1e-14 * float(one.abs().max())
