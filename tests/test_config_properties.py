"""Property tests of config parsing: garbage gives ConfigError and nothing else; valid configs round-trip.

`Config.from_dict` is fed valid config.json objects of every family with random
keys deleted or replaced by arbitrary JSON values (wrong types, negative or
huge numbers, strings where ints go, heads that do not divide, bad rope
objects). Whatever it accepts must be a usable config: positive sizes that fit
together, computable rotary tables, and a `to_dict` that reads back equal.
"""

import copy
import json
import math
import os
import tempfile

import pytest
import torch
from hf_reference import hf_float64_logits, load_hf_float64
from huggingface_hub.errors import StrictDataclassFieldValidationError
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

import minielm
from minielm.checkpoint import expected_shapes
from minielm.config import LAYER_TYPES, SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, Config
from minielm.errors import CheckpointError, ConfigError, InputError, NumericalError
from minielm.rope import rotation

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# One valid config.json object per spelling minielm reads (transformers 4 and 5, every family).
BASES = {
    "llama3": dict(model_type="llama", **_COMMON, tie_word_embeddings=False, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32)),
    "qwen3": dict(model_type="qwen3", **_COMMON, head_dim=16, tie_word_embeddings=True, use_sliding_window=True,
                  sliding_window=4, max_window_layers=1, rope_parameters=dict(rope_type="default", rope_theta=1e6),
                  layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
    "gemma3_text": dict(model_type="gemma3_text", **_COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh",
                        sliding_window=4, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
    "gemma3": dict(model_type="gemma3", text_config=dict(**_COMMON, head_dim=16, sliding_window=4,
                                                         sliding_window_pattern=2, rope_local_base_freq=1e4,
                                                         rope_scaling=dict(rope_type="linear", factor=8.0))),
    "phi3_longrope": dict(model_type="phi3", **_COMMON, original_max_position_embeddings=8, partial_rotary_factor=0.5,
                          rope_scaling=dict(type="longrope", short_factor=[1.0, 1.3], long_factor=[1.1, 2.5])),
    "mistral": dict(model_type="mistral", **_COMMON, sliding_window=5, rope_theta=1e4),
    "olmo2": dict(model_type="olmo2", **_COMMON, rope_theta=5e5, rope_scaling=None),
}

TOP_KEYS = sorted({k for base in BASES.values() for k in base} | {k for k in BASES["gemma3"]["text_config"]}
                  | {"head_dim", "hidden_act", "attention_bias", "mlp_bias", "layer_types", "rope_parameters",
                     "rope_scaling", "partial_rotary_factor", "attn_logit_softcapping", "sliding_window_pattern",
                     "_sliding_window_pattern", "original_max_position_embeddings", "use_sliding_window",
                     "use_bidirectional_attention"})
ROPE_KEYS = ["rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "short_factor", "long_factor", "partial_rotary_factor",
             "attention_factor", *LAYER_TYPES]

scalars = (st.none() | st.booleans() | st.integers(-3, 70) | st.integers() | st.floats()
           | st.text(max_size=6) | st.sampled_from([*SUPPORTED_MODEL_TYPES, *SUPPORTED_ROPE_TYPES, *LAYER_TYPES,
                                                    "su", "yarn", "silu", "gelu_pytorch_tanh", "16"]))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(ROPE_KEYS) | st.text(max_size=5), inner, max_size=4), max_leaves=8)


def rope_objects(raw: dict) -> list:
    """The rope settings objects inside a config object, to mutate."""
    found = [raw[k] for k in ("rope_scaling", "rope_parameters") if isinstance(raw.get(k), dict)]
    return found + [v for d in found for v in d.values() if isinstance(v, dict)]


@st.composite
def mutated_configs(draw, base: dict | None = None, keys: list = TOP_KEYS):
    """A config.json object (a family's base, or `base`) with 1 to 4 keys (mostly from `keys`) deleted or
    set to any JSON value."""
    raw = copy.deepcopy(base if base is not None else BASES[draw(st.sampled_from(sorted(BASES)))])
    target = raw["text_config"] if "text_config" in raw and draw(st.booleans()) else raw
    for _ in range(draw(st.integers(1, 4))):
        inner = rope_objects(target)
        if inner and draw(st.booleans()):
            obj, key = draw(st.sampled_from(inner)), draw(st.sampled_from(ROPE_KEYS) | st.text(max_size=4))
        else:
            obj, key = target, draw(st.sampled_from(keys) | st.text(max_size=4))
        if key in obj and draw(st.booleans()):
            del obj[key]
        else:
            obj[key] = draw(json_values)
    return raw


