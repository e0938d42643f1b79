"""Reading the operators: decoding on a model with a known answer, spectra, layers, steering."""

import importlib
import math

import pytest
import torch
from conftest import PROMPT

import minielm
from minielm.checkpoint import save_checkpoint
from minielm.interpret import (decode_input, decode_output, layer_table, stable_rank, stacked, stacked_svd,
                               token_shares)
from minielm.layer_maps import all_layer_maps
from minielm.spectra import FrozenProducts, block_lanczos, singular_vectors
from minielm.steering import steer

# The module of all_layer_maps, which calls forward_layer_maps and reverse_layer_maps by their global
# names: test_all_layer_maps_chooses_the_cheaper_pass wraps the two passes there.
LAYER_PASSES = "minielm.layer_maps"


@pytest.fixture(scope="module")
def known_model(tmp_path_factory):
    """One layer whose attention and MLP write nothing (W_O = W_D = 0), so y = diag(w̃) x_T / ρ.

    The final norm weight is 10 on dimension 0 and 1 elsewhere, so the top singular
    vector of [J_1 … J_T] is e_0 in token T's block. Token 7's unembedding row is
    the one most along e_0, and token 3's embedding row is e_0 itself; token 4's is its negative.
    """
    d, V = 8, 16
    gen = torch.Generator().manual_seed(0)
    config = dict(model_type="llama", vocab_size=V, hidden_size=d, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    embed = torch.randn(V, d, generator=gen)
    embed[3] = torch.nn.functional.one_hot(torch.tensor(0), d) * 2.0
    embed[4] = -embed[3]
    lm_head = torch.randn(V, d, generator=gen) * 0.1
    lm_head[7, 0] = 5.0
    layer = {"attn_norm": torch.ones(d), "wq": torch.randn(d, d, generator=gen), "wk": torch.randn(4, d, generator=gen),
             "wv": torch.randn(4, d, generator=gen), "wo": torch.zeros(d, d), "mlp_norm": torch.ones(d),
             "w_gate": torch.randn(16, d, generator=gen), "w_up": torch.randn(16, d, generator=gen),
             "w_down": torch.zeros(d, 16)}
    final = torch.ones(d)
    final[0] = 10.0
    path = tmp_path_factory.mktemp("known")
    save_checkpoint(path, config, {"embed": embed, "final_norm": final, "lm_head": lm_head, "layers": [layer]})
    return minielm.load(path)


@pytest.mark.parametrize("block", [1, 2, 3, 8])
def test_block_lanczos_with_repeated_singular_values(known_model, block):
    """The known model's [J_1 … J_T] is diag(w̃)/ρ in token T's block and 0 elsewhere: σ = 10/ρ, then 1/ρ seven
    times. A block that meets the repeated values loses rank; the triplets must still be right, their residuals
    true and the bases orthonormal."""
    ids = [5, 9, 2, 3]
    A = stacked(minielm.equivalent_linear_map(known_model, ids).operators)  # (d, T·d)
    found = block_lanczos(FrozenProducts(known_model, ids), 4, block, 1e-12)
    dense = torch.linalg.svdvals(A)[:4]
    assert torch.allclose(found.S, dense, rtol=1e-12, atol=0)
    true = torch.linalg.vector_norm(A.T @ found.U - found.V * found.S, dim=0)
    assert float(true.max()) < 1e-10 * float(dense[0])
    eye = torch.eye(4, dtype=A.dtype)
    assert torch.allclose(found.U.T @ found.U, eye, atol=1e-12) and torch.allclose(found.V.T @ found.V, eye, atol=1e-12)


def test_decoding_on_a_known_model(known_model):
    ids = [5, 9, 2, 3]  # the last token's embedding is 2·e_0: y points along +e_0
    elm = minielm.equivalent_linear_map(known_model, ids)
    svd = stacked_svd(elm, k=2)
    assert torch.allclose(svd.U[:, 0].abs(), torch.eye(8, dtype=torch.float64)[0], atol=1e-12)
    assert svd.U[0, 0] > 0  # sign aligned with y, whose component 0 is positive
    assert svd.V[:-1, :, 0].abs().max() < 1e-12  # only the last token's block carries it
    assert decode_output(known_model, svd.U[:, 0])[0][0] == "#7"
    assert decode_input(known_model, svd.V[-1, :, 0])[0][0] == "#3"
    assert decode_input(known_model, svd.V[-1, :, 0])[0][1] == pytest.approx(1.0, abs=1e-12)
    ρ = float(torch.sqrt((elm.inputs[-1] ** 2).mean() + known_model.config.rms_norm_eps))
    assert float(svd.S[0]) == pytest.approx(10.0 / ρ, rel=1e-12)
    # negating the last input (token 4 = -token 3) negates y but leaves [J_1 … J_T] as it was
    # (ρ is the same): the sign rule u · y ≥ 0 must flip the singular pair with y
    negated = minielm.equivalent_linear_map(known_model, [5, 9, 2, 4])
    assert torch.equal(negated.output, -elm.output)
    assert torch.allclose(negated.operators, elm.operators, rtol=0, atol=1e-15)
    flipped = stacked_svd(negated, 1)
    assert torch.allclose(flipped.U, -svd.U[:, :1], atol=1e-12) and torch.allclose(flipped.V, -svd.V[..., :1], atol=1e-12)
    assert flipped.U[0, 0] < 0


def test_stable_rank_and_shares(checkpoints):
    assert float(stable_rank(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))) == pytest.approx(10 / 9)
    model = minielm.load(checkpoints["llama"])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    assert float(token_shares(elm).sum()) == pytest.approx(1.0, abs=1e-13)


