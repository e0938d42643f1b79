"""Many devices: 2 ranks under torchrun (gloo, CPU) split the output rows; gathered, and written
into one file, the operators equal one process's to round-off."""

import subprocess
import sys

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
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("case", ["llama", "gemma3_text"])
def test_two_ranks_equal_one_process(case, checkpoints, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(ids=PROMPT))
    out, gathered = tmp_path / "operators.safetensors", tmp_path / "gathered.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), str(checkpoints[case]), str(out), str(gathered)],
                   check=True, capture_output=True, text=True, timeout=300)
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
