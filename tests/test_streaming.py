"""Streaming: a checkpoint larger than its float64 budget, run layer by layer, each read from the file as it is used."""

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEVICES
from hf_reference import save_tiny_checkpoint

import minielm
from minielm import checkpoint
from minielm.cost import Shape
from minielm.errors import CheckpointError

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
from bench import random_checkpoint  # noqa: E402
from proc_memory import CHILD_PRELUDE  # noqa: E402

IDS = [1, 17, 5, 88]

# The child reads its own memory from /proc: VmRSS now, VmHWM the peak (tools/proc_memory.py).
CHILD = CHILD_PRELUDE + """
import json, sys, torch
import minielm

directory, out, ids, resident = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "resident"
before = status_mb("VmRSS")
model = minielm.load(directory, dtype=torch.float64, stream=True)
model.weights["layers"].resident = resident
logits = model.logits(ids)
operators = minielm.equivalent_linear_map(model, ids).operators
peak = status_mb("VmHWM")
torch.save({"logits": logits, "operators": operators}, out)
print(json.dumps({"before_mb": before, "peak_mb": peak}))
"""


@pytest.fixture(scope="module")
def big_bf16(tmp_path_factory):
    """A random bf16 Llama-style checkpoint of 163M parameters: 1.24 GB in float64 (325 MB on disk). Twelve
    layers, so that the fixed part of a streamed run's memory (one float64 layer, the 64 MiB sweep scratch,
    the operators) stays well under 40 % of the weights: it does not grow with the number of layers."""
    directory = tmp_path_factory.mktemp("big")
    random_checkpoint(directory, d=1024, layers=12, f=2816, heads=8, kv_heads=8, vocab=4096,
                      dtype=torch.bfloat16, tied=False)
    return directory


@pytest.mark.parametrize("mode", ["re-read", "resident"])
def test_streamed_run_fits_in_40_percent_and_is_identical(big_bf16, tmp_path, mode):
    """Re-reading its layers, a streamed run holds about one float64 layer; resident, it holds the file's
    bf16 bytes (a quarter of float64) more, and nothing else."""
    float64_mb = Shape.of(minielm.load(big_bf16, stream=True).config).params * 8 / 2**20  # the norms left out
    assert float64_mb > 900
    bound = 0.4 * float64_mb + (float64_mb / 4 if mode == "resident" else 0)
    out = tmp_path / "streamed.pt"
    result = subprocess.run([sys.executable, "-c", CHILD, str(big_bf16), str(out), json.dumps(IDS), mode],
                            capture_output=True, text=True, check=True)
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    extra = memory["peak_mb"] - memory["before_mb"]
    print(f"streamed logits and operators ({mode}): {extra:.0f} MB above the imports, for {float64_mb:.0f} MB of "
          f"float64 weights")
    assert extra < bound, f"streamed run needed {extra:.0f} MB of {float64_mb:.0f} MB"
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


# ---- the read-ahead: the next layer read on a background thread while this one is used ----------
class Recorded:
    """A checkpoint's own tensor source, noting which thread read each tensor (name, thread name)."""

    def __init__(self, source):
        self.source, self.reads = source, []

    def get(self, name):
        self.reads.append((name, threading.current_thread().name))
        return self.source.get(name)

    def __getattr__(self, attribute):  # names, info, origin: the source's own
        return getattr(self.source, attribute)

    def layer(self, i, thread=None):
        """The tensors of layer i read so far (by threads whose name starts with `thread`)."""
        return sorted(n for n, t in self.reads if f".layers.{i}." in n and t.startswith(thread or ""))


def recorded(model, read_ahead=True, resident=False) -> Recorded:
    """The model's reads, recorded, with the read-ahead on (on a CPU it is off unless switched on), and
    re-reading its layers at every use (a resident model reads each tensor once)."""
    model.weights["layers"].read_ahead = read_ahead
    model.weights["layers"].resident = resident
    model.weights["layers"].source = Recorded(model.weights["layers"].source)
    return model.weights["layers"].source


