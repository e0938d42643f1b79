"""A CUDA device simulated on the CPU, for tests: minielm's CUDA path run without a GPU.

    with SimulatedCuda() as cuda:
        model = minielm.load(device="cuda")       # every weight a fake tensor on "cuda:0"
        elm = minielm.equivalent_linear_map(model, ids)
    cuda.check()                                  # AssertionError listing every fault seen

Tensors on the device are torch's fake tensors (FakeTensorMode): they carry a shape, a dtype and
the device "cuda:0", and no values; every op runs through its meta kernel, so a run costs no
arithmetic. Tensors on the CPU stay real: reading the checkpoint, checking its values and writing
an operators file run as they do on a GPU machine, on real host memory. What crosses from the
device to the host (`.cpu()`, `.item()`, `bool(t)`) has no value to bring: it comes back as zeros,
True or 0, after the crossing is judged (below). Values are fake, so only structure is checked.

What fails (each fault is raised where it happens, naming the op and the line of minielm that made
it, and listed by `check()`):

- device: a CPU tensor (more than one number: a CPU scalar is passed by value, as CUDA does) that
  meets a device tensor in an op, index tensors included; inside a per-layer loop, any tensor made
  or computed on the host, unless it is the checkpoint's own data being read (`host_read`);
- dtype: an op on the device whose floating output is not float64, unless it only moves data
  (a view, a split, a copy that keeps the dtype: the file's bf16 crossing to the device, cast there);
  a copy from the host that casts on the way (the cast belongs on the device: 4x fewer bytes cross);
- host synchronization inside a per-layer loop: `.item()`, `bool(t)`, `float(t)`, `int(t)`,
  `.tolist()`, `torch.equal`, a copy to the host (`.cpu()`, `.to("cpu")`, `.numpy()`), an op whose
  output shape depends on values (`nonzero`, `masked_select`, a boolean-mask index: these fail
  anywhere, as nothing can size them), `torch.cuda.synchronize()`;
- the read-ahead's side stream: a tensor copied there used on the main stream before that stream
  waited for the copy's event, or without `record_stream` (its memory could be reused too early); a
  copy there that blocks the host (not `non_blocking`, or from memory that is not pinned).

The per-layer loops are the passes that `minielm.progress.progress` labels (PER_LAYER_LOOPS): the
forward pass, the sweeps, the layer-map passes and the attribution's. Synchronizations outside them
are allowed on purpose, each once a pass, a step or a block, where the host needs a value to decide
what comes next or to write it: a forward pass's finiteness checks (read at its end), a result's
final checks and decodes, a Lanczos step's rank and convergence tests, a generated token's id, a
finished block of rows written to an operators file (and the weights' fingerprint written with it).
`synchronizations` counts them by line; `loops` counts the passes seen, so a test can assert that
the checks ran where they matter.

Shims, while it is entered: torch.cuda says it has one device; torch.cuda.Stream, stream(),
current_stream(), synchronize() and Tensor.record_stream are stand-ins that note what is asked of
them; pin_memory() marks the host tensor pinned; minielm's read-ahead thread runs each read where it
is asked for (`InlineReader`), in the thread whose modes hold the fake device.

What the simulation cannot see: the real order and overlap of CUDA streams and events (only the
calls that set it up are checked), memory use, speed, and the numerics of the CUDA kernels; nor
autograd's backward pass (its engine needs a real CUDA device) or a seeded CUDA generator.

On a CPU-only build of torch, indexing a fake CUDA tensor needs a CUDA device guard, which such a
build lacks; `fake_cuda_guard` installs torch's own no-op one (see there).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import pkgutil
import sys
import traceback
from collections import Counter
from concurrent.futures import Future

import pytest
import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode, unset_fake_temporarily)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import minielm
import minielm.checkpoint
import minielm.progress

for _module in pkgutil.iter_modules(minielm.__path__):  # all of them now: their passes' loops are tracked
    if _module.name != "__main__":
        importlib.import_module(f"minielm.{_module.name}")

aten = torch.ops.aten

PER_LAYER_LOOPS = {"forward", "sweep", "reverse pass", "forward pass of ∂h/∂x", "attribution"}

# ops that read values on the host: a synchronization when their input is on the device
SYNCS = {aten._local_scalar_dense.default: ".item(), bool(t), float(t), int(t) or .tolist()",
         aten.equal.default: "torch.equal", aten.is_nonzero.default: "bool(t)"}
# ops that only move data (views too): they may output a dtype other than float64 if their input has it already
MOVES = {aten._to_copy.default, aten.clone.default, aten.copy_.default, aten.cat.default, aten.stack.default}


class SimulationFault(AssertionError):
    """A fault the simulated device saw: a CPU tensor in the device's compute, another dtype than
    float64, a host synchronization inside a per-layer loop, a side-stream tensor used unsafely."""


@contextlib.contextmanager
def fake_cuda_guard():
    """Lets fake CUDA tensors be indexed on a CPU-only build of torch, while it is entered.

    Python indexing (`x[0]`) opens a device guard for the tensor's device. torch's FakeTensorMode
    calls `torch._C._ensureCUDADeviceGuardSet()` to install a no-op guard for CUDA when no GPU is
    there, but c10 does so only over an existing CUDA guard that counts 0 devices: a CUDA build
    without a GPU has one, a CPU-only build has none, and indexing fails ("PyTorch is not linked
    with support for cuda devices"). So the slot for CUDA in c10's registry of guards is given, for
    a moment, another device's guard that counts 0 devices (the Lazy device's does), and torch's own
    call then replaces it with its no-op CUDA guard; the slot is emptied again on exit. Nothing else
    changes: torch.cuda still reports no device, and no CUDA memory can be made."""
    if torch.cuda._is_compiled():  # a CUDA build: its own guard is there (FakeTensorMode replaces it if unused)
        yield
        return
    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    registry = (ctypes.c_void_p * 21).in_dll(library, "_ZN3c104impl26device_guard_impl_registryE")  # by DeviceType
    cuda = 1  # c10::DeviceType::CUDA; CPU is 0, the others follow up to PrivateUse1 = 20
    for donor in range(2, 21):
        if registry[donor] and not registry[cuda]:
            registry[cuda] = registry[donor]
            torch._C._ensureCUDADeviceGuardSet()
            if registry[cuda] == registry[donor]:  # that guard counts devices: not replaced, try the next one
                registry[cuda] = None
    if not registry[cuda]:
        raise RuntimeError("could not install a no-op CUDA device guard on this CPU-only build of torch")
    try:
        yield
    finally:
        registry[cuda] = None


class SimulatedDevice(FakeTensorMode):
    """torch's fake tensors, which never touch a real device, even where torch.cuda says it has one
    (the simulation tells minielm so)."""

    @property
    def avoid_device_init(self) -> bool:
        return True


class FakeStream:
    """torch.cuda.Stream as far as minielm uses it: events recorded on it, and waited for."""

    def __init__(self, simulation, name):
        self.simulation, self.name, self.pending = simulation, name, []

    def record_event(self):
        event = FakeEvent(self, self.pending)
        self.pending = []
        return event

    def wait_event(self, event):
        for tensor in event.tensors:
            tensor._waited = True

    def synchronize(self):
        self.simulation.synchronized("stream.synchronize()")


class FakeEvent:
    def __init__(self, stream, tensors):
        self.stream, self.tensors = stream, tensors

    def synchronize(self):
        self.stream.simulation.synchronized("event.synchronize()")


class InlineReader:
    """minielm's read-ahead thread, run at the moment a read is asked for, in the caller's thread:
    the fake device lives in that thread's modes. The order of the reads is the same; their overlap
    with the compute, which the simulation could not see anyway, is lost."""

    def submit(self, fn, *args):
        future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # kept for the layer that takes it, as a thread's would be
            future.set_exception(error)
        return future


def where() -> str:
    """' at minielm/FILE.py:LINE (the line)': the innermost line of minielm that is running."""
    frames = [f for f in traceback.extract_stack() if f"{os.sep}minielm{os.sep}" in f.filename]
    if not frames:
        return ""
    return f" at minielm/{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} ({frames[-1].line})"


def stand_in(dtype):
    """What the host reads from a device tensor that has no values: True, 0 or 0.0 (a check passes,
    an index is valid)."""
    return True if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0


def recorded(tensor, stream):
    """Tensor.record_stream: the allocator is told that `stream` uses the tensor's memory."""
    tensor._recorded = True


