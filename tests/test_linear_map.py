"""The equivalent linear map: exact reconstruction, analytic = autograd, freezing, attribution."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from conftest import DEVICES, PROMPT
from hf_reference import EDGE_CASES, FAMILIES, float64_everywhere, hf_float64_logits, load_hf_float64
from torch.overrides import TorchFunctionMode

import minielm
import minielm.fast_sweep
from minielm.interpret import stacked_svd
from minielm.layer_maps import all_layer_maps
from minielm.linear_map import trace
from minielm.spectra import singular_vectors


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
    # the affine part b is Hugging Face's frozen forward at zero input (test_bias_is_hugging_faces_frozen_pass_at_zero)
    assert elm.bias.abs().max() > 0 if model.config.affine else torch.all(elm.bias == 0)


class FrozenFactors(TorchFunctionMode):
    """Record, then replay, the factors that minielm freezes, where Hugging Face computes them (as in
    test_hf_autograd): the outputs of `torch.rsqrt` in its RMSNorms (1/ρ), of the softmax in its attention
    (P) and of the MLP's activation (the gate φ(W_G u)); a LayerNorm's 1/σ (F.layer_norm, decomposed) and,
    in a plain MLP (`plain`), the factor s(z) of its activation z·s(z) (F.gelu's, or GPT-2's tanh). Recording
    keeps each factor in call order; replaying uses the recorded one in its place, call for call."""

    FUNCTIONS = {torch.rsqrt, torch.Tensor.rsqrt, F.softmax, torch.softmax, torch.Tensor.softmax, F.silu, F.gelu}

    def __init__(self, recorded=None, plain=False):
        super().__init__()
        self.replaying, self.plain = recorded is not None, plain
        self.factors = [] if recorded is None else list(recorded)
        self.calls = 0

    def factor(self, value):
        """`value` while recording; the recorded factor in its place while replaying."""
        self.calls += 1
        if not self.replaying:
            self.factors.append(value)
            return value
        frozen = self.factors[self.calls - 1]
        assert frozen.shape == value.shape, (frozen.shape, value.shape)
        return frozen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:  # (x − mean) · 1/σ · w + b, 1/σ the factor
            def layer_norm(x, shape, weight, bias, eps):
                centred = x - x.mean(-1, keepdim=True)
                inv_sigma = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
                return centred * self.factor(inv_sigma) * weight + bias
            return layer_norm(*args, **kwargs)
        if self.plain and func is F.gelu:  # z · s(z), s the factor
            z = args[0]
            return z * self.factor(0.5 * (1 + torch.erf(z / 2 ** 0.5)))
        out = func(*args, **kwargs)
        if func in self.FUNCTIONS or self.plain and func in (torch.tanh, torch.Tensor.tanh):
            return self.factor(out)
        return out


@pytest.mark.parametrize("case", list(FAMILIES))
def test_bias_is_hugging_faces_frozen_pass_at_zero(case, checkpoints):
    """The affine part b of y = Σ_t J_t x_t + b, against Hugging Face's own modelling code: its float64
    model runs on the prompt, recording the factors (1/ρ, P, the gate); then on zero input embeddings
    with those factors held fixed. Its final-normed last hidden state there is b: nonzero where the
    checkpoint has biases on the linear path (qwen2's value bias, GPT-2's and GPT-NeoX's everywhere,
    their LayerNorms'), zero for the families without."""
    model = minielm.load(checkpoints[case])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    hf = load_hf_float64(checkpoints[case])
    plain, T, d = model.config.family_spec.mlp == "plain", len(PROMPT), model.config.hidden_size
    zero = torch.zeros(1, T, d, dtype=torch.float64)
    if "positions" in model.weights:  # GPT-2: Hugging Face adds the position rows to what it is given
        zero = zero - model.weights["positions"][:T]

    def last_hidden(**inputs):
        return hf.base_model(**inputs, use_cache=False).last_hidden_state[0, -1]

    with torch.no_grad(), float64_everywhere():
        with FrozenFactors(plain=plain) as record:
            y = last_hidden(input_ids=torch.tensor([PROMPT]))
        with FrozenFactors(record.factors, plain) as replay:
            b = last_hidden(inputs_embeds=zero)
    L = model.config.num_hidden_layers
    assert replay.calls == len(record.factors) >= 2 * L + 1 + L + L  # norms, softmaxes, gates: all replayed
    if model.config.affine:
        assert b.abs().max() > 1e-2 and relative(elm.bias, b) < 1e-12
    else:
        assert torch.all(b == 0) and torch.all(elm.bias == 0)
    assert relative(elm.output, y) < 1e-12  # and the recorded pass is the map's


@pytest.mark.parametrize("case", list(FAMILIES))
def test_analytic_operators_match_autograd(case, checkpoints):
    model = minielm.load(checkpoints[case])
    analytic = minielm.equivalent_linear_map(model, PROMPT).operators
    assert relative(analytic, minielm.detached_jacobian(model, PROMPT)) < 1e-12


def trap_autograd(monkeypatch) -> None:
    """Booby-trap every autograd entry point (torch.autograd.grad and .backward, which Tensor.backward
    calls, torch.autograd.functional.jacobian, torch.func.jacrev and vjp): each raises AssertionError."""
    def trap(*args, **kwargs):
        raise AssertionError("autograd was called")

    for name in ("grad", "backward"):
        monkeypatch.setattr(torch.autograd, name, trap)
    monkeypatch.setattr(torch.autograd.functional, "jacobian", trap)
    monkeypatch.setattr(torch.func, "jacrev", trap)
    monkeypatch.setattr(torch.func, "vjp", trap)


def test_no_autograd_on_the_analytic_path(checkpoints, monkeypatch):
    """Under inference_mode, with every autograd entry point booby-trapped, the map still assembles."""
    model = minielm.load(checkpoints["gemma3_text"])
    trap_autograd(monkeypatch)
    with torch.inference_mode():
        elm = minielm.equivalent_linear_map(model, PROMPT)
    assert elm.relative_error() < 1e-13


def test_the_autograd_trap_fires(checkpoints, monkeypatch):
    """The trap of test_no_autograd_on_the_analytic_path, shown firing: under it each way of asking
    autograd for a derivative raises, minielm's own autograd Jacobian (detached_jacobian, which the
    CLI's cross-check uses) included, so an analytic path that took one of them would fail there."""
    model = minielm.load(checkpoints["llama"])
    trap_autograd(monkeypatch)
    x = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
    offending = {
        "jacobian": lambda: torch.autograd.functional.jacobian(torch.sin, x),
        "grad": lambda: torch.autograd.grad(x.sin().sum(), x),
        "Tensor.backward": lambda: x.sin().sum().backward(),
        "jacrev": lambda: torch.func.jacrev(torch.sin)(x),
        "vjp": lambda: torch.func.vjp(torch.sin, x),
        "detached_jacobian": lambda: minielm.detached_jacobian(model, PROMPT[:3]),
    }
    for name, call in offending.items():
        with pytest.raises(AssertionError, match="autograd was called"):
            call()
            pytest.fail(f"{name} ran under the trap")
    assert x.grad is None


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


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "olmo2", "qwen2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("T", [len(PROMPT), 1])
def test_attribution_cells(case, T, checkpoints):
    """Every cell (source s, layer ℓ, module) against a forward computation: the frozen forward
    pass run on x with every position but s zeroed (less its value at 0) gives module ℓ's output
    at the last position due to x_s alone; the frozen final norm and the unembedding row read it.
    GPT-2 (LayerNorm, biases) and GPT-NeoX (the parallel residual, which the attribution sweeps apart) too."""
    model = minielm.load(checkpoints[case])
    token, L = 5, model.config.num_hidden_layers
    table = minielm.attribution(model, PROMPT[:T], token=token)
    x = model.embed(PROMPT[:T])  # (T, d)
    _, _, _, frozen = trace(model, x)
    _, attn0, mlp0, _ = trace(model, torch.zeros_like(x), frozen)  # the affine parts (biases)

    def logit_of(v):  # z = w_token · N'_f v: the final norm frozen at the model's own 1/ρ, less its bias (LayerNorm)
        linear = model.final_norm(v, frozen.final_norm[-1])[0] - model.final_norm(torch.zeros_like(v), frozen.final_norm[-1])[0]
        return float(linear @ model.weights["lm_head"][token])

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


# ---- edge configurations and prompt lengths ------------------------------------------------------
# Prompt lengths at the edges: 1 and 2 tokens for every configuration; for those with a sliding window w,
# w and w + 1 (the first prompt the window cuts) and 5w (most sources outside it); for longrope, the
# original context and one past it (short factors, then long ones); for llama3 scaling, past its context.
WINDOWS = {"mistral": 5, "gemma3_text": 4, "qwen3_sliding": 4, "mistral_no_gqa": 3}
EDGE_LENGTHS = ([(case, T) for case in [*FAMILIES, *EDGE_CASES] for T in (1, 2)]
                + [(case, T) for case, w in WINDOWS.items() for T in (w, w + 1, 5 * w)]
                + [("phi3_longrope", 8), ("phi3_longrope", 9), ("llama", 40), ("llama_mqa", 20)])


def edge_prompt(T):
    """T token ids valid in every tiny vocabulary, none repeated next to each other."""
    return [3 + (7 * t) % 120 for t in range(T)]


def checkpoint(case, checkpoints, edge_checkpoints):
    return checkpoints[case] if case in checkpoints else edge_checkpoints(case)


@pytest.mark.parametrize("case, T", EDGE_LENGTHS)
def test_edge_lengths_match_hugging_face_and_autograd(case, T, checkpoints, edge_checkpoints):
    """Logits against the float64 Hugging Face model, the reconstruction, and the analytic operators against
    autograd, at prompt lengths and on configurations the 16-token tests do not reach."""
    path = checkpoint(case, checkpoints, edge_checkpoints)
    model, prompt = minielm.load(path), edge_prompt(T)
    if case in WINDOWS:  # the configuration has the sliding layers it was written to have
        assert "sliding_attention" in model.config.layer_types and model.config.sliding_window == WINDOWS[case]
    assert relative(model.logits(prompt), hf_float64_logits(path, prompt)) < 1e-13
    elm = minielm.equivalent_linear_map(model, prompt)
    assert elm.relative_error() < 1e-13
    assert relative(elm.operators, minielm.detached_jacobian(model, prompt)) < 1e-12


@pytest.mark.parametrize("case, old_keys", [("qwen3_sliding", {}), ("gemma3_text", {"sliding_window_pattern": 2})])
def test_files_without_layer_types_read_as_hugging_face_reads_them(case, old_keys, checkpoints, edge_checkpoints,
                                                                   tmp_path):
    """config.json files written before transformers listed `layer_types` give the sliding layers by rule: Qwen's
    use_sliding_window with max_window_layers, Gemma 3's sliding_window_pattern. The same layer types, and the
    same float64 logits as Hugging Face reading the same file, past the window."""
    path = shutil.copytree(checkpoint(case, checkpoints, edge_checkpoints), tmp_path / "old")
    raw = json.loads((path / "config.json").read_text())
    layer_types = raw.pop("layer_types")
    raw.update(old_keys)
    (path / "config.json").write_text(json.dumps(raw))
    model, prompt = minielm.load(path), edge_prompt(12)
    assert model.config.layer_types == layer_types and "sliding_attention" in layer_types
    assert relative(model.logits(prompt), hf_float64_logits(path, prompt)) < 1e-13


@pytest.mark.parametrize("case, T", [(case, T) for case, T in EDGE_LENGTHS if T <= 2 or case in WINDOWS and T <= 6])
def test_every_entry_point_agrees_at_edge_lengths(case, T, checkpoints, edge_checkpoints):
    """All layer maps (forward = reverse = one target at a time, negative layers too), blocks of rows that do
    not divide d, the attribution's sum, and the matrix-free singular triplets (b = 1 and 3, whole map and one
    token) against the dense SVD, on 1 and 2 tokens and across a sliding window's edge."""
    model, prompt = minielm.load(checkpoint(case, checkpoints, edge_checkpoints)), edge_prompt(T)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    forward, reverse = (all_layer_maps(model, prompt, mode=mode) for mode in ("forward", "reverse"))
    assert len(forward) == len(reverse) == 3 * L
    for (layer, component), elm in forward.items():
        single = minielm.equivalent_linear_map(model, prompt, layer=layer - L, component=component)
        scale = float(single.operators.abs().max())
        assert relative(elm.operators, single.operators) < 1e-12, (layer, component)
        assert float((reverse[(layer, component)].operators - single.operators).abs().max()) < 1e-12 * scale
        assert torch.equal(elm.output, single.output) and torch.equal(elm.bias, single.bias)
        assert max(elm.relative_error(), reverse[(layer, component)].relative_error(), single.relative_error()) < 1e-13
    whole = forward[(L - 1, "output")]
    for block in (1, d - 1, d + 5):
        assert relative(minielm.equivalent_linear_map(model, prompt, block=block).operators, whole.operators) < 1e-13
    table = minielm.attribution(model, prompt, token=5)
    assert table.table.shape == (T, L, 2) and abs(table.total() - table.logit) < 1e-13 * max(1.0, abs(table.logit))
    dense = stacked_svd(whole, k=3)
    for block in (1, 3):
        U, S, V = singular_vectors(model, prompt, k=3, block=block)
        assert relative(S, dense.S) < 1e-10
        assert torch.allclose(U, dense.U, atol=1e-8) and torch.allclose(V, dense.V, atol=1e-8)
        for token in (0, -1):
            _, S_t, _ = singular_vectors(model, prompt, k=3, token=token, block=block)
            assert relative(S_t, torch.linalg.svdvals(whole.operators[token])[:3]) < 1e-10


class FloatDtypes(TorchDispatchMode):
    """Every floating-point dtype of a tensor that goes into or comes out of an aten operation."""

    def __init__(self):
        super().__init__()
        self.seen = {}  # dtype -> the first operation it was seen in

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen.setdefault(t.dtype, str(func))
        return out


@pytest.mark.parametrize("case", ["qwen2"])
def test_float64_is_float64_throughout(case, checkpoints):
    """Asked for float64, no operation of the map, the layer maps, the attribution or the singular triplets
    (dense and matrix-free) makes or reads a tensor of any other floating-point dtype, not even an exact one."""
    model, prompt = minielm.load(checkpoints[case]), PROMPT[:4]
    with FloatDtypes() as dtypes:
        elm = minielm.equivalent_linear_map(model, prompt, block=5)
        all_layer_maps(model, prompt, mode="forward"), all_layer_maps(model, prompt, mode="reverse")
        minielm.attribution(model, prompt)
        stacked_svd(elm, k=2), singular_vectors(model, prompt, k=2), singular_vectors(model, prompt, k=2, token=0)
    assert set(dtypes.seen) == {torch.float64}, dtypes.seen


def test_the_float64_traps_fire(checkpoints, monkeypatch):
    """The two float64 traps, shown firing. FloatDtypes (test_float64_is_float64_throughout) sees a
    float32 tensor made on the map's path, even an exact round trip: here `x.float().double()` of the
    MLP gate inside the sweep. The Hugging Face oracle's aten-level check (hf_float64_logits) raises
    when transformers' own float32 casts are left in: its TorchFunctionMode made a pass-through for
    the forward pass (the model loaded as usual, its buffers in float64)."""
    import hf_reference

    with FloatDtypes() as dtypes:
        torch.ones(3, dtype=torch.float64).float()
    assert dtypes.seen.get(torch.float32) == "aten._to_copy.default"

    model = minielm.load(checkpoints["qwen2"])
    exact = minielm.fast_sweep.folded_mlp

    def via_float32(*args):  # the gate φ_t through float32 and back: exact here, still a float32 tensor
        W_D, gate, W_U = exact(*args)
        return W_D, gate.float().double(), W_U

    monkeypatch.setattr(minielm.fast_sweep, "folded_mlp", via_float32)
    with FloatDtypes() as dtypes:
        minielm.equivalent_linear_map(model, PROMPT[:4])
    assert torch.float32 in dtypes.seen

    hf = hf_reference.load_hf_float64(checkpoints["llama"])
    monkeypatch.setattr(hf_reference, "load_hf_float64", lambda directory: hf)
    monkeypatch.setattr(hf_reference._Float32RequestsToFloat64, "__torch_function__",
                        lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {})))
    with pytest.raises(AssertionError, match="low-precision tensors in the float64 reference"):
        hf_reference.hf_float64_logits(checkpoints["llama"], PROMPT[:4])


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-4), (torch.bfloat16, 1e-1), (torch.float16, 1e-2)])
@pytest.mark.parametrize("case", ["qwen2", "gemma3_text", "olmo2"])
def test_lower_precision_maps_agree_with_their_own_forward_pass(case, dtype, bound, checkpoints):
    """In float32, bfloat16 and float16 the map is computed in that dtype (no upcast) and still reproduces
    the model's own output at that precision (the bounds of `minielm check`), for every target, T = 1 and 16."""
    model = minielm.load(checkpoints[case], dtype=dtype)
    for prompt in (PROMPT[:1], PROMPT):
        y = model.forward(model.embed(prompt))[0][-1]
        elm = minielm.equivalent_linear_map(model, prompt)
        assert elm.operators.dtype == elm.bias.dtype == elm.output.dtype == dtype and torch.equal(elm.output, y)
        assert elm.relative_error() < bound
        for mode in ("forward", "reverse"):
            maps = all_layer_maps(model, prompt, mode=mode)
            assert all(m.operators.dtype == dtype for m in maps.values())
            assert max(m.relative_error() for m in maps.values()) < bound
        table = minielm.attribution(model, prompt, token=5)
        assert table.table.dtype == dtype and abs(table.total() - table.logit) < bound * max(1.0, abs(table.logit))