def test_decode_input_ranks_a_zero_embedding_row_by_cosine_zero(tiny_with_tokenizer):
    """In float32 a zero embedding row's cosine was 0/0 = NaN (the 1e-300 floor is 0 there), and
    topk ranked it first; it is cosine 0 now, and the top token is the one v points at."""
    model = minielm.load(tiny_with_tokenizer, dtype="float32")
    model.weights["embed"] = model.weights["embed"].clone()
    model.weights["embed"][7] = 0
    v = model.weights["embed"][9].to(model.dtype)  # (d,): exactly token 9's embedding
    decoded = decode_input(model, v, n=model.config.vocab_size)
    assert decoded[0][0] == model.tokenizer.token(9) and decoded[0][1] == pytest.approx(1, abs=1e-6)
    assert all(math.isfinite(c) for _, c in decoded)
    assert dict(decoded)[model.tokenizer.token(7)] == 0.0


def test_stable_rank_of_exactly_zero_operators_is_zero(checkpoints):
    """Every Mistral layer slides a window of 5 over 16 tokens: the first tokens reach y through no
    path, their J_t are exactly 0, and their stable rank is 0 (no directions), not 0/0 = NaN."""
    model = minielm.load(checkpoints["mistral"])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    zero = [t for t in range(len(PROMPT)) if not elm.operators[t].any()]
    assert zero and zero == list(range(len(zero)))  # the earliest tokens, outside the receptive field
    ranks = stable_rank(elm.operators)
    assert ranks[zero].tolist() == [0.0] * len(zero) and bool((ranks[len(zero):] >= 1).all())
    assert float(stable_rank(torch.zeros(3, 3, dtype=torch.float64))) == 0.0


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "qwen2"])
def test_matrix_free_matches_dense(case, checkpoints):
    model = minielm.load(checkpoints[case])
    dense = stacked_svd(minielm.equivalent_linear_map(model, PROMPT), k=4)
    U, S, V = singular_vectors(model, PROMPT, k=4)
    assert U.shape == (model.config.hidden_size, 4) and V.shape == (len(PROMPT), model.config.hidden_size, 4)
    assert torch.allclose(S, dense.S, rtol=1e-8, atol=0)
    assert torch.allclose(U, dense.U, atol=1e-8) and torch.allclose(V, dense.V, atol=1e-8)


def test_matrix_free_stops_early_on_a_larger_model(tiny_with_tokenizer):
    """d = 48, T = 40: the top 3 converge in fewer steps than d, still to 1e-8."""
    model = minielm.load(tiny_with_tokenizer)
    ids = model.tokenizer.encode("And God said, Let there be light: and there was light. And God saw the light")
    ids = (ids * 3)[:40]
    elm = minielm.equivalent_linear_map(model, ids)
    dense = stacked_svd(elm, k=3)
    U, S, V = singular_vectors(model, ids, k=3, tol=1e-10, max_steps=40)
    assert torch.allclose(S, dense.S, rtol=1e-8, atol=0)
    assert torch.allclose(U, dense.U, atol=1e-7)
    _, S_t, _ = singular_vectors(model, ids, k=2, token=5)
    assert torch.allclose(S_t, torch.linalg.svdvals(elm.operators[5])[:2], rtol=1e-8)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("case", ["llama", "gemma3_text", "olmo2", "qwen2", "phi3"])
