"""Streaming: a checkpoint larger than its float64 budget, run layer by layer from the mapped file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICES
from hf_reference import save_tiny_checkpoint

import minielm

TOOLS = Path(__file__).resolve().parent.parent / "tools"
IDS = [1, 17, 5, 88]

# The child reads its own memory from /proc: VmRSS now, VmHWM the peak. (getrusage's ru_maxrss
# would not do: Linux carries it across exec from the forked parent, here the test runner.)
CHILD = """
import json, sys, torch
import minielm

def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

directory, out, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
before = status_mb("VmRSS")
model = minielm.load(directory, dtype=torch.float64, stream=True)
logits = model.logits(ids)
operators = minielm.equivalent_linear_map(model, ids).operators
peak = status_mb("VmHWM")
torch.save({"logits": logits, "operators": operators}, out)
print(json.dumps({"before_mb": before, "peak_mb": peak}))
"""


@pytest.fixture(scope="module")
def big_bf16(tmp_path_factory):
    """A random bf16 Llama-style checkpoint of 124M parameters: about 1 GB in float64 (250 MB on disk)."""
    sys.path.insert(0, str(TOOLS))
    from bench import random_checkpoint

    directory = tmp_path_factory.mktemp("big")
    random_checkpoint(directory, d=1024, layers=9, f=2816, heads=8, kv_heads=8, vocab=4096,
                      dtype=torch.bfloat16, tied=False)
    return directory


def test_streamed_run_fits_in_40_percent_and_is_identical(big_bf16, tmp_path):
    float64_mb = sum(t.numel() for t in minielm.load(big_bf16, stream=True).parameters()) * 8 / 2**20
    assert float64_mb > 900
    out = tmp_path / "streamed.pt"
    result = subprocess.run([sys.executable, "-c", CHILD, str(big_bf16), str(out), json.dumps(IDS)],
                            capture_output=True, text=True, check=True)
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    extra = memory["peak_mb"] - memory["before_mb"]
    print(f"streamed logits and operators: {extra:.0f} MB above the imports, for {float64_mb:.0f} MB of float64 weights")
    assert extra < 0.4 * float64_mb, f"streamed run needed {extra:.0f} MB of {float64_mb:.0f} MB"
    streamed = torch.load(out)
    model = minielm.load(big_bf16, dtype=torch.float64)  # the whole model in float64, for comparison
    assert torch.equal(streamed["logits"], model.logits(IDS))
    assert torch.equal(streamed["operators"], minielm.equivalent_linear_map(model, IDS).operators)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["llama", "gemma3_text", "phi3", "qwen2"])
def test_streamed_equals_loaded(case, device, tmp_path):
    """Streaming (host -> device, layer by layer, on CUDA) changes nothing in the results."""
    save_tiny_checkpoint(case, tmp_path, dtype=torch.bfloat16)
    loaded = minielm.load(tmp_path, device=device)
    streamed = minielm.load(tmp_path, device=device, stream=True)
    assert streamed.weights["embed"].dtype == torch.bfloat16  # kept in the file's dtype
    ids = [1, 17, 5, 88, 2, 41, 9, 60, 33, 7]
    assert torch.equal(loaded.logits(ids), streamed.logits(ids))
    assert torch.equal(minielm.equivalent_linear_map(loaded, ids).operators,
                       minielm.equivalent_linear_map(streamed, ids).operators)
    assert loaded.generate_ids(ids[:3], 6) == streamed.generate_ids(ids[:3], 6)
    assert torch.equal(minielm.attribution(loaded, ids).table, minielm.attribution(streamed, ids).table)
