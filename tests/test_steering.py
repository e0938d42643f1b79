"""Steering recipes (minielm, paper, actadd) and their evaluation, on a tiny model with a real tokenizer."""

import subprocess
import sys

import pytest
import torch

import minielm
import minielm.cli
from minielm.linear_map import equivalent_linear_map
from minielm.errors import InputError
from minielm.steering import (METHODS, NEUTRAL, Steering, actadd_edit, evaluate, format_table, next_token_log_probs,
                               steer, unit)

PROMPT, CONCEPT = "And God called the light", "the face of the waters"


@pytest.fixture(scope="module")
def model(tiny_with_tokenizer):
    return minielm.load(tiny_with_tokenizer)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", [0, 1])
def test_zero_scale_changes_nothing_and_a_large_one_does(model, method, layer):
    baseline = model.generate(PROMPT, 12)
    assert steer(model, CONCEPT, PROMPT, layer, 0.0, 12, method=method) == baseline
    assert steer(model, CONCEPT, PROMPT, layer, 2.0, 12, method=method) != baseline


def golden_paper_generation(model, concept, prompt_ids, layer, scale, steps):
    """Golden's apply_steering_operator, written out directly: every step re-runs the whole
    text with no cache, adds λ‖h_k‖ c_k/(2‖c_k‖), c_k = Σ_{j≤k} J_{j mod T_c} x_j, to the
    stream entering `layer`, finishes the pass and takes the argmax."""
    J = equivalent_linear_map(model, model.tokenizer.encode(concept), layer=layer).operators  # (T_c, d, d)
    ids = list(prompt_ids)
    for _ in range(steps):
        x = model.embed(ids)  # (T, d)
        positions = torch.arange(len(ids))
        h = x
        for i in range(layer):
            h = model.block(i, h, positions)[0]
        vectors = torch.stack([J[k % J.shape[0]] @ x[k] for k in range(len(ids))])  # (T, d)
        added = torch.cumsum(vectors, 0)
        h = h + torch.stack([scale * added[k] * h[k].norm() / (2 * added[k].norm()) for k in range(len(ids))])
        for i in range(layer, model.config.num_hidden_layers):
            h = model.block(i, h, positions)[0]
        y = model.norm(h, model.weights["final_norm"])[0]
        ids.append(int(torch.argmax(model.unembed(y[-1]))))
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("layer", [0, 1])
def test_paper_recipe_matches_a_direct_uncached_implementation(model, layer):
    ids = model.tokenizer.encode(PROMPT)
    with torch.no_grad():
        direct = golden_paper_generation(model, CONCEPT, ids, layer, 1.5, 10)
    cached = model.generate_ids(ids, 10, edit=Steering(model, CONCEPT, layer, "paper").edit(1.5))
    assert cached == direct
    assert cached != model.generate_ids(ids, 10)  # the scale is large enough to matter


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_and_uncached_paths_agree(model, method):
    """Generated with the cache (prompt once, then one token a call), then rescored in one
    uncached pass with a fresh edit: the steered distributions must pick the same tokens,
    and the last step's must equal a whole-sequence rerun with the cache's pass."""
    steering, ids = Steering(model, CONCEPT, 1, method), model.tokenizer.encode(PROMPT)
    new = model.generate_ids(ids, 12, edit=steering.edit(1.0))
    uncached = next_token_log_probs(model, ids + new, steering.edit(1.0))  # (T, V)
    assert uncached[len(ids) - 1:-1].argmax(-1).tolist() == new
    cache, edit = minielm.model.KVCache(model.config.num_hidden_layers), steering.edit(1.0)
    with torch.no_grad():
        model.forward(model.embed(ids + new[:-1]), cache=cache, edit=edit)
        y, _ = model.forward(model.embed(new[-1:]), cache=cache, edit=edit)
    cached_last = torch.log_softmax(model.unembed(y[-1]), -1)
    assert torch.allclose(cached_last, uncached[-1], atol=1e-12, rtol=0)


def test_evaluation_is_deterministic_and_zero_scale_has_no_lift(model):
    grid = dict(layers=[0, 1], scales=[0.0, 1.0], max_new_tokens=8)
    first = evaluate(model, CONCEPT, PROMPT, **grid)
    assert evaluate(model, CONCEPT, PROMPT, **grid) == first
    sampled = evaluate(model, CONCEPT, PROMPT, **grid, methods=["paper"], temperature=1.0, seed=3)
    assert evaluate(model, CONCEPT, PROMPT, **grid, methods=["paper"], temperature=1.0, seed=3) == sampled
    assert sampled["baseline"]["text"] != first["baseline"]["text"]  # sampling, not greedy
    reseeded = evaluate(model, CONCEPT, PROMPT, **grid, methods=["paper"], temperature=1.0, seed=4)
    assert [r["text"] for r in reseeded["rows"]] != [r["text"] for r in sampled["rows"]]  # the seed is used
    for row in first["rows"]:
        if row["scale"] == 0:
            assert row["text"] == first["baseline"]["text"]
            assert row["next_token_lift"] == row["continuation_lift"] == 0.0
    assert any(row["continuation_lift"] != 0 for row in first["rows"])


