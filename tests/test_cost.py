"""The cost model's flop formulas against torch's flop counter on the real code paths."""

import pytest
import torch
from conftest import PROMPT
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import minielm
import minielm.spectra
from minielm.cost import (Shape, assembly_bytes, assembly_flops, forward_flops, frozen_product_flops, lanczos_flops,
                          sweep_flops)
from minielm.fast_sweep import fast_sweep
from minielm.linear_map import trace
from minielm.spectra import FrozenProducts, singular_vectors


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3", "gpt2", "gpt_neox",
                                  "gpt_neox_sequential"])
def test_flop_formulas_match_the_code(case, checkpoints):
    model = minielm.load(checkpoints[case])
    shape, T = Shape.of(model.config), len(PROMPT)
    x = model.embed(PROMPT)
    _, _, _, frozen = trace(model, x)
    seed = torch.eye(shape.d, dtype=x.dtype)
    top = (model, frozen)
    assert counted(lambda: fast_sweep(*top, seed, shape.L - 1, "output")) == assembly_flops(shape, T)
    assert counted(lambda: fast_sweep(*top, seed[:1], shape.L - 1, "output")) == sweep_flops(shape, T, 1)
    assert counted(lambda: model.forward(x, frozen)) == forward_flops(shape, T, frozen=True)
    assert counted(lambda: model.forward(x, frozen.at_last_position())) == frozen_product_flops(shape, T)
    last_logits = 2 * shape.d * shape.V
    assert counted(lambda: model.forward(x)) == forward_flops(shape, T) - last_logits


def test_parameter_count(checkpoints):
    model = minielm.load(checkpoints["llama"])
    shape = Shape.of(model.config)
    norms = model.config.hidden_size * (2 * shape.L + 1)
    assert shape.params + norms == sum(t.numel() for t in model.parameters())


@pytest.mark.parametrize("case, block", [("llama", 1), ("qwen3", 1), ("qwen3", 3)])
def test_lanczos_flops(case, block, checkpoints):
    """A Lanczos run of `steps` blocks (a tolerance no run can meet: it runs them all, then gives up): its matrix
    products and reorthogonalization, by torch's counter, less the small residual products."""
    model = minielm.load(checkpoints[case])
    shape, T, k, steps = Shape.of(model.config), len(PROMPT), 2, 6

    def run():
        with pytest.raises(minielm.NumericalError, match="not converged"):
            singular_vectors(model, PROMPT, k=k, tol=1e-300, max_steps=steps, block=block)

    setup = counted(lambda: FrozenProducts(model, PROMPT))  # the traced forward pass and the affine part
    residuals = sum(2 * block * block * k for j in range(1, steps + 1) if j * block >= k)  # Sᵀ P_i, each step
    assert counted(run) - setup - residuals == lanczos_flops(shape, T, steps, block)


class LargestTensor(TorchDispatchMode):
    """The largest storage (in bytes) behind any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.bytes = max([self.bytes, *sizes])
        return out


@pytest.mark.parametrize("case, dtype", [("llama", torch.float64), ("qwen3", torch.float64), ("qwen3", torch.float32)])
def test_assembly_bytes(case, dtype, checkpoints):
    """The operators, the weights, one layer; and no tensor the assembly makes is larger than the
    operators or the sweep's scratch budget (qwen3: H·hd > d)."""
    model = minielm.load(checkpoints[case], dtype=dtype)
    shape, T, b = Shape.of(model.config), len(PROMPT), dtype.itemsize
    memory = assembly_bytes(shape, T, b)
    largest = LargestTensor()
    with largest:
        operators = minielm.equivalent_linear_map(model, PROMPT).operators
    assert memory["operators"] == operators.nbytes
    assert largest.bytes >= memory["operators"]  # the operators are made whole
    assert largest.bytes <= max(memory["operators"], memory["scratch"])
    if case == "llama":  # the weight formulas leave out the norms, and count an untied unembedding
        norms = model.config.hidden_size * b  # each RMSNorm weight
        assert memory["weights"] + (2 * shape.L + 1) * norms == sum(t.nbytes for t in model.parameters())
        assert memory["one_layer"] + 2 * norms == sum(t.nbytes for t in model.weights["layers"][0].tensors())