def test_all_layers_in_one_pass(case, mode, checkpoints):
    model = minielm.load(checkpoints[case])
    maps = all_layer_maps(model, PROMPT, mode=mode)
    assert len(maps) == 3 * model.config.num_hidden_layers
    for (layer, component), elm in maps.items():
        single = minielm.equivalent_linear_map(model, PROMPT, layer=layer, component=component)
        assert elm.target == single.target
        assert float((elm.operators - single.operators).abs().max()) < 1e-12 * float(single.operators.abs().max())
        assert elm.relative_error() < 1e-13
        if mode == "forward":  # each map holds its own (T, d, d), not a view into a layer's (T, T, d, d)
            assert elm.operators.untyped_storage().nbytes() == elm.operators.nbytes
    # layer_table's stable ranks are ‖A‖_F² / σ_1² of each stacked map, computed here from its singular values
    rows = layer_table(model, PROMPT)
    assert [r["target"] for r in rows][-1] == "final"
    for r in rows:
        sigma = torch.linalg.svdvals(stacked(maps[(r["layer"], r["component"])].operators))
        assert r["stable_rank"] == pytest.approx(float((sigma ** 2).sum() / sigma[0] ** 2), rel=1e-10)
        assert r["singular_values"] == pytest.approx(sigma[:3].tolist(), rel=1e-10)


@pytest.mark.parametrize("case", ["llama", "gemma3_text"])
def test_all_layer_maps_chooses_the_cheaper_pass(case, checkpoints, monkeypatch):
    """mode='auto' takes the forward pass for prompts shorter than 1.5 (L + 1) tokens, the reverse one
    from there on; 'forward' and 'reverse' take the pass they name. The two passes are wrapped so that
    each call is recorded: the test sees which pass ran (not which rounding came out), and that
    all_layer_maps returns that pass's own result."""
    passes, calls = importlib.import_module(LAYER_PASSES), []

    def recording(name):
        exact = getattr(passes, name)

        def wrapper(*args, **kwargs):
            result = exact(*args, **kwargs)
            calls.append((name, result))
            return result
        return wrapper

    for name in ("forward_layer_maps", "reverse_layer_maps"):
        monkeypatch.setattr(passes, name, recording(name))
    model = minielm.load(checkpoints[case])
    threshold = 1.5 * (model.config.num_hidden_layers + 1)  # 4.5 for 2 layers, 6 for 3
    for T in (math.ceil(threshold) - 1, math.ceil(threshold)):
        for mode, expected in (("auto", "forward_layer_maps" if T < threshold else "reverse_layer_maps"),
                               ("forward", "forward_layer_maps"), ("reverse", "reverse_layer_maps")):
            calls.clear()
            maps = passes.all_layer_maps(model, PROMPT[:T], mode=mode)
            assert [name for name, _ in calls] == [expected], (T, mode)
            assert maps is calls[0][1], (T, mode)


def test_steering(tiny_with_tokenizer):
    model = minielm.load(tiny_with_tokenizer)
    prompt, concept = "And God called the light", "the face of the waters"
    baseline = model.generate(prompt, 12)
    assert steer(model, concept, prompt, layer=1, scale=1.0, max_new_tokens=12) != baseline
    with pytest.raises(minielm.InputError, match="layer"):
        steer(model, concept, prompt, layer=5, scale=1.0)


def steered_greedy_ids(model, S, layer, scale, ids, steps):
    """Greedy continuation computed directly, without a KV cache: every forward pass runs over the
    whole sequence, adding λ‖h_p‖ S x_p / ‖S x_p‖ to the residual stream after `layer` at every position p."""
    ids = list(ids)
    for _ in range(steps):
        x = model.embed(ids)  # (T, d)
        positions = torch.arange(len(ids))
        h = x
        for i in range(model.config.num_hidden_layers):
            h, _, _ = model.block(i, h, positions)
            if i == layer:
                push = x @ S.T  # (T, d): S x_p
                h = h + scale * h.norm(dim=-1, keepdim=True) * push / push.norm(dim=-1, keepdim=True)
        y, _ = model.norm(h, model.weights["final_norm"])
        ids.append(int(model.unembed(y[-1]).argmax()))
    return ids


@pytest.mark.parametrize("layer, scale", [(0, 0.7), (1, 1.0)])
def test_steering_formula(tiny_with_tokenizer, layer, scale):
    """steer() continues the text as the formula says, with S = Σ_t J^ℓ_t of the concept prompt."""
    model = minielm.load(tiny_with_tokenizer)
    prompt, concept, steps = "And God called the light", "the face of the waters", 10
    S = minielm.equivalent_linear_map(model, model.tokenizer.encode(concept), layer=layer).operators.sum(0)  # (d, d)
    ids = model.tokenizer.encode(prompt)
    direct = steered_greedy_ids(model, S, layer, scale, ids, steps)
    expected = model.tokenizer.decode(direct)[len(model.tokenizer.decode(ids)):]
    assert steer(model, concept, prompt, layer=layer, scale=scale, max_new_tokens=steps) == expected
    assert direct[len(ids):] != model.generate_ids(ids, steps)  # the steering changes the text here
