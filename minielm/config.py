"""Model configuration, read from a checkpoint's config.json.

Field names are the config.json keys. `Config.from_dict` drops unknown keys,
fills each family's defaults, and normalises the several ways Hugging Face
files spell the rotary settings (`rope_theta` + `rope_scaling`, Gemma 3's
`rope_local_base_freq`, transformers 5's `rope_parameters`, flat or keyed by
layer type) into one `rope_parameters` dict keyed by layer type.

What each family is (its defaults, its norms, its biases, ...) is data in
`minielm/families.py`; `Config.family_spec` is this config's entry there, and
the derived switches below (`norm_offset`, `qk_norm`, ...) read it. The model
code reads those switches, never `model_type`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, show
from .families import ACTIVATIONS, FAMILIES, Family

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = tuple(ACTIVATIONS)
LAYER_TYPES = ("full_attention", "sliding_attention")
MAX_SIZE = 2**31 - 1  # no dimension, count or position of a real model comes near this
MAX_LAYERS = 10_000  # a sanity bound: the per-layer lists are built when the config is read


@dataclass
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0  # 0: same as num_attention_heads
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5  # LayerNorm families (GPT-2: layer_norm_epsilon)
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None  # Phi-3 longrope
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    use_parallel_residual: bool | None = None  # GPT-NeoX: h + attn(N₁(h)) + mlp(N₂(h)); None: the family's default
    rope_parameters: dict = field(default_factory=dict)  # layer type -> {rope_type, rope_theta, ...}
    sliding_window: int | None = None
    layer_types: list = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    query_pre_attn_scalar: float | None = None  # Gemma 3: scores scaled by its -1/2 power
    attn_logit_softcapping: float | None = None  # Gemma 2: attention scores soft-capped, cap·tanh(s/cap)
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    # ---- derived: the switches the families need, read from the family's entry -------------
    @property
    def family_spec(self) -> Family:
        """What this model's family is (minielm/families.py); the multimodal gemma3 is its gemma3_text decoder."""
        return FAMILIES[self.model_type]

    @property
    def family(self) -> str:
        """The decoder's model_type: "gemma3_text" for a multimodal "gemma3" checkpoint."""
        return self.family_spec.model_type

    @property
    def norm_offset(self) -> float:
        """RMSNorm scales by (offset + w): Gemma stores w - 1."""
        return self.family_spec.norm_offset

    @property
    def embed_scale(self) -> float:
        """Gemma multiplies the embedding rows by sqrt(d)."""
        return math.sqrt(self.hidden_size) if self.family_spec.scale_embeddings else 1.0

    @property
    def qk_norm(self) -> str | None:
        """RMSNorm on queries and keys: per head (Qwen 3, Gemma 3), over the whole projection (OLMo 2)."""
        return self.family_spec.qk_norm

    @property
    def pre_norms(self) -> bool:
        """Norm before each sublayer (every family but OLMo 2)."""
        return self.family_spec.pre_norms

    @property
    def post_norms(self) -> bool:
        """Norm on each sublayer's output before the residual add (Gemma 3, OLMo 2)."""
        return self.family_spec.post_norms

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q, k and v projections: Qwen 2 always has them, the others as attention_bias says."""
        always = self.family_spec.qkv_bias
        return self.attention_bias if always is None else always

    @property
    def o_bias(self) -> bool:
        """A bias on the output projection: Qwen 2 never has one, the others as attention_bias says."""
        always = self.family_spec.o_bias
        return self.attention_bias if always is None else always

    @property
    def affine(self) -> bool:
        """A bias on the linear path (b_V, b_O, the MLP's, a LayerNorm's; b_Q and b_K only shape P): the
        frozen map is then affine, y = Σ_t J_t x_t + b, and its value at x = 0 is b; without them b is 0."""
        return self.qkv_bias or self.o_bias or self.family_spec.mlp_bias or self.family_spec.norm == "layer"

    @property
    def norm_eps(self) -> float:
        """The ε of the family's norms: rms_norm_eps, or layer_norm_eps for LayerNorm families."""
        return self.layer_norm_eps if self.family_spec.norm == "layer" else self.rms_norm_eps

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # ---- reading -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> Config:
        """Build a Config from a parsed config.json, checking what it must hold.

        Raises ConfigError, naming the key and what was expected, for anything
        else: a missing or mistyped key, an unsupported model or rope type,
        sizes that do not fit together.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: unsupported model_type {show(model_type)}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        family = FAMILIES[model_type]
        if model_type == family.multimodal_model_type:  # an image-text checkpoint: the decoder is its text_config
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type {model_type!r} needs a 'text_config' object, got {show(text)}")
            raw = {**_given(text), "model_type": model_type}
        raw = _with_defaults(_with_aliases(raw, family.key_aliases), family.config_defaults)
        if family.intermediate_size_factor and raw.get("intermediate_size") is None and _is_int(raw.get("hidden_size")):
            raw["intermediate_size"] = family.intermediate_size_factor * raw["hidden_size"]  # GPT-2's n_inner null

        fields = {f.name: f for f in dataclasses.fields(cls)}
        # a null for a key with a non-null default means "not given": the default applies
        kwargs = {k: v for k, v in raw.items() if k in fields and not (v is None and _has_default(fields[k]))}
        for key in REQUIRED_KEYS:
            if key not in kwargs:
                raise ConfigError(f"{source}: required key {key!r} is missing")
        kwargs.setdefault("hidden_act", family.hidden_act)  # the family's own default (Gemma's is not silu)
        if kwargs.get("use_parallel_residual") is None:
            kwargs["use_parallel_residual"] = family.parallel_residual_default
        if not family.mlp_bias and raw.get("mlp_bias") not in (None, False):
            raise ConfigError(f"{source}: mlp_bias={show(raw['mlp_bias'])} is not supported; expected false")
        if not family.attn_logit_softcapping and raw.get("attn_logit_softcapping") not in (None, 0):
            raise ConfigError(f"{source}: attn_logit_softcapping={show(raw['attn_logit_softcapping'])} is not supported "
                              f"for {model_type} (it does not soft-cap attention scores, and Hugging Face ignores "
                              f"the key); expected null")
        for key, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):  # GPT-2
            if raw.get(key) not in (None, plain):
                raise ConfigError(f"{source}: {key}={show(raw[key])} is not supported; expected {str(plain).lower()}")
        if raw.get("use_bidirectional_attention") not in (None, False):  # EmbeddingGemma: an encoder
            value = show(raw["use_bidirectional_attention"])
            raise ConfigError(f"{source}: use_bidirectional_attention={value} is not supported (an encoder); "
                              f"expected false: minielm's decoders attend causally")
        _check_fields(kwargs, source)
        config = cls(**{**kwargs, "rope_parameters": {}, "layer_types": []})
        config.num_key_value_heads = config.num_key_value_heads or config.num_attention_heads
        config.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        config.rope_parameters = _rope_parameters(raw, source)
        config.layer_types = _layer_types(raw, family, config.num_hidden_layers, source)
        config._check(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json")
        return cls.from_dict(read_json(path), str(path))

    def to_dict(self) -> dict:
        """A config.json object that `from_dict` reads back to an equal Config."""
        out = dataclasses.asdict(self)
        if self.family_spec.sliding_layers == "use_sliding_window" and "sliding_attention" in self.layer_types:
            out["use_sliding_window"] = True  # else Qwen's layer_types are read as all full attention
        if self.model_type == self.family_spec.multimodal_model_type:
            out = {"model_type": self.model_type, "text_config": out}
        return out

    def _check(self, source: str) -> None:
        """What the fields must satisfy together (each field alone is checked by `_check_fields`)."""
        for key in ("num_key_value_heads", "head_dim"):
            value = getattr(self, key)
            if not _is_int(value) or not 0 < value <= MAX_SIZE:
                raise ConfigError(f"{source}: {key} must be a positive integer, got {show(value)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_key_value_heads}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"{source}: layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError(f"{source}: sliding_attention layers need a positive sliding_window")
        for layer_type in sorted(set(self.layer_types)):
            params = self.rope_parameters[layer_type]
            rotary = self.head_dim * params["partial_rotary_factor"]
            if int(rotary) < 2 or int(rotary) % 2:
                raise ConfigError(f"{source}: head_dim={self.head_dim} × partial_rotary_factor="
                                  f"{params['partial_rotary_factor']} gives {int(rotary)} rotary dimensions "
                                  f"for {layer_type} layers; expected a positive even number")
            if params["rope_type"] == "longrope":
                old = params.get("original_max_position_embeddings") or self.original_max_position_embeddings
                if not _is_int(old) or not 0 < old <= MAX_SIZE:
                    raise ConfigError(f"{source}: longrope needs a positive integer original_max_position_embeddings "
                                      f"(in the rope settings or at the top level), got {show(old)}")
                for key in ("short_factor", "long_factor"):
                    if len(params[key]) != int(rotary) // 2:
                        raise ConfigError(f"{source}: rope {key!r} for {layer_type} layers has {len(params[key])} "
                                          f"entries; expected {int(rotary) // 2} (half the rotary dimensions)")


REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# ---- checking values ------------------------------------------------------------------
def read_json(path: Path):
    """The JSON value in a file; ConfigError naming the file if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # bad JSON or encoding, an integer too long, too deep
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None


