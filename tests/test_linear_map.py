"""The equivalent linear map: exact reconstruction, analytic = autograd, freezing, attribution."""

import pytest
import torch
from conftest import DEVICES, PROMPT
from hf_reference import FAMILIES

import minielm
from minielm.linear_map import trace


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(FAMILIES))
@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_is_exact(case, device, checkpoints):
    model = minielm.load(checkpoints[case], device=device)
    elm = minielm.equivalent_linear_map(model, PROMPT)
    T, d = len(PROMPT), model.config.hidden_size
    assert elm.operators.shape == (T, d, d) and elm.inputs.shape == (T, d) and elm.output.shape == (d,)
    # the target is the model's own output, computed independently of the map
    y = model.forward(model.embed(PROMPT))[0][-1]
    assert torch.equal(elm.output, y)
    assert elm.relative_error() < 1e-13
    probs = torch.softmax(model.logits(PROMPT)[-1], dim=-1)
    assert torch.allclose(elm.probabilities(), probs, rtol=0, atol=1e-14)
    assert torch.allclose(elm.model_probabilities(), probs, rtol=0, atol=1e-15)  # the model's own, from y
    assert elm.bias.abs().max() > 0 if case == "qwen2" else torch.all(elm.bias == 0)
    # the affine part is the frozen pass at x = 0, which the map runs only for checkpoints with biases
    states0 = trace(model, torch.zeros_like(elm.inputs), elm.frozen)[0]
    assert torch.equal(model.norm(states0[-1][-1], model.weights["final_norm"], elm.frozen.final_norm[-1])[0],
                       elm.bias)


@pytest.mark.parametrize("case", list(FAMILIES))
def test_analytic_operators_match_autograd(case, checkpoints):
    model = minielm.load(checkpoints[case])
    analytic = minielm.equivalent_linear_map(model, PROMPT).operators
    assert relative(analytic, minielm.detached_jacobian(model, PROMPT)) < 1e-12