def assert_usable(config: Config) -> None:
    """What the model code relies on, for any config from_dict accepts."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = getattr(config, key)
        assert type(value) is int and value > 0, key
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert len(config.layer_types) == config.num_hidden_layers
    assert set(config.layer_types) <= set(LAYER_TYPES)
    if "sliding_attention" in config.layer_types:
        assert config.sliding_window > 0
    assert math.isfinite(config.attention_scale) and config.attention_scale > 0
    assert math.isfinite(config.embed_scale)
    assert math.isfinite(config.rms_norm_eps) and config.rms_norm_eps >= 0
    assert type(config.tie_word_embeddings) is bool
    expected_shapes(config)
    if config.head_dim <= 1024:  # the rotary tables, at a few positions inside and beyond any original context
        for layer_type in set(config.layer_types):
            params = config.rope_parameters[layer_type]
            assert params["rope_type"] in SUPPORTED_ROPE_TYPES
            cos, sin = rotation(config, params, torch.tensor([0, 1, 5, 300]), torch.float64)
            assert cos.shape[1] % 2 == 0 and cos.shape[1] > 0
            assert bool(torch.isfinite(cos).all() and torch.isfinite(sin).all())


def test_bases_are_valid():
    for name, raw in BASES.items():
        config = Config.from_dict(raw)
        assert_usable(config)
        assert Config.from_dict(config.to_dict()) == config, name
    assert Config.from_dict(BASES["qwen3"]).layer_types == ["full_attention", "sliding_attention",
                                                            "sliding_attention"]


@SETTINGS
@given(mutated_configs())
def test_from_dict_raises_only_config_error(raw):
    before = copy.deepcopy(raw)
    try:
        config = Config.from_dict(raw)
    except ConfigError as err:
        message = str(err)
        assert message.startswith("config.json: ") and "\n" not in message and len(message) < 400
        return
    finally:
        assert raw == before, "from_dict changed its argument"
    assert_usable(config)
    assert Config.from_dict(config.to_dict()) == config


@st.composite
def valid_configs(draw):
    """Random valid config.json objects of every family and rope spelling."""
    family = draw(st.sampled_from(SUPPORTED_MODEL_TYPES))
    kv, group = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    head_dim = 4 * draw(st.integers(1, 8))
    layers = draw(st.integers(1, 5))
    raw = dict(vocab_size=draw(st.integers(1, 300_000)), hidden_size=draw(st.integers(1, 512)),
               intermediate_size=draw(st.integers(1, 2048)), num_hidden_layers=layers,
               num_attention_heads=kv * group, num_key_value_heads=kv, head_dim=head_dim,
               max_position_embeddings=draw(st.integers(1, 1 << 20)),
               rms_norm_eps=draw(st.floats(0, 1e-3)), tie_word_embeddings=draw(st.booleans()))
    partial = draw(st.sampled_from([1.0, 0.5]))
    kind = draw(st.sampled_from(SUPPORTED_ROPE_TYPES))
    rope = dict(rope_type=kind, rope_theta=draw(st.floats(1.0, 1e7)), partial_rotary_factor=partial)
    if kind == "linear":
        rope["factor"] = draw(st.floats(0.5, 64))
    elif kind == "llama3":
        low = draw(st.floats(0.5, 2))
        rope.update(factor=draw(st.floats(1, 64)), low_freq_factor=low, high_freq_factor=low + draw(st.floats(0.5, 4)),
                    original_max_position_embeddings=draw(st.integers(1, 8192)))
    elif kind == "longrope":
        half = int(head_dim * partial) // 2
        factors = st.lists(st.floats(0.5, 10), min_size=half, max_size=half)
        rope.update(short_factor=draw(factors), long_factor=draw(factors), original_max_position_embeddings=64)
    style = draw(st.sampled_from(["transformers4", "flat", "keyed"]))
    if style == "transformers4":
        raw["rope_theta"] = rope.pop("rope_theta")
        raw["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        raw["rope_scaling"] = rope
    elif style == "flat":
        raw["rope_parameters"] = rope
    else:
        raw["rope_parameters"] = {"full_attention": rope, "sliding_attention": dict(rope, rope_theta=1e4)}
    if draw(st.booleans()):
        raw["sliding_window"] = draw(st.integers(1, 4096))
        raw["layer_types"] = draw(st.lists(st.sampled_from(LAYER_TYPES), min_size=layers, max_size=layers))
        raw["use_sliding_window"] = True
    if family == "gemma3":
        return {"model_type": "gemma3", "text_config": raw}
    return {"model_type": family, **raw}


@SETTINGS
@given(valid_configs())
def test_valid_configs_round_trip(raw):
    config = Config.from_dict(raw)
    assert_usable(config)
    fields = raw.get("text_config", raw)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        assert getattr(config, key) == fields[key]
    if "layer_types" in fields:
        assert config.layer_types == fields["layer_types"]
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))  # through a config.json file's text
    assert again == config


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | json_values.map(lambda v: json.dumps(v).encode()))
def test_from_file_raises_only_config_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "wb") as f:
            f.write(data)
        try:
            Config.from_file(path)
        except ConfigError as err:
            assert str(err).startswith(path) and "\n" not in str(err)


# ---- the named cases, with the message each must give ----------------------------------------------
def with_changes(base: str, **changes) -> dict:
    raw = copy.deepcopy(BASES[base])
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("raw, fragments", [
    ([1, 2], ["expected a JSON object, got list"]),
    (with_changes("llama3", model_type="bert"), ["'bert'", "supported: " + ", ".join(SUPPORTED_MODEL_TYPES)]),
    (with_changes("llama3", model_type=...), ["model_type None"]),
    (with_changes("llama3", hidden_size=...), ["required key 'hidden_size' is missing"]),
    (with_changes("llama3", hidden_size=None), ["hidden_size must be a positive integer, got None"]),
    (with_changes("llama3", hidden_size="32"), ["hidden_size must be a positive integer, got '32'"]),
    (with_changes("llama3", num_hidden_layers=True), ["num_hidden_layers must be a positive integer, got True"]),
    (with_changes("llama3", intermediate_size=-48), ["intermediate_size must be a positive integer, got -48"]),
    (with_changes("llama3", vocab_size=64.0), ["vocab_size must be a positive integer, got 64.0"]),
    (with_changes("llama3", num_hidden_layers=10**30), ["num_hidden_layers must be a positive integer"]),
    (with_changes("llama3", num_key_value_heads=3), ["num_attention_heads=4", "num_key_value_heads=3"]),
    (with_changes("llama3", tie_word_embeddings="false"), ["tie_word_embeddings must be true or false"]),
    (with_changes("llama3", hidden_act="relu"), ["unsupported hidden_act 'relu'", "silu"]),
    (with_changes("llama3", rms_norm_eps=-1e-6), ["rms_norm_eps must be a non-negative number"]),
    (with_changes("llama3", rope_scaling="llama3"), ["rope_scaling must be an object or null, got 'llama3'"]),
    (with_changes("llama3", rope_scaling=[["factor", 8.0]]), ["rope_scaling must be an object or null"]),
    (with_changes("llama3", rope_scaling=dict(rope_type="yarn", factor=4.0)), ["unsupported rope type 'yarn'"]),
    (with_changes("llama3", rope_scaling=dict(rope_type="llama3", factor=8.0)),
     ["llama3 rope", "low_freq_factor", "positive number, got None"]),
    (with_changes("llama3", rope_theta="10000"), ["rope_theta to be a positive number, got '10000'"]),
    (with_changes("llama3", rope_parameters=[1]), ["rope_parameters must be an object, got [1]"]),
    (with_changes("gemma3_text", rope_parameters={"full_attention": 10000.0}),
     ["rope_parameters['full_attention'] must be an object, got 10000.0"]),
    (with_changes("llama3", head_dim=3), ["3 rotary dimensions", "positive even number"]),
    (with_changes("phi3_longrope", rope_scaling=dict(type="longrope", short_factor=[1.0], long_factor=[1.0, 2.0])),
     ["'short_factor'", "1 entries; expected 2"]),
    (with_changes("llama3", layer_types=3), ["layer_types must be a list, got 3"]),
    (with_changes("llama3", layer_types=["full_attention"]), ["layer_types has 1 entries for 3 layers"]),
    (with_changes("llama3", layer_types=["full_attention", "local", "full_attention"]), ["unknown layer type 'local'"]),
    (with_changes("qwen3", sliding_window=None), ["sliding_attention layers need a positive sliding_window"]),
    (with_changes("llama3", mlp_bias=True), ["mlp_bias=True is not supported"]),
    (with_changes("gemma3_text", attn_logit_softcapping=50.0), ["attn_logit_softcapping=50.0 is not supported"]),
    (with_changes("gemma3_text", use_bidirectional_attention=True),
     ["use_bidirectional_attention=True is not supported"]),
    (with_changes("gemma3", text_config={**BASES["gemma3"]["text_config"], "use_bidirectional_attention": True}),
     ["use_bidirectional_attention=True is not supported (an encoder); expected false"]),
    (with_changes("gemma3", text_config="none"), ["'gemma3' needs a 'text_config' object"]),
    (with_changes("llama3", eos_token_id={"id": 2}), ["eos_token_id must be a token id, a list of token ids or null"]),
])
def test_config_error_names_the_key(raw, fragments):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(raw, "dir/config.json")
    message = str(info.value)
    assert message.startswith("dir/config.json: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_causal_gemma3_may_say_so():
    """use_bidirectional_attention false (or null) is the decoder minielm runs: accepted."""
    for value in (False, None):
        config = Config.from_dict(with_changes("gemma3_text", use_bidirectional_attention=value))
        assert config.model_type == "gemma3_text"


def test_null_means_the_default():
    """A null for a key with a default (as transformers writes them) is the default, not an error."""
    config = Config.from_dict(with_changes("llama3", head_dim=None, tie_word_embeddings=None, rms_norm_eps=None))
    assert config.head_dim == 8 and config.tie_word_embeddings is False and config.rms_norm_eps == 1e-6


# ---- fuzzing config.json inside a real checkpoint, through minielm.load -------------------------------
# The weights stay those of one tiny Llama-style checkpoint; only config.json changes. Whatever the file
# says, loading and running must end in a clean one-line error (naming the checkpoint's file or tensor
# for a ConfigError or CheckpointError), or in a correct result: the very logits of the unmutated
# checkpoint when the config minielm reads is the same, and otherwise finite logits that a config.json
# written from minielm's own reading (Config.to_dict) reproduces bit for bit. Either way, in float64
# they are Hugging Face's float64 logits for the same config.json, to 1e-12, wherever transformers
# accepts the file (it refuses some that minielm reads: a null hidden_act, say, which minielm takes
# as the default). The weights file is never written.
FUZZ_IDS = [1, 7, 3, 60, 12, 9, 33, 5]
FUZZ_BASE = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                 rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=1, eos_token_id=2)


PLAUSIBLE = {  # values a config.json could really hold: some fit these weights, some do not
    "rope_theta": st.floats(1.0, 1e7), "rms_norm_eps": st.floats(0, 1e-2),
    "max_position_embeddings": st.integers(1, 1 << 20), "hidden_act": st.sampled_from(["silu", "gelu_pytorch_tanh"]),
    "tie_word_embeddings": st.booleans(), "hidden_size": st.sampled_from([8, 16, 32]),
    "intermediate_size": st.sampled_from([16, 32, 64]), "num_hidden_layers": st.integers(1, 3),
    "num_key_value_heads": st.sampled_from([1, 2, 4]), "head_dim": st.sampled_from([2, 4, 8]),
    "rope_scaling": st.none() | st.builds(dict, rope_type=st.just("linear"), factor=st.floats(0.5, 8))
    | st.builds(dict, rope_type=st.just("llama3"), factor=st.floats(1, 8), low_freq_factor=st.just(1.0),
                high_freq_factor=st.just(4.0), original_max_position_embeddings=st.integers(1, 64)),
    "model_type": st.sampled_from(["llama", "mistral", "qwen2"]),
}


@st.composite
def plausible_configs(draw):
    """FUZZ_BASE with 1 or 2 keys set to plausible values."""
    raw = dict(FUZZ_BASE)
    for key in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), min_size=1, max_size=2, unique=True)):
        raw[key] = draw(PLAUSIBLE[key])
    return raw


@pytest.fixture(scope="module")
def fuzz_checkpoint(tmp_path_factory):
    """(directory, logits of FUZZ_IDS, the weights file's bytes) of a checkpoint whose config.json is FUZZ_BASE."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from bench import random_checkpoint

    directory = tmp_path_factory.mktemp("config_fuzz")
    random_checkpoint(directory, d=16, layers=2, f=32, heads=4, kv_heads=2, vocab=64, tied=False)
    return directory, logits_of(directory, FUZZ_BASE), (directory / "model.safetensors").read_bytes()


def logits_of(directory, raw: dict):
    """Write raw as config.json, load the checkpoint, and run FUZZ_IDS: (T, V)."""
    (directory / "config.json").write_text(json.dumps(raw))
    return minielm.load(directory).logits(FUZZ_IDS)


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


# How many examples of each property reached the comparison with Hugging Face's logits: a property
# whose examples all end in a refusal (minielm's or transformers') would pass without comparing
# anything, so each test below runs its property and then requires a minimum. The counts with the
# fixed examples ("same every run") are 36 of 50 for the fuzzed configs and 20 of 50 for the
# plausible ones; the minimums leave room for `--hypothesis-profile explore`.
COMPARED = {"count": 0}
MIN_COMPARED = {"fuzzed": 15, "plausible": 10}


def comparisons(run, *args) -> int:
    """Run a hypothesis property; the number of its examples compared with Hugging Face."""
    before = COMPARED["count"]
    run(*args)
    return COMPARED["count"] - before


@FUZZ
@given(raw=mutated_configs(FUZZ_BASE, sorted(FUZZ_BASE) + ["rope_scaling", "head_dim", "layer_types",
                                                             "sliding_window", "attention_bias"]))
def fuzzed_config_json(fuzz_checkpoint, raw):
    clean_error_or_correct_result(fuzz_checkpoint, raw)


@FUZZ
@given(raw=plausible_configs())
def plausible_config_json(fuzz_checkpoint, raw):
    clean_error_or_correct_result(fuzz_checkpoint, raw)


def test_fuzzed_config_json_in_a_checkpoint(fuzz_checkpoint):
    compared = comparisons(fuzzed_config_json, fuzz_checkpoint)
    assert compared >= MIN_COMPARED["fuzzed"], f"only {compared} examples compared with Hugging Face"


def test_plausible_config_json_in_a_checkpoint(fuzz_checkpoint):
    compared = comparisons(plausible_config_json, fuzz_checkpoint)
    assert compared >= MIN_COMPARED["plausible"], f"only {compared} examples compared with Hugging Face"


def note(what: str) -> None:
    """A hypothesis event (shown by --hypothesis-show-statistics) inside a property test, else nothing."""
    if currently_in_test_context():
        event(what)


# The ways transformers (5.25) refuses a config.json that minielm reads, all raised while it loads the
# checkpoint: its strict config dataclasses (a null hidden_act, rms_norm_eps 0 as an int), and its rotary
# init on a rope_theta it does not check (null: TypeError, 0.0: ZeroDivisionError, 2**70: OverflowError).
# Anything else (an AssertionError from the oracle's own float64 check, an error in the forward pass)
# fails the test.
HF_REFUSALS = (StrictDataclassFieldValidationError, ValueError, TypeError, ZeroDivisionError, OverflowError)


def clean_error_or_correct_result(fuzz_checkpoint, raw: dict) -> None:
    directory, expected, weights = fuzz_checkpoint
    try:
        logits = logits_of(directory, raw)
    except (ConfigError, CheckpointError, NumericalError, InputError) as err:
        note(type(err).__name__)
        message = str(err)
        assert "\n" not in message and len(message) < 500, message
        if isinstance(err, (ConfigError, CheckpointError)):
            assert str(directory) in message, message  # names the file or tensor at fault
        return
    finally:
        assert (directory / "model.safetensors").read_bytes() == weights
    assert logits.shape == expected.shape and bool(torch.isfinite(logits).all())
    config = Config.from_dict(raw)
    note("ran: same config read" if config == Config.from_dict(FUZZ_BASE) else "ran: another config read")
    if config == Config.from_dict(FUZZ_BASE):
        assert torch.equal(logits, expected), "the same config read, a different answer"
    else:
        assert torch.equal(logits_of(directory, config.to_dict()), logits)
    (directory / "config.json").write_text(json.dumps(raw))
    try:
        reference = hf_float64_logits(directory, FUZZ_IDS)
    except HF_REFUSALS as err:  # transformers refuses this config.json: no reference to compare with
        note(f"transformers refused: {type(err).__name__}")
        with pytest.raises(type(err)):  # ... and refuses it on loading, not in the forward pass
            load_hf_float64(directory)
        return
    ours = minielm.load(directory, dtype=torch.float64).logits(FUZZ_IDS)
    error = float((ours - reference).abs().max() / reference.abs().max())
    assert error < 1e-12, f"{error:.1e} from Hugging Face's float64 logits"
    COMPARED["count"] += 1


ODD_VALUES = [None, True, False, 0, -1, 1.5, 2**70, math.nan, math.inf, "", "16", "silu", [], [1], {}, {"x": 1}]


@pytest.mark.parametrize("key", sorted(FUZZ_BASE) + ["rope_scaling", "head_dim", "layer_types", "sliding_window"])
def test_every_key_set_to_odd_values(fuzz_checkpoint, key):
    """The sweep hypothesis may miss: every key of the checkpoint's config.json set, in turn, to each of
    a fixed list of odd JSON values (NaN and Infinity as Python's json writes them), and deleted."""
    for value in [*ODD_VALUES, ...]:
        raw = {k: v for k, v in FUZZ_BASE.items() if k != key}
        if value is not ...:
            raw[key] = value
        clean_error_or_correct_result(fuzz_checkpoint, raw)
