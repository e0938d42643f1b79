"""Argument checks shared by every public function and the command line.

Each checker takes the argument's name as the caller spells it (`layer`,
`--max-new-tokens`), the value, and what is allowed; it returns the value in
the form the code uses (a plain int, a float, a str) or raises one InputError
that names all three:

    layer must be an integer in [0, 4), got True

Two Python conveniences are refused on purpose, because each turns a mistake
into a silent wrong answer: booleans are not integers (True == 1 would pass as
layer 1 or token id 1), and bytes are not text (b"abc" iterates as the token
ids 97, 98, 99). Checks look at values only: they never allocate anything the
size of a request, so a runaway size is rejected by arithmetic.
"""

from __future__ import annotations

import errno
import inspect
import math
import numbers
import operator
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, TokenizerError, show

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)


def interval(low, high, closed=False) -> str:
    """'[low, high)' or '[low, high]'; an open end is written ∞, a large power of two as 2**n."""
    if isinstance(high, int) and high >= 2**32 and high & (high - 1) == 0:
        high = f"2**{high.bit_length() - 1}"
    if high is None:
        return f"[{low}, ∞)"
    return f"[{'-∞' if low is None else low}, {high}{']' if closed else ')'}"


def integer(name: str, value, low=None, high=None, closed=False, why: str = "") -> int:
    """A plain int in [low, high) ([low, high] when `closed`), from an int, a numpy integer or a
    0-d integer tensor; never from a bool, a float or a string. `why` explains the bound."""
    bounded = f" in {interval(low, high, closed)}" if low is not None or high is not None else ""
    allowed = f"an integer{bounded}{f' ({why})' if why else ''}"
    if is_boolean(value):
        raise InputError(f"{name} must be {allowed}, got {show(value)} (a boolean is not an integer)")
    try:
        number = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be {allowed}, got {show(value)}") from None
    if (low is not None and number < low) or (high is not None and (number > high if closed else number >= high)):
        raise InputError(f"{name} must be {allowed}, got {show(number)}")
    return number


def optional_integer(name: str, value, low=None, high=None, closed=False, why: str = ""):
    """None, or an integer as `integer` checks it."""
    return None if value is None else integer(name, value, low, high, closed, why)


def positions(name: str, value, T: int) -> list:
    """Distinct positions of a T-token prompt, each in [-T, T) (negative counts from the end), from a
    non-empty list, tuple or range of integers: as ints in [0, T), in the order given."""
    if not isinstance(value, (list, tuple, range)) or len(value) == 0:
        raise InputError(f"{name} must be a non-empty list of positions in [{-T}, {T}) (the prompt has {T} tokens), "
                         f"got {show(value)}")
    found = [integer(f"{name}[{i}]", v, -T, T, why=f"a position in the {T}-token prompt") % T
             for i, v in enumerate(value)]
    repeated = sorted({t for t in found if found.count(t) > 1})
    if repeated:
        raise InputError(f"{name} names position {repeated[0]} twice, got {show(value)}")
    return found


def real(name: str, value, low=None, high=None, low_open=False) -> float:
    """A finite real number (not a bool, not a complex, not a string) in [low, high] ((low, high] when
    `low_open`), as a float."""
    bounds = ""
    if low is not None:
        bounds = f" > {low}" if low_open else f" >= {low}"
    if high is not None:
        bounds += f"{' and' if bounds else ''} <= {high}"
    allowed = f"a finite number{bounds}"
    if is_boolean(value) or not isinstance(value, (numbers.Real, np.floating, np.integer)) and not _real_tensor(value):
        raise InputError(f"{name} must be {allowed}, got {show(value)}")
    number = float(value)
    if not math.isfinite(number) or (low is not None and (number <= low if low_open else number < low)) or (
            high is not None and number > high):
        raise InputError(f"{name} must be {allowed}, got {show(number)}")
    return number


def one_of(name: str, value, allowed) -> str:
    """One of a few named choices."""
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {show(value)}")
    return value


def boolean(name: str, value) -> bool:
    """True or False, exactly (not 1, not 'yes')."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {show(value)}")
    return value


def text(name: str, value) -> str:
    """A str. Bytes are refused with the hint to decode them: they are not text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise InputError(f"{name} must be text (str), got {type(value).__name__} {show(bytes(value), 40)}: "
                         "decode it first, e.g. value.decode('utf-8')")
    if not isinstance(value, str):
        raise InputError(f"{name} must be text (str), got {type(value).__name__} {show(value, 40)}")
    return value


def prompt(name: str, value):
    """Text, or a sequence of token ids, left as it is (ids are checked against the model later).
    Bytes are refused: they would iterate as token ids."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text(name, value)
    if not isinstance(value, (str, list, tuple, range, torch.Tensor, np.ndarray)):
        raise InputError(f"{name} must be text (str) or a list of token ids, got {type(value).__name__} "
                         f"{show(value, 40)}")
    return value


def seed(name: str, value):
    """None, or an integer seed that torch.Generator takes."""
    return optional_integer(name, value, 0, SEED_LIMIT, why="a torch generator seed")


def vector(name: str, value, size: int) -> torch.Tensor:
    """A real torch tensor of shape (size,)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != (size,):
        what = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                else show(value, 40))
        raise InputError(f"{name} must be a floating-point tensor of shape ({size},), got {what}")
    return value


