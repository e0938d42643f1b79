"""Reading a checkpoint's tensors: the weight-name maps, the checks, and the safetensors files.

One declarative map per family (its `layer_tensors` in minielm/families.py)
names every tensor the decoder consumes, from the Hugging Face name to
minielm's short name. Fused tensors (Phi-3's
`qkv_proj` and `gate_up_proj`) map to a tuple of short names and are split by
rows. Loading checks that every expected tensor is present with the expected
shape and that no tensor is left over, reads each one, checks that its values
are finite, then casts it to the compute dtype.

Everything above the file format works through a `TensorSource`: four methods
that a safetensors directory (`SafetensorsSource`, here) and a GGUF file
(`minielm/gguf.py`) both implement. Files are only read, never written. Both
sources compare the file with what it was at opening (`check_unchanged`) around
every read, so a file that shrinks or changes during a run is a CheckpointError,
not a mix of old and new weights. Safetensors files are read with pread, never
memory-mapped; GGUF files are memory-mapped by gguf-py, so for them only a cut
made in the middle of one tensor's read can still end the process (SIGBUS).

A streamed model (`StreamedLayers`) reads each layer while it is used and casts it into
buffers that every layer reuses; it keeps what it read, in the file's dtype, when the
whole model fits in memory that way (`resident_fits`). On a GPU it reads the next layer
ahead meanwhile, on a background thread, and copies it on a side stream.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from .config import Config
from .model import LAYER_FIELDS, LayerWeights
from .errors import CheckpointError
from .families import O_BIAS, QKV_BIASES

# ---- the weight-name maps --------------------------------------------------------
# Each family's per-layer map is its `layer_tensors` in minielm/families.py, and its top-level
# tensors its `top_tensors`; most families name the latter alike:
TOP_LEVEL = {"embed_tokens.weight": "embed", "norm.weight": "final_norm"}

# Tensors that are not part of the decoder and are skipped on purpose.
IGNORED_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer that old checkpoints saved; recomputed


def layer_map(config: Config) -> dict:
    """Hugging Face per-layer tensor name -> short name(s), for one layer of this config's decoder."""
    names = dict(config.family_spec.layer_tensors)
    named = {n for short in names.values() for n in (short if isinstance(short, tuple) else (short,))}
    if config.qkv_bias and "bq" not in named:  # biases a config switches on, in Llama's names
        names.update(QKV_BIASES)
    if config.o_bias and "bo" not in named:
        names.update(O_BIAS)
    return names


def expected_shapes(config: Config) -> dict:
    """Short name -> shape, for one layer (model.LayerWeights) and for the top level."""
    d, V = config.hidden_size, config.vocab_size
    return {"embed": (V, d), "final_norm": (d,), "final_norm_bias": (d,), "lm_head": (V, d),
            "positions": (config.max_position_embeddings, d), **LayerWeights.shapes(config)}


# ---- the tensor source ------------------------------------------------------------------
class TensorSource(Protocol):
    """Where the tensors come from: the one interface between a file format and everything above
    it (`checked_plan`, `load_weights`, `StreamedLayers`). `SafetensorsSource` implements it for a
    Hugging Face directory; a GGUF reader implements the same five methods."""

    def names(self) -> set[str]:
        """The Hugging Face tensor names in the checkpoint ("model.layers.0.self_attn.q_proj.weight", ...)."""

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a tensor as `get` returns it (before the cast to the compute dtype)."""

    def get(self, name: str) -> torch.Tensor:
        """The tensor on the CPU, in Hugging Face layout, in memory this process owns."""

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of a top-level matrix (the embedding, the unembedding, learned positions),
        as `get(name)[start:stop]` but reading only those rows from the file."""

    def origin(self, name: str) -> str:
        """The file to name in an error message about this tensor."""