def test_no_autograd_on_the_analytic_path(checkpoints, monkeypatch):
    """Under inference_mode, with every autograd entry point booby-trapped, the map still assembles."""
    model = minielm.load(checkpoints["gemma3_text"])

    def trap(*args, **kwargs):
        raise AssertionError("autograd was called")

    for name in ("grad", "backward"):
        monkeypatch.setattr(torch.autograd, name, trap)
    monkeypatch.setattr(torch.autograd.functional, "jacobian", trap)
    monkeypatch.setattr(torch.func, "jacrev", trap)
    monkeypatch.setattr(torch.func, "vjp", trap)
    with torch.inference_mode():
        elm = minielm.equivalent_linear_map(model, PROMPT)
    assert elm.relative_error() < 1e-13


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "olmo2", "qwen2"])
def test_freezing(case, checkpoints):
    """With the factors fixed, the forward pass is an affine map of any input, and it is the map's."""
    model = minielm.load(checkpoints[case])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    gen = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(elm.inputs.shape, generator=gen, dtype=torch.float64) for _ in range(2))

    def frozen_output(z):
        return model.forward(z, elm.frozen)[0][-1]

    for z in (z1, z2):  # replacing the input: the same operators predict the frozen output
        predicted = torch.einsum("tij,tj->i", elm.operators, z) + elm.bias
        assert relative(predicted, frozen_output(z)) < 1e-13
    lhs = frozen_output(2.0 * z1 - 3.0 * z2) - elm.bias
    rhs = 2.0 * (frozen_output(z1) - elm.bias) - 3.0 * (frozen_output(z2) - elm.bias)
    assert relative(lhs, rhs) < 1e-13
    # ... while the unfrozen model at z1 is not that map: the freezing is what makes it linear
    unfrozen = model.forward(z1)[0][-1]
    assert relative(unfrozen, frozen_output(z1)) > 1e-3


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "olmo2", "qwen2", "phi3"])
@pytest.mark.parametrize("T", [len(PROMPT), 1])  # one token: the target's own layer is also the bottom one
def test_intermediate_operators(case, T, checkpoints):
    """Operators to every layer's output and every module's output reconstruct their targets,
    and agree with autograd of the frozen forward pass to that same target."""
    model = minielm.load(checkpoints[case])
    prompt = PROMPT[:T]
    x = model.embed(prompt)
    residual, attn, mlp, frozen = trace(model, x)
    for layer in range(model.config.num_hidden_layers):
        for component, states in (("output", residual), ("attention", attn), ("mlp", mlp)):
            elm = minielm.equivalent_linear_map(model, prompt, layer=layer, component=component)
            assert elm.relative_error() < 1e-13, (layer, component)
            if component != "output":
                assert torch.equal(elm.output, states[layer][-1])
                for read in (elm.logits, elm.model_probabilities):  # a module's output is not read by W_U
                    with pytest.raises(minielm.InputError, match="residual-stream targets"):
                        read()

                def target(z, layer=layer, component=component):
                    return trace(model, z, frozen)[{"attention": 1, "mlp": 2}[component]][layer][-1]

                J = torch.autograd.functional.jacobian(target, x).permute(1, 0, 2)
                assert relative(elm.operators, J) < 1e-12, (layer, component)


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("T", [len(PROMPT), 1])
def test_attribution_sums_to_the_logit(case, T, checkpoints):
    model = minielm.load(checkpoints[case])
    prompt = PROMPT[:T]
    table = minielm.attribution(model, prompt, token=5)
    L = model.config.num_hidden_layers
    assert table.table.shape == (T, L, 2)
    assert abs(table.total() - table.logit) < 1e-13 * max(1.0, abs(table.logit))
    # the logit is the model's own (before soft-capping)
    y = model.forward(model.embed(prompt))[0][-1]
    assert abs(table.logit - float(y @ model.weights["lm_head"][5])) < 1e-13
    # every layer and both modules carry some of it, and earlier sources matter
    assert (table.table.abs().sum(0) > 0).all() and table.table[0].abs().sum() > 0


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "olmo2", "qwen2"])
@pytest.mark.parametrize("T", [len(PROMPT), 1])
def test_attribution_cells(case, T, checkpoints):
    """Every cell (source s, layer ℓ, module) against a forward computation: the frozen forward
    pass run on x with every position but s zeroed (less its value at 0) gives module ℓ's output
    at the last position due to x_s alone; the frozen final norm and the unembedding row read it."""
    model = minielm.load(checkpoints[case])
    token, L = 5, model.config.num_hidden_layers
    table = minielm.attribution(model, PROMPT[:T], token=token)
    x = model.embed(PROMPT[:T])  # (T, d)
    _, _, _, frozen = trace(model, x)
    _, attn0, mlp0, _ = trace(model, torch.zeros_like(x), frozen)  # the affine parts (biases)

    def logit_of(v):  # z = w_token · N_f(v), the final norm frozen at the model's own 1/ρ
        return float(model.norm(v, model.weights["final_norm"], frozen.final_norm[-1])[0] @ model.weights["lm_head"][token])

    expected = torch.zeros(T, L, 2, dtype=x.dtype)
    for s in range(T):
        alone = torch.zeros_like(x)
        alone[s] = x[s]
        _, attn, mlp, _ = trace(model, alone, frozen)
        for layer in range(L):
            expected[s, layer, 0] = logit_of(attn[layer][-1] - attn0[layer][-1])
            expected[s, layer, 1] = logit_of(mlp[layer][-1] - mlp0[layer][-1])
    assert relative(table.table, expected) < 1e-12
    bias = torch.tensor([[logit_of(attn0[layer][-1]), logit_of(mlp0[layer][-1])] for layer in range(L)], dtype=x.dtype)
    assert torch.allclose(table.bias, bias, rtol=0, atol=1e-12)
    assert table.embedding[-1] == pytest.approx(logit_of(x[-1]), rel=1e-12) and not table.embedding[:-1].any()


def test_bad_arguments(checkpoints):
    model = minielm.load(checkpoints["llama"])
    with pytest.raises(minielm.InputError, match="layer"):
        minielm.equivalent_linear_map(model, PROMPT, layer=7)
    with pytest.raises(minielm.InputError, match="component"):
        minielm.equivalent_linear_map(model, PROMPT, layer=0, component="mixer")
    with pytest.raises(minielm.InputError, match="empty"):
        minielm.equivalent_linear_map(model, [])