def reader_idle():
    """Wait until the read-ahead thread has done everything asked of it (its queue is first in, first out)."""
    checkpoint.READER.submit(lambda: None).result()


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("five")
    random_checkpoint(directory, d=32, layers=5, f=64, heads=4, kv_heads=2, vocab=128, dtype=torch.bfloat16,
                      tied=False)
    return directory


def test_the_next_layer_is_read_before_it_is_asked_for(five_layers):
    model = minielm.load(five_layers, stream=True)
    assert not model.weights["layers"].read_ahead  # on a CPU, off unless switched on
    reads, layers = recorded(model), model.weights["layers"]
    per_layer = len(layers.plans[0])
    layers[0]["wq"]  # layer 0 is read where it is used; taking it starts reading layer 1 (away from the end),
    reader_idle()     # all of it, since no layer was asked for anything before
    assert reads.layer(0, "MainThread") == ["model.layers.0.self_attn.q_proj.weight"]
    assert len(reads.layer(1, "minielm-read-ahead")) == per_layer and reads.layer(2) == []
    dict(layers[1])  # every tensor of layer 1, taken from the read-ahead: no read of its own
    reader_idle()
    assert reads.layer(1, "MainThread") == [] and len(reads.layer(1)) == per_layer
    # step +1: layer 2 is read ahead, what layer 0 was asked for only
    assert reads.layer(2, "minielm-read-ahead") == ["model.layers.2.self_attn.q_proj.weight"] and reads.layer(3) == []
    dict(layers[2])  # the rest of layer 2 is read where it is used; layer 3 ahead, all of it (as layer 1)
    reader_idle()
    assert len(reads.layer(2, "MainThread")) == per_layer - 1 and len(reads.layer(3, "minielm-read-ahead")) == per_layer
    dict(layers[1])  # back down (step -1): layer 1 is read again, where it is used, and layer 0 ahead
    reader_idle()
    assert len(reads.layer(1, "MainThread")) == per_layer and len(reads.layer(0, "minielm-read-ahead")) == per_layer


def test_a_sweep_reads_ahead_only_what_it_uses(five_layers):
    """The reverse sweep never uses the query, key and gate weights, and the read-ahead does not read them: each
    layer reads ahead what the layer before was asked for. Right after the forward pass at x, which used every
    weight, the first two layers below the top follow that use; after a frozen pass (Lanczos' A V), none do."""
    from minielm.fast_sweep import fast_sweep
    from minielm.linear_map import traced

    model = minielm.load(five_layers, stream=True)
    reads = recorded(model)

    def sweep_reads_ahead():  # layer -> the kinds of weight the sweep read ahead
        reader_idle()
        del reads.reads[:]
        fast_sweep(model, frozen, torch.eye(32, dtype=torch.float64), 4, "output")
        reader_idle()
        ahead = {}
        for name, thread in reads.reads:
            if thread.startswith("minielm-read-ahead"):
                ahead.setdefault(name.split(".")[2], set()).add(name.split(".")[4])
        return ahead

    unused = {"q_proj", "k_proj", "gate_proj"}
    x, frozen, _, _ = traced(model, IDS)  # the forward pass at x: every weight
    ahead = sweep_reads_ahead()
    assert set(ahead) == {"3", "2", "1", "0"}  # from the top, where the pass ended
    assert ahead["3"] >= unused and ahead["2"] >= unused and not (ahead["1"] | ahead["0"]) & unused
    model.forward(x, frozen)  # a frozen pass asks for none of them
    ahead = sweep_reads_ahead()
    assert set(ahead) == {"3", "2", "1", "0"} and not set.union(*ahead.values()) & unused