def matrices(name: str, value) -> torch.Tensor:
    """A real torch tensor with at least two dimensions (a matrix or a stack of them)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2:
        what = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                else show(value, 40))
        raise InputError(f"{name} must be a floating-point tensor of matrices (..., m, n), got {what}")
    return value


def overwrites(path: Path, checkpoint: Path) -> bool:
    """Whether writing `path` would change `checkpoint` (a directory, or a GGUF file): a path inside the
    directory, or the file itself, links resolved (a symlinked folder, the Hugging Face cache's
    snapshot links into blobs/), or one of its files under another name (a hard link)."""
    checkpoint = checkpoint.resolve()
    target = path.resolve()  # what a write would change (symlinks followed)
    if checkpoint.is_dir():
        if path.parent.resolve().is_relative_to(checkpoint) or target.is_relative_to(checkpoint):
            return True
        files = [f for f in checkpoint.iterdir() if f.is_file()]
    else:
        files = [checkpoint]
    return target == checkpoint or (target.is_file() and any(os.path.samefile(target, f) for f in files))


def path_fits(name: str, path, error: type = InputError, suffix: str = "", why: str = "") -> None:
    """`path`, with `suffix` added (the .partial or the temporary name written first: `why` names it), is
    one the file system can name; else one `error` naming the argument and the length, where the first
    call to meet ENAMETOOLONG raised a bare OSError. Asked of the system (lstat): limits differ between
    file systems."""
    full = os.fspath(path) + suffix
    try:
        os.lstat(full)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            longest = max(len(os.fsencode(part)) for part in Path(full).parts)
            raise error(f"{name} is too long for the file system ({len(os.fsencode(full))} bytes, its longest name "
                        f"{longest} bytes{f', with {why or suffix}' if suffix else ''}): "
                        f"{show(os.fspath(path), 60)}") from None


def edit_hook(name: str, edit) -> None:
    """None, or a function that can be called as edit(i, h, x): a wrong signature is named here, before
    any work, not as a TypeError from inside the forward pass. (A callable whose signature Python cannot
    read, a builtin, is let through.)"""
    if edit is None:
        return
    if not callable(edit):
        raise InputError(f"{name} must be None or a function edit(i, h, x) -> h, got {type(edit).__name__}")
    try:
        signature = inspect.signature(edit)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(0, None, None)
    except TypeError:
        raise InputError(f"{name} must be a function edit(i, h, x) -> h, called with 3 arguments (the layer, the "
                         f"residual stream, the input), got {getattr(edit, '__qualname__', type(edit).__name__)}"
                         f"{signature}") from None


def new_file(path) -> int:
    """A file descriptor, open for writing, of a file created at `path` by this call: O_EXCL fails on
    anything already there and O_NOFOLLOW on a symbolic link, so no existing file is ever written
    through (a stale file, a link to the weights being read, a hard link to another file).
    Every file minielm writes is first made here, then renamed over the path asked for."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)


def instance(name: str, value, kind: type, hint: str) -> None:
    """`value` is a `kind` (e.g. the Model from minielm.load); `hint` says where one comes from."""
    if not isinstance(value, kind):
        raise InputError(f"{name} must be a {kind.__name__} ({hint}), got {type(value).__name__}")


def token_ids(value, vocab_size: int, max_positions: int, mismatch: str = "") -> list:
    """Token ids as a list of ints, each in [0, vocab_size), at least one and at most max_positions.

    Accepted: a list or tuple of ints (or numpy / 0-d torch integers), or a 1-D integer tensor or
    array. Refused: text and bytes (encode text with model.tokenizer.encode), booleans, floats, None.
    `mismatch` is appended to an out-of-vocabulary message when the tokenizer is known to disagree
    with the model, so that the message names the real culprit for ids that came from text.
    """
    if isinstance(value, str):
        raise InputError(f"ids must be token ids, got the text {show(value, 40)}: "
                         "encode it first with model.tokenizer.encode(text)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise InputError(f"ids must be token ids (a list of ints), got {type(value).__name__} "
                         f"{show(bytes(value), 40)}: bytes are not token ids")
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise InputError(f"ids must be token ids with values, got a tensor on the meta device (it holds no values, "
                         f"only the shape {tuple(value.shape)})")
    if isinstance(value, (torch.Tensor, np.ndarray)):
        integral = (not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool
                    if isinstance(value, torch.Tensor) else value.dtype.kind in "iu")
        if value.ndim != 1 or not integral:
            raise InputError(f"ids must be a 1-D sequence of integer token ids, got a {value.dtype} "
                             f"{type(value).__name__} of shape {tuple(value.shape)}")
        value = value.tolist()
    elif not isinstance(value, (list, tuple, range)):
        raise InputError(f"ids must be a list of token ids (ints), got {type(value).__name__} {show(value, 40)}")
    ids = [integer(f"ids[{t}]", i) if is_boolean(i) or not isinstance(i, int) else i
           for t, i in enumerate(value)]
    if not ids:
        raise InputError("ids is empty: expected at least one token id")
    for t, i in enumerate(ids):
        if not 0 <= i < vocab_size:
            error = TokenizerError if mismatch else InputError  # the culprit: the tokenizer, or the ids
            raise error(f"token id {i} at position {t} is outside the model's vocabulary [0, {vocab_size})"
                        f"{mismatch}")
    if len(ids) > max_positions:
        raise InputError(f"{len(ids)} tokens exceed max_position_embeddings={max_positions}")
    return ids


def is_boolean(value) -> bool:
    """Python, numpy and 0-d torch booleans: all of them would pass as 0 or 1 if let through."""
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def _real_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0 and not value.is_complex() \
        and value.dtype != torch.bool
