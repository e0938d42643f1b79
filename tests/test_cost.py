"""The cost model's flop formulas against torch's flop counter on the real code paths."""

import pytest
import torch
from conftest import PROMPT
from torch.utils.flop_counter import FlopCounterMode

import minielm
from minielm.cost import Shape, assembly_flops, forward_flops, sweep_flops
from minielm.linear_map import pull_back, trace


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma3_text", "olmo2", "phi3"])
def test_flop_formulas_match_the_code(case, checkpoints):
    model = minielm.load(checkpoints[case])
    shape, T = Shape.of(model.config), len(PROMPT)
    x = model.embed(PROMPT)
    _, _, _, frozen = trace(model, x)
    seed = torch.eye(shape.d, dtype=x.dtype)
    top = (model, frozen)
    assert counted(lambda: pull_back(*top, seed, shape.L - 1, "output")) == assembly_flops(shape, T)
    assert counted(lambda: pull_back(*top, seed[:1], shape.L - 1, "output")) == sweep_flops(shape, T, 1)
    assert counted(lambda: model.forward(x, frozen)) == forward_flops(shape, T, frozen=True)
    last_logits = 2 * shape.d * shape.V
    assert counted(lambda: model.forward(x)) == forward_flops(shape, T) - last_logits


def test_parameter_count(checkpoints):
    model = minielm.load(checkpoints["llama"])
    shape = Shape.of(model.config)
    norms = model.config.hidden_size * (2 * shape.L + 1)
    assert shape.params + norms == sum(t.numel() for t in model.parameters())