def test_lanczos_turns_find_the_next_layer_read_ahead(five_layers):
    """Lanczos alternates a frozen pass up the layers (A V) and a sweep down them (Aᵀ U). At both turns
    nothing is read where it is used: the layer where it turns is still in the cast buffers (a frozen
    pass and a sweep use the same weights), and the next one is already on its way."""
    from minielm.fast_sweep import fast_sweep
    from minielm.linear_map import traced

    model = minielm.load(five_layers, stream=True)
    reads = recorded(model)
    x, frozen, _, _ = traced(model, IDS)
    seed = torch.eye(32, dtype=torch.float64)[:1]

    def read_in_use(run):  # the layers whose tensors were read by the main thread during run()
        reader_idle()
        del reads.reads[:]
        run()
        reader_idle()
        return {name.split(".")[2] for name, thread in reads.reads if thread == "MainThread"}

    for _ in range(2):
        assert read_in_use(lambda: fast_sweep(model, frozen, seed, 4, "output")) == set()
        with torch.no_grad():  # as FrozenProducts.apply runs it (in grad mode each use casts its own)
            assert read_in_use(lambda: model.forward(x[None], frozen)) == set()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_read_ahead_changes_nothing(five_layers, family, device, tmp_path):
    """Logits, operators and generated ids of a streamed model whose layers were read ahead (on CUDA:
    copied on a side stream) equal the loaded model's, bit for bit."""
    directory = five_layers
    if family != "llama":
        directory = tmp_path
        random_checkpoint(directory, d=32, layers=5, f=64, heads=4, kv_heads=2, vocab=128, dtype=torch.bfloat16,
                          family=family, head_dim=16)
    loaded = minielm.load(directory, device=device)
    streamed = minielm.load(directory, device=device, stream=True)
    reads = recorded(streamed)
    ids = [1, 17, 5, 88, 2, 41, 9, 60]
    assert torch.equal(loaded.logits(ids), streamed.logits(ids))
    assert all(reads.layer(i, "minielm-read-ahead") for i in range(1, 5))  # the forward pass read ahead
    del reads.reads[:]
    assert torch.equal(minielm.equivalent_linear_map(loaded, ids).operators,
                       minielm.equivalent_linear_map(streamed, ids).operators)
    assert all(reads.layer(i, "minielm-read-ahead") for i in range(0, 3))  # and so did the sweep, downwards
    assert loaded.generate_ids(ids[:3], 5) == streamed.generate_ids(ids[:3], 5)


def test_gguf_read_ahead_changes_nothing(tmp_path):
    """The same for a GGUF file (Gemma 3, six layers, Q8_0): its tensors are dequantized on the read-ahead thread."""
    from gguf import GGMLQuantizationType as Q
    from gguf_writer import write_gguf
    from hf_reference import randomize_
    from test_gguf import FAMILIES
    from transformers import AutoModelForCausalLM

    make_config, arch = FAMILIES["gemma3"]
    hf = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
    randomize_(hf, 0)
    write_gguf(hf, tmp_path / "gemma3.gguf", arch, Q.Q8_0)
    loaded, streamed = minielm.load(tmp_path / "gemma3.gguf"), minielm.load(tmp_path / "gemma3.gguf", stream=True)
    reads = recorded(streamed)
    assert torch.equal(loaded.logits(IDS), streamed.logits(IDS))
    assert torch.equal(minielm.equivalent_linear_map(loaded, IDS).operators,
                       minielm.equivalent_linear_map(streamed, IDS).operators)
    assert all(reads.layer(i, "minielm-read-ahead") for i in range(6))


def test_a_read_ahead_never_used_raises_nothing(five_layers, tmp_path):
    """A layer read ahead but not taken keeps its error to itself; taken later, it raises it as a read would."""
    directory = shutil.copytree(five_layers, tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][1, 2] = math.inf
    save_file(tensors, directory / "model.safetensors")
    model = minielm.load(directory, stream=True)
    model.weights["layers"].read_ahead = True
    dict(model.weights["layers"][0])
    dict(model.weights["layers"][1])  # starts reading layer 2, which fails on the read-ahead thread
    reader_idle()
    dict(model.weights["layers"][0])  # a jump: layer 2's read-ahead is dropped, its error with it
    with pytest.raises(CheckpointError) as info:
        model.logits(IDS)
    assert str(info.value) == (f"{directory / 'model.safetensors'}: tensor 'model.layers.2.mlp.up_proj.weight' holds "
                               f"non-finite weights (1 of 2048, the first inf at index [1, 2]); the checkpoint is corrupt")


