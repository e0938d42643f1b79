"""Model configuration, read from a checkpoint's config.json.

Field names are the config.json keys. `Config.from_dict` drops unknown keys,
fills each family's defaults, and normalises the several ways Hugging Face
files spell the rotary settings (`rope_theta` + `rope_scaling`, Gemma 3's
`rope_local_base_freq`, transformers 5's `rope_parameters`, flat or keyed by
layer type) into one `rope_parameters` dict keyed by layer type.

The derived switches at the bottom (`norm_offset`, `qk_norm`, ...) are the
only places where the families differ; the model code reads them, never
`model_type`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "phi3", "olmo2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


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
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None  # Phi-3 longrope
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_parameters: dict = field(default_factory=dict)  # layer type -> {rope_type, rope_theta, ...}
    sliding_window: int | None = None
    layer_types: list = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    query_pre_attn_scalar: float | None = None  # Gemma 3: scores scaled by its -1/2 power
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    # ---- derived: the switches the families need -------------------------------
    @property
    def family(self) -> str:
        return "gemma3_text" if self.model_type == "gemma3" else self.model_type

    @property
    def norm_offset(self) -> float:
        """RMSNorm scales by (offset + w): Gemma stores w - 1."""
        return 1.0 if self.family == "gemma3_text" else 0.0

    @property
    def embed_scale(self) -> float:
        """Gemma multiplies the embedding rows by sqrt(d)."""
        return math.sqrt(self.hidden_size) if self.family == "gemma3_text" else 1.0

    @property
    def qk_norm(self) -> str | None:
        """RMSNorm on queries and keys: per head (Qwen 3, Gemma 3), over the whole projection (OLMo 2)."""
        return {"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}.get(self.family)

    @property
    def pre_norms(self) -> bool:
        """Norm before each sublayer (every family but OLMo 2)."""
        return self.family != "olmo2"

    @property
    def post_norms(self) -> bool:
        """Norm on each sublayer's output before the residual add (Gemma 3, OLMo 2)."""
        return self.family in ("gemma3_text", "olmo2")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.family == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.family != "qwen2"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # ---- reading -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> Config:
        """Build a Config from a parsed config.json, checking what it must hold."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: unsupported model_type {model_type!r}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if model_type == "gemma3":  # the multimodal checkpoint: the decoder lives in text_config
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type 'gemma3' needs a 'text_config' object")
            raw = {**GEMMA3_DEFAULTS, **text, "model_type": "gemma3"}
        elif model_type == "gemma3_text":
            raw = {**GEMMA3_DEFAULTS, **raw}

        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in kwargs:
                raise ConfigError(f"{source}: required key {key!r} is missing")
        if raw.get("hidden_activation") is not None:  # Gemma's name for it
            kwargs["hidden_act"] = raw["hidden_activation"]
        if raw.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        kwargs["rope_parameters"] = _rope_parameters(raw, source)
        kwargs["layer_types"] = _layer_types(raw, source)
        config = cls(**kwargs)
        config._check(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(raw, str(path))

    def _check(self, source: str) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported hidden_act {self.hidden_act!r}; "
                              f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps >= 0):
            raise ConfigError(f"{source}: rms_norm_eps must be a non-negative number, got {self.rms_norm_eps!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"{source}: layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError(f"{source}: sliding_attention layers need a positive sliding_window")


GEMMA3_DEFAULTS = dict(  # transformers' Gemma3TextConfig defaults that real config.json files omit
    vocab_size=262208, hidden_act="gelu_pytorch_tanh", head_dim=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
    tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=2, eos_token_id=1,
)


def _rope_parameters(raw: dict, source: str) -> dict:
    """One dict of rotary settings per layer type, whatever spelling the file uses.

    Each value holds `rope_type`, `rope_theta`, `partial_rotary_factor` and the
    type's own keys (`factor`, `low_freq_factor`, `short_factor`, ...).
    """
    given = raw.get("rope_parameters")
    if isinstance(given, dict) and set(given) & set(LAYER_TYPES):  # transformers 5, keyed by layer type
        present = [t for t in LAYER_TYPES if t in given]
        per_type = {t: dict(given.get(t, given[present[0]])) for t in LAYER_TYPES}
    elif isinstance(given, dict):  # transformers 5, one for all layers
        per_type = {t: dict(given) for t in LAYER_TYPES}
    else:  # transformers 4: rope_theta + rope_scaling (+ Gemma 3's local base)
        scaling = dict(raw.get("rope_scaling") or {})
        glob = {"rope_theta": raw.get("rope_theta", 10_000.0), **scaling}
        local = {"rope_theta": raw.get("rope_local_base_freq", glob["rope_theta"])}
        if raw.get("rope_local_base_freq") is None:
            local = dict(glob)
        per_type = {"full_attention": glob, "sliding_attention": local}
    for params in per_type.values():
        params["rope_type"] = params.get("rope_type") or params.pop("type", None) or "default"
        if params["rope_type"] == "su":  # the first Phi-3 files' name for longrope
            params["rope_type"] = "longrope"
        params.setdefault("rope_theta", raw.get("rope_theta", 10_000.0))
        params.setdefault("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: unsupported rope type {params['rope_type']!r}; "
                              f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return per_type


def _layer_types(raw: dict, source: str) -> list:
    """'full_attention' or 'sliding_attention' for every layer."""
    n = raw["num_hidden_layers"]
    given = raw.get("layer_types")
    if given is not None:
        bad = [t for t in given if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"{source}: unknown layer type {bad[0]!r} in layer_types; expected one of {LAYER_TYPES}")
        if raw["model_type"] in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
            return ["full_attention"] * n  # Qwen writes sliding layer types but uses them only when asked to
        return list(given)
    if raw["model_type"] in ("gemma3", "gemma3_text"):  # older files: every `pattern`-th layer is global
        pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if raw["model_type"] in ("mistral", "phi3") and raw.get("sliding_window"):
        return ["sliding_attention"] * n
    if raw["model_type"] in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        first = raw.get("max_window_layers", n)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return ["full_attention"] * n
