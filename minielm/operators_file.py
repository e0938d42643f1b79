"""Operators on disk: one safetensors file, written a block of rows at a time, read back memory-mapped.

    elm = minielm.equivalent_linear_map(model, ids, out="ops.safetensors")  # never all in memory at once
    elm = minielm.load_operators("ops.safetensors", model)                 # later: memory-mapped

This module is the file format alone: minielm.linear_map writes and reads maps through it.

The file is a plain safetensors file (`safetensors.safe_open` reads it):

    ids (T,) int64 | operators (T, d, d): J_t | inputs (T, d): x_t | output (d,): y | bias (d,): b

with the metadata `format` = "minielm-operators", `target` ('final', 'layer 3', ...), `model`
(the checkpoint directory) and `weights` (the sha256 of the model's weights, Model.fingerprint). The header is written first, with every tensor's
final offsets; each block of rows of every J_t is then written in place at its byte
offset (os.pwrite), so one process or many (each rank its own rows) fill the same file.
It is written under PATH.partial, a new file (anything already there is refused, never written
through), and renamed once complete: a file at PATH is whole.

It is read back by mapping a private copy (`private_copy`), never the file itself: a mapped file
truncated in place while its map is in use (`truncate`, `cp other.safetensors PATH`) ends the process
with SIGBUS at the next touch of a page that is gone. The copy has no name (O_TMPFILE, beside the file:
on btrfs or XFS the kernel shares the blocks and copies nothing), so nothing else can cut it, and
it is mapped, not read: a map larger than memory still pages from the disk. Its cost (the copy's
time and disk space; no memory) is measured by tools/bench_load_operators.py.
"""

from __future__ import annotations

import json
import math
import errno
import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from . import checks
from .checkpoint import SAFETENSORS_DTYPES as DTYPES, check_unchanged, file_stamp
from .distributed import barrier, on_every_rank, rank_and_size
from .errors import InputError, MinielmError, OutputError
from .model import Model

FORMAT = "minielm-operators"
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
TARGET = re.compile(r"final|(layer|attention|mlp) [0-9]+")  # the names of linear_map.target_name