@pytest.mark.parametrize("case", ["gemma3_text", "qwen2", "llama_mqa"])
def test_sweeps_in_small_pieces_give_the_same_operators(case, checkpoints, edge_checkpoints, monkeypatch):
    """With a scratch budget of one byte every chunked loop of the sweep (rows of the attention sublayer,
    positions of the MLP, sources below the top attention, sources of the top attention alone) goes one
    item at a time, as it does on large models; the operators of every entry point stay those of the
    unchunked sweep. Without this the tiny models never leave the one-chunk path."""
    model, prompt = minielm.load(checkpoint(case, checkpoints, edge_checkpoints)), PROMPT[:4]
    L = model.config.num_hidden_layers

    def everything():
        return ([minielm.equivalent_linear_map(model, prompt, block=block).operators for block in (None, 24)]
                + [minielm.equivalent_linear_map(model, prompt, layer=-L, component=component).operators
                   for component in ("attention", "mlp")]
                + [m.operators for m in all_layer_maps(model, prompt, mode="reverse").values()]
                + [minielm.attribution(model, prompt, token=5).table])

    whole = everything()
    monkeypatch.setattr(minielm.fast_sweep, "SCRATCH_BYTES", 1)
    for a, b in zip(everything(), whole, strict=True):
        assert relative(a, b) < 1e-13


def test_repr_is_one_short_line():
    """repr(elm) names the target, T, d, the dtype and the relative error, read from the map itself (a
    dataclass repr printed every tensor: 33 KB for the shipped model)."""
    model = minielm.load()
    elm = minielm.equivalent_linear_map(model, model.tokenizer.encode("In the beginning"), layer=1, component="mlp")
    T, d = elm.inputs.shape
    shown = repr(elm)
    assert "\n" not in shown and len(shown) < 150, shown
    assert shown == (f"EquivalentLinearMap(target={elm.target!r}, T={T}, d={d}, dtype=float64, "
                     f"relative_error={elm.relative_error():.1e})")