def test_a_file_cut_under_a_read_ahead_is_named_when_its_layer_is_taken(five_layers, tmp_path):
    directory = shutil.copytree(five_layers, tmp_path / "ckpt")
    model = minielm.load(directory, stream=True)
    layers = model.weights["layers"]
    layers.read_ahead = True
    dict(layers[0])  # reads layer 1 ahead, from the whole file
    reader_idle()
    size = (directory / "model.safetensors").stat().st_size
    os.truncate(directory / "model.safetensors", size // 2)
    dict(layers[1])  # read before the cut: fine; reading layer 2 ahead meets the cut
    with pytest.raises(CheckpointError) as info:
        layers[2]
    assert str(info.value).startswith(f"{directory / 'model.safetensors'}: the file changed on disk during this run "
                                      f"(it was truncated to {size // 2} bytes from {size}; reading tensor 'model.layers.2.")


# ---- resident weights and cast buffers ------------------------------------------------------------
def test_a_resident_model_reads_each_tensor_once(five_layers):
    """A streamed model that fits in memory keeps what it read, in the file's dtype: logits, a map, block
    Lanczos and the detached Jacobian read each tensor once, and give the loaded model's results bit for
    bit (the singular vectors too: nothing kept across layers, frozen factors or outputs, aliases a cast
    buffer that a later layer overwrites)."""
    loaded, streamed = minielm.load(five_layers), minielm.load(five_layers, stream=True)
    assert streamed.weights["layers"].resident  # 93 kB of bf16 layers: it fits
    reads = recorded(streamed, read_ahead=False, resident=True)
    ids = [1, 17, 5, 88, 2, 41, 9, 60]
    assert torch.equal(loaded.logits(ids), streamed.logits(ids))
    assert torch.equal(minielm.equivalent_linear_map(loaded, ids).operators,
                       minielm.equivalent_linear_map(streamed, ids).operators)
    for a, b in zip(minielm.singular_vectors(loaded, ids, k=2, block=3),
                    minielm.singular_vectors(streamed, ids, k=2, block=3)):
        assert torch.equal(a, b)
    # autograd keeps every layer's weights for its backward pass: in grad mode each use casts its own
    assert torch.equal(minielm.detached_jacobian(loaded, ids), minielm.detached_jacobian(streamed, ids))
    names = [name for name, _ in reads.reads]
    assert len(names) == len(set(names)) == 5 * 9  # every tensor of the five layers, once


def test_a_model_that_does_not_fit_reads_its_layers_at_every_use(five_layers, monkeypatch):
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 100_000)  # less than 93 kB of bf16 layers / 0.9
    model = minielm.load(five_layers, stream=True)
    layers = model.weights["layers"]
    assert not layers.resident
    layers.source = reads = Recorded(layers.source)
    assert torch.equal(model.logits(IDS), model.logits(IDS))
    names = [name for name, _ in reads.reads]
    assert len(names) == 2 * len(set(names)) == 2 * 5 * 9


def test_each_layer_is_cast_once_per_pass_into_the_same_buffers(five_layers, monkeypatch):
    """A Lanczos step (a frozen pass up the layers, a sweep down) casts each weight it uses once a layer,
    but for the layers where it turns (still in the buffers), and into the buffers the first pass allocated:
    no new float64 tensor, no fresh pages."""
    from minielm.spectra import FrozenProducts

    model = minielm.load(five_layers, stream=True)
    layers, ops = model.weights["layers"], FrozenProducts(model, IDS)  # its forward pass at x casts every weight
    U, V = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, ops.n, dtype=torch.float64)
    ops.apply_transposed(U)
    buffers, casts = dict(layers.buffers), []
    cast = checkpoint.cast_into
    monkeypatch.setattr(checkpoint, "cast_into", lambda buffer, piece: casts.append(buffer) or cast(buffer, piece))
    for _ in range(2):
        del casts[:]
        ops.apply(V)
        ops.apply_transposed(U)
        assert len(casts) == 6 * (2 * 5 - 2)  # the norms, W_V, W_O, W_U and W_D; five layers up, five down
        assert layers.buffers.keys() == buffers.keys() and all(layers.buffers[k] is b for k, b in buffers.items())
        assert all(any(c is b for b in buffers.values()) for c in casts)


