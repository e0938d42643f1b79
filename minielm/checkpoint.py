"""Reading a local Hugging Face checkpoint: config.json and *.safetensors.

One declarative map per family names every tensor the decoder consumes, from
the Hugging Face name to minielm's short name. Fused tensors (Phi-3's
`qkv_proj` and `gate_up_proj`) map to a tuple of short names and are split by
rows. Loading checks that every expected tensor is present with the expected
shape and that no tensor is left over, then casts to the compute dtype.
Files are opened memory-mapped and never written.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

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
        for name in MappedFile(path).keys():
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class MappedFile:
    """One safetensors file, memory-mapped read-only; tensors are zero-copy views in the file's dtype.

    Layout: 8 bytes little-endian n, n bytes of JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the data, offsets counted from its start.
    Everything the header claims is checked against the file's size first.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError(f"header of {n} bytes does not fit in a file of {size} bytes")
                header = json.loads(f.read(n))
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError, RecursionError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: unreadable safetensors file (the header is not a JSON object)")
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, {}
        for name, entry in header.items():
            self.entries[name] = self._checked(name, entry, size - self.start)

    def _checked(self, name, entry, data_size):
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: unreadable safetensors file (bad header entry for {name!r})") from None
        count = math.prod(shape)
        if not 0 <= begin <= end <= data_size or end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{self.path}: unreadable safetensors file (tensor {name!r} claims bytes "
                                  f"{begin}..{end} of {data_size}: truncated or corrupt)")
        return dtype, shape, begin, count

    def keys(self):
        return self.entries.keys()

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a read-only view into the mapped file (no copy)."""
        dtype, shape, begin, count = self.entries[name]
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the map is read-only; nothing writes through these views
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.start + begin).view(shape)

    def release(self, name: str) -> None:
        """Let the kernel drop the pages of a tensor already cast: they leave this process's memory."""
        _, _, begin, count = self.entries[name]
        first = (self.start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        last = self.start + begin + count * self.entries[name][0].itemsize
        if count and hasattr(self.map, "madvise"):
            self.map.madvise(mmap.MADV_DONTNEED, first, last - first)


class TensorSource:
    """Memory-mapped access to the tensors of a checkpoint, by Hugging Face name."""

    def __init__(self, directory: Path):
        self.where = safetensors_files(directory)
        self.files = {}

    def names(self) -> set:
        return set(self.where)

    def file(self, name: str) -> MappedFile:
        path = self.where[name]
        if path not in self.files:
            self.files[path] = MappedFile(path)
        if name not in self.files[path].entries:
            raise CheckpointError(f"{path}: has no tensor {name!r}, which the index places there")
        return self.files[path]

    def get(self, name: str) -> torch.Tensor:
        return self.file(name).view(name)


def load_weights(directory: Path, config: Config, dtype: torch.dtype, device, stream: bool = False) -> dict:
    """All decoder tensors, by short name: {'embed', 'final_norm', 'lm_head', 'layers': [dict, ...]}.

    Raises CheckpointError naming the tensor if one is missing, left over or of
    the wrong shape. With `stream`, the embedding and unembedding stay
    memory-mapped in the file's dtype and the layers are `StreamedLayers`, cast
    to the compute dtype only while they are used.
    """
    source = TensorSource(directory)
    plan = checked_plan(source, directory, config)
    weights = {"layers": [{} for _ in range(config.num_hidden_layers)]}
    for hf_name, layer, parts in plan:
        if stream and (layer is not None or parts[0][0] in ("embed", "lm_head")):
            continue
        target = weights if layer is None else weights["layers"][layer]
        for name, piece in zip((p for p, _ in parts), split_parts(source.get(hf_name), parts)):
            target[name] = piece.to(device=device, dtype=dtype).contiguous()
    if stream:
        check_aligned(source, plan)
        return_freed_memory_promptly()
        for hf_name, layer, parts in plan:
            if layer is None and parts[0][0] in ("embed", "lm_head"):
                weights[parts[0][0]] = source.get(hf_name)  # (V, d) in the file's dtype, memory-mapped
        weights["layers"] = StreamedLayers(source, plan, config.num_hidden_layers, dtype, device)
    if config.tie_word_embeddings:
        weights["lm_head"] = weights["embed"]
    return weights


def check_aligned(source: TensorSource, plan: list) -> None:
    """Streaming computes on views into the mapped file, so each tensor must start at a multiple
    of its element size (as safetensors writers lay them out); else a CheckpointError."""
    for hf_name, _, _ in plan:
        mapped = source.file(hf_name)
        file_dtype, _, begin, _ = mapped.entries[hf_name]
        if (mapped.start + begin) % file_dtype.itemsize:
            raise CheckpointError(f"{mapped.path}: tensor {hf_name!r} starts at byte {mapped.start + begin}, "
                                  f"not a multiple of its {file_dtype.itemsize}-byte elements: stream=True maps "
                                  f"tensors in place and needs them aligned; load without stream=True")


def return_freed_memory_promptly() -> None:
    """glibc keeps freed blocks under a moving size threshold (up to 32 MiB) in its heap, so a
    streamed model's per-layer tensors would pile up there instead of going back to the system.
    A fixed threshold of 1 MiB (mallopt M_MMAP_THRESHOLD) returns them as each layer is dropped.
    Elsewhere than glibc this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


def checked_plan(source: TensorSource, directory: Path, config: Config) -> list:
    """[(hf_name, layer or None, [(short name, rows), ...])] for every tensor the decoder uses,
    after checking that each is present, floating point and of the expected shape, and that
    nothing else is in the checkpoint."""
    available = source.names()
    prefix = next((p for p in DECODER_PREFIXES if p + "embed_tokens.weight" in available), None)
    if prefix is None:
        raise CheckpointError(f"{directory}: tensor 'model.embed_tokens.weight' is missing")
    wanted = {prefix + k: (None, v) for k, v in TOP_LEVEL.items()}
    if not config.tie_word_embeddings:
        wanted["lm_head.weight"] = (None, "lm_head")
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
    plan = []
    for hf_name, (layer, short) in wanted.items():
        if hf_name not in available:
            raise CheckpointError(f"{directory}: tensor {hf_name!r} is missing (a {config.num_hidden_layers}-layer "
                                  f"{config.model_type} decoder needs it)")
        names = short if isinstance(short, tuple) else (short,)
        expected = [shapes[p] for p in names]
        dtype, shape, _, _ = source.file(hf_name).entries[hf_name]
        fused_shape = (sum(e[0] for e in expected), *expected[0][1:])
        if shape != fused_shape:
            raise CheckpointError(f"{source.where[hf_name]}: tensor {hf_name!r} has shape {shape}, "
                                  f"expected {fused_shape} from config.json")
        if not dtype.is_floating_point:
            raise CheckpointError(f"{source.where[hf_name]}: tensor {hf_name!r} has dtype {dtype}, "
                                  f"expected floating point")
        plan.append((hf_name, layer, [(n, e[0]) for n, e in zip(names, expected)]))
    return plan


def split_parts(tensor, parts):
    """A fused tensor split by rows into its parts (one part: the tensor itself)."""
    return torch.split(tensor, [rows for _, rows in parts])


class StreamedLayers(Sequence):
    """The layers of a streamed model: `layers[i]` is a fresh StreamedLayer each time.

    The model code takes a layer once per use (a block of the forward pass, a
    sublayer of the reverse sweep); each use casts what it reads and frees it
    when it is dropped, so about one layer is held in the compute dtype at a time.
    """

    def __init__(self, source: TensorSource, plan: list, num_layers: int, dtype, device):
        self.plans = [[(h, p) for h, i, p in plan if i == layer] for layer in range(num_layers)]
        self.source, self.dtype, self.device = source, dtype, device

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return StreamedLayer(self.source, self.plans[i], self.dtype, self.device)

    def __len__(self):
        return len(self.plans)


class StreamedLayer(Mapping):
    """One use of a layer: weights by short name, cast from the memory-mapped file on first access;
    the file's pages are released once cast."""

    def __init__(self, source: TensorSource, plan: list, dtype, device):
        self.source, self.dtype, self.device, self.cast = source, dtype, device, {}
        self.where = {name: (hf_name, parts, k) for hf_name, parts in plan for k, (name, _) in enumerate(parts)}

    def __getitem__(self, name):
        if name not in self.cast:
            hf_name, parts, k = self.where[name]
            piece = split_parts(self.source.get(hf_name), parts)[k]
            self.cast[name] = piece.to(device=self.device, dtype=self.dtype).contiguous()
            self.source.file(hf_name).release(hf_name)
        return self.cast[name]

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)


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
