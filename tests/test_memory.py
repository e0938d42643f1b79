"""Bounded memory: a child process's peak during equivalent_linear_map, on a model whose H·hd exceeds
d (as Gemma 3's), at T = 512, where the operators (T·d², 256 MB) dominate everything else. In memory:
the operators, the sweep's scratch and the frozen factors, with 32 MB of slack (the unblocked sweep,
the control, needs far more). With out=: one block's work, well under the operators.

The child runs with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), so that every
large tensor is mapped when made and unmapped when freed: the peak is then minielm's own live memory.
With the default, adaptive threshold the peak also holds whatever the allocator kept from the warm-up,
and identical runs of the out= case measured anywhere from 65 to 107 MB."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
from proc_memory import CHILD_PRELUDE  # noqa: E402
T = 512

CHILD = CHILD_PRELUDE + """
import json, sys, torch, minielm, minielm.linear_map
directory, T, out, scratch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
minielm.fast_sweep.SCRATCH_BYTES = scratch
model = minielm.load(directory)
with torch.inference_mode():
    minielm.equivalent_linear_map(model, [1, 2, 3, 4])  # the runtime's one-time buffers, before measuring,
    minielm.linear_map.traced(model, list(range(1, T + 1)))  # and the forward pass's (the heap keeps them)
    before = status_mb("VmRSS")
    if out == "-":
        elm = minielm.equivalent_linear_map(model, list(range(1, T + 1)))
    else:
        elm = minielm.equivalent_linear_map(model, list(range(1, T + 1)), out=out, block=16)
    peak = status_mb("VmHWM")
print(json.dumps({"extra_mb": peak - before, "operators_mb": elm.operators.numel() * 8 / 2**20,
                  "error": elm.relative_error()}))
"""


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory):
    """d = 256 with 4 heads of 128: H·hd = 512 > d, one key-value head, Gemma 3's norms."""
    from bench import random_checkpoint

    directory = tmp_path_factory.mktemp("gemma_like")
    random_checkpoint(directory, d=D, layers=2, f=512, heads=4, kv_heads=1, vocab=600, family="gemma3_text",
                      head_dim=128)
    return directory


D, SCRATCH = 256, 16 * 2**20


def peak(directory, out="-", scratch=SCRATCH) -> dict:
    live = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), MALLOC_TRIM_THRESHOLD_=str(2**20))
    result = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(T), str(out), str(scratch)],
                            capture_output=True, text=True, check=True, env=live)
    return json.loads(result.stdout.strip().splitlines()[-1])


def in_memory_bound(operators_mb: float) -> float:
    """The operators; the scratch (an eighth of them here, kept for about 2.5 sublayers' shapes); the
    frozen factors P (H, T, T) of both layers, and one layer's P with the norms folded in; 32 MB of slack."""
    factors_mb = 2 * 4 * T * T * 8 / 2**20
    return operators_mb + 2.5 * operators_mb / 8 + 1.5 * factors_mb + 32


def test_peak_in_memory_is_the_operators_and_a_bounded_scratch(gemma_like):
    memory = peak(gemma_like)
    bound = in_memory_bound(memory["operators_mb"])
    print(f"in memory: {memory['extra_mb']:.0f} MB above the model for {memory['operators_mb']:.0f} MB of operators "
          f"(bound {bound:.0f} MB)")
    assert memory["error"] < 1e-13
    assert memory["operators_mb"] > 0.6 * bound  # the operators are most of what is bounded
    assert memory["extra_mb"] <= bound


def test_the_unbounded_sweep_exceeds_the_bound(gemma_like):
    """The control: with a scratch budget that bounds nothing, the sweep takes every row at once and its
    head-sized temporaries (T, d, H·hd) come on top of the operators: the bound above catches it."""
    memory = peak(gemma_like, scratch=2**40)
    print(f"unbounded: {memory['extra_mb']:.0f} MB above the model (bound {in_memory_bound(memory['operators_mb']):.0f})")
    assert memory["extra_mb"] > in_memory_bound(memory["operators_mb"])


def test_peak_with_out_is_one_block(gemma_like, tmp_path):
    memory = peak(gemma_like, tmp_path / "operators.safetensors")
    block_mb = T * 16 * D * 8 / 2**20  # the block's G: 16 rows of every J_t
    factors_mb = 2 * 4 * T * T * 8 / 2**20  # P (H, T, T) of both layers, held by the frozen factors
    states_mb = 3 * 2 * T * D * 8 / 2**20  # each layer's residual stream, attention and MLP outputs, traced at x
    # + the scratch (2 × budget), a layer's P with the norms' 1/ρ folded in (one copy), 32 MB of slack
    bound = block_mb + 2 * 16 + factors_mb + factors_mb / 2 + states_mb + 32
    print(f"out=: {memory['extra_mb']:.0f} MB above the model (bound {bound:.0f}), blocks of {block_mb:.0f} MB, "
          f"operators {memory['operators_mb']:.0f} MB")
    assert memory["error"] < 1e-13
    assert memory["extra_mb"] <= bound
