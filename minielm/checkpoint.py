"""Reading a local Hugging Face checkpoint: config.json and *.safetensors.

One declarative map per family names every tensor the decoder consumes, from
the Hugging Face name to minielm's short name. Fused tensors (Phi-3's
`qkv_proj` and `gate_up_proj`) map to a tuple of short names and are split by
rows. Loading checks that every expected tensor is present with the expected
shape and that no tensor is left over, then casts to the compute dtype.
Files are opened memory-mapped and never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import Config
from .errors import CheckpointError

# ---- the weight-name maps --------------------------------------------------------
# short names: attn_norm, attn_post_norm, mlp_norm, mlp_post_norm  (RMSNorm weights, (d,))
#              wq (H*hd, d), wk (Hkv*hd, d), wv (Hkv*hd, d), wo (d, H*hd), bq, bk, bv, bo (biases)
#              q_norm, k_norm  (hd,) per head or (H*hd,), (Hkv*hd,) over the whole projection
#              w_gate (f, d), w_up (f, d), w_down (d, f)

LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
QK_NORMS = {"self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm"}
QKV_BIASES = {"self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv"}
O_BIAS = {"self_attn.o_proj.bias": "bo"}

LAYER_MAPS = {
    "llama": LLAMA_LAYER,
    "mistral": LLAMA_LAYER,
    "qwen2": LLAMA_LAYER,
    "qwen3": {**LLAMA_LAYER, **QK_NORMS},
    "gemma3_text": {  # four norms per layer: before and after each sublayer
        **LLAMA_LAYER, **QK_NORMS,
        "post_attention_layernorm.weight": "attn_post_norm",
        "pre_feedforward_layernorm.weight": "mlp_norm",
        "post_feedforward_layernorm.weight": "mlp_post_norm",
    },
    "olmo2": {  # norms only after each sublayer
        **{k: v for k, v in LLAMA_LAYER.items() if "layernorm" not in k}, **QK_NORMS,
        "post_attention_layernorm.weight": "attn_post_norm",
        "post_feedforward_layernorm.weight": "mlp_post_norm",
    },
    "phi3": {  # fused projections, split by rows in this order
        "input_layernorm.weight": "attn_norm",
        "self_attn.qkv_proj.weight": ("wq", "wk", "wv"),
        "self_attn.o_proj.weight": "wo",
        "post_attention_layernorm.weight": "mlp_norm",
        "mlp.gate_up_proj.weight": ("w_gate", "w_up"),
        "mlp.down_proj.weight": "w_down",
    },
}
TOP_LEVEL = {"embed_tokens.weight": "embed", "norm.weight": "final_norm"}

# Where the decoder's tensors live: "model." in text checkpoints, deeper in multimodal ones.
DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
# Tensors that are not part of the decoder and are skipped on purpose.
IGNORED_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer that old checkpoints saved; recomputed


def layer_map(config: Config) -> dict:
    names = dict(LAYER_MAPS[config.family])
    if config.qkv_bias:
        names.update(QKV_BIASES)
    if config.o_bias:
        names.update(O_BIAS)
    return names


def expected_shapes(config: Config) -> dict:
    """Short name -> shape, for one layer and for the top level."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    qk_norm = {"head": ((hd,), (hd,)), "full": ((q,), (kv,))}.get(config.qk_norm, (None, None))
    return {
        "embed": (config.vocab_size, d), "final_norm": (d,), "lm_head": (config.vocab_size, d),
        "attn_norm": (d,), "attn_post_norm": (d,), "mlp_norm": (d,), "mlp_post_norm": (d,),
        "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q),
        "bq": (q,), "bk": (kv,), "bv": (kv,), "bo": (d,),
        "q_norm": qk_norm[0], "k_norm": qk_norm[1],
        "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f),
    }


