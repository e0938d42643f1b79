"""The CUDA path on a simulated device (tests/simulated_cuda.py), on every run, without a GPU.

The whole pipeline runs with device="cuda": loading (in memory, and streamed with the read-ahead's
side stream), the forward pass, the dense and the blocked sweep, an operators file, Lanczos,
the attribution, every layer's map (and the `layers` and `explain` commands), steering and
generation. The simulation fails on a CPU tensor in the device's compute, a dtype other than
float64, a host synchronization inside a per-layer loop, or a read-ahead tensor used before its
copy was waited for. Values are fake (no arithmetic runs): these tests check devices, dtypes,
shapes and where the host waits; the numbers are the CPU tests' business, and a real GPU's
(tools/gpu_session.sh). The last tests break the code on purpose and see the simulation fail.

Not simulated: autograd (its engine needs a real CUDA device to run a backward pass, so `explain`
runs with --no-autograd here), and seeded sampling (a CUDA generator needs the CUDA library).
"""

import contextlib
import io

import pytest
import torch
from conftest import PROMPT
from simulated_cuda import SimulatedCuda, SimulationFault
from torch._subclasses.fake_tensor import FakeTensor

import minielm
import minielm.cli
from minielm import fast_sweep, model as model_module
from minielm.layer_maps import all_layer_maps
from minielm.steering import Steering, measure

TEXT = "In the beginning"  # each op costs a fraction of a millisecond, some run once a token or a layer


@pytest.fixture
def cuda():
    """The simulated device, for one test; every fault it saw fails the test, even one caught on the way."""
    with SimulatedCuda() as simulation:
        yield simulation
    simulation.check()


def on_device(*tensors, dtype=torch.float64):
    """Each tensor lives on the simulated device, floating ones in `dtype`."""
    for t in tensors:
        assert isinstance(t, FakeTensor) and t.device.type == "cuda", (type(t), t.device)
        assert not t.dtype.is_floating_point or t.dtype == dtype, t.dtype
    return True


@pytest.fixture
def tiny(tiny_with_tokenizer):
    """A random 2-layer Llama-style checkpoint (d = 48, grouped-query attention) with a tokenizer."""
    return tiny_with_tokenizer


def loaded(path, stream=False):
    model = minielm.load(path, device="cuda", stream=stream)
    return model, model.tokenizer.encode(TEXT)