def header(T: int, d: int, dtype: torch.dtype, metadata: dict) -> tuple[bytes, int]:
    """The safetensors header (8-byte length, then JSON padded to a multiple of 8 bytes), and the
    size of the data it describes."""
    shapes = {"ids": ((T,), torch.int64), "operators": ((T, d, d), dtype), "inputs": ((T, d), dtype),
              "output": ((d,), dtype), "bias": ((d,), dtype)}
    entries, offset = {"__metadata__": {"format": FORMAT, **metadata}}, 0
    for name, (shape, kind) in shapes.items():  # ids first: every tensor starts at a multiple of its element size
        size = math.prod(shape) * kind.itemsize
        entries[name] = {"dtype": DTYPE_NAMES[kind], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offset


def read_header(path) -> tuple[int, dict]:
    """(start of the data, header entries) of an operators file; an InputError if it is not one."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            size = os.fstat(f.fileno()).st_size
            entries = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except (OSError, ValueError, RecursionError) as err:
        raise InputError(f"{path}: cannot read an operators file ({err})") from None
    metadata = entries.get("__metadata__") if isinstance(entries, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise InputError(f"{path}: not a minielm operators file (written by equivalent_linear_map(..., out=))")
    if entries != layout(entries, metadata):  # a header edited by hand or damaged: its offsets are not trusted
        raise InputError(f"{path}: damaged operators file: its header is not ids (T,) int64, operators (T, d, d), "
                         "inputs (T, d), output (d,), bias (d,) of one float dtype, one after another, "
                         "with a target")
    end = max(e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__")
    if 8 + n + end != size:  # cut short (truncated), or with bytes after the data: neither is what was written
        gap = size - (8 + n + end)
        state, way = ("damaged", "longer") if gap > 0 else ("truncated", "shorter")
        raise InputError(f"{path}: {state} operators file, {abs(gap)} byte{'s' if abs(gap) != 1 else ''} {way} "
                         f"than its header describes ({size} bytes, the header describes {8 + n + end})")
    return 8 + n, entries


def layout(entries: dict, metadata: dict) -> dict | None:
    """The header entries `header` writes for the T, d and dtype of `entries`' operators (None if
    it has none that make sense)."""
    operators = entries.get("operators")
    shape = operators.get("shape") if isinstance(operators, dict) else None
    dtype = DTYPES.get(operators.get("dtype")) if isinstance(shape, list) and len(shape) == 3 else None
    if dtype is None or not dtype.is_floating_point or not all(type(n) is int and n > 0 for n in shape):
        return None
    if not all(isinstance(v, str) for v in metadata.values()) or not TARGET.fullmatch(metadata.get("target", "")):
        return None
    return json.loads(header(shape[0], shape[1], dtype, metadata)[0][8:])


def partial_path(out) -> str:
    """Where the operators for `out` are written before the rename: beside the file it will replace."""
    return f"{os.path.realpath(out)}.partial"


def refuse_existing_partial(out) -> None:
    """An OutputError, before any work, if something is already at `out`'s .partial: a run killed
    without cleaning up, or a link planted there. It is never written through, nor removed."""
    partial = partial_path(out)
    if os.path.lexists(partial):
        raise OutputError(already_there(partial))


def already_there(partial: str) -> str:
    kind = "a symbolic link" if os.path.islink(partial) else "a file"
    return (f"{partial}: already exists ({kind}: left by an interrupted run, or put there); the operators are "
            "written into a new file of that name, never through one already there: remove it or write them "
            "somewhere else")


def create(path, T: int, d: int, dtype, metadata: dict, ids, inputs, output, bias) -> None:
    """Create the file `path` (exclusively: see checks.new_file), write the header and the small tensors;
    the file gets its final size, the operators still zero. A failure removes the file it made."""
    start_bytes, data_size = header(T, d, dtype, metadata)
    try:
        fd = checks.new_file(path)
    except FileExistsError:
        raise OutputError(already_there(path)) from None
    except OSError as err:
        raise OutputError(f"{path}: cannot write the operators ({err.strerror or err})") from None
    try:
        with open(fd, "wb") as f:
            f.write(start_bytes)
            f.truncate(len(start_bytes) + data_size)
        start, entries = read_header(path)
        small = (("ids", torch.tensor(ids, dtype=torch.int64)), ("inputs", inputs), ("output", output), ("bias", bias))
        write_at(path, [(start + entries[name]["data_offsets"][0], tensor) for name, tensor in small])
    except OSError as err:
        Path(path).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the operators ({err.strerror or err})") from None
    except BaseException:  # an interrupt, or an OutputError of write_at: no half-made file left
        Path(path).unlink(missing_ok=True)
        raise


def write_rows(path, a: int, G) -> None:
    """Rows a .. a+b of every J_t, from G (T, b, d): T contiguous runs of b·d numbers, written in place."""
    start, entries = read_header(path)  # whole: create gave the file its final size
    T, b, d = G.shape
    first = start + entries["operators"]["data_offsets"][0]
    G = G.cpu()
    write_at(path, [(first + (t * d + a) * d * G.element_size(), G[t]) for t in range(T)])


def write_at(path, pieces) -> None:
    """Each tensor of `pieces` [(offset, tensor), ...] at its byte offset, through one open file;
    a failed write (a full disk) is an OutputError."""
    try:
        with open(os.open(path, os.O_WRONLY | os.O_NOFOLLOW), "wb") as f:  # the file create made, never a link
            if os.fstat(f.fileno()).st_nlink != 1:  # swapped for a hard link to another file since: not ours
                raise OutputError(f"{path}: has been replaced by a hard link to another file; not written through")
            for offset, tensor in pieces:
                os.pwrite(f.fileno(), as_bytes(tensor.cpu()), offset)
    except OSError as err:
        raise OutputError(f"{path}: cannot write the operators ({err.strerror or err})") from None


def as_bytes(tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def read(path, model=None) -> tuple[dict, dict]:
    """The tensors stored at `path` by name, memory-mapped from a private copy of the file (changing them
    changes nothing on disk; changing the file changes nothing in them), and the file's metadata. With
    a model: a model whose weights' fingerprint differs is refused (minielm.load_operators makes the map of them)."""
    if model is not None:
        checks.instance("model", model, Model, "from minielm.load")
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        raise InputError(f"{path}: no such operators file")
    stamp = file_stamp(path)  # before the header: a change from here on is seen once the copy is made
    start, entries = read_header(path)
    mapped = private_copy(path, stamp)
    tensors = {}
    for name, entry in entries.items():
        if name != "__metadata__":
            dtype, (begin, end) = DTYPES[entry["dtype"]], entry["data_offsets"]
            tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                             offset=start + begin).view(entry["shape"])
    if model is not None:
        check_same_model(path, entries["__metadata__"], tensors["ids"].tolist(), tensors["inputs"], model)
    return tensors, entries["__metadata__"]