# ---- the files ------------------------------------------------------------------------
def safetensors_files(directory: Path) -> dict:
    """Tensor name -> the file that holds it, from the index file or the files themselves."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return _read_index(index)
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights file (and no model.safetensors.index.json)")
    where = {}
    for path in files:
        for name in _open(path).keys():
            if name in where:
                raise CheckpointError(f"{directory}: tensor {name!r} is in both {where[name].name} and {path.name}; "
                                      f"expected each tensor in one file (or an index naming the shards)")
            where[name] = path
    return where


def _read_index(index: Path) -> dict:
    """Tensor name -> shard file, from model.safetensors.index.json; every shard must be there."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, RecursionError, AttributeError) as err:  # bad JSON, or JSON that is not an object
        raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{index}: cannot read ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index; expected a 'weight_map' object "
                              f"from tensor names to shard file names")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).is_absolute() or ".." in Path(shard).parts or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index}: names shard {shard!r}; expected a *.safetensors file name "
                                  f"inside the checkpoint directory")
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: names shard {shard!r}, which is missing")
    return {name: index.parent / shard for name, shard in weight_map.items()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error type for truncated or garbage files
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


class TensorSource:
    """Memory-mapped access to the tensors of a checkpoint, by Hugging Face name."""

    def __init__(self, directory: Path):
        self.where = safetensors_files(directory)
        self.handles = {}

    def names(self) -> set:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        if path not in self.handles:
            self.handles[path] = _open(path)
        try:
            return self.handles[path].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({err})") from None


def load_weights(directory: Path, config: Config, dtype: torch.dtype, device) -> dict:
    """All decoder tensors, by short name: {'embed', 'final_norm', 'lm_head', 'layers': [dict, ...]}.

    Raises CheckpointError naming the tensor if one is missing, left over or
    of the wrong shape.
    """
    source = TensorSource(directory)
    available = source.names()
    prefix = next((p for p in DECODER_PREFIXES if p + "embed_tokens.weight" in available), None)
    if prefix is None:
        raise CheckpointError(f"{directory}: tensor 'model.embed_tokens.weight' is missing")
    wanted = {prefix + k: v for k, v in TOP_LEVEL.items()}
    if not config.tie_word_embeddings:
        wanted["lm_head.weight"] = "lm_head"
    per_layer = layer_map(config)
    for i in range(config.num_hidden_layers):
        wanted.update({f"{prefix}layers.{i}.{k}": (i, v) for k, v in per_layer.items()})

    leftover = sorted(n for n in available - set(wanted)
                      if not n.startswith(IGNORED_PREFIXES) and not n.endswith(IGNORED_SUFFIXES))
    if leftover:
        raise CheckpointError(f"{source.where[leftover[0]]}: unexpected tensor {leftover[0]!r} "
                              f"({len(leftover)} tensor(s) not used by a {config.num_hidden_layers}-layer "
                              f"{config.model_type} decoder)")
    shapes = expected_shapes(config)
    weights = {"layers": [{} for _ in range(config.num_hidden_layers)]}
    for hf_name, short in wanted.items():
        if hf_name not in available:
            raise CheckpointError(f"{directory}: tensor {hf_name!r} is missing (a {config.num_hidden_layers}-layer "
                                  f"{config.model_type} decoder needs it)")
        layer, short = short if isinstance(short, tuple) and isinstance(short[0], int) else (None, short)
        parts = short if isinstance(short, tuple) else (short,)
        expected = [shapes[p] for p in parts]
        tensor = source.get(hf_name)
        fused_shape = (sum(s[0] for s in expected), *expected[0][1:])
        if tuple(tensor.shape) != fused_shape:
            raise CheckpointError(f"{source.where[hf_name]}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {fused_shape} from config.json")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source.where[hf_name]}: tensor {hf_name!r} has dtype {tensor.dtype}, "
                                  f"expected floating point")
        target = weights if layer is None else weights["layers"][layer]
        for name, piece in zip(parts, torch.split(tensor, [s[0] for s in expected])):
            target[name] = piece.to(device=device, dtype=dtype).contiguous()
    if config.tie_word_embeddings:
        weights["lm_head"] = weights["embed"]
    return weights


def save_checkpoint(directory, config_json: dict, weights: dict, dtype=torch.float32) -> None:
    """Write weights (the dict `load_weights` returns) as a Hugging Face directory:
    config.json and model.safetensors, under the family's names. For tools and tests;
    `minielm.load` itself never writes anything."""
    from safetensors.torch import save_file

    config = Config.from_dict(config_json)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"model." + k: weights[v] for k, v in TOP_LEVEL.items()}
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = weights["lm_head"]
    for i, layer in enumerate(weights["layers"]):
        for hf_name, short in layer_map(config).items():
            parts = short if isinstance(short, tuple) else (short,)
            tensors[f"model.layers.{i}.{hf_name}"] = torch.cat([layer[p] for p in parts])
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