def test_fluency_cost_is_the_unsteered_nll(model):
    result = evaluate(model, CONCEPT, PROMPT, layers=[1], scales=[1.0], methods=["actadd"], max_new_tokens=6)
    row, ids = result["rows"][0], model.tokenizer.encode(PROMPT)
    new = model.generate_ids(ids, 6, edit=Steering(model, CONCEPT, 1, "actadd").edit(1.0))
    logits = model.logits(ids + new)  # (T, V) unsteered
    nll = -torch.stack([torch.log_softmax(logits[len(ids) - 1 + t], -1)[tok] for t, tok in enumerate(new)]).mean()
    assert row["nll"] == pytest.approx(float(nll), rel=1e-12)


def run(*args):
    return subprocess.run([sys.executable, "-m", "minielm.cli", *args], capture_output=True, text=True)


def test_cli_steer_methods_and_evaluation(tiny_with_tokenizer, tmp_path):
    result = run("steer", PROMPT, "--concept", CONCEPT, "--layer", "1", "--method", "paper",
                 "--model", str(tiny_with_tokenizer), "--max-new-tokens", "6")
    assert result.returncode == 0 and "by paper" in result.stdout
    result = run("steer-eval", PROMPT, "--concept", CONCEPT, "--layers", "1", "--scales", "0.5",
                 "--model", str(tiny_with_tokenizer), "--max-new-tokens", "4", "--plot", str(tmp_path / "t.png"))
    assert result.returncode == 0 and "| actadd | 1 | 0.5 |" in result.stdout and (tmp_path / "t.png").stat().st_size
    assert result.stdout.splitlines()[1].startswith("  # lift = ")  # the legend, as every other section has
    result = run("steer-eval", PROMPT, "--concept", CONCEPT, "--layers", "1", "--methods", "paper,bogus",
                 "--model", str(tiny_with_tokenizer))
    assert result.returncode == 2 and "bogus" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name, magic", [("tradeoff", b"\x89PNG"), ("tradeoff.svg", b"<?xml"), ("tradeoff.PDF", b"%PDF")])
def test_steer_eval_plot_is_written_to_exactly_the_path_given(tiny_with_tokenizer, tmp_path, name, magic):
    """--plot out writes `out` (matplotlib alone would write out.png), in the format of its suffix (png
    without one), like explain's and layers' plots; nothing else appears beside it."""
    result = run("steer-eval", PROMPT, "--concept", CONCEPT, "--layers", "1", "--scales", "0.5", "--methods", "actadd",
                 "--model", str(tiny_with_tokenizer), "--max-new-tokens", "3", "--plot", str(tmp_path / name))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes().startswith(magic)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_a_zero_direction_stays_zero_in_every_dtype(dtype):
    """unit(0) = 0 (1e-300 underflowed to 0 in float32 and below: 0/0 = NaN), so a zero push at λ = 0
    changes nothing instead of failing as non-finite."""
    assert unit(torch.zeros(2, 8, dtype=dtype)).tolist() == [[0.0] * 8] * 2
    h = torch.randn(3, 8).to(dtype)
    assert torch.equal(actadd_edit(torch.zeros(8, dtype=dtype), 0, 0.0)(0, h, h), h)


def test_actadd_refuses_a_zero_activation_difference(tiny_with_tokenizer):
    """The concept and the neutral prompt with the same mean stream (here: the same text) give v = 0,
    which has no direction: one InputError, in float32 as in float64."""
    model = minielm.load(tiny_with_tokenizer, dtype="float32")
    with pytest.raises(InputError, match="the concept and the neutral prompt give the same mean stream"):
        Steering(model, CONCEPT, 1, "actadd", neutral=CONCEPT)


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(layers=1), "layers must be a list"),
    (dict(methods="actadd"), "methods must be a list"), (dict(layers=[2]), "layer"), (dict(layers=[]), "layers is empty"),
    (dict(scales=["a"]), "scales"), (dict(methods=["minielm", "bogus"]), "methods"), (dict(neutral=3), "neutral"),
    (dict(temperature=-1.0), "temperature"), (dict(concept=" "), "empty concept"), (dict(progress=3), "progress"),
])
def test_evaluate_checks_every_argument_before_generating(model, monkeypatch, bad, match):
    """A bad argument of the public `evaluate` is one InputError naming it, raised before the baseline
    generation (max_new_tokens=0 was an IndexError after it, layers=1 a TypeError, methods='actadd'
    went through its characters)."""
    monkeypatch.setattr(model, "generate_ids", lambda *a, **k: pytest.fail("generated before checking"))
    arguments = dict(concept=CONCEPT, prompt=PROMPT, layers=[1], scales=[0.5], methods=["actadd"]) | bad
    with pytest.raises(InputError, match=match):
        evaluate(model, **arguments)


