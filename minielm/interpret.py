"""Reading the operators: singular values, decoded singular vectors, stable rank, shares.

For an operator J (d × d, or the stacked d × T·d map [J_1 … J_T]):

- the left (output-side) singular vectors u_k live where y lives, so they are
  decoded through the unembedding: the tokens with the largest W_U u_k. A
  singular pair is defined up to a joint sign; we choose the sign with u_k · y ≥ 0
  so that "top tokens" means tokens the operator pushes the output towards;
- the right (input-side) singular vectors v_k live where the inputs x_t live, so
  they are decoded by cosine similarity with the embedding rows;
- the stable rank ‖J‖_F² / σ_1² counts how many directions carry the operator.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch

from . import checks
from .layer_maps import all_layer_maps
from .linear_map import EquivalentLinearMap, checked_ids
from .model import Model, on_device, times_transposed
from .progress import progress


def svd_ready(J: torch.Tensor) -> torch.Tensor:
    """linalg's SVD kernels take float32 and float64 only: bfloat16/float16 are upcast (exactly) to float32."""
    return J if J.dtype in (torch.float32, torch.float64) else J.float()  # lower precision on purpose: an exact upcast


def stable_rank(J: torch.Tensor, sigma1: torch.Tensor | None = None) -> torch.Tensor:
    """‖J‖_F² / σ_1² of each matrix in a stack (..., m, n) -> (...); 0 for a zero matrix (no directions).
    `sigma1` (...), each matrix's largest singular value, where the caller has it already."""
    J = svd_ready(checks.matrices("J", J))
    if sigma1 is None:
        sigma1 = torch.linalg.matrix_norm(J, ord=2)  # (...)
    return ratio_or_zero(torch.linalg.matrix_norm(J) ** 2, sigma1 ** 2)


def ratio_or_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b elementwise, 0 where b is 0 (a stable rank of a zero operator, e.g. a token outside every
    sliding window, is 0, not 0/0 = NaN)."""
    return torch.where(b > 0, a / torch.where(b > 0, b, 1), 0)


def stacked(operators: torch.Tensor) -> torch.Tensor:
    """[J_1 … J_T]: (T, d, d) -> (d, T·d)."""
    T, d, _ = operators.shape
    return operators.permute(1, 0, 2).reshape(d, T * d)


@dataclass
class Singular:
    """Top-k singular triplets of the stacked map, signs aligned with the output y."""

    U: torch.Tensor  # (d, k) output side
    S: torch.Tensor  # (k,)
    V: torch.Tensor  # (T, d, k) input side, one d-block per token (per chosen position)


def align_signs(U, V, y):
    """Flip each pair (u_k, v_k) so that u_k · y ≥ 0. U is (d, k), or a stack (..., d, k) of them (one
    per token), V (..., k) with k last, the same stack in front for a stack of U."""
    one = U.new_ones(())  # in U's dtype: a -1.0/1.0 literal would make the signs float32 first
    signs = torch.where(y @ U < 0, -one, one).unsqueeze(-2)  # (..., 1, k)
    return U * signs, V * signs


def stacked_svd(elm: EquivalentLinearMap, k: int = 5, positions: list | None = None) -> Singular:
    """Dense SVD of [J_1 … J_T] (d × T·d), top k; of [J_p for p in positions] (d × P·d) when given,
    and V is then (P, d, k), block i for position positions[i]."""
    checks.instance("elm", elm, EquivalentLinearMap, "from minielm.equivalent_linear_map")
    T, d, _ = elm.operators.shape
    k = checks.integer("k", k, 1, d, closed=True, why="[J_1 … J_T] has hidden_size singular values")
    operators = elm.operators if positions is None else elm.operators[checks.positions("positions", positions, T)]
    # SVD of the tall Aᵀ = V S Uᵀ (P·d × d): LAPACK is several times faster on it than on the wide A
    V, S, Uh = torch.linalg.svd(svd_ready(stacked(operators)).T, full_matrices=False)
    U, S, V = (t.to(elm.operators.dtype) for t in (Uh.T, S, V))
    k = min(k, S.shape[0])
    V = V[:, :k].reshape(operators.shape[0], d, k)
    U, V = align_signs(U[:, :k], V, elm.output)
    return Singular(U, S[:k], V)


def decode_output(model, u: torch.Tensor, n: int = 5) -> list:
    """The n tokens whose unembedding rows point most along u (d,): [(token, score)]."""
    check_decoding(model, "u", u, n)
    return decode_outputs(model, u[:, None], n)[0]


def decode_input(model, v: torch.Tensor, n: int = 5) -> list:
    """The n embedding rows most cosine-similar to v (d,): [(token, cosine)]."""
    check_decoding(model, "v", v, n)
    return decode_inputs(model, v[:, None], n)[0]


def decode_outputs(model, U: torch.Tensor, n: int = 5) -> list:
    """decode_output of each column of U (d, m), reading the unembedding (V × d) once for all m: a
    large vocabulary's W_U is read from memory at about the cost of one product with it."""
    scores = times_transposed(U.T, model.weights["lm_head"])  # (m, V): W_U u_j
    return top_tokens(model, scores, n)