def generation_eos_token_id(path: Path, config: Config):
    """Where generation stops: generation_config.json's eos_token_id where the checkpoint has one, as
    transformers' generate reads it (an instruct model's end of turn, Gemma 3's <end_of_turn> or
    Llama 3's <|eot_id|>, is often listed there only); else config.json's."""
    if not path.is_file():
        return config.eos_token_id
    raw = read_json(path)
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if eos is None:
        return config.eos_token_id
    if not _token_ids(eos):
        raise ConfigError(f"{path}: eos_token_id must be a token id, a list of token ids or null, got {show(eos)}")
    return eos


def _token_ids(value) -> bool:
    """Whether a JSON value is what eos_token_id may be: a token id, a list of token ids, or null."""
    return value is None or _is_int(value) or isinstance(value, list) and all(_is_int(v) for v in value)


def _given(raw: dict) -> dict:
    """The keys of a config object that are not null."""
    return {k: v for k, v in raw.items() if v is not None}


def _with_aliases(raw: dict, aliases: dict) -> dict:
    """A config object with the family's own spellings of keys (GPT-2's n_embd, Gemma's hidden_activation)
    read under minielm's (Config's) names; a given alias wins over the plain key."""
    renamed = {key: raw[alias] for alias, key in aliases.items() if raw.get(alias) is not None}
    return {**raw, **renamed}


