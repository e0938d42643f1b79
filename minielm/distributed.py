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

import torch

from .errors import InputError


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