def decode_inputs(model, V: torch.Tensor, n: int = 5) -> list:
    """decode_input of each column of V (d, m), reading the embeddings (V × d) once for all m."""
    norms = embedding_norms(model)[None, :] * torch.linalg.vector_norm(V, dim=0)[:, None]  # (m, V): ‖E_i‖ ‖v_j‖
    norms = norms.clamp_min(torch.finfo(norms.dtype).tiny)  # never 0 (1e-300 is 0 in float32): cosine 0, not NaN
    return top_tokens(model, times_transposed(V.T, model.weights["embed"]) / norms, n)  # (m, V): cosines


def top_tokens(model, scores: torch.Tensor, n: int) -> list:
    """For each row of scores (m, V): its n largest [(token, score)], largest first."""
    top = torch.topk(scores, n, dim=1)
    return [[(model_token(model, i), float(s)) for s, i in zip(values, indices)]
            for values, indices in zip(top.values, top.indices)]


def check_decoding(model, name, vector, n):
    """A model, a vector (d,) in its hidden space, and a count n of tokens it has."""
    checks.instance("model", model, Model, "from minielm.load")
    checks.vector(name, vector, model.config.hidden_size)
    checks.integer("n", n, 1, model.config.vocab_size, closed=True, why="the vocabulary size")


def embedding_norms(model, chunk=16384) -> torch.Tensor:
    """‖E_i‖ for every embedding row (V,), in the compute dtype, a block of rows at a time."""
    E = model.weights["embed"]
    return torch.cat([torch.linalg.vector_norm(on_device(E[i:i + chunk], model.device, model.dtype), dim=1)
                      for i in range(0, E.shape[0], chunk)])


def model_token(model, i) -> str:
    """A readable piece for token id i ('#i' when the model has no tokenizer)."""
    try:
        return model.tokenizer.token(int(i))
    except Exception:
        return f"#{int(i)}"


LEFT_TO_RIGHT_MARK = "\u200e"


def printable(text: str) -> str:
    """`text` for a row of a text table: what the terminal would act on rather than show (newlines, tabs,
    escape sequences, bidirectional controls such as U+202E) escaped as repr escapes it ('\\n', '\\x1b',
    '\\u202e'); text with right-to-left letters (Hebrew, Arabic) is followed by a left-to-right mark, so the
    columns after it stay in their order."""
    shown = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))
    if any(unicodedata.bidirectional(c) in ("R", "AL") for c in shown):
        shown += LEFT_TO_RIGHT_MARK
    return shown


def width(text: str) -> int:
    """Terminal columns of printable text: 2 for a wide (CJK) character, 0 for a combining or zero-width one."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) == "Cf"
               else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def cell(text: str, columns: int) -> str:
    """printable(text) in exactly `columns` terminal columns: cut with an ellipsis when longer, padded with
    spaces when shorter."""
    shown = printable(text)
    if width(shown) > columns:
        mark = LEFT_TO_RIGHT_MARK if shown.endswith(LEFT_TO_RIGHT_MARK) else ""
        kept = ""
        for c in shown.removesuffix(mark):
            if width(kept + c) > columns - 1:
                break
            kept += c
        shown = kept + "…" + mark
    return shown + " " * (columns - width(shown))


def token_shares(elm: EquivalentLinearMap) -> torch.Tensor:
    """(J_t x_t) · y / ‖y‖² for each t: (T,). With the bias's share, they sum to 1 (to round-off)."""
    checks.instance("elm", elm, EquivalentLinearMap, "from minielm.equivalent_linear_map")
    parts = torch.einsum("tij,tj->ti", elm.operators, elm.inputs)  # (T, d)
    return parts @ elm.output / (elm.output @ elm.output)


# The order in which the targets of a layer are computed, and in which every report lists them:
# layer ℓ's attention module, its MLP module, then the residual stream after layer ℓ ('layer ℓ').
COMPONENTS = ("attention", "mlp", "output")


def forward_order(key) -> tuple:
    """Sort key for (layer, component): layer by layer, each in the order of COMPONENTS."""
    layer, component = key
    return layer, COMPONENTS.index(component)


def layer_table(model, ids, k: int = 3) -> list:
    """For every layer output (final norm applied) and every attention and MLP module, in
    forward order: the stacked operator's top singular values, stable rank, reconstruction
    error, and the top output-side vector decoded through the unembedding. One pass for the maps."""
    checked_ids(model, ids)
    k = checks.integer("k", k, 1, model.config.hidden_size, closed=True, why="at most hidden_size singular values")
    rows = []
    maps = all_layer_maps(model, ids)
    for layer, component in progress(sorted(maps, key=forward_order), "spectra", unit="target"):
        elm = maps[(layer, component)]
        svd = stacked_svd(elm, k)
        rows.append({
            "layer": layer, "component": component, "target": elm.target,
            "singular_values": [float(s) for s in svd.S],
            "stable_rank": float(ratio_or_zero(svd_ready(elm.operators).square().sum(), svd.S[0] ** 2)),  # ‖A‖_F² / σ1²
            "relative_error": elm.relative_error(),
            "top_tokens": [t for t, _ in decode_output(model, svd.U[:, 0])],
            "predicts": [t for t, _ in decode_output(model, elm.output)],  # the logit lens of the target itself
        })
    return rows
