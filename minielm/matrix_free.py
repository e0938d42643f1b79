"""The explanation of one prompt without its operators: what `explain` computes when they are too big.

The dense route assembles every J_t (T · d² numbers, one sweep of d rows) and reads
everything off them. For an 8B model at T = 32 that is 0.75 PFLOP: hours on a CPU.
Most of what `explain` shows needs far less, because the map is known through two
products (minielm/spectra.py, `FrozenProducts`):

    A v  = Σ_t J_t v_t       one frozen forward pass
    uᵀA  = (uᵀ J_t)_t        one reverse sweep of one row

and each row of the sweep gives, for its direction u, every token's uᵀ J_t at once:

    exactness along u:   Σ_t (uᵀJ_t) x_t + uᵀb = uᵀy          (u = y/‖y‖ and a few random u)
    the shares of y:     (J_t x_t)·y / ‖y‖² = (ŷᵀJ_t) x_t / ‖y‖,  ŷ = y/‖y‖
    the reconstruction:  A x + b = y                            (one frozen forward pass at x)
    autograd along u:    uᵀJ_t = ∂(uᵀy)/∂x_t, one backward pass (where the weights are held)

The top singular triplets of [J_1 … J_T] come from block Lanczos on the same products, started
from the rows the exactness sweep made (their Aᵀu cost nothing more).
Per-token figures that need each whole J_t (σ1, stable rank) are not computed here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .checkpoint import StreamedLayers
from .cost import Shape, assembly_bytes, assembly_flops
from .model import Model
from .spectra import FrozenProducts

# Above these many flops (the sweep of d rows that assembles the T operators, the dense SVD
# beside it) `explain` takes the matrix-free route: about 10 minutes at a 2-core CPU's float64
# matmul rate (tools/README.md), and about a minute on one data-centre GPU.
DENSE_FLOP_LIMIT = {"cpu": 5e13, "cuda": 5e15}
DENSE_MEMORY_SHARE = 0.25  # ... or when the operators would take more than this share of the memory

RANDOM_DIRECTIONS = 3  # besides ŷ, for the exactness along u

# The matrix-free spectrum stops when every residual ‖Aᵀu_i − σ_i v_i‖ is below DISPLAY_TOL·σ_1
# (A v_i = σ_i u_i holds to round-off by construction). Each σ_i is then within DISPLAY_TOL·σ_1 of a
# singular value of A, and each pair's direction within DISPLAY_TOL·σ_1 / gap of the true one: a
# hundredth of a percent of σ_1, enough to decode the vectors. On Llama 3 8B's shape (random weights,
# a flat spectrum; tools/README.md) the top 4 took 19 steps of 4 rows to 1e-4, 21 to 1e-5, 23 to 1e-6.
DISPLAY_TOL = 1e-4


def dense_cost(model: Model, T: int) -> tuple[float, int]:
    """(flops, bytes) of the dense route for T tokens: assembling the operators and the SVD of
    [J_1 … J_T] (about 4·T·d³ + 22·d³ for the SVD of a T·d × d matrix)."""
    s, d = Shape.of(model.config), model.config.hidden_size
    return assembly_flops(s, T) + 4 * T * d ** 3 + 22 * d ** 3, assembly_bytes(s, T, model.dtype.itemsize)["operators"]


def dense_is_too_big(model: Model, T: int) -> str | None:
    """Why the dense operators are too big to assemble here (None if they are not): the flops over
    DENSE_FLOP_LIMIT for the model's device, or the bytes over DENSE_MEMORY_SHARE of the memory."""
    flops, nbytes = dense_cost(model, T)
    limit = DENSE_FLOP_LIMIT.get(model.device.type, DENSE_FLOP_LIMIT["cpu"])
    if flops > limit:
        return f"the {T} dense operators would take {flops / 1e12:,.0f} TFLOP (the bound is {limit / 1e12:,.0f})"
    memory = physical_memory()
    if memory and nbytes > DENSE_MEMORY_SHARE * memory:
        return (f"the {T} dense operators would take {nbytes / 2**30:.1f} GiB, more than "
                f"{DENSE_MEMORY_SHARE:.0%} of this machine's {memory / 2**30:.0f} GiB")
    return None


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Directional:
    """What the sweep of a few rows u says about the map, without the operators."""

    directions: torch.Tensor  # (r, d): unit rows u, the first ŷ = y/‖y‖
    rows: torch.Tensor  # (r, T, d): uᵀ J_t
    errors: torch.Tensor  # (r,): |Σ_t (uᵀJ_t) x_t + uᵀb − uᵀy| / ‖y‖
    shares: torch.Tensor  # (T,): (J_t x_t)·y / ‖y‖²
    bias_share: float  # b·y / ‖y‖²
    reconstruction_error: float  # ‖A x + b − y‖ / ‖y‖, A x by the frozen forward pass
    reconstruction: torch.Tensor  # (d,): A x + b


def directional_checks(ops: FrozenProducts, random_directions: int = RANDOM_DIRECTIONS, seed: int = 0) -> Directional:
    """One sweep of 1 + `random_directions` rows and one frozen forward pass: the exactness of the map
    along ŷ and random unit directions, each token's share of y, and the reconstruction A x + b."""
    y, x, b = ops.y, ops.x, ops.bias  # (d,), (T, d), (d,)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    random = torch.randn(random_directions, ops.d, generator=gen, dtype=y.dtype).to(y.device)  # (r − 1, d)
    U = torch.cat([y[None], random])
    U = U / torch.linalg.vector_norm(U, dim=1, keepdim=True)  # (r, d) unit rows, ŷ first
    rows = ops.apply_transposed(U).view(U.shape[0], *x.shape)  # (r, T, d): uᵀ J_t
    parts = torch.einsum("rtd,td->rt", rows, x)  # (r, T): (uᵀJ_t) x_t
    norm_y = torch.linalg.vector_norm(y)
    errors = (parts.sum(dim=1) + U @ b - U @ y).abs() / norm_y  # (r,)
    reconstruction = ops.apply(x.reshape(1, -1))[0] + b  # (d,): Σ_t J_t x_t + b, frozen forward pass
    return Directional(U, rows, errors, parts[0] / norm_y, float(U[0] @ b / norm_y),
                       float(torch.linalg.vector_norm(reconstruction - y) / norm_y), reconstruction)


def autograd_row(ops: FrozenProducts, u: torch.Tensor) -> torch.Tensor:
    """uᵀ J_t for every t, (T, d), by autograd: the gradient of u·y with respect to x through the
    frozen forward pass (only the linear path carries gradient): an independent check of one
    sweep row. It holds every layer's weights for the backward pass."""
    x = ops.x.detach().clone().requires_grad_(True)
    y = ops.model.forward(x, ops.frozen_to_last)[0][-1]  # (d,)
    (grad,) = torch.autograd.grad(y @ u, x)
    return grad


def autograd_fits(model: Model) -> str | None:
    """Why the autograd row is skipped (None if it is not): a streamed model would have to hold every
    layer's weights in the compute dtype at once for the backward pass."""
    if not isinstance(model.weights["layers"], StreamedLayers):
        return None
    s = Shape.of(model.config)
    return (f"skipped: the model is streamed, and the backward pass would hold all its layers "
            f"({s.L * s.layer_params * model.dtype.itemsize / 2**30:.0f} GiB in {str(model.dtype).removeprefix('torch.')})")