def stream_after(model, ids, layer, push=None):
    """The residual stream after `layer` (T, d), by a manual loop over model.block; with push(h, x), the
    stream after `layer` becomes push(h, x) and the pass goes on to the final norm: (T, d) y."""
    x = model.embed(ids)  # (T, d)
    positions = torch.arange(len(ids))
    h = x
    for i in range(model.config.num_hidden_layers):
        h = model.block(i, h, positions)[0]  # (T, d): the stream leaving block i
        if i == layer and push is None:
            return h
        if i == layer:
            h = push(h, x)
    return model.norm(h, model.weights["final_norm"])[0]


@pytest.mark.parametrize("method", ["minielm", "actadd"])
@pytest.mark.parametrize("layer", [0, 1])
def test_minielm_and_actadd_formulas_by_hand(model, method, layer):
    """One steered pass written out from the module docstring's formulas, compared with the hook:
      minielm  h_p <- h_p + λ ‖h_p‖ S x_p / ‖S x_p‖ after layer ℓ, S = Σ_t J^ℓ_t of the concept
      actadd   h_p <- h_p + λ ‖h_p‖ v / ‖v‖ after layer ℓ, v = mean_t h^ℓ_t(concept) − mean_t h^ℓ_t(neutral),
               the means by hand over the block outputs, BOS left out."""
    scale, ids = 0.7, model.tokenizer.encode(PROMPT)
    with torch.no_grad():
        if method == "minielm":
            S = equivalent_linear_map(model, model.tokenizer.encode(CONCEPT), layer=layer).operators.sum(0)  # (d, d)
            direction = lambda h, x: torch.stack([S @ x[p] / (S @ x[p]).norm() for p in range(len(x))])  # (T, d)
        else:
            def mean_stream(text):  # (d,): the mean over the text's tokens after `layer`, BOS left out
                text_ids = model.tokenizer.encode(text)
                assert text_ids[0] == model.tokenizer.bos_id
                return stream_after(model, text_ids, layer)[1:].mean(0)

            v = mean_stream(CONCEPT) - mean_stream(NEUTRAL)  # (d,)
            direction = lambda h, x: (v / v.norm()).expand_as(h)
        push = lambda h, x: h + scale * h.norm(dim=-1, keepdim=True) * direction(h, x)
        by_hand = stream_after(model, ids, layer, push)  # (T, d): y at every position
        hooked = model.forward(model.embed(ids), edit=Steering(model, CONCEPT, layer, method).edit(scale))[0]
        unsteered = model.forward(model.embed(ids))[0]
    assert torch.allclose(hooked, by_hand, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(hooked, unsteered, rtol=1e-3, atol=1e-3)  # the push is large enough to matter


def test_the_table_escapes_what_would_break_its_rows():
    row = {"method": "actadd", "layer": 1, "scale": 1.0, "next_token_lift": 0.0, "continuation_lift": 0.0,
           "concept_hits": 0, "nll": 1.0, "repetition": 0.0, "text": "a\x1b[2Jb \u202eevil | שלום"}
    table = format_table({"concept": "c", "prompt": "p", "baseline": dict(row, method="none", layer=None),
                          "rows": [row]})
    assert "\x1b" not in table and "\u202e" not in table  # a terminal's escape sequence, an override of direction
    assert "\\x1b[2Jb \\u202eevil \\| שלום\u200e |" in table  # escaped; a left-to-right mark after the Hebrew


@pytest.mark.parametrize("method", METHODS)
def test_a_concept_too_long_is_named(model, tiny_with_tokenizer, method, capsys):
    """A concept past the positions is named as the culprit (it was "841 tokens exceed
    max_position_embeddings=512", which reads as the prompt's fault)."""
    limit = model.config.max_position_embeddings
    concept = " light" * (limit + 5)
    with pytest.raises(minielm.InputError, match=r"^the concept \(--concept\) is \d+ tokens, more than the "
                                                 rf"model's max_position_embeddings={limit}"):
        steer(model, concept, "In the beginning", 0, 1.0, max_new_tokens=1, method=method)
    assert minielm.cli.main(["steer", "In the beginning", "--concept", concept, "--model", str(tiny_with_tokenizer),
                             "--method", method, "--max-new-tokens", "1"]) == 2
    assert capsys.readouterr().err.startswith("minielm: error: the concept (--concept) is ")


def test_a_neutral_prompt_too_long_is_named(model):
    limit = model.config.max_position_embeddings
    with pytest.raises(minielm.InputError, match=r"^the neutral \(--neutral\) is \d+ tokens"):
        steer(model, "light", "In the beginning", 0, 1.0, max_new_tokens=1, method="actadd",
                      neutral=" dark" * (limit + 5))
