"""Many processes, one map: the d output rows split over the ranks of torch.distributed.

    torchrun --nproc-per-node 2 script.py     # in script.py:
        torch.distributed.init_process_group("gloo")             # "nccl" on GPUs, one per rank
        elm = minielm.equivalent_linear_map(model, ids, distributed=True)

Every rank runs the same forward pass, so it holds the same frozen factors; rank k
sweeps rows [k·n, (k+1)·n) of every J_t, n = ceil(d / ranks). Without `out=`, rank 0
receives the other ranks' rows and returns the whole map on its device, where it must
fit (the others return None); with `out=`, every rank writes its own rows into the one
file and all return it: the way for a map larger than one device.
Opting in with `distributed=True`, rather than splitting whenever a process group
exists, keeps a data-parallel job (each rank its own prompt) from being split by
accident; the prompt and the target are checked to be the same on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import tempfile

import torch

from . import checks
from .errors import InputError

# What torchrun sets and init_process_group reads ("env://"), and minielm's own bound on the wait for the
# other ranks: torch's default (30 minutes for gloo, 10 for nccl) reads as a hang to someone who started
# one process by hand, and 5 minutes is still ample for ranks started together.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VARIABLE = "MINIELM_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def environment_integer(name: str, low: int, high: int | None = None, closed: bool = False, why: str = "",
                        default: str | None = None) -> int:
    """The environment variable `name` as an integer in [low, high) ([low, high] when `closed`): an
    InputError naming the variable otherwise."""
    text = os.environ.get(name, default)
    what = f"--distributed: the environment variable {name}"
    try:
        value = int(text.strip())
    except ValueError:
        value = text  # not a number: checks.integer names it as it was given
    return checks.integer(what, value, low, high, closed, why)


def check_environment() -> dict:
    """torchrun's variables, checked before any work: set, integers where they must be, RANK in
    [0, WORLD_SIZE), a port in 1..65535, an address that resolves, and minielm's timeout. Set by hand and
    wrong, they were internal errors from int(), or a wait without end in init_process_group."""
    unset = [k for k in TORCHRUN_VARIABLES if k not in os.environ]
    if unset:
        raise InputError(f"--distributed runs under torchrun ({' and '.join(unset)} not set): "
                         "torchrun --nproc-per-node N -m minielm.cli operators ... --distributed")
    size = environment_integer("WORLD_SIZE", 1, why="the number of ranks")
    rank = environment_integer("RANK", 0, size, why=f"below WORLD_SIZE={size}")
    port = environment_integer("MASTER_PORT", 1, 65535, closed=True, why="a TCP port")
    address = os.environ["MASTER_ADDR"]
    try:
        socket.getaddrinfo(address, port)
    except (OSError, UnicodeError) as err:
        raise InputError(f"--distributed: the environment variable MASTER_ADDR={address!r} cannot be resolved "
                         f"({getattr(err, 'strerror', None) or err})") from None
    timeout = environment_integer(TIMEOUT_VARIABLE, 1, why="seconds to wait for the other ranks",
                                  default=str(DEFAULT_TIMEOUT_S))
    return {"RANK": rank, "WORLD_SIZE": size, "MASTER_ADDR": address, "MASTER_PORT": port, TIMEOUT_VARIABLE: timeout}


@contextlib.contextmanager
def native_stderr_held():
    """File descriptor 2 sent to a temporary file inside the block, and shown afterwards only if the block
    succeeded: torch's C++ rendezvous logs every failed retry (tens of lines, with stack frames) there,
    which would bury the one-line error that replaces them."""
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        os.write(2, held.read())


def init_process_group(backend: str) -> None:
    """torch.distributed.init_process_group with the variables checked and a bounded wait: a rank whose
    peers never come is an InputError naming the variables, after MINIELM_DISTRIBUTED_TIMEOUT seconds."""
    variables = check_environment()
    timeout = variables[TIMEOUT_VARIABLE]
    try:
        with native_stderr_held():
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except torch.distributed.DistError as err:
        first_line = " ".join(str(err).split("\n")[0].split()).rstrip(".")
        shown = ", ".join(f"{k}={v}" for k, v in variables.items())
        raise InputError(f"--distributed: the {variables['WORLD_SIZE']} ranks did not meet within the time allowed "
                         f"({shown}): {first_line}; start every rank, with torchrun --nproc-per-node N, or "
                         f"raise {TIMEOUT_VARIABLE}") from None


def rank_and_size(distributed: bool) -> tuple[int, int]:
    """(rank, number of ranks): (0, 1) unless distributed."""
    if not distributed:
        return 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise InputError("distributed=True needs torch.distributed.init_process_group() first (run under torchrun)")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def rows_of(rank: int, ranks: int, d: int) -> slice:
    """The output rows rank `rank` sweeps: [k·n, (k+1)·n) ∩ [0, d), n = ceil(d / ranks)."""
    n = -(-d // ranks)
    return slice(min(rank * n, d), min((rank + 1) * n, d))


def check_same_prompt(ids: list, target: tuple, device) -> None:
    """An InputError on every rank unless all ranks were given the same token ids and the same
    `target` (integers: the layer, the component, the model's shape and dtype)."""
    fingerprint = torch.tensor([len(ids), hash(tuple(ids)), *target], dtype=torch.int64, device=device)
    low, high = fingerprint.clone(), fingerprint.clone()
    torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
    if not torch.equal(low[:2], high[:2]):
        raise InputError("distributed=True: the ranks were given different prompts; every rank needs the same ids")
    if not torch.equal(low, high):  # rows of different maps would be put together as one
        raise InputError("distributed=True: the ranks were given different targets (layer, component) or models "
                         "of another shape or dtype; every rank needs the same")


def gather_rows(G, d: int, rank: int, ranks: int):
    """Rank 0: the whole (T, d, d) from every rank's rows G (T, r_k, d); the other ranks: None."""
    if rank != 0:
        if G.shape[1]:
            torch.distributed.send(G.contiguous(), dst=0)
        return None
    T = G.shape[0]
    whole = G.new_empty(T, d, d)
    whole[:, rows_of(0, ranks, d)] = G
    for k in range(1, ranks):
        rows = rows_of(k, ranks, d)
        if rows.stop > rows.start:
            block = G.new_empty(T, rows.stop - rows.start, d)
            torch.distributed.recv(block, src=k)
            whole[:, rows] = block
    return whole


def barrier(distributed: bool) -> None:
    if distributed:
        torch.distributed.barrier()


def on_every_rank(distributed: bool, ok: bool, device) -> bool:
    """Whether `ok` holds on every rank (each waits here for the others, as at a barrier)."""
    if not distributed:
        return ok
    flag = torch.tensor([int(ok)], device=device)
    torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MIN)
    return bool(flag)