def test_the_8b_benchmark_builds_a_checkpoint_that_loads_and_is_reused(tmp_path, monkeypatch):
    """tools/bench_8b.py writes its safetensors shards by hand, a block of rows at a time. At a tiny shape, with
    small shards and blocks: the safetensors library reads every tensor as minielm does, the weights have the
    scale asked for, every id decodes, a second build writes nothing, and a shard cut short is written again."""
    import bench_8b
    from safetensors.torch import load_file

    monkeypatch.setattr(bench_8b, "SHARD_BYTES", 20_000)
    monkeypatch.setattr(bench_8b, "ROWS", 24)
    config_json = dict(bench_8b.llama3_8b(layers=2, vocab=300), hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    bench_8b.build(tmp_path, config_json)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 2
    model = minielm.load(tmp_path, dtype=torch.bfloat16)
    stored = {k: v for f in files for k, v in load_file(f).items()}
    assert torch.equal(stored["model.layers.1.mlp.down_proj.weight"], model.weights["layers"][1].w_down)
    assert torch.equal(stored["lm_head.weight"], model.weights["lm_head"])
    assert abs(float(model.weights["layers"][1].w_down.double().std()) * 64 ** 0.5 - 1) < 0.1  # N(0, 1/fan_in)
    assert abs(float(model.weights["final_norm"].double().mean()) - 1) < 0.05  # 1 + N(0, 0.1²)
    ids = model.tokenizer.encode("In the beginning")
    assert ids[0] == 256 and model.tokenizer.decode(ids[1:]) == "In the beginning"
    assert all(model.tokenizer.token(i) for i in range(300))
    written = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    bench_8b.build(tmp_path, config_json)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == written
    os.truncate(files[1], files[1].stat().st_size - 2)
    bench_8b.build(tmp_path, config_json)
    assert torch.equal(minielm.load(tmp_path, dtype=torch.bfloat16).weights["layers"][1].w_down, stored[
        "model.layers.1.mlp.down_proj.weight"])


EXIT_CHILD = """
import sys, minielm
model = minielm.load(sys.argv[1], stream=True)
model.weights["layers"].read_ahead = True
model.weights["layers"][0]["wq"]  # starts reading layer 1 ahead; the process ends meanwhile
print("done")
"""


def test_a_process_ends_with_a_read_ahead_under_way(five_layers):
    result = subprocess.run([sys.executable, "-c", EXIT_CHILD, str(five_layers)], capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", "")


# A process forked while its parent's read-ahead is under way: the child has no reader thread of the
# parent's, so that future never finishes; the child must drop it and read the layer itself. The
# parent's read is held (a source whose read-ahead waits) until the child exists, so the moment is not
# left to chance; a child that hangs is ended by SIGALRM.
FORK_CHILD = """
import os, signal, sys, threading, torch, minielm
model = minielm.load(sys.argv[1], stream=True)
layers = model.weights["layers"]
layers.read_ahead = True
parent, started, release, source = os.getpid(), threading.Event(), threading.Event(), layers.source

class Held:
    def __getattr__(self, attribute):
        return getattr(source, attribute)

    def get(self, name):
        if os.getpid() == parent and threading.current_thread().name.startswith("minielm-read-ahead"):
            started.set()
            release.wait()
        return source.get(name)

layers.source = Held()
layers[0]["wq"]  # starts reading layer 1 ahead
started.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(30)
    layer, loaded = dict(layers[1]), minielm.load(sys.argv[1]).weights["layers"][1]
    same = all(torch.equal(layer[k], getattr(loaded, k)) for k in layer) and len(layer) == len(loaded.tensors())
    os._exit(0 if same else 3)
release.set()
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), len(dict(layers[1])))
"""


def test_a_child_forked_during_a_read_ahead_reads_its_own_layer(five_layers):
    result = subprocess.run([sys.executable, "-c", FORK_CHILD, str(five_layers)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "9"]  # the child: its own layer 1, right; the parent: its read-ahead