def private_copy(path, stamp: tuple) -> mmap.mmap:
    """The bytes of the file at `path`, mapped (copy-on-write) from an unnamed copy: a file without a name,
    in `path`'s directory (the same file system: a reflink where it can share blocks), else in the temporary
    directory. The file must still be what `file_stamp` saw (`stamp`) once copied: a CheckpointError if it
    changed meanwhile. An OutputError if no copy can be made (a full disk)."""
    size = stamp[2]  # file_stamp: (device, inode, size, ...)
    try:
        with open(path, "rb") as source, unnamed_file_beside(path) as copy:
            copy_bytes(source, copy)
            check_unchanged(path, stamp, "operators", again="load the operators again")  # cut or rewritten meanwhile
            return mmap.mmap(copy.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as err:
        raise OutputError(f"{path}: cannot make the private copy that the operators are mapped from, beside it or "
                          f"in {tempfile.gettempdir()} ({err.strerror or err}; it needs {size} bytes of disk)") from None


def unnamed_file_beside(path):
    """A new file without a name (O_TMPFILE where the system has it), in `path`'s directory, or, where that
    cannot be written, in the temporary directory; it is gone once closed and unmapped."""
    try:
        return tempfile.TemporaryFile(dir=os.path.dirname(os.path.realpath(path)))
    except OSError:
        return tempfile.TemporaryFile()


def copy_bytes(source, target) -> None:
    """Copy the file `source` into `target` (both open, at offset 0) inside the kernel, with no buffer in this
    process (copy_file_range: a reflink on btrfs or XFS); where the system cannot, through a buffer."""
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while n := os.copy_file_range(source.fileno(), target.fileno(), 2**30):
                copied += n
            return
        except OSError as err:
            if copied or err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    shutil.copyfileobj(source, target, 2**24)


def write(out, T: int, d: int, dtype, metadata: dict, ids, inputs, output, bias, first_row: int, sweep,
          distributed: bool) -> None:
    """Create the operators file `out`, and have `sweep(write_block)` fill in this process's rows,
    calling write_block(a, G) with rows first_row + a .. of every J_t in G (T, b, d).

    The file is made as out.partial (by rank 0, under torchrun) and renamed over `out` once every
    rank has written its rows: a file at `out` is whole. An error or an interrupt on any rank
    stops every rank and leaves no .partial behind."""
    rank, _ = rank_and_size(distributed)
    partial, failed, created = partial_path(out), None, False
    try:
        if rank == 0:
            try:
                create(partial, T, d, dtype, metadata, ids, inputs, output, bias)
                created = True
            except Exception as error:
                failed = error
        if not on_every_rank(distributed, failed is None, inputs.device):  # the other ranks stop too, rather than wait
            raise failed or OutputError(f"{out}: rank 0 could not create the file")
        try:
            sweep(lambda a, G: write_rows(partial, first_row + a, G))
        except Exception as error:  # a full disk on one rank: every rank stops, and rank 0 removes the file
            failed = error
        if not on_every_rank(distributed, failed is None, inputs.device):
            raise failed or OutputError(f"{out}: another rank could not write its rows")
        if rank == 0:
            os.replace(partial, out)
    except BaseException:  # an error or an interrupt leaves no half-written file behind
        if created and os.path.isfile(partial):  # only the file this run made: a stale one is not ours
            os.remove(partial)
        raise
    barrier(distributed)


def check_same_model(path, metadata: dict, ids: list, inputs, model: Model) -> None:
    """An InputError unless `model` has the weights whose fingerprint the file holds (`weights`, written
    since issue 26: the embedding alone let through a model that differs past it), has the target's
    layer and embeds the stored `ids` as the stored `inputs` (T, d): ids outside its vocabulary or past
    its positions are another model's too. A file without `weights` is judged by the rest alone."""
    layer, why = metadata["target"].split()[-1], ""
    try:
        same = (metadata.get("weights", model.fingerprint()) == model.fingerprint()  # absent: an older file
                and model.config.hidden_size == inputs.shape[1]
                and (not layer.isdigit() or int(layer) < model.config.num_hidden_layers)
                and torch.allclose(model.embed(ids).cpu().to(inputs.dtype), inputs, rtol=1e-12, atol=0))
    except MinielmError as error:
        same, why = False, f": {error}"
    if not same:
        raise InputError(f"{path}: these operators ({metadata['target']}, {str(inputs.dtype).removeprefix('torch.')}, "
                         f"d = {inputs.shape[1]}) were computed with another model ({metadata.get('model', 'unknown')})"
                         f" or dtype{why}")