# ---- the pipeline, in memory -----------------------------------------------------------------
def test_load_forward_and_the_sweeps(cuda, tiny, tmp_path):
    model, ids = loaded(tiny)
    T, d, V = len(ids), model.config.hidden_size, model.config.vocab_size
    assert on_device(model.weights["embed"], *model.parameters())
    logits = model.logits(ids)
    assert logits.shape == (T, V) and on_device(logits)
    elm = minielm.equivalent_linear_map(model, ids)  # the dense sweep, all d rows at once
    assert elm.operators.shape == (T, d, d) and on_device(elm.operators, elm.inputs, elm.output, elm.bias)
    module = minielm.equivalent_linear_map(model, ids, layer=1, component="attention")
    assert on_device(module.operators, elm.probabilities())
    path = tmp_path / "ops.safetensors"
    written = minielm.equivalent_linear_map(model, ids, out=path, block=d // 2 + 1)  # the blocked sweep: two
    again = minielm.load_operators(path, model)  # blocks, the last one short, each written to the file at once;
    # the file's map is on the host, its logits on the device
    assert written.operators.device.type == again.operators.device.type == "cpu"
    assert again.operators.shape == (T, d, d) and on_device(again.probabilities())
    assert {"forward", "sweep"} <= set(cuda.loops)


def test_spectra_attribution_and_layer_maps(cuda, tiny):
    model, ids = loaded(tiny)
    T, d, L = len(ids), model.config.hidden_size, model.config.num_hidden_layers
    U, S, V = minielm.singular_vectors(model, ids, k=2)  # block Lanczos, k + 4 rows per sweep on CUDA
    assert (U.shape, S.shape, V.shape) == ((d, 2), (2,), (T, d, 2)) and on_device(U, S, V)
    attr = minielm.attribution(model, ids)
    assert attr.table.shape == (T, L, 2) and on_device(attr.table, attr.embedding, attr.bias)
    maps = all_layer_maps(model, ids, mode="reverse")  # (the forward mode: `minielm layers`, below)
    assert len(maps) == 3 * L and on_device(*(m.operators for m in maps.values()))
    assert {"forward", "sweep", "reverse pass"} <= set(cuda.loops)  # the attribution is one reverse pass too


def test_generation_and_steering(cuda, tiny):
    model, ids = loaded(tiny)
    assert len(model.generate_ids(ids, 2)) == 2  # greedy, with a KV cache
    assert len(model.generate_ids(ids, 1, temperature=0.8, top_k=5)) == 1  # sampled
    for method in ("minielm", "paper", "actadd"):
        steering = Steering(model, "the sea", 1, method)
        assert on_device(steering.ingredient)
        new = model.generate_ids(ids, 1, edit=steering.edit(0.1))
    scores = measure(model, ids, new, [5, 9], steering.edit(0.1))  # steer-eval's scores of a continuation
    assert {"nll", "continuation_lift"} <= set(scores)


def test_the_commands_layers_and_explain(cuda, tiny):
    for argv in (["layers", "In"], ["explain", TEXT, "--no-autograd", "-k", "2"],  # 2 tokens: the forward mode
                 ["explain", TEXT, "--no-autograd", "-k", "2", "--route", "matrix-free"]):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert minielm.cli.main(argv + ["--model", str(tiny), "--device", "cuda", "--quiet"]) == 0
        assert "d=48, 2 layers, float64" in out.getvalue()  # the header (the figures below it are fake)
    assert {"forward", "sweep", "forward pass of ∂h/∂x"} <= set(cuda.loops)


# ---- streamed, with the read-ahead on its side stream ------------------------------------------
def test_streamed_with_read_ahead(cuda):
    """The shipped model (4 layers, bf16 on disk): each layer crosses to the device in bf16, cast there."""
    model = minielm.load(device="cuda", stream=True)
    ids = model.tokenizer.encode(TEXT)
    layers = model.weights["layers"]
    assert layers.read_ahead and layers.side_stream is not None  # on CUDA, on by default
    assert model.weights["embed"].dtype == torch.bfloat16 and model.weights["embed"].device.type == "cpu"  # the
    # file's dtype, on the host (and the unembedding, tied to it)
    assert on_device(model.logits(ids))
    U, S, V = minielm.singular_vectors(model, ids, k=2)  # a pass up, then frozen passes up and sweeps down
    assert on_device(U, S, V)
    assert cuda.side_copies > 0 and cuda.side_uses > 0  # the read-ahead copied layers, and they were used


# ---- other families: their own operations on the device -------------------------------------------
@pytest.mark.parametrize("case", ["gemma3_text", "gpt2", "gpt_neox", "phi3_longrope"])
def test_families_forward_and_sweeps(case, checkpoints, cuda):
    """Gemma 3's four norms, q/k norms and sliding layers; GPT-2's LayerNorm, learned positions and biases
    (an affine map); GPT-NeoX's parallel residual; Phi-3's fused weights and longrope past its original
    context (8 tokens)."""
    model = minielm.load(checkpoints[case], device="cuda")
    ids = PROMPT[:9]
    elm = minielm.equivalent_linear_map(model, ids, block=model.config.hidden_size // 2 + 1)
    assert on_device(elm.operators, elm.bias, elm.probabilities())


# ---- the simulation fails where it should: faults injected on purpose --------------------------
def broken_mlp_sublayer(monkeypatch, fault):
    """fast_sweep's MLP sublayer, with `fault(G)` run first, inside the sweep's per-layer loop."""
    original = fast_sweep.mlp_sublayer

    def mlp_sublayer(model, i, factors, G, *args, **kwargs):
        fault(G)
        return original(model, i, factors, G, *args, **kwargs)
    monkeypatch.setattr(fast_sweep, "mlp_sublayer", mlp_sublayer)


def sweep_fails(tiny, monkeypatch, fault, *expected):
    """The dense sweep, broken by `fault`, fails on the simulated device with a message saying `expected`."""
    broken_mlp_sublayer(monkeypatch, fault)
    with SimulatedCuda() as simulation:
        model, ids = loaded(tiny)
        with pytest.raises(SimulationFault) as failure:
            minielm.equivalent_linear_map(model, ids)
    message = str(failure.value)
    assert all(part in message for part in expected), message
    with pytest.raises(AssertionError):
        simulation.check()
    return message


def test_it_fails_on_a_tensor_made_without_device(tiny, monkeypatch):
    def arange(G):
        G[-1, :, :3] += torch.arange(3)  # torch.arange(n) without device=
    sweep_fails(tiny, monkeypatch, arange, "CPU tensor", "aten.arange", "per-layer loop 'sweep'")


def test_it_fails_on_a_cpu_tensor_meeting_the_device_outside_a_loop(tiny):
    with SimulatedCuda():
        model, ids = loaded(tiny)
        x = model.embed(ids)
        with pytest.raises(SimulationFault, match=rf"a \({len(ids)},\) CPU tensor meets the device in aten.add"):
            x[:, 0] + torch.arange(len(ids))


def test_it_fails_on_a_host_computation_inside_a_loop(tiny, monkeypatch):
    """A CPU-only intermediate, made and used on the host (it never meets the device): caught where it is made."""
    def host_only(G):
        n = int(torch.arange(G.shape[0]).sum())
        G[-1] *= n
    sweep_fails(tiny, monkeypatch, host_only, "CPU tensor", "made on the host", "per-layer loop 'sweep'")


@pytest.mark.parametrize("sync", [lambda G: G.sum().item(), lambda G: bool(G.any()), lambda G: G.cpu(),
                                  lambda G: G.nonzero()],
                         ids=["item", "bool", "cpu", "nonzero"])  # float(t), .tolist(): as .item()
def test_it_fails_on_a_host_synchronization_in_the_sweep(tiny, monkeypatch, sync):
    sweep_fails(tiny, monkeypatch, sync, "host synchronization", "per-layer loop 'sweep'")


def test_it_fails_on_a_host_synchronization_in_the_forward_pass(tiny, monkeypatch):
    original = model_module.attention

    def attention(u, *args, **kwargs):
        u.abs().max().item()
        return original(u, *args, **kwargs)
    monkeypatch.setattr(model_module, "attention", attention)
    with SimulatedCuda():
        model, ids = loaded(tiny)
        with pytest.raises(SimulationFault, match="host synchronization.*per-layer loop 'forward'"):
            model.logits(ids)


def test_it_fails_on_another_dtype(tiny, monkeypatch):
    def float32(G):
        G[-1] += G[-1].float().double()  # x.float() in the compute path
    sweep_fails(tiny, monkeypatch, float32, "dtype", "torch.float32")


def test_it_fails_on_a_read_ahead_used_before_its_copy_was_waited_for(tiny, monkeypatch):
    monkeypatch.setattr("simulated_cuda.FakeStream.wait_event", lambda stream, event: None)
    with SimulatedCuda():
        model, ids = loaded(tiny, stream=True)
        with pytest.raises(SimulationFault, match="side stream.*without waiting for its event"):
            model.logits(ids)
