"""Block Lanczos spectra against the dense SVD of the assembled operators, and its stopping rule."""

import pytest
import torch
from conftest import PROMPT

import minielm
from minielm.errors import InputError, NumericalError
from minielm.interpret import stacked, stacked_svd
from minielm.linear_map import traced
from minielm.spectra import FrozenProducts, block_lanczos, singular_vectors


def test_frozen_forward_takes_a_batch(checkpoints):
    """model.forward(x (b, T, d), frozen) is the b single forward passes, stacked."""
    model = minielm.load(checkpoints["qwen2"])  # biases: the affine part rides along in every item
    x, frozen, _, _ = traced(model, PROMPT)
    batch = torch.randn(3, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    together = model.forward(batch, frozen)[0]  # (3, T, d)
    one_by_one = torch.stack([model.forward(item, frozen)[0] for item in batch])
    assert torch.allclose(together, one_by_one, rtol=0, atol=1e-13)


@pytest.mark.parametrize("case", ["qwen2", "gemma3_text", "olmo2", "phi3"])
def test_frozen_pass_to_the_last_position(case, checkpoints):
    """With the top layer's factors cut to the last position, the frozen pass gives y_T alone, as the full pass
    does: biases (qwen2), post-norms and sliding windows (gemma3), norms without pre-norm (olmo2), fused weights."""
    model = minielm.load(checkpoints[case])
    x, frozen, _, _ = traced(model, PROMPT)
    batch = torch.randn(3, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    last = model.forward(batch, frozen.at_last_position())[0]
    assert last.shape == (3, 1, x.shape[1])
    assert torch.allclose(last[:, 0], model.forward(batch, frozen)[0][:, -1], rtol=0, atol=1e-13)


@pytest.mark.parametrize("case, block", [("llama", 8), ("qwen3", 8), ("gemma3_text", 8), ("olmo2", 8), ("phi3", 8),
                                         ("qwen2", 8), ("qwen3", 1)])
def test_block_spectra_match_the_dense_svd(case, block, checkpoints):
    """Top 4 of [J_1 … J_T] and of one J_t, b = 1 and b = k + 4 rows per sweep, to 1e-10."""
    model = minielm.load(checkpoints[case])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    dense = stacked_svd(elm, k=4)
    U, S, V = singular_vectors(model, PROMPT, k=4, block=block)
    T, d = len(PROMPT), model.config.hidden_size
    assert U.shape == (d, 4) and S.shape == (4,) and V.shape == (T, d, 4)
    assert float(((S - dense.S) / dense.S).abs().max()) < 1e-10
    assert float((U - dense.U).abs().max()) < 1e-8 and float((V - dense.V).abs().max()) < 1e-8
    token = 9
    P, S_t, Qh = torch.linalg.svd(elm.operators[token])
    U_t, S_tb, V_t = singular_vectors(model, PROMPT, k=4, token=token, block=block)
    assert U_t.shape == (d, 4) and V_t.shape == (d, 4)
    assert float(((S_tb - S_t[:4]) / S_t[:4]).abs().max()) < 1e-10
    assert torch.allclose(elm.operators[token] @ V_t, U_t * S_tb, rtol=0, atol=1e-10 * float(S_t[0]))


@pytest.mark.parametrize("block", [1, 6])
def test_the_residual_estimate_is_the_true_residual(block, tiny_with_tokenizer):
    """Stopped at a loose tol, the reported residuals are the true ‖Aᵀu_i − σ_i v_i‖ and
    ‖A v_i − σ_i u_i‖ (from the dense operators), below tol·σ_1, and the basis has not
    filled R^d: the stopping rule, not exhaustion, ended the run."""
    model = minielm.load(tiny_with_tokenizer)  # d = 48
    ids = (model.tokenizer.encode("And God said, Let there be light: and there was light.") * 3)[:40]
    A = stacked(minielm.equivalent_linear_map(model, ids).operators)  # (d, T·d)
    tol = 1e-5
    found = block_lanczos(FrozenProducts(model, ids), k=3, block=block, tol=tol)
    true_transposed = torch.linalg.vector_norm(A.T @ found.U - found.V * found.S, dim=0)
    true_forward = torch.linalg.vector_norm(A @ found.V - found.U * found.S, dim=0)
    sigma1 = float(torch.linalg.matrix_norm(A, ord=2))
    assert found.steps * block < A.shape[0]
    assert torch.allclose(found.residuals, true_transposed, rtol=1e-6, atol=1e-12 * sigma1)
    assert float(true_transposed.max()) <= tol * sigma1 and float(true_forward.max()) < 1e-12 * sigma1
    assert float(true_transposed.max()) > 1e-3 * tol * sigma1  # stopped when tol was met, not long after
    # the history: the largest residual ÷ σ_1 after each step that had k Ritz values, over tol until the last
    assert len(found.history) == found.steps - (-(-3 // block) - 1)
    assert found.history[-1] == pytest.approx(float(found.residuals.max() / found.S[0]), rel=1e-12)
    assert all(r > tol for r in found.history[:-1])


@pytest.mark.parametrize("given", [3, 1])
def test_lanczos_starts_from_the_rows_given(given, tiny_with_tokenizer):
    """A start block that spans the top 3 right singular vectors (all 3 given, or 1 given and completed by
    random rows) converges at once, where a random start takes more steps."""
    model = minielm.load(tiny_with_tokenizer)
    ids = model.tokenizer.encode("And God said, Let there be light: and there was light.")
    A = stacked(minielm.equivalent_linear_map(model, ids).operators)  # (d, T·d)
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)
    ops = FrozenProducts(model, ids)
    block = 3 if given == 3 else 2  # 2: the row given and one random row
    started = block_lanczos(ops, k=given, block=block, tol=1e-10, start=Vh[:given] * 2.5)  # any scale
    assert started.steps == 1
    assert block_lanczos(ops, k=given, block=block, tol=1e-10).steps > 1


def test_not_converged_is_a_one_line_error(checkpoints):
    model = minielm.load(checkpoints["llama"])
    with pytest.raises(NumericalError, match="not converged .* in 2 steps"):
        singular_vectors(model, PROMPT, k=4, tol=1e-14, max_steps=2, block=2)


@pytest.mark.parametrize("block", [1, 3])
def test_a_basis_that_fills_its_space_ends_the_run(block, checkpoints):
    """With a tolerance no residual meets, the run goes on until the left basis fills R^d; the residuals are then
    exactly 0 and the triplets those of the dense SVD (the default max_steps leaves room for that last step)."""
    model = minielm.load(checkpoints["llama"])
    dense = stacked_svd(minielm.equivalent_linear_map(model, PROMPT), k=4)
    _, S, _ = singular_vectors(model, PROMPT, k=4, tol=1e-300, block=block)
    assert float(((S - dense.S) / dense.S).abs().max()) < 1e-10


def test_float32_meets_its_own_default_tolerance_and_bf16_is_refused(checkpoints):
    dense = stacked_svd(minielm.equivalent_linear_map(minielm.load(checkpoints["llama"]), PROMPT), k=4)
    _, S, _ = singular_vectors(minielm.load(checkpoints["llama"], dtype=torch.float32), PROMPT, k=4)
    assert S.dtype == torch.float32 and float(((S.double() - dense.S) / dense.S).abs().max()) < 1e-4
    with pytest.raises(InputError, match="float32 or float64 model, not torch.bfloat16"):
        singular_vectors(minielm.load(checkpoints["llama"], dtype=torch.bfloat16), PROMPT)


@pytest.mark.parametrize("block", [1, 6])
def test_spectrum_of_chosen_positions_is_the_svd_of_their_operators(block, checkpoints):
    """positions=[...] takes those columns of [J_1 … J_T] alone (the others held at zero: qwen2's biases
    must not leak in): the top triplets are the dense SVD of [J_p for p in positions], assembled here
    from the operators in the order given, V's block i being position positions[i] (negative: from the end).
    The command's dense path (stacked_svd with positions) gives the same."""
    model = minielm.load(checkpoints["qwen2"])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    T, d = elm.operators.shape[:2]
    positions = [9, 1, -1, 4]
    A = torch.cat([elm.operators[9], elm.operators[1], elm.operators[T - 1], elm.operators[4]], dim=1)  # (d, 4d)
    S = torch.linalg.svdvals(A)
    U, S_l, V = singular_vectors(model, PROMPT, k=4, positions=positions, block=block)
    assert U.shape == (d, 4) and V.shape == (4, d, 4)
    assert float(((S_l - S[:4]) / S[:4]).abs().max()) < 1e-10
    V_flat = V.reshape(4 * d, 4)  # block i = position positions[i], as the columns of A
    assert torch.allclose(A @ V_flat, U * S_l, rtol=0, atol=1e-10 * float(S[0]))
    assert torch.allclose(A.T @ U, V_flat * S_l, rtol=0, atol=1e-10 * float(S[0]))
    dense = stacked_svd(elm, k=4, positions=positions)
    assert torch.allclose(dense.S, S[:4], rtol=1e-12, atol=0)
    assert float((dense.U - U).abs().max()) < 1e-8 and float((dense.V - V).abs().max()) < 1e-8


def test_a_streamed_model_on_a_cpu_takes_blocks_of_rows(checkpoints, monkeypatch):
    """Its steps also cast every layer, whatever the block: the default block differs from a loaded model's
    (1 row on a CPU), and the triplets are the same."""
    import minielm.spectra

    blocks, run = [], minielm.spectra.block_lanczos
    monkeypatch.setattr(minielm.spectra, "block_lanczos", lambda ops, k, block, *rest: blocks.append(block) or
                        run(ops, k, block, *rest))
    loaded = singular_vectors(minielm.load(checkpoints["llama"]), PROMPT, k=2)
    streamed = singular_vectors(minielm.load(checkpoints["llama"], stream=True), PROMPT, k=2)
    assert blocks == [1, minielm.spectra.STREAMED_CPU_BLOCK] and minielm.spectra.STREAMED_CPU_BLOCK > 1
    for a, b in zip(loaded, streamed):
        assert torch.allclose(a, b, rtol=0, atol=1e-10 * float(loaded[1][0]))