def _with_defaults(raw: dict, defaults: dict) -> dict:
    """A config object with a family's defaults (Family.config_defaults) for the keys it leaves out or
    sets to null. A family with none keeps the object as it is: there a null is read as "not given"
    key by key (a null required key is then reported as null, not as missing)."""
    if not defaults:
        return raw
    return {**defaults, **_given(raw)}


def _has_default(f: dataclasses.Field) -> bool:
    """Whether a field has a default other than None."""
    return f.default_factory is not dataclasses.MISSING or f.default not in (None, dataclasses.MISSING)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    """value as a finite float, or None if it is not a finite JSON number (true/false are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _check_fields(kwargs: dict, source: str) -> None:
    """Each field read from the file, alone: its type and range."""
    def fail(key, expected):
        raise ConfigError(f"{source}: {key} must be {expected}, got {show(kwargs[key])}")

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        if key in kwargs and (not _is_int(kwargs[key]) or not 0 < kwargs[key] <= MAX_SIZE):
            fail(key, "a positive integer")
    if kwargs["num_hidden_layers"] > MAX_LAYERS:
        fail("num_hidden_layers", f"at most {MAX_LAYERS}")
    for key in ("num_key_value_heads", "head_dim"):  # 0 (or absent): derived from the others
        if key in kwargs and (not _is_int(kwargs[key]) or not 0 <= kwargs[key] <= MAX_SIZE):
            fail(key, "a positive integer (or 0 to derive it)")
    for key in ("original_max_position_embeddings", "sliding_window"):
        if kwargs.get(key) is not None and (not _is_int(kwargs[key]) or not 0 <= kwargs[key] <= MAX_SIZE):
            fail(key, "a positive integer or null")
    if kwargs.get("bos_token_id") is not None and not _is_int(kwargs["bos_token_id"]):
        fail("bos_token_id", "a token id or null")
    if not _token_ids(kwargs.get("eos_token_id")):
        fail("eos_token_id", "a token id, a list of token ids or null")
    if "hidden_act" in kwargs and (not isinstance(kwargs["hidden_act"], str)
                                   or kwargs["hidden_act"] not in SUPPORTED_ACTIVATIONS):
        raise ConfigError(f"{source}: unsupported hidden_act {show(kwargs['hidden_act'])}; "
                          f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    for key in ("rms_norm_eps", "layer_norm_eps"):
        if key in kwargs and not (_number(kwargs[key]) is not None and kwargs[key] >= 0):
            fail(key, "a non-negative number")
    for key in ("tie_word_embeddings", "attention_bias", "use_parallel_residual"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            fail(key, "true or false")
    if kwargs.get("query_pre_attn_scalar") is not None and not (_number(kwargs["query_pre_attn_scalar"]) or 0) > 0:
        fail("query_pre_attn_scalar", "a positive number or null")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # 0 or null: no soft-capping
        if kwargs.get(key) is not None and not (_number(kwargs[key]) is not None and kwargs[key] >= 0):
            fail(key, "a positive number or null")
    for key in ("rms_norm_eps", "layer_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping"):
        if kwargs.get(key) is not None:  # an integer such as 2**70 is a valid JSON number, but not for torch
            kwargs[key] = float(kwargs[key])


def _rope_parameters(raw: dict, source: str) -> dict:
    """One dict of rotary settings per layer type, whatever spelling the file uses.

    Each value holds `rope_type`, `rope_theta`, `partial_rotary_factor` and the
    type's own keys (`factor`, `low_freq_factor`, `short_factor`, ...).
    """
    given = raw.get("rope_parameters")
    if given is not None and not isinstance(given, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {show(given)}")
    if isinstance(given, dict) and set(given) & set(LAYER_TYPES):  # transformers 5, keyed by layer type
        present = [t for t in LAYER_TYPES if t in given]
        for t in present:
            if not isinstance(given[t], dict):
                raise ConfigError(f"{source}: rope_parameters[{t!r}] must be an object, got {show(given[t])}")
        per_type = {t: dict(given.get(t, given[present[0]])) for t in LAYER_TYPES}
    elif isinstance(given, dict):  # transformers 5, one for all layers
        per_type = {t: dict(given) for t in LAYER_TYPES}
    else:  # transformers 4: rope_theta + rope_scaling (+ Gemma 3's local base)
        scaling = raw.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object or null, got {show(scaling)}")
        glob = {"rope_theta": _get(raw, "rope_theta", 10_000.0), **(scaling or {})}
        local = {"rope_theta": _get(raw, "rope_local_base_freq", glob["rope_theta"])}
        if raw.get("rope_local_base_freq") is None:
            local = dict(glob)
        per_type = {"full_attention": glob, "sliding_attention": local}
    for layer_type, params in per_type.items():
        params["rope_type"] = params.get("rope_type") or params.pop("type", None) or "default"
        if params["rope_type"] == "su":  # the first Phi-3 files' name for longrope
            params["rope_type"] = "longrope"
        if params.get("rope_theta") is None:
            params["rope_theta"] = _get(raw, "rope_theta", 10_000.0)
        if params.get("partial_rotary_factor") is None:
            params["partial_rotary_factor"] = _get(raw, "partial_rotary_factor", 1.0)
        _check_rope(params, layer_type, source)
    return per_type


def _get(raw: dict, key: str, default):
    value = raw.get(key)
    return default if value is None else value


def _check_rope(params: dict, layer_type: str, source: str) -> None:
    """The rotary settings of one layer type: a supported type with every key it needs."""
    kind = params["rope_type"]
    if not isinstance(kind, str) or kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported rope type {show(kind)}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    def need(key, expected, ok):
        value = params.get(key)
        if not ok(value):
            raise ConfigError(f"{source}: {kind} rope for {layer_type} layers needs {key} to be {expected}, "
                              f"got {show(value)}")

    def positive(value):
        return (_number(value) or 0) > 0

    need("rope_theta", "a positive number", positive)
    need("partial_rotary_factor", "a number in (0, 1]", lambda v: positive(v) and v <= 1)
    if kind == "linear":
        need("factor", "a positive number", positive)
    elif kind == "llama3":
        for key in ("factor", "low_freq_factor"):
            need(key, "a positive number", positive)
        need("high_freq_factor", "a number above low_freq_factor",
             lambda v: positive(v) and v > params["low_freq_factor"])
        need("original_max_position_embeddings", "a positive integer", lambda v: _is_int(v) and 0 < v <= MAX_SIZE)
    elif kind == "longrope":
        for key in ("short_factor", "long_factor"):
            need(key, "a list of positive numbers", lambda v: isinstance(v, list) and all(positive(x) for x in v))
        for key in ("factor", "attention_factor"):
            need(key, "a positive number or null", lambda v: v is None or positive(v))
    for key, value in params.items():  # checked numbers as floats: an integer such as 2**70 is not for torch
        if key != "original_max_position_embeddings" and _number(value) is not None:
            params[key] = float(value)
        elif key in ("short_factor", "long_factor") and isinstance(value, list):
            params[key] = [float(v) if _number(v) is not None else v for v in value]


def _layer_types(raw: dict, family: Family, n: int, source: str) -> list:
    """'full_attention' or 'sliding_attention' for every one of the n layers: the file's layer_types,
    or, where it has none, as the family's `sliding_layers` key says."""
    given = raw.get("layer_types")
    use_sliding = raw.get("use_sliding_window")
    if use_sliding is not None and not isinstance(use_sliding, bool):
        raise ConfigError(f"{source}: use_sliding_window must be true or false, got {show(use_sliding)}")
    if given is not None:
        if not isinstance(given, list):
            raise ConfigError(f"{source}: layer_types must be a list, got {show(given)}")
        bad = [t for t in given if not isinstance(t, str) or t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"{source}: unknown layer type {show(bad[0])} in layer_types; "
                              f"expected one of {', '.join(LAYER_TYPES)}")
    switch = family.sliding_layers
    if switch == "use_sliding_window" and not use_sliding:
        return ["full_attention"] * n  # Qwen writes sliding layer types but uses them only when asked to
    if given is not None:
        return list(given)
    if switch == "sliding_window_pattern":  # Gemma 3's older files: every `pattern`-th layer is global
        pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
        if not _is_int(pattern) or pattern < 1:
            raise ConfigError(f"{source}: sliding_window_pattern must be a positive integer, got {show(pattern)}")
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if switch == "sliding_window" and raw.get("sliding_window"):  # Mistral, Phi-3: every layer slides
        return ["sliding_attention"] * n
    if switch == "use_sliding_window":  # Qwen, asked to slide: the layers from max_window_layers on
        first = _get(raw, "max_window_layers", n)
        if not _is_int(first):
            raise ConfigError(f"{source}: max_window_layers must be an integer, got {show(first)}")
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return ["full_attention"] * n