# The dtypes minielm reads. Not the float8 ones: FP8 checkpoints pair each weight with a scale tensor,
# which a plain cast would ignore.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsSource:
    """The tensors of a Hugging Face checkpoint directory: its *.safetensors files, or the shards
    that model.safetensors.index.json names.

    Each file is opened with the `safetensors` library, which validates the header first: the
    JSON, dtypes and shapes, data offsets that tile the data exactly (no gap, no overlap) and a
    file exactly as long as the header says. Tensors are read with its `pread` backend into memory
    this process owns, never mapped: a mapped file that shrinks during a run kills the process
    with SIGBUS, a short read is an error that can be named. Each read also compares the file's
    stamp (`file_stamp`: device, inode, size, modification and status-change times) with the one
    taken at opening, so a file rewritten during a run is a CheckpointError, not a mix of old and
    new weights.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files = {}  # path -> SafetensorsFile, opened on first use
        index = self.directory / "model.safetensors.index.json"
        self.where = read_index(index) if index.is_file() else self.tensors_by_file()

    def tensors_by_file(self) -> dict:
        """Tensor name -> the file that holds it, from the files themselves (no index)."""
        paths = sorted(p for p in self.directory.glob("*.safetensors") if p.is_file())
        if not paths:
            raise CheckpointError(f"{self.directory}: no *.safetensors weights file "
                                  f"(and no model.safetensors.index.json)")
        where = {}
        for path in paths:
            for name in self.open(path).names:
                if name in where:
                    raise CheckpointError(f"{self.directory}: tensor {name!r} is in both {where[name].name} and "
                                          f"{path.name}; expected each tensor in one file (or an index naming "
                                          f"the shards)")
                where[name] = path
        return where

    def open(self, path: Path) -> "SafetensorsFile":
        if path not in self.files:
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def file(self, name: str) -> "SafetensorsFile":
        opened = self.open(self.where[name])
        if name not in opened.names:
            raise CheckpointError(f"{opened.path}: has no tensor {name!r}, which the index places there")
        return opened

    def names(self) -> set[str]:
        return set(self.where)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.file(name).info(name)

    def get(self, name: str) -> torch.Tensor:
        return self.file(name).read(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.file(name).read_rows(name, start, stop)

    def origin(self, name: str) -> str:
        return str(self.where[name])


def read_index(index: Path) -> dict:
    """Tensor name -> shard file, from model.safetensors.index.json; every shard must be there."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, RecursionError, AttributeError) as err:  # bad JSON, or JSON that is not an object
        raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{index}: cannot read ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index; expected a 'weight_map' object "
                              f"from tensor names to shard file names")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).is_absolute() or ".." in Path(shard).parts or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index}: names shard {shard!r}; expected a *.safetensors file name "
                                  f"inside the checkpoint directory")
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: names shard {shard!r}, which is missing")
    return {name: index.parent / shard for name, shard in weight_map.items()}


