"""The reference sweep (minielm/sweep.py) and the fast one (minielm/fast_sweep.py): the same operators."""

import pytest
import torch
from conftest import PROMPT
from hf_reference import FAMILIES

import minielm
from minielm.fast_sweep import (ATTENTION_FROM_LAST, ATTENTION_FROM_LAST_AND_LOW_RANK_MLP, explicit_mlp_pays,
                                fast_sweep, low_rank_pays, norms_fold_pays, plan, sweep_in_blocks)
from minielm.linear_map import target_values, traced
from minielm.sweep import reference_sweep


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def targets(model):
    L = model.config.num_hidden_layers
    return [(layer, component) for layer in range(L) for component in ("output", "attention", "mlp")]


BLOCKS = (5, 12)  # few rows: 5 (the norms' diagonals on G's rows) and 12 (at 16 positions: folded, yet factored)


@pytest.mark.parametrize("case", list(FAMILIES) + ["llama_mqa", "qwen3_sliding"])
@pytest.mark.parametrize("T", [len(PROMPT), 1])
def test_fast_sweep_equals_the_reference_sweep(case, T, checkpoints, edge_checkpoints):
    """On every family and every target (each layer's output, attention and MLP), in one block of all d rows
    and in blocks of 5 and 12 (the last one short), the fast sweep's operators are the reference sweep's."""
    model = minielm.load(checkpoints[case] if case in FAMILIES else edge_checkpoints(case))
    x, frozen, states, states0 = traced(model, PROMPT[:T])
    for layer, component in targets(model):
        _, _, seed = target_values(model, states, states0, layer, component)
        reference = reference_sweep(model, frozen, seed, layer, component)
        assert relative(fast_sweep(model, frozen, seed, layer, component), reference) < 1e-14, (layer, component)
        for block in BLOCKS:
            blocks = sweep_in_blocks(model, frozen, seed, layer, component, block=block)
            assert relative(blocks, reference) < 1e-14, (layer, component, block)


def test_every_form_of_the_norms_is_tested(checkpoints):
    """On every family, the comparison above reaches each form an MLP sublayer takes: explicit (all d rows),
    factored with the norms' diagonals folded into W_D and W_U, and factored with them on G's rows; and each
    form of the attention's pre-norm: folded into W_V, and on the rows (`norms_fold_pays`)."""
    for case in FAMILIES:
        c = minielm.load(checkpoints[case]).config
        d, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
        mlp, attention = set(), set()
        for T in (len(PROMPT), 1):
            for r in (d, *BLOCKS):
                for positions in (1, T):  # the MLP at the last position (the top of the sweep), or at every one
                    mlp.add("explicit" if explicit_mlp_pays(d, f, r) else norms_fold_pays(f, positions * r))
                attention.add(norms_fold_pays(kv, T * r))
        assert mlp == {"explicit", True, False} and attention == {True, False}, case


def test_the_reference_sweep_is_the_map(checkpoints):
    """Reference operators reconstruct y (the fast sweep is not the only way to exactness)."""
    model = minielm.load(checkpoints["gemma3_text"])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    L = model.config.num_hidden_layers
    seed = target_values(model, *traced(model, PROMPT)[2:], L - 1, "output")[2]
    J = reference_sweep(model, elm.frozen, seed, L - 1)
    assert relative(torch.einsum("tij,tj->i", J, elm.inputs) + elm.bias, elm.output) < 1e-13


def test_the_low_rank_form_is_tested(checkpoints):
    """The comparison above reaches the fast sweep's fused low-rank step (optimization 4) and its plain
    form, with residual: both branches of the plan are exercised (all d rows, and blocks of 5)."""
    forms = set()
    for case in FAMILIES:
        c = minielm.load(checkpoints[case]).config
        for rows in (c.hidden_size, 5):
            low_rank = low_rank_pays(c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim, rows)
            forms |= {step.form for step in plan(len(PROMPT), c.num_hidden_layers - 1, "output", low_rank)}
    assert ATTENTION_FROM_LAST_AND_LOW_RANK_MLP in forms and ATTENTION_FROM_LAST in forms


@pytest.mark.parametrize("component, first", [("output", "mlp at last"), ("mlp", "mlp at last"),
                                              ("attention", "attention from last")])
def test_plan_of_a_module_target(component, first):
    """A module target takes its own branch alone (no residual) in its own layer; everything below keeps it."""
    steps = plan(T=4, layer=2, component=component, low_rank=False)
    assert steps[0].form == first and steps[0].residual == (component == "output")
    assert [s.layer for s in steps] == ([2] if component == "attention" else [2, 2]) + [1, 1, 0, 0]
    assert all(s.residual for s in steps if s.layer < 2)
