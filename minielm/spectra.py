"""Matrix-free singular triplets of the equivalent linear map, for long prompts.

The stacked map A = [J_1 … J_T] (d × T·d) never needs to be formed. Two
products are enough, and each costs about one forward pass:

    A v  = Σ_t J_t v_t      the frozen forward pass run on v (T, d), minus its value at 0
    Aᵀ u = (uᵀ J_t)_t       one reverse sweep carrying the single row uᵀ (r = 1)

Golub–Kahan–Lanczos bidiagonalization with full reorthogonalization builds
orthonormal U (d × m) and V (T·d × m) with A V = U B, B upper bidiagonal; the
SVD of the small B gives the Ritz triplets. We stop when the top k have
residuals ‖Aᵀu_i − σ_i v_i‖ below `tol`·σ_1, after m ≪ d steps for a spectrum
that decays. Cost: m·(forward + sweep) against d sweep rows for the dense
operators, and memory (T·d·m) instead of T·d².
"""

from __future__ import annotations

import torch

from .errors import InputError
from .interpret import align_signs
from .linear_map import pull_back, trace
from .model import Model
from .progress import progress


class FrozenProducts:
    """v -> A v and u -> Aᵀ u for the frozen map of one prompt (optionally one token's J_t)."""

    def __init__(self, model: Model, ids, token: int | None = None):
        ids = model.check_ids(ids)
        self.model, self.token = model, token
        self.x = model.embed(ids)  # (T, d)
        T = self.x.shape[0]
        if token is not None and not (isinstance(token, int) and -T <= token < T):
            raise InputError(f"token must be a position in [0, {T}), got {token!r}")
        self.residual, _, _, self.frozen = trace(model, self.x)
        self.offset = self._forward(torch.zeros_like(self.x))  # the affine part b
        final_w = model.weights["final_norm"]
        self.y = model.norm(self.residual[-1][-1], final_w, self.frozen.final_norm[-1])[0]  # (d,)
        self.out_scale = (model.config.norm_offset + final_w) * self.frozen.final_norm[-1]  # ∂y/∂h^L_T, diagonal

    def _forward(self, v):
        return self.model.forward(v, self.frozen)[0][-1]

    def matvec(self, v):
        """A v: v (T, d) -> (d,); for one token, v (d,) placed at that position."""
        if self.token is not None:
            full = torch.zeros_like(self.x)
            full[self.token] = v
            v = full
        return self._forward(v) - self.offset

    def rmatvec(self, u):
        """Aᵀ u: u (d,) -> (T, d), or (d,) for one token."""
        L = self.model.config.num_hidden_layers
        G = pull_back(self.model, self.frozen, (u * self.out_scale)[None, :], L - 1, "output")[:, 0, :]
        return G if self.token is None else G[self.token]


def singular_vectors(model: Model, ids, k: int = 4, token: int | None = None, tol: float = 1e-12,
                     max_steps: int | None = None, seed: int = 0):
    """Top-k singular triplets of [J_1 … J_T] (or of J_token), without forming the operators.

    Returns (U, S, V): U (d, k), S (k,), V (T, d, k) — or (d, k) for one token —
    with each pair's sign chosen so that u_k · y ≥ 0.
    """
    ops = FrozenProducts(model, ids, token)
    d = ops.x.shape[1]
    if not (isinstance(k, int) and 1 <= k <= d):
        raise InputError(f"k must be an integer in [1, {d}], got {k!r}")
    shape = ops.x.shape if token is None else ops.x.shape[1:]
    max_steps = min(max_steps or d, d)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=ops.x.dtype).to(ops.x.device)
    Vs, Us, alphas, betas = [v / torch.linalg.vector_norm(v)], [], [], []
    for step in progress(range(max_steps), "Lanczos", unit="step"):
        u = ops.matvec(Vs[-1])
        if Us:
            u = u - betas[-1] * Us[-1]
        u = reorthogonalize(u, Us)
        alphas.append(torch.linalg.vector_norm(u))
        Us.append(u / alphas[-1])
        v = reorthogonalize(ops.rmatvec(Us[-1]) - alphas[-1] * Vs[-1], Vs)
        betas.append(torch.linalg.vector_norm(v))
        Vs.append(v / betas[-1])
        if step + 1 >= k and ((step + 1) % 4 == 0 or step + 1 == max_steps):
            P, S, Qh = torch.linalg.svd(bidiagonal(alphas, betas[:-1]))
            residuals = betas[-1] * P[-1, :k].abs()
            if bool((residuals <= tol * S[0]).all()) or step + 1 == max_steps:
                break
    U = torch.stack(Us, -1) @ P[:, :k]  # (d, k)
    V = torch.stack(Vs[:-1], -1) @ Qh[:k].T  # (T, d, k) or (d, k)
    U, V = align_signs(U, V, ops.y)
    return U, S[:k], V


def reorthogonalize(w, basis):
    """w minus its components along an orthonormal basis, twice (Gram–Schmidt, "twice is enough")."""
    for _ in range(2):
        for b in basis:
            w = w - (b * w).sum() * b
    return w


def bidiagonal(alphas, betas):
    """The m × m upper bidiagonal matrix with diagonal α and superdiagonal β."""
    B = torch.diag(torch.stack(alphas))
    if betas:
        B = B + torch.diag(torch.stack(betas), 1)
    return B
