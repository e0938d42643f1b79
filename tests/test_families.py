"""minielm/families.py is the one place that says what each family is.

These tests tie it to the rest: every family has a tiny Hugging Face case in tests/hf_reference.py
(the engine and loading tests run over those), every GGUF architecture has a case in
tests/test_gguf.py, no module of minielm compares a value with a family's name (the facts would
then be in two places again), and each entry is one that model.py can run.
"""

import ast
import dataclasses
from pathlib import Path

import hf_reference
import test_gguf

import minielm
from minielm.config import SUPPORTED_ACTIVATIONS, SUPPORTED_MODEL_TYPES, Config
from minielm.families import ACTIVATION_FACTORS, ACTIVATIONS, FAMILIES, GGUF_ARCHITECTURES

DECODERS = {family.model_type: family for family in FAMILIES.values()}  # without the multimodal aliases
FAMILY_NAMES = set(FAMILIES) | set(GGUF_ARCHITECTURES)


def test_supported_model_types_come_from_the_table_in_order():
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3",
                                     "olmo2", "gpt2", "gpt_neox")
    assert SUPPORTED_ACTIVATIONS == tuple(ACTIVATIONS)


def test_every_family_has_a_hf_reference_case():
    """Each decoder family is run against Hugging Face through at least one case of hf_reference.FAMILIES
    (the multimodal gemma3 through its gemma3_text decoder, and tests/test_gemma3_multimodal.py)."""
    covered = {make().model_type for make in hf_reference.FAMILIES.values()}
    assert set(DECODERS) - covered == set(), "families without a case in tests/hf_reference.py's FAMILIES"


def test_every_gguf_architecture_has_a_gguf_case():
    """Each GGUF architecture, and each family read from one (Mistral: a llama with a sliding window),
    is written and read back against Hugging Face by tests/test_gguf.py."""
    run = {"llama", *test_gguf.FAMILY_TYPES}  # test_llama_every_type_matches_hf, test_family_matches_hf
    archs = {test_gguf.FAMILIES[case][1] for case in run}
    assert archs == set(GGUF_ARCHITECTURES)
    model_types = {test_gguf.FAMILIES[case][0]().model_type for case in run}
    readable = {f.model_type for f in GGUF_ARCHITECTURES.values()}
    readable |= {f.gguf.sliding_window_model_type for f in GGUF_ARCHITECTURES.values()} - {None}
    assert readable - model_types == set(), "families read from GGUF without a case in tests/test_gguf.py"


def family_name_comparisons(source: str) -> list:
    """(line, name) for every comparison in Python source with a family's model_type or GGUF
    architecture name: `x == "qwen2"`, `arch in ("llama", ...)`, `"olmo2" != y`, ..."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                found += [(node.lineno, item.value) for item in items
                          if isinstance(item, ast.Constant) and item.value in FAMILY_NAMES]
    return found


def test_the_scan_finds_family_name_comparisons():
    assert family_name_comparisons('if config.family in ("qwen2", "x") or arch == "gemma3":\n    pass\n') == [
        (1, "qwen2"), (1, "gemma3")]
    assert family_name_comparisons('kind = "llama"\nif config.qk_norm == "head":\n    pass\n') == []


def test_no_module_compares_with_a_family_name():
    """What a family is stays in minielm/families.py: the modules read its fields."""
    package = Path(minielm.__file__).parent
    found = [f"{path.name}:{line}: {name!r}" for path in sorted(package.glob("*.py"))
             for line, name in family_name_comparisons(path.read_text(encoding="utf-8"))]
    assert found == []


def short_names(family) -> set:
    return {part for short in family.layer_tensors.values()
            for part in (short if isinstance(short, tuple) else (short,))}


def test_layer_tensors_agree_with_the_switches():
    """The per-layer tensors are the ones the family's switches say the layer uses: all of a group, or none."""
    groups = {"pre_norms": {"attn_norm", "mlp_norm"}, "post_norms": {"attn_post_norm", "mlp_post_norm"},
              "qk_norm": {"q_norm", "k_norm"}}
    mlp = {"gated": {"w_gate", "w_up", "w_down"}, "plain": {"w_up", "b_up", "w_down", "b_down"}}
    for family in DECODERS.values():
        names = short_names(family)
        assert {"wq", "wk", "wv", "wo"} | mlp[family.mlp] <= names, family.model_type
        assert ("w_gate" in names) == (family.mlp == "gated"), family.model_type
        assert ({"attn_norm_bias", "mlp_norm_bias"} <= names) == (family.norm == "layer"), family.model_type
        for switch, group in groups.items():
            expected = group if getattr(family, switch) else set()
            assert names & group == expected, (family.model_type, switch)


def test_every_family_uses_operations_minielm_has():
    fields = {f.name for f in dataclasses.fields(Config)}
    for family in DECODERS.values():
        assert family.norm in ("rms", "layer") and family.position in ("rope", "learned"), family.model_type
        assert family.mlp == "gated" or family.hidden_act in ACTIVATION_FACTORS, family.model_type  # z·s(z)
        assert family.hidden_act in ACTIVATIONS, family.model_type
        assert family.qk_norm in (None, "head", "full"), family.model_type
        assert family.sliding_layers in (None, "sliding_window", "sliding_window_pattern", "use_sliding_window")
        rope_keys = {"rope_theta", "partial_rotary_factor"}  # read into rope_parameters, not fields of their own
        assert set(family.key_aliases.values()) <= fields | rope_keys, family.model_type