class SimulatedCuda(TorchDispatchMode):
    """The checks, op by op, above the fake device (see the module's docstring)."""

    def __init__(self):
        super().__init__()
        self.monkeypatch, self.faults, self.loops, self.inside = pytest.MonkeyPatch(), [], Counter(), []
        self.main_stream = FakeStream(self, "main")
        self.stream = self.main_stream  # the current stream
        self.ops = 0  # ops run (the simulation's cost: each takes a fraction of a millisecond)
        self.side_copies, self.side_uses = 0, 0  # copies made on a side stream (the read-ahead's), their uses
        self.synchronizations = Counter()  # outside the loops: allowed, counted by where they are

    # -- entering: the device, the shims, the loops ----------------------------------------------
    def __enter__(self):
        self.guard = fake_cuda_guard()
        self.guard.__enter__()
        patch, cuda = self.monkeypatch.setattr, torch.cuda
        patch(cuda, "is_available", lambda: True)
        patch(cuda, "device_count", lambda: 1)
        patch(cuda, "Stream", lambda device=None, **_: FakeStream(self, "side"))
        patch(cuda, "current_stream", lambda device=None: self.stream)
        patch(cuda, "stream", self.using)
        patch(cuda, "synchronize", lambda device=None: self.synchronized("torch.cuda.synchronize()"))
        patch(torch.Tensor, "record_stream", recorded)
        patch(minielm.checkpoint, "READER", InlineReader())
        patch(minielm.checkpoint.SafetensorsSource, "get", self.host_read(minielm.checkpoint.SafetensorsSource.get))
        progress = minielm.progress.progress
        for module in [m for name, m in sys.modules.items() if name.startswith("minielm.") and name != "minielm.progress"]:
            if getattr(module, "progress", None) is progress:
                patch(module, "progress", self.tracked(progress))
        self.device = SimulatedDevice(allow_non_fake_inputs=True)
        self.device.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.device.__exit__(*exc)
        self.monkeypatch.undo()
        self.guard.__exit__(*exc)

    def check(self):
        """An AssertionError listing every fault seen (some may have been caught on the way)."""
        assert not self.faults, "the simulated CUDA device saw:\n" + "\n".join(self.faults)

    def tracked(self, progress):
        def tracked_progress(iterable, what, *args, **kwargs):
            inner = progress(iterable, what, *args, **kwargs)
            return self.loop(inner, what) if what in PER_LAYER_LOOPS else inner
        return tracked_progress

    def loop(self, inner, what):
        self.loops[what] += 1
        self.inside.append(what)
        try:
            yield from inner
        finally:
            self.inside.remove(what)

    def host_read(self, get):
        """A tensor source's read: host I/O into real CPU memory, outside the device's modes. Its
        results are the checkpoint's data, which the host may check and split in any loop."""
        def read(source, name):
            with unset_fake_temporarily(), torch.utils._python_dispatch._disable_current_modes():
                tensor = get(source, name)
            tensor._host_data = True
            return tensor
        return read

    @contextlib.contextmanager
    def using(self, stream):
        before, self.stream = self.stream, stream
        try:
            yield stream
        finally:
            self.stream = before

    # -- faults --------------------------------------------------------------------------------
    def fault(self, kind, what):
        loop = f" inside the per-layer loop '{self.inside[-1]}'" if self.inside else ""
        message = f"{kind}: {what}{loop}{where()}"
        self.faults.append(message)
        raise SimulationFault(message)

    def synchronized(self, what):
        if self.inside:
            self.fault("host synchronization", what)
        self.synchronizations[where()] += 1

    # -- every op ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:  # a question about a tensor, not an op on it
            return args[0].device
        kwargs, self.ops = kwargs or {}, self.ops + 1
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        to = kwargs.get("device")
        if func in (aten._pin_memory.default, aten.pin_memory.default):  # page-locked host memory: the same data
            with unset_fake_temporarily():
                pinned = args[0].detach()  # (a new tensor on the same memory: a copy would only cost time)
            pinned._pinned, pinned._host_data = True, getattr(args[0], "_host_data", False)
            return pinned
        if not any(isinstance(t, FakeTensor) for t in tensors) and (to is None or torch.device(to).type == "cpu"):
            return self.on_host(func, tensors, args, kwargs)
        return self.on_device(func, tensors, args, kwargs, to)

    def on_host(self, func, tensors, args, kwargs):
        """An op on real CPU tensors: run for real. Inside a loop only the checkpoint's data may be
        worked on there (read, checked, split); anything else made on the host is a fault."""
        host_data = bool(tensors) and all(getattr(t, "_host_data", False) for t in tensors)
        if self.inside and not host_data:
            self.fault("CPU tensor", f"{func} made on the host")
        with unset_fake_temporarily():
            out = func(*args, **kwargs)
        if host_data:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    t._host_data = True
        return out

    def on_device(self, func, tensors, args, kwargs, to):
        device = [t for t in tensors if isinstance(t, FakeTensor) and t.device.type == "cuda"]
        host = [t for t in tensors if t.device.type == "cpu"]
        if func in SYNCS and device:
            self.synchronized(SYNCS[func])
            return stand_in(device[0].dtype)
        if func is aten._to_copy.default and to is not None and torch.device(to).type == "cpu":
            self.synchronized("a copy to the host (.cpu(), .to('cpu'), .numpy())")
            with unset_fake_temporarily():  # no values to bring: zeros
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten.copy_.default and args[0].device.type == "cpu":
            self.synchronized("a copy to the host (.copy_ into a CPU tensor)")
            return args[0]
        crossing = func is aten._to_copy.default and host and to is not None  # a copy from the host to the device
        if crossing:
            self.copied_to_device(args[0], kwargs)
        elif func is aten.copy_.default and args[1].device.type == "cpu" and args[1].dim() > 0:
            self.copied_to_device(args[1], {"dtype": args[0].dtype, "non_blocking": kwargs.get("non_blocking")})
        else:
            for t in host:
                if t.dim() > 0:  # a CPU scalar is passed by value, as CUDA does
                    self.fault("CPU tensor", f"a {tuple(t.shape)} CPU tensor meets the device in {func}")
        self.stream_order(func, tensors)
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            self.fault("host synchronization", f"{func}: its output's shape depends on values")
        except DataDependentOutputException:
            self.fault("host synchronization", f"{func} reads values on the host")
        self.check_outputs(func, tensors, out)
        return out

    def copied_to_device(self, source, kwargs):
        """A copy from the host: in the source's dtype (the cast is done on the device); on a side
        stream, asynchronous from pinned memory."""
        if kwargs.get("dtype") is not None and kwargs["dtype"] != source.dtype:
            self.fault("dtype", f"a {source.dtype} tensor cast to {kwargs['dtype']} on the host on its way to "
                                f"the device (copy it in its own dtype, then cast it there)")
        if self.stream is not self.main_stream:
            self.side_copies += 1
            if not kwargs.get("non_blocking") or not getattr(source, "_pinned", False):
                self.fault("side stream", "a copy that blocks the host (not non_blocking, or not from pinned memory)")

    def stream_order(self, func, tensors):
        """On the main stream, a tensor copied on a side stream is used only after the main stream
        waited for that copy's event, and recorded there (record_stream)."""
        if self.stream is not self.main_stream:
            return
        for t in tensors:
            if getattr(t, "_side", False):
                if not (getattr(t, "_waited", False) and getattr(t, "_recorded", False)):
                    missing = "waiting for its event" if not getattr(t, "_waited", False) else "record_stream"
                    self.fault("side stream", f"{func} uses a tensor copied on the side stream without {missing}")
                self.side_uses += 1

    def check_outputs(self, func, tensors, out):
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        inputs = {t.dtype for t in tensors if t.dtype.is_floating_point}
        for t in outputs:
            if t.device.type != "cuda":
                if self.inside:
                    self.fault("CPU tensor", f"{func} made a CPU tensor")
                continue
            if t.dtype.is_floating_point and t.dtype != torch.float64:
                if not ((func in MOVES or func.is_view) and inputs == {t.dtype}):
                    self.fault("dtype", f"{func} makes a {t.dtype} tensor")
            if self.stream is not self.main_stream:
                t._side = True
                self.stream.pending.append(t)