class SafetensorsFile:
    """One safetensors file, opened (and its header validated) by the safetensors library."""

    def __init__(self, path: Path):
        self.path = path
        try:  # opened here first: the library words a file it may not read as "No such file or directory"
            os.close(os.open(path, os.O_RDONLY))
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open the safetensors file ({err.strerror or err})") from None
        try:
            self.stamp = file_stamp(path)  # before the library reads the header: a later change shows
            self.handle = safe_open(path, framework="pt", backend="pread")
            self.names = set(self.handle.keys())
            self.data_start, self.offsets = data_offsets(path)  # for read_rows; the library validated the header
        except (SafetensorError, OSError, ValueError) as err:  # ValueError: a header changed since the library read it
            cut = shortfall(path)
            if cut:
                raise CheckpointError(f"{path}: truncated safetensors file ({cut})") from None
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        piece = self.handle.get_slice(name)
        if piece.get_dtype() not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {piece.get_dtype()}, "
                                  f"which minielm does not read; expected one of {', '.join(SAFETENSORS_DTYPES)}")
        return tuple(piece.get_shape()), SAFETENSORS_DTYPES[piece.get_dtype()]

    def read(self, name: str) -> torch.Tensor:
        """The tensor, read from the file into a fresh CPU tensor; a CheckpointError if the file
        has changed since it was opened, or cannot be read as its header says."""
        try:
            tensor = self.handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            check_unchanged(self.path, self.stamp, name)  # a short read: most likely a file cut meanwhile
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({err})") from None
        check_unchanged(self.path, self.stamp, name)
        return tensor

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the tensor, read from the file into a fresh CPU tensor (only those bytes:
        the library's slices read the whole tensor); a CheckpointError as for `read`."""
        shape, dtype = self.info(name)
        block = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        try:
            got = read_into(self.path, self.data_start + self.offsets[name] + start * row_bytes, block)
        except OSError as err:
            got = err
        check_unchanged(self.path, self.stamp, name)  # a short read: most likely a file cut meanwhile
        if got != block.numel() * dtype.itemsize:
            raise CheckpointError(f"{self.path}: cannot read rows {start}..{stop} of tensor {name!r} "
                                  f"({getattr(got, 'strerror', None) or 'a short read'})")
        return block


def data_offsets(path: Path) -> tuple[int, dict]:
    """(where the tensors' data begins, {tensor name: its first byte after that}) from a safetensors header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n, {name: entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


def read_into(path, offset: int, tensor: torch.Tensor) -> int:
    """Read the file's bytes from `offset` into `tensor` (contiguous, on the CPU), as many reads as it
    takes; returns the number of bytes read: fewer only where the file ends."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))  # buffered: whole unless cut


HEADER_LIMIT = 100 * 2**20  # the safetensors library's bound on a header; a larger length is not one


def shortfall(path: Path) -> str | None:
    """How a safetensors file the library refused is shorter than it says it is: shorter than the 8 bytes of
    its header's length, than that header, or than its tensors' data (naming the first tensor cut); None
    when it is not (the library said only "header too small", "incomplete metadata, file not fully covered")."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as file:
            n = int.from_bytes(file.read(8), "little")
            if size < 8:
                return f"{size} bytes, shorter than the 8 bytes that give its header's length"
            if n > HEADER_LIMIT:
                return None
            if size < 8 + n:
                return f"{size} bytes, where its header alone ends at byte {8 + n}"
            header = json.loads(file.read(n))
        spans = sorted((entry["data_offsets"][1], name) for name, entry in header.items() if name != "__metadata__")
        end = 8 + n + spans[-1][0]
        if size < end:
            first = next(name for stop, name in spans if 8 + n + stop > size)
            return f"{size} bytes, the header describes {end}; tensor {first!r} is the first cut short"
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):  # not a header worth reading
        return None
    return None


# ---- a file that changes during a run ------------------------------------------------------------
def file_stamp(path: Path) -> tuple:
    """What identifies a file's contents cheaply: its device, inode, size, modification time and
    status-change time. The last catches a rewrite in place that restores the modification time
    (`cp -p`, `rsync -t --inplace`, `touch -r`): the kernel sets it on every write and no call sets it back."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise CheckpointError(f"{path}: the file is gone or unreadable ({err.strerror})") from None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def check_unchanged(path: Path, stamp: tuple, name: str, again: str = "load the checkpoint again") -> None:
    """A CheckpointError if the file at `path` is no longer the one `file_stamp` saw (`stamp`), naming
    the tensor being read (`name`) and what to do (`again`): a file cut, rewritten or replaced during a
    run is an error, never a mix of old and new weights."""
    now = file_stamp(path)
    if now != stamp:
        (_, inode, size, mtime, _), (_, inode_now, size_now, mtime_now, _) = stamp, now
        what = (f"it was truncated to {size_now} bytes from {size}" if size_now < size else
                f"it grew to {size_now} bytes from {size}" if size_now > size else
                "another file took its place" if inode_now != inode else
                "it was rewritten" if mtime_now != mtime else
                "its status-change time moved: rewritten with the modification time restored, or its "
                "permissions changed")
        raise CheckpointError(f"{path}: the file changed on disk during this run ({what}; reading tensor "
                              f"{name!r}); {again}")


# ---- a family's own layout, as nn.Linear's ----------------------------------------------------
class LinearLayout:
    """A TensorSource whose layer matrices come in nn.Linear's (out, in) layout, fused parts stacked
    one after another, whatever the family's files keep (everything else passes through):

        GPT-2 (conv1d)            its Conv1D matrices are stored (in, out): transposed
        GPT-NeoX (fused_per_head) query_key_value holds, head after head, that head's q, k and v
                                  rows (H, 3, hd): regrouped as all q rows, all k rows, all v rows

    The safetensors files of Hugging Face checkpoints need it; llama.cpp's converter already did both
    on the way into a GGUF file."""

    def __init__(self, source: TensorSource, config: Config):
        self.source, self.family, self.heads = source, config.family_spec, config.num_attention_heads
        layer = self.family.layer_tensors
        self.matrices = tuple("." + k for k in layer if k.endswith(".weight"))  # norms are 1-D: never transposed
        self.fused = tuple("." + k for k, v in layer.items() if isinstance(v, tuple))

    def names(self) -> set[str]:
        return self.source.names()

    def origin(self, name: str) -> str:
        return self.source.origin(name)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype = self.source.info(name)
        return (tuple(reversed(shape)) if self.transposed(name, shape) else tuple(shape)), dtype

    def get(self, name: str) -> torch.Tensor:
        tensor = self.source.get(name)
        if self.transposed(name, tensor.shape):
            tensor = tensor.T.contiguous()  # (in, out) -> (out, in)
        if self.family.fused_per_head and name.endswith(self.fused):
            rows = tensor.shape[0]  # 3·H·hd: (H, 3, hd, ...) -> (3, H, hd, ...)
            grouped = tensor.reshape(self.heads, 3, rows // (3 * self.heads), *tensor.shape[1:]).transpose(0, 1)
            tensor = grouped.reshape(tensor.shape).contiguous()
        return tensor

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.source.rows(name, start, stop)  # top-level matrices are stored as nn.Linear's in every family

    def transposed(self, name: str, shape) -> bool:
        return self.family.conv1d and len(shape) == 2 and name.endswith(self.matrices)


def in_linear_layout(source: TensorSource, config: Config) -> TensorSource:
    """`source` as LinearLayout where the family's files need it, else itself."""
    return LinearLayout(source, config) if config.family_spec.conv1d or config.family_spec.fused_per_head else source


# ---- loading: check the plan, read, check the values, cast ----------------------------------
def load_weights(source: TensorSource, config: Config, dtype: torch.dtype, device, stream: bool = False,
                 where=None) -> dict:
    """All decoder tensors, by short name: {'embed', 'final_norm', 'lm_head', 'layers': [LayerWeights, ...]}.

    Raises CheckpointError naming the tensor if one is missing, left over, of the wrong shape, or
    holds a non-finite value (`where` names the checkpoint for a tensor that is missing). With
    `stream`, the embedding and unembedding are kept in the file's dtype and the layers are
    `StreamedLayers`, read and cast to the compute dtype only while they are used.
    The top-level matrices are read a block of rows at a time (`read_in_blocks`).
    """
    plan = checked_plan(source, config, where)
    weights = {"layers": [{} for _ in range(config.num_hidden_layers)]}
    for hf_name, layer, parts in plan:
        if stream and layer is not None:
            continue
        name = parts[0][0]
        if name in ("embed", "lm_head", "positions"):  # (V, d) or (positions, d): a streamed model keeps the
            kept = stream and name != "positions"  # embedding and unembedding in the file's dtype
            weights[name] = read_in_blocks(source, hf_name, dtype, None if kept else device, kept)
            continue
        tensor = read_checked(source, hf_name, dtype)
        target = weights if layer is None else weights["layers"][layer]
        for name, piece in zip((p for p, _ in parts), split_parts(tensor, parts)):
            target[name] = to_compute(piece, dtype, device)
    if stream:
        return_freed_memory_promptly()
        weights["layers"] = StreamedLayers(source, plan, config.num_hidden_layers, dtype, device)
    else:
        weights["layers"] = [LayerWeights(**layer) for layer in weights["layers"]]
    if config.tie_word_embeddings:
        weights["lm_head"] = weights["embed"]
    return weights


def read_checked(source: TensorSource, hf_name: str, dtype: torch.dtype) -> torch.Tensor:
    """source.get(hf_name), after checking that every value is finite and stays finite in `dtype`."""
    tensor = source.get(hf_name)
    check_values(source, hf_name, tensor, dtype)
    return tensor


BLOCK_BYTES = 64 * 2**20  # read_in_blocks: rows read, checked and cast this many bytes of the file at a time


def read_in_blocks(source: TensorSource, hf_name: str, dtype: torch.dtype, device, keep_file_dtype: bool = False):
    """A top-level matrix (rows, d) read BLOCK_BYTES of the file at a time, each block checked (`check_values`)
    and cast into its rows of the result, made once: in `dtype` on `device`, or, with `keep_file_dtype`, in the
    file's dtype on the CPU. A 15 GB bf16 embedding in float64 is 60 GB of float64 and one block of bf16, where
    reading it whole and then casting held both (and torch.isfinite's temporaries of the whole)."""
    (rows, *row), file_dtype = source.info(hf_name)
    result = torch.empty((rows, *row), dtype=file_dtype if keep_file_dtype else dtype,
                         device="cpu" if keep_file_dtype else device)
    step = max(1, BLOCK_BYTES // max(1, math.prod(row) * file_dtype.itemsize))
    for start in range(0, rows, step):
        block = source.rows(hf_name, start, min(rows, start + step))
        check_values(source, hf_name, block, dtype, start, lambda: non_finite_in_blocks(source, hf_name, step))
        result[start:start + step].copy_(block.to(result.device))  # crosses in the file's dtype, cast there
    return result


def non_finite_in_blocks(source: TensorSource, hf_name: str, step: int) -> int:
    """How many values of a top-level matrix are not finite, counted `step` rows at a time."""
    rows = source.info(hf_name)[0][0]
    return sum(int((~torch.isfinite(source.rows(hf_name, a, min(rows, a + step)))).sum()) for a in range(0, rows, step))


def check_values(source: TensorSource, hf_name: str, tensor: torch.Tensor, dtype: torch.dtype, first_row: int = 0,
                 count_non_finite=None) -> None:
    """A CheckpointError naming the tensor `hf_name` unless every value of `tensor` (all of it, or its rows
    from `first_row` on: then `count_non_finite()` counts the whole tensor's) is finite and stays finite in `dtype`.
    The smallest and the largest value say both, in one pass with no temporary (a NaN anywhere makes them NaN):
    torch.isfinite made 2.5 times a bf16 tensor's bytes of temporaries and took 35 times longer."""
    if not tensor.numel():
        return
    low, high = torch.aminmax(tensor)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        finite = torch.isfinite(tensor)  # where, and how many
        index = tuple(int(i) for i in (~finite).nonzero()[0])
        count = count_non_finite() if count_non_finite else int((~finite).sum())
        raise CheckpointError(f"{source.origin(hf_name)}: tensor {hf_name!r} holds non-finite weights "
                              f"({count} of {math.prod(source.info(hf_name)[0])}, the first {tensor[index].item()} "
                              f"at index {[first_row + index[0], *index[1:]]}); the checkpoint is corrupt")
    if torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
        largest = torch.maximum(-low, high)  # the cast is monotone: if the largest value fits, all do
        if not bool(torch.isfinite(largest.to(dtype))):
            raise CheckpointError(f"{source.origin(hf_name)}: tensor {hf_name!r} holds {largest.item():g}, beyond "
                                  f"the range of {dtype} (at most {torch.finfo(dtype).max:g}); "
                                  f"load it in float32 or float64")


def return_freed_memory_promptly() -> None:
    """glibc keeps freed blocks under a moving size threshold (up to 32 MiB) in its heap, so a
    streamed model's per-layer tensors would pile up there instead of going back to the system.
    A fixed threshold of 1 MiB (mallopt M_MMAP_THRESHOLD) returns them as each layer is dropped.
    Elsewhere than glibc this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


def checked_plan(source: TensorSource, config: Config, where=None) -> list:
    """[(hf_name, layer or None, [(short name, rows), ...])] for every tensor the decoder uses,
    after checking that each is present, floating point and of the expected shape, and that
    nothing else is in the checkpoint. `where` names the checkpoint when a tensor is missing."""
    where = where if where is not None else "the checkpoint"
    available, family = source.names(), config.family_spec
    embed = next(k for k, v in family.top_tensors.items() if v == "embed")
    prefix = next((p for p in family.prefixes if p + embed in available), None)
    if prefix is None:
        raise CheckpointError(f"{where}: tensor {family.prefixes[0] + embed!r} is missing")
    wanted = {prefix + k: (None, v) for k, v in family.top_tensors.items()}
    if not config.tie_word_embeddings:
        wanted[family.unembedding] = (None, "lm_head")
    per_layer = layer_map(config)
    for i in range(config.num_hidden_layers):
        wanted.update({f"{prefix}{family.layers_name}.{i}.{k}": (i, v) for k, v in per_layer.items()})

    ignored = IGNORED_SUFFIXES + family.ignored_suffixes
    leftover = sorted(n for n in available - set(wanted) if not n.startswith(IGNORED_PREFIXES) and not n.endswith(ignored))
    if leftover:
        raise CheckpointError(f"{source.origin(leftover[0])}: unexpected tensor {leftover[0]!r} "
                              f"({len(leftover)} tensor(s) not used by a {config.num_hidden_layers}-layer "
                              f"{config.model_type} decoder)")
    shapes = expected_shapes(config)
    plan = []
    for hf_name, (layer, short) in wanted.items():
        if hf_name not in available:
            raise CheckpointError(f"{where}: tensor {hf_name!r} is missing (a {config.num_hidden_layers}-layer "
                                  f"{config.model_type} decoder needs it)")
        names = short if isinstance(short, tuple) else (short,)
        expected = [shapes[p] for p in names]
        shape, dtype = source.info(hf_name)
        fused_shape = (sum(e[0] for e in expected), *expected[0][1:])
        if tuple(shape) != fused_shape:
            raise CheckpointError(f"{source.origin(hf_name)}: tensor {hf_name!r} has shape {tuple(shape)}, "
                                  f"expected {fused_shape} from the config")
        if not dtype.is_floating_point:
            raise CheckpointError(f"{source.origin(hf_name)}: tensor {hf_name!r} has dtype {dtype}, "
                                  f"expected floating point")
        plan.append((hf_name, layer, [(n, e[0]) for n, e in zip(names, expected)]))
    return plan


def to_compute(piece: torch.Tensor, dtype, device) -> torch.Tensor:
    """A tensor read from the file, in the compute dtype on the compute device. It crosses to the
    device in the file's dtype and is cast there: a CPU->GPU copy that also changes the dtype
    would cast on the CPU first and move 4x the bytes of a bf16 weight in float64."""
    return piece.to(device=device).to(dtype=dtype).contiguous()


def split_parts(tensor, parts):
    """A fused tensor split by rows into its parts (one part: the tensor itself)."""
    return torch.split(tensor, [rows for _, rows in parts])


# ---- streaming: resident in the file's dtype when it fits, cast into reused buffers -------------------
RESIDENT_SHARE = 0.9  # of the memory available at load that a streamed model's resident layers may take


def available_memory() -> int:
    """Bytes this process may still allocate without swapping: MemAvailable in /proc/meminfo (Linux: free
    memory plus the page cache and other memory the kernel can reclaim); elsewhere the free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 0  # unknown: nothing is kept


def resident_fits(file_bytes: int, buffer_bytes: int, available: int) -> bool:
    """Whether a streamed model keeps its layers in memory in the file's dtype: when those `file_bytes`
    and the cast buffers (`buffer_bytes`, one layer in the compute dtype) take at most RESIDENT_SHARE of
    the memory `available` at load. Else each use reads its layer from the file again.

    Llama 3 8B in bf16 (14.0 GB of layers, 1.75 GB of float64 buffers) is kept where 17.5 GB are
    available, as on a 24 GB machine that runs little else."""
    return file_bytes + buffer_bytes <= RESIDENT_SHARE * available


def cast_into(buffer: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """`piece` (as read, in the file's dtype) cast into `buffer` (the compute dtype, on the compute device),
    overwriting it: no allocation, no fresh pages. Like `to_compute`, it crosses to the device in the file's
    dtype and is cast there. Returns the buffer."""
    return buffer.copy_(piece.to(buffer.device))


class StreamedLayers(Sequence):
    """The layers of a streamed model: `layers[i]` is a fresh StreamedLayer each time.

    The model code takes a layer once per use (a block of the forward pass, a
    sublayer of the reverse sweep). Each weight it asks for is cast to the compute dtype
    into that weight's buffer (one per short name, allocated on first use and reused by
    every layer: no fresh pages per pass), unless the buffer already holds that layer's
    weight: each layer is cast once per pass (the sweep takes a layer once per sublayer,
    and at Lanczos' turns the layer a pass ends on is the one the next begins with). A
    layer's weights are therefore valid until the same weight of another layer is taken:
    the model code uses them only while it works on that layer, and keeps nothing computed
    that aliases them (its outputs and frozen factors are new tensors). About one layer is
    held in the compute dtype. Autograd keeps what a product needs for its backward pass,
    every layer's weights: in grad mode each use gets casts of its own (as before the
    buffers), and the computations that never need gradients (the traced pass, the frozen
    products, the sweeps) run without it. Where the compute dtype is the file's, nothing is
    cast or copied: the tensor read is used.

    Resident or re-read (`resident`, decided at load by `resident_fits`; it may be set
    before the first use): a resident model keeps every tensor it reads, in the file's
    dtype, and never reads it again; else each use reads its tensors from the file again.
    What is checked when: each tensor's values (finite, and within the compute dtype's range)
    the first time it is read; the file against its stamp at opening (`check_unchanged`) at
    every read. A resident model reads each tensor once: what it read is what it uses, and a
    file changed after that changes nothing (as for a model loaded whole); a change before a
    tensor's first read is an error at that read. A re-reading model checks the file at every
    use of every layer.

    Read-ahead, on a GPU: taking layer i also starts reading layer i + step on a
    background thread, step being the move from the layer taken before (+1 in a forward
    pass, -1 in a sweep), or, after a jump to the first or the last layer, away from that
    end; a sweep that begins on the top layer where a forward pass ended reads the one
    below, and a sweep that reaches the bottom layer reads layer 1 again, for the forward
    pass that may follow (Lanczos alternates the two; after a map, that read goes unused).
    The tensors that the layer before was asked for (a frozen pass or a sweep asks
    for no query, key or gate weights; right after the forward pass at x, which asks for all,
    the sweep's first two read-aheads read them too) are read, checked and copied to the GPU on a side
    stream, in the file's dtype, and wait there for their use, which casts them as it
    would have cast its own reads: the results are the same. Memory: one layer more, in
    the file's dtype, on the GPU. A read-ahead's error (a non-finite tensor, a file changed on disk) is
    raised when its layer is taken, in the thread that takes it; one never taken is
    dropped unseen, as a layer never read would be. On a CPU the reader and the compute
    share the cores and Python's lock: measured (tools/bench_read_ahead.py), runs were
    slower with it there, so it is off (`read_ahead`; the tests switch it on to run the
    same machinery on a CPU).
    """

    def __init__(self, source: TensorSource, plan: list, num_layers: int, dtype, device):
        self.plans = [[(h, p) for h, i, p in plan if i == layer] for layer in range(num_layers)]
        self.source, self.dtype, self.device = source, dtype, device
        self.checked = set()  # hf names whose values were checked
        self.kept = {}  # hf name -> the tensor as read, in the file's dtype (a resident model's)
        self.buffers = {}  # short name -> its buffer in the compute dtype, allocated on first use
        self.held = {}  # short name -> (layer, tensor): the weight last handed out under that name
        self.taken, self.ready = None, {}  # the layer taken last; its tensors read ahead and not yet used
        self.asked = set()  # the short names that the uses of the layer taken last asked for
        self.ahead = None  # (layer, Future, pid) of the layer being read ahead, by process `pid`
        self.side_stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None
        self.read_ahead = self.side_stream is not None  # on a GPU
        file_bytes = sum(math.prod(source.info(h)[0]) * source.info(h)[1].itemsize for h, i, _ in plan
                         if i is not None)
        first = self.plans[0] if self.plans else []
        buffer_bytes = sum(math.prod(source.info(h)[0]) for h, _ in first) * dtype.itemsize  # one layer
        self.resident = resident_fits(file_bytes, buffer_bytes, available_memory())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # an IndexError past the end, as for a list
        return StreamedLayer(self, i, self.take(i))

    def __len__(self):
        return len(self.plans)

    def read(self, hf_name: str) -> torch.Tensor:
        """The tensor in the file's dtype: kept from its first read (resident), or read from the source,
        its values checked on the first read."""
        if hf_name in self.kept:
            return self.kept[hf_name]
        if hf_name in self.checked:
            tensor = self.source.get(hf_name)
        else:
            tensor = read_checked(self.source, hf_name, self.dtype)
            self.checked.add(hf_name)
        if self.resident:
            self.kept[hf_name] = tensor
        return tensor

    def weight(self, i: int, name: str, ready: dict, own: dict) -> torch.Tensor:
        """Layer i's weight `name` in the compute dtype, from the read-ahead (`ready`) or a read; a fused
        tensor's parts are cast together. Without grad mode: in its buffer (as handed out last, if that was
        layer i's). In grad mode, where autograd may keep every layer's weights for its backward pass (the
        detached Jacobian): a cast of its own, kept for the use in `own`, as a loaded model's would be."""
        shared = not torch.is_grad_enabled()
        if shared and name in self.held and self.held[name][0] == i:
            return self.held[name][1]
        if not shared and name in own:
            return own[name]
        hf_name, parts = next((h, p) for h, p in self.plans[i] if any(n == name for n, _ in p))
        tensor = ready.pop(hf_name) if hf_name in ready else self.read(hf_name)
        for part, piece in zip((p for p, _ in parts), split_parts(tensor, parts)):
            if not shared or piece.dtype == self.dtype:  # its own cast; none where the dtype is the compute one
                cast = to_compute(piece, self.dtype, self.device)
            else:
                if part not in self.buffers or self.buffers[part].shape != piece.shape:
                    self.buffers[part] = torch.empty(piece.shape, dtype=self.dtype, device=self.device)
                cast = cast_into(self.buffers[part], piece)
            if shared:
                self.held[part] = (i, cast)
            else:
                own[part] = cast
        return self.held[name][1] if shared else own[name]

    # -- the read-ahead: the next layer read on READER's thread while this one is used --------
    def take(self, i: int) -> dict:
        """hf name -> tensor, those of layer i that were read ahead and not yet used ({} if
        none: the layer then reads its own), after starting to read the next layer."""
        if self.ahead is not None and self.ahead[2] != os.getpid():  # a parent's, from before a fork: its thread
            self.ahead = None  # is not in this process, and its future would never finish; dropped, as if never begun
        if i == self.taken:  # the same layer again (the sweep takes it once per sublayer)
            if i == len(self) - 1 and self.ahead is None:  # at the top: a sweep begins where a forward pass ended
                self.start_reading(i - 1, set(self.asked))
            return self.ready
        # the step: the move from the layer taken before, if it was a neighbour; else away from an end
        near = self.taken is not None and abs(i - self.taken) == 1
        step = i - self.taken if near else 1 if i == 0 else -1 if i == len(self) - 1 else None
        if i == 0 and step == -1:  # a sweep at the bottom: the forward pass that may follow (Lanczos) goes up
            step = 1
        ahead, self.ahead, self.taken, self.ready = self.ahead, None, i, {}
        asked, self.asked = self.asked, set()  # what the layer before asked for: the next will ask the same
        if ahead is not None and ahead[0] == i:
            self.ready = self.arrived(ahead[1])  # a read-ahead's error is raised here
        elif ahead is not None:
            ahead[1].cancel()  # another layer came instead; a read already under way finishes, unused
        if step is not None:
            self.start_reading(i + step, asked)
        return self.ready

    def start_reading(self, i: int, asked: set) -> None:
        """Read layer i ahead (if it exists and reading ahead is on), what `asked` names."""
        if self.read_ahead and 0 <= i < len(self):
            self.ahead = (i, READER.submit(self.read_layer, i, asked), os.getpid())

    def read_layer(self, i: int, asked: set) -> tuple[dict, object]:
        """Layer i's tensors that hold a weight in `asked` (all of them if it is empty), read and
        checked, in the file's dtype: the read-ahead's work, on READER's thread. (A frozen pass
        or a sweep asks for no query, key or gate weights; the layer before tells which.) They
        are copied to the GPU on a side stream, from page-locked memory (its blocks reused
        layer after layer), and the event returned marks the end of the copies (on a CPU:
        nothing to copy, and no event)."""
        plan = [hf_name for hf_name, parts in self.plans[i] if not asked or any(p in asked for p, _ in parts)]
        if self.side_stream is None:
            return {hf_name: self.read(hf_name) for hf_name in plan}, None
        with torch.cuda.stream(self.side_stream):
            tensors = {hf_name: self.read(hf_name).pin_memory().to(self.device, non_blocking=True)
                       for hf_name in plan}
            return tensors, self.side_stream.record_event()

    def arrived(self, future) -> dict:
        """A read-ahead's tensors, made safe to use on the current CUDA stream: it waits for the
        side stream's copies, and the allocator is told that this stream uses their memory
        (so that it is not reused before this stream is done with it)."""
        tensors, copied = future.result()  # waits for the read; its error, if any, is raised here
        if copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            for tensor in tensors.values():
                tensor.record_stream(stream)
        return tensors


def start_reader() -> None:
    """READER: one background thread for every streamed model's read-ahead. It runs beside the
    compute while neither holds Python's lock: torch's checks and casts, gguf's numpy
    dequantization and CUDA copies release it; safetensors' read (0.8) keeps it. Its thread starts
    on the first read-ahead; at exit Python lets it finish the one read under way. A forked child
    starts its own."""
    global READER
    READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minielm-read-ahead")


start_reader()
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=start_reader)


class StreamedLayer(Mapping):
    """One use of layer `index`: its weights as model.LayerWeights has them (`layer.wq`; also by short
    name, `layer["wq"]`), each cast on access (StreamedLayers.weight): into its buffer, valid until the
    same weight of another layer is taken; in grad mode, into a tensor of its own."""

    def __init__(self, layers: StreamedLayers, index: int, ready: dict):
        self.layers, self.index, self.ready, self.own = layers, index, ready, {}
        self.names = [name for _, parts in layers.plans[index] for name, _ in parts]

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        self.layers.asked.add(name)
        return self.layers.weight(self.index, name, self.ready, self.own)

    def __getattr__(self, name):  # only for names that are not attributes of the object itself
        if name not in LAYER_FIELDS:
            raise AttributeError(name)
        return self[name] if name in self.__dict__.get("names", ()) else None  # None: as in LayerWeights

    def tensors(self) -> list:
        return [self[name] for name in self.names]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def weight(layer, name: str) -> torch.Tensor:
    """A layer's tensor by short name, from LayerWeights (as loaded) or a plain dict (as tools build them)."""
    return layer[name] if isinstance(layer, dict) else getattr(layer, name)


def save_checkpoint(directory, config_json: dict, weights: dict, dtype=torch.float32) -> None:  # lower precision on purpose
    """Write weights (the dict `load_weights` returns) as a Hugging Face directory:
    config.json and model.safetensors, under the family's names. For tools and tests;
    `minielm.load` itself never writes anything."""
    from safetensors.torch import save_file

    config = Config.from_dict(config_json)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family = config.family_spec
    prefix = family.prefixes[0]
    tensors = {prefix + k: weights[v] for k, v in family.top_tensors.items()}
    if not config.tie_word_embeddings:
        tensors[family.unembedding] = weights["lm_head"]
    for i, layer in enumerate(weights["layers"]):
        for hf_name, short in layer_map(config).items():
            parts = short if isinstance(short, tuple) else (short,)
            tensors[f"{prefix}{family.layers_name}.{i}.{hf_name}"] = torch.cat([weight(layer, p) for p in parts])
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
