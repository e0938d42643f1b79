"""Matrix-free singular triplets of the equivalent linear map, by block Lanczos.

The stacked map A = [J_1 … J_T] (d × T·d), or one token's J_t (d × d), never
needs to be formed. Two products are enough, and each handles a block of b
vectors at the cost of about one pass over the layers:

    A V  = Σ_t J_t v_t   for b inputs v (T, d) at once: one frozen forward pass over a batch
    Aᵀ U = (uᵀ J_t)_t    for b rows u (d,) at once:     one reverse sweep carrying r = b rows

Block Golub–Kahan–Lanczos with full reorthogonalization grows orthonormal
bases U (p rows in R^d) and V (q rows in R^{T·d}) a block at a time, and keeps
M = U A Vᵀ (p × q), with A Vᵀ = Uᵀ M exactly. The SVD of the small M gives the
Ritz triplets (σ_i, u_i, v_i); then A v_i = σ_i u_i holds by construction, and
the residual ‖Aᵀu_i − σ_i v_i‖ is read off the newest block (see
`block_lanczos`). We stop when the top k residuals are below `tol`·σ_1: after
a few blocks of b = k + p rows for a spectrum that decays, against d sweep rows
for the dense operators, and with T·d·q numbers held instead of T·d².
A block of rows costs one sweep whatever b is, so its GEMMs are b times
taller: a better use of a GPU than b single-row sweeps. b = 1 is the classic
single-vector Golub–Kahan–Lanczos.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from . import checks
from .errors import InputError, NumericalError
from .interpret import align_signs
from .checkpoint import StreamedLayers
from .fast_sweep import fast_sweep
from .linear_map import checked_ids, target_values, traced
from .model import Model
from .progress import progress


# Rows a step for a streamed model on a CPU. Measured on Llama 3 8B's shape with 2 layers, T = 32, top 4 to
# 1e-12 (tools/bench_8b.py, busy 2-core CPU; tools/README.md): b = 1, 2, 4, 8 took 87, 61, 43, 32 steps of
# 1.48, 2.04, 2.83, 4.26 s: 129, 124, 122, 136 s in all. With 32 layers, top 4 to 1e-4 (idle): b = 2, 4, 8 took
# 30, 19, 14 steps: 589, about 607, 804 s.
STREAMED_CPU_BLOCK = 4


class FrozenProducts:
    """A and Aᵀ on blocks of vectors, for the frozen map of one prompt: the stacked [J_1 … J_T], or
    the columns of the chosen `positions` alone, [J_p for p in positions] (one token's J_t: [t]).

    Vectors are rows: an input-side block is (b, n), n = P·d (position-major, as in
    [J_1 … J_T]), P the number of positions; an output-side block is (b, d).
    """

    def __init__(self, model: Model, ids, positions: list | None = None):
        ids = checked_ids(model, ids)
        T, L = len(ids), model.config.num_hidden_layers
        self.model, self.d = model, model.config.hidden_size
        self.choose(positions, T)  # checked before the forward pass
        self.x, self.frozen, states, states0 = traced(model, ids)  # x (T, d)
        self.frozen_to_last = self.frozen.at_last_position()  # A V needs y_T only
        # y (d,), the affine part b (d,), and ∂y/∂h^L_T (d, d): the frozen final norm
        self.y, self.bias, self.out_jacobian = target_values(model, states, states0, L - 1, "output")

    def choose(self, positions: list | None, T: int) -> None:
        """Take the columns of `positions` (of a T-token prompt) alone, None: all; sets `positions` and n."""
        self.positions = None if positions is None else checks.positions("positions", positions, T)
        self.n = (T if positions is None else len(self.positions)) * self.d

    def restricted_to(self, positions: list | None) -> FrozenProducts:
        """The same frozen map (no new forward pass) with the columns of `positions` alone; None: all."""
        if positions is None:
            return self
        other = copy.copy(self)
        other.choose(positions, self.x.shape[0])
        return other

    def columns(self, rows):
        """Rows over every position (b, T, d) -> their chosen columns (b, n), as Aᵀ gives them."""
        return (rows if self.positions is None else rows[:, self.positions]).reshape(rows.shape[0], -1)

    @torch.no_grad()  # the products never need gradients: a streamed model's layers then share their cast buffers
    def apply(self, V):
        """A on each row of V (b, n) -> (b, d): one frozen forward pass over the batch of b inputs."""
        b, (T, d) = V.shape[0], self.x.shape
        if self.positions is None:
            x = V.view(b, T, d)  # (b, T, d): input v_t at every position
        else:
            x = V.new_zeros(b, T, d)
            x[:, self.positions] = V.view(b, -1, d)  # (b, T, d): the inputs at the chosen positions, zero elsewhere
        return self.model.forward(x, self.frozen_to_last)[0][:, -1] - self.bias  # (b, d): Σ_t J_t v_t

    @torch.no_grad()
    def apply_transposed(self, U):
        """Aᵀ on each row of U (b, d) -> (b, n): one reverse sweep carrying the b rows uᵀ ∂y/∂h^L_T."""
        L = self.model.config.num_hidden_layers
        G = fast_sweep(self.model, self.frozen, U @ self.out_jacobian, L - 1, "output")  # (T, b, d): uᵀ J_t
        return self.columns(G.transpose(0, 1))  # (b, n) from (b, T, d)


@dataclass
class Spectrum:
    """Top singular triplets from `block_lanczos`, with what it took to get them."""

    U: torch.Tensor  # (d, k) output side
    S: torch.Tensor  # (k,)
    V: torch.Tensor  # (n, k) input side; (P, d, k) from top_triplets
    residuals: torch.Tensor  # (k,): ‖Aᵀu_i − σ_i v_i‖ (A v_i − σ_i u_i is zero by construction)
    steps: int  # blocks: each one sweep and one frozen forward pass
    history: list  # the largest of the top k residuals ÷ σ_1 after each step (none before k Ritz values)


def block_lanczos(ops: FrozenProducts, k: int, block: int, tol: float, max_steps: int | None = None,
                  seed: int = 0, start: torch.Tensor | None = None) -> Spectrum:
    """Top-k singular triplets of A by block Golub–Kahan–Lanczos with full reorthogonalization.

    The first block V is `start`'s first b rows (r, n), completed by random rows where r < b; or b random
    rows. A start of rows Aᵀu already swept for other reasons (matrix_free.directional_checks) is the
    block of a left start u, at the cost of no product: the Krylov space is then Aᵀ·K(AAᵀ, u).

    Each step carries one block of b rows each way:
        A V_newᵀ   = Uᵀ Cᵀ + U_newᵀ Rᵀ     (expand on U; the rest gives the next left block)
        Aᵀ U_newᵀ  = Vᵀ Dᵀ + V_nextᵀ Sᵀ    (expand on V; the rest gives the next right block)
    M = U A Vᵀ grows by the column block [Cᵀ; Rᵀ]; the rows U_new get zeros under
    the old columns, since A already mapped those into the old U. With the SVD
    M = P Σ Qᵀ, u_i = Uᵀ P_i and v_i = Vᵀ Q_i:
        A v_i − σ_i u_i = 0,   Aᵀ u_i − σ_i v_i = V_nextᵀ Sᵀ P_i[U_new rows],
    so the residual is ‖Sᵀ P_i[U_new rows]‖, exact up to round-off. When a basis
    fills its space (p = d, or q = n for one token), A = Uᵀ M V and the residuals are 0.
    """
    d, n = ops.d, ops.n
    gen = torch.Generator(device="cpu").manual_seed(seed)
    given = ops.x.new_zeros(0, n) if start is None else start[:block]
    random = torch.randn(block - given.shape[0], n, generator=gen, dtype=ops.x.dtype).to(ops.x.device)
    start = torch.cat([given, random])  # (b, n)
    _, new_V, _ = extend(start.new_zeros(0, n), start, n, gen)  # b orthonormal rows
    U, V = start.new_zeros(0, d), new_V  # (p, d), (q, n)
    M = start.new_zeros(0, 0)  # (p, q'), q' = q − the newest block's rows
    max_steps = max_steps or -(-d // block) + 1  # the left basis fills R^d, and the residuals are then 0
    history = []  # the largest residual ÷ σ_1 after each step
    for step in progress(range(1, max_steps + 1), "Lanczos", unit="block"):
        p, q_old = U.shape[0], M.shape[1]
        C, new_U, R = extend(U, ops.apply(new_V), d - p, gen)  # (b, p), (b1, d), (b, b1)
        M = torch.block_diag(M, R.T)  # (p + b1, q): M, and Rᵀ under the new columns
        M[:p, q_old:] = C.T
        U = torch.cat([U, new_U])
        if new_U.shape[0] > 0:
            _, new_V, S = extend(V, ops.apply_transposed(new_U), n - V.shape[0], gen)  # (b2, n), (b1, b2)
        else:
            new_V, S = V.new_zeros(0, n), V.new_zeros(0, 0)
        P, sigma, Qh = torch.linalg.svd(M, full_matrices=False)  # the Ritz values σ, and P (p, ·), Qh (·, q)
        if sigma.shape[0] >= k:
            residuals = torch.linalg.vector_norm(S.T @ P[p:, :k], dim=0)  # (k,): ‖Sᵀ P_i[U_new rows]‖
            history.append(float(residuals.max() / sigma[0]) if sigma[0] > 0 else 0.0)
            if history[-1] <= tol:
                return Spectrum(U.T @ P[:, :k], sigma[:k], V.T @ Qh[:k].T, residuals, step, history)
        V = torch.cat([V, new_V])
    left = f" (largest residual {history[-1]:.1e} of σ_1)" if history else ""
    raise NumericalError(f"top {k} singular triplets not converged to tol={tol:g} in {max_steps} steps "
                         f"of {block} rows{left}")


def extend(basis, W, room: int, gen: torch.Generator):
    """The rows of W (b, n) as C·basis + R·new on the orthonormal rows `basis` (m, n).

    Returns C (b, m), `new` (min(b, room) orthonormal rows, orthogonal to `basis`,
    spanning what is left of W) and R (b, b'). The projection is done twice ("twice
    is enough"); the SVD orders the new rows by how much of the rest they carry, so a
    basis near the end of its space keeps the right ones. Where the rest has lower
    rank than b (repeated singular values, an invariant subspace), the SVD's other rows
    are round-off and need not be orthogonal to `basis`: they are replaced by random
    rows made orthogonal to everything kept, which carry none of W (R ≈ 0 there).
    """
    C = W @ basis.T  # (b, m)
    rest = W - C @ basis  # (b, n)
    again = rest @ basis.T  # what round-off left along the basis
    rest, C = rest - again @ basis, C + again
    _, s, Vh = torch.linalg.svd(rest, full_matrices=False)  # (min(b, n), n): orthonormal rows
    want = min(W.shape[0], room)
    rank = int((s > torch.finfo(W.dtype).eps * max(W.shape) * torch.linalg.matrix_norm(W)).sum())  # numerical rank
    new = Vh[: min(rank, want)]
    while new.shape[0] < want:
        z = torch.randn(1, W.shape[1], generator=gen, dtype=W.dtype).to(W.device)
        for _ in range(2):
            held = torch.cat([basis, new])
            z = z - (z @ held.T) @ held
        new = torch.cat([new, z / torch.linalg.vector_norm(z)])
    return C, new, rest @ new.T


def singular_vectors(model: Model, ids, k: int = 4, token: int | None = None, tol: float | None = None,
                     max_steps: int | None = None, seed: int = 0, block: int | None = None,
                     positions=None):
    """Top-k singular triplets of [J_1 … J_T] (or of J_token), without forming the operators.

    `positions` (a list of positions, e.g. range(1, T) to leave out the first token, an attention
    sink) takes the chosen columns alone, [J_p for p in positions]: the map of those inputs, the
    others held at zero. `token=t` is one position, [t].

    Block Lanczos with `block` rows per sweep (1 is single-vector Lanczos), stopped
    when every residual ‖Aᵀu_i − σ_i v_i‖ is below tol·σ_1 (default 1e-12 in float64,
    100 ε = 1.2e-5 in float32); `max_steps` blocks at most (NumericalError if that is
    not enough). The model must compute in float32 or float64 (the small SVDs). The default is k + 4 rows on a GPU
    and 1 on a CPU: a CPU already runs the one-row products (GEMMs with T rows) near
    its matmul rate, so b rows cost about b times one, and one row at a time needs
    the fewest rows in all (tools/bench_spectra.py measures both). A streamed model on a
    CPU takes STREAMED_CPU_BLOCK rows: each step also casts every layer twice (the pass up,
    the sweep down), whatever b is, and a block of rows shares that cost (tools/bench_8b.py).
    Returns (U, S, V): U (d, k), S (k,), V (T, d, k) — (P, d, k) for P positions, (d, k) for one
    token — with each pair's sign chosen so that u_k · y ≥ 0.
    """
    T = len(checked_ids(model, ids))
    if model.dtype not in (torch.float32, torch.float64):
        raise InputError(f"singular triplets need a float32 or float64 model, not {model.dtype}: "
                         f"load it with dtype=torch.float64")
    d = model.config.hidden_size
    k = checks.integer("k", k, 1, d, closed=True, why="at most hidden_size singular triplets")
    tol = max(1e-12, 100 * torch.finfo(model.dtype).eps) if tol is None else checks.real("tol", tol, 0, low_open=True)
    seed = checks.integer("seed", seed, 0, checks.SEED_LIMIT, why="a torch generator seed")
    if block is None:
        block = default_block(model, k)
    block = checks.integer("block", block, 1, why="rows per sweep")
    max_steps = checks.optional_integer("max_steps", max_steps, -(-k // block), why=f"at least k / block blocks of {block} rows")
    token = checks.optional_integer("token", token, -T, T, why=f"a position in the {T}-token prompt")
    if token is not None and positions is not None:
        raise InputError("token and positions both given: token=t is positions=[t] (V then (d, k))")
    ops = FrozenProducts(model, ids, [token] if token is not None else positions)
    found = top_triplets(ops, k, block, tol, max_steps, seed)
    return found.U, found.S, found.V[0] if token is not None else found.V  # V (d, k) for one token


def default_block(model: Model, k: int) -> int:
    """Rows per Lanczos step when the caller does not say: k + 4 on a GPU; on a CPU STREAMED_CPU_BLOCK for a
    streamed model, else 1 (see singular_vectors)."""
    if model.device.type == "cuda":
        return k + 4
    return STREAMED_CPU_BLOCK if isinstance(model.weights["layers"], StreamedLayers) else 1


def top_triplets(ops: FrozenProducts, k: int, block: int, tol: float, max_steps: int | None = None,
                 seed: int = 0, start: torch.Tensor | None = None) -> Spectrum:
    """`block_lanczos`'s triplets with V as (P, d, k), P the positions of `ops` (T unless chosen), and each
    pair's sign chosen so that u_k · y ≥ 0."""
    found = block_lanczos(ops, k, min(block, ops.d), tol, max_steps, seed, start)
    found.U, found.V = align_signs(found.U, found.V.reshape(-1, ops.d, k), ops.y)
    return found
