"""explain without the operators: its figures against those of the assembled map, and the route it takes."""

import json

import pytest
import torch
from conftest import PROMPT

import minielm
from minielm import cli, matrix_free
from minielm.interpret import stacked_svd, token_shares
from minielm.matrix_free import autograd_row, dense_is_too_big, directional_checks
from minielm.spectra import FrozenProducts


@pytest.mark.parametrize("case", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma3_text"])
def test_directional_figures_are_the_dense_ones(case, checkpoints):
    """Each swept row is uᵀJ_t of the assembled operators; the shares are token_shares; the
    reconstruction is the dense one; autograd along ŷ agrees; every figure at round-off.
    Biases (qwen2, gpt2, gpt_neox) put b into the check along u."""
    model = minielm.load(checkpoints[case])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    ops = FrozenProducts(model, PROMPT)
    found = directional_checks(ops)
    dense_rows = torch.einsum("rd,tde->rte", found.directions, elm.operators)  # (r, T, d)
    scale = float(dense_rows.abs().max())
    assert float((found.rows - dense_rows).abs().max()) < 1e-13 * scale
    assert float((found.shares - token_shares(elm)).abs().max()) < 1e-13
    y = elm.output
    assert abs(found.bias_share - float(elm.bias @ y / (y @ y))) < 1e-13
    assert float(found.errors.max()) < 1e-13 and found.reconstruction_error < 1e-13
    assert torch.allclose(found.reconstruction, elm.reconstruct(), rtol=0, atol=1e-13 * float(y.abs().max()))
    by_autograd = autograd_row(ops, found.directions[0])
    assert float((by_autograd - found.rows[0]).abs().max()) < 1e-13 * scale


def test_a_wrong_row_is_seen_along_u(checkpoints, monkeypatch):
    """The check along u sees a sweep that is wrong: every row scaled by (1 + 1e-9) at one token."""
    model = minielm.load(checkpoints["llama"])
    ops = FrozenProducts(model, PROMPT)
    right = ops.apply_transposed

    def off_by_a_little(U):
        rows = right(U).view(U.shape[0], len(PROMPT), -1).clone()
        rows[:, 3] *= 1 + 1e-9
        return rows.reshape(U.shape[0], -1)

    monkeypatch.setattr(ops, "apply_transposed", off_by_a_little)
    assert float(directional_checks(ops).errors.max()) > 1e-12


def explain_json(capsys, *argv):
    assert cli.main(["explain", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_both_routes_agree_on_the_shipped_model(capsys):
    """--route matrix-free: the same next token, shares, top singular values (within its tolerance) and
    decoded vectors as the dense route; its own exactness figures at round-off."""
    prompt = "And God said, Let there be light"
    dense = explain_json(capsys, prompt, "-k", "3")
    free = explain_json(capsys, prompt, "-k", "3", "--route", "matrix-free")
    assert dense["route"] == "dense" and free["route"] == "matrix-free"
    assert free["next_token"] == dense["next_token"]
    assert [t["probability"] for t in free["top"]] == pytest.approx([t["probability"] for t in dense["top"]], abs=1e-14)
    for a, b in zip(free["per_token"], dense["per_token"]):
        assert a["token"] == b["token"] and a["share"] == pytest.approx(b["share"], abs=1e-12)
        assert a["stable_rank"] is None and a["sigma1"] is None
    sigma = dense["singular_values"][0]
    assert free["singular_values"] == pytest.approx(dense["singular_values"], abs=2 * free["lanczos"]["tol"] * sigma)
    assert [d["output_tokens"] for d in free["decoded"]] == [d["output_tokens"] for d in dense["decoded"]]
    assert free["lanczos"]["largest_residual"] <= free["lanczos"]["tol"]
    for key in ("relative_error", "probability_error", "directional_error", "autograd_relative_difference"):
        assert free[key] < 1e-13, key


def test_skipped_positions_on_both_routes(capsys):
    """--skip-positions: the matrix-free route's top σ are the dense route's, from the same columns."""
    prompt = "And God said, Let there be light"
    dense = explain_json(capsys, prompt, "-k", "2", "--skip-positions", "0")
    free = explain_json(capsys, prompt, "-k", "2", "--skip-positions", "0", "--route", "matrix-free")
    assert free["skipped_positions"] == dense["skipped_positions"] == [0]
    sigma = dense["singular_values"][0]
    assert free["singular_values"] == pytest.approx(dense["singular_values"], abs=2 * free["lanczos"]["tol"] * sigma)
    assert [d["input_position"] for d in free["decoded"]] == [d["input_position"] for d in dense["decoded"]]
    assert 0 not in [d["input_position"] for d in free["decoded"]]


def test_auto_takes_the_matrix_free_route_over_the_bound(capsys, monkeypatch):
    """Over the flop bound `explain` goes matrix-free and says why in its header; `layers` and `check` refuse
    in one line with exit 2, before any work; `--html` too, as it needs the operators."""
    prompt = "And God said"
    assert dense_is_too_big(minielm.load(), 4) is None  # the shipped model: dense, well under the bound
    monkeypatch.setitem(matrix_free.DENSE_FLOP_LIMIT, "cpu", 1e6)
    assert cli.main(["explain", prompt, "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "route   matrix-free, the operators J_t never formed: the 4 dense operators would take" in out
    assert "along u" in out and "stable rank and σ1 need each whole J_t" in out
    for argv in (["layers", prompt], ["check", "--prompt", prompt], ["explain", prompt, "--html", "x.html"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "TFLOP" in err, err


def test_a_streamed_model_skips_autograd_and_says_why(capsys, monkeypatch):
    """Streamed, the backward pass would hold every layer: the autograd row is skipped with the reason."""
    assert cli.main(["explain", "In the beginning", "--stream", "--route", "matrix-free", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "autograd        skipped: the model is streamed" in out


def test_lanczos_starts_from_the_exactness_sweep(capsys, monkeypatch):
    """The matrix-free route starts Lanczos from the rows uᵀJ_t its exactness sweep already made (no product
    spent on them): those of the kept positions under --skip-positions, as the dense operators give them."""
    prompt, seen, real = "And God said, Let there be light", [], cli.top_triplets
    monkeypatch.setattr(cli, "top_triplets", lambda ops, *rest, start=None: seen.append(start) or real(ops, *rest, start=start))
    explain_json(capsys, prompt, "-k", "2", "--skip-positions", "0", "--route", "matrix-free")
    model = minielm.load()
    ids = model.tokenizer.encode(prompt)
    directions = directional_checks(FrozenProducts(model, ids)).directions  # (r, d): ŷ and the random ones
    dense_rows = torch.einsum("rd,tde->rte", directions, minielm.equivalent_linear_map(model, ids).operators)
    (start,) = seen
    assert start.shape == (directions.shape[0], (len(ids) - 1) * model.config.hidden_size)
    assert torch.allclose(start, dense_rows[:, 1:].flatten(1), rtol=0, atol=1e-13 * float(dense_rows.abs().max()))
