"""Reading a GGUF file (llama.cpp, Ollama, LM Studio) as if it were a Hugging Face checkpoint.

A GGUF file holds everything in one place: metadata (the hyperparameters under
llama.cpp's key names, the tokenizer's vocabulary) and tensors, most of them
quantized in blocks. The `gguf` package (llama.cpp's own gguf-py) reads the file
and dequantizes the blocks; this module only translates:

* the metadata into a config.json dict for `Config.from_dict`
  (`gguf_config`), and into a `tokenizers` tokenizer (`gguf_tokenizer`);
* the tensors into Hugging Face names and layout (`GGUFSource`), undoing
  what llama.cpp's converter (convert_hf_to_gguf.py) did on the way in:

    llama (and Mistral, stored as llama)   q and k rows permuted for llama.cpp's
                                           interleaved RoPE: permuted back
    gemma3                                 every norm weight stored with the 1 of
                                           Gemma's (1 + w) added: 1 subtracted again
                                           in float64, where w - 1 is exact
    no `output.weight`                     tied embeddings

  Which architecture does what is data: each family's `gguf` conventions in
  minielm/families.py (`GGUF_ARCHITECTURES`).

The dequantized values are the model's weights by definition: a model loaded
from a quantized file is exactly equivalent to its linear maps, as any other,
but it is the dequantized model, not the original one.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from .checkpoint import check_unchanged, file_stamp, layer_map, read_into
from .config import Config
from .errors import CheckpointError, ConfigError, TokenizerError, show
from .families import GGUF_ARCHITECTURES, GGUFConventions
from .tokenizer import Tokenizer

# Tensors a GGUF file may hold that are not weights of a Hugging Face checkpoint: RoPE frequency
# factors (read into the config instead).
ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def read_gguf(path: Path):
    """The file, opened by gguf-py's reader (memory-mapped, read-only); CheckpointError if it is not GGUF.
    The last file opened is kept while it is unchanged (`file_stamp`): the command line reads a file's
    metadata to check its flags and then loads it, and parsing takes seconds (11 s for Gemma 3 270M)."""
    return opened_gguf(Path(path), file_stamp(path))


class PastTheEnd(Exception):
    """gguf-py's reader asked for bytes past the end of the file: `end`, the offset it needed."""

    def __init__(self, end: int):
        self.end = end


@functools.lru_cache(maxsize=1)
def opened_gguf(path: Path, stamp: tuple):
    from gguf.gguf_reader import GGUFReader  # the class itself, whatever the package's name is bound to

    class BoundedReader(GGUFReader):
        """gguf-py's reader, a read past the end of the file raised as PastTheEnd: unchecked, a file cut
        short came out as numpy's words ("When changing to a larger dtype, its size must be a divisor ...",
        "index 0 is out of bounds ...") and never as truncated."""

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise PastTheEnd(end)
            return super()._get(offset, dtype, count, override_order)

    size = stamp[2]  # file_stamp: (device, inode, size, ...)
    if size == 0:
        raise CheckpointError(f"{path}: truncated GGUF file (0 bytes, empty)")
    try:
        reader = BoundedReader(path, "r")
    except PastTheEnd as cut:
        raise CheckpointError(f"{path}: truncated GGUF file ({size} bytes, where its header and tensor table "
                              f"need at least {cut.end}: the file is cut short, or a length or count in it "
                              f"is damaged)") from None
    except Exception as err:  # bad magic, an unknown value type ...
        raise CheckpointError(f"{path}: not a readable GGUF file ({err})") from None
    check_tensor_table(reader, path)
    check_tokenizer_arrays(reader, path)
    return reader


# ---- the file's layout, checked as llama.cpp checks it (gguf.cpp) before any tensor is read ----------
def check_tensor_table(reader, path: Path) -> None:
    """A CheckpointError naming the tensor and the rule unless the tensors lie as GGUF writers put them and
    llama.cpp requires: in table order, one after another from the start of the data section, each at
    an offset that is a multiple of general.alignment and padded to it, each of the bytes its type and
    shape require (gguf-py's n_bytes), the last ending inside the file and the file ending with its padding.
    gguf-py trusts every offset: a moved or swapped one, or F32 data labelled F16, read other bytes as weights."""
    alignment, size = reader.alignment, len(reader.data)
    expected, before = 0, None  # where the next tensor must start (relative to the data section); the last one
    for tensor in reader.tensors:
        offset = tensor.data_offset - reader.data_offset
        where = f"{path}: tensor {tensor.name!r}:"
        if offset % alignment:
            raise CheckpointError(f"{where} offset {offset} is not a multiple of general.alignment = {alignment}")
        if offset < expected:
            raise CheckpointError(f"{where} its bytes [{offset}, {offset + tensor.n_bytes}) overlap those of "
                                  f"{overlapped(reader, tensor)!r} (offsets relative to the data section)")
        if offset > expected:
            raise CheckpointError(f"{where} starts {offset - expected} bytes after the end of {before.name!r} "
                                  f"(GGUF tensors lie one after another, each padded to {alignment} bytes): "
                                  f"an offset moved, or a type or shape that gives {before.name!r} fewer bytes "
                                  f"than it has") if before else \
                CheckpointError(f"{where} starts at offset {offset}, not at the start of the data section")
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(f"{where} its {tensor.n_bytes} bytes ({tensor.tensor_type.name}, shape "
                                  f"{list(map(int, tensor.shape))}) end past the end of the file ({size} bytes): the file is truncated, or its type or shape "
                                  f"is wrong")
        expected, before = offset + padded(tensor.n_bytes, alignment), tensor
    end = reader.data_offset + expected
    if before is not None and size > end:
        raise CheckpointError(f"{path}: the file holds {size - end} bytes after the data of its last tensor "
                              f"{before.name!r} and its padding: its type or shape gives it fewer bytes than it has")


def padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def overlapped(reader, tensor):
    """The name of the first other tensor whose bytes share some of `tensor`'s."""
    start, end = tensor.data_offset, tensor.data_offset + tensor.n_bytes
    return next(t.name for t in reader.tensors
                if t is not tensor and t.data_offset < end and start < t.data_offset + max(t.n_bytes, 1))


TOKEN_ARRAYS = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")  # one value per token of tokenizer.ggml.tokens


def check_tokenizer_arrays(reader, path: Path) -> None:
    """A CheckpointError naming the key unless each per-token array has one value per token (llama.cpp's
    vocabulary load indexes them by token id; taken as they came, they made other tokens of a prompt)."""
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        return
    n = len(fields["tokenizer.ggml.tokens"].data)  # the count, without decoding the strings
    for key in TOKEN_ARRAYS:
        if key in fields and len(fields[key].data) != n:
            raise CheckpointError(f"{path}: {key} holds {len(fields[key].data)} values for the {n} tokens of "
                                  f"tokenizer.ggml.tokens; it needs one per token")


def metadata(reader) -> dict:
    """key -> value for every metadata field but the tokenizer's large arrays (read on demand)."""
    return {key: field.contents() for key, field in reader.fields.items()
            if not (key.startswith("tokenizer.ggml.") and field.types and field.types[0].name == "ARRAY")}


# ---- config ---------------------------------------------------------------------------
def gguf_config(reader, path: Path) -> Config:
    """The Config the file's metadata describes, built from the config.json dict it amounts to."""
    return Config.from_dict(config_dict(reader, path), f"{path} (GGUF metadata)")


def config_dict(reader, path: Path) -> dict:
    """The GGUF metadata as config.json keys, per architecture, with llama.cpp's built-in defaults."""
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"{path}: GGUF architecture {show(arch)} is not supported; "
                          f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    family = GGUF_ARCHITECTURES[arch]
    conventions = family.gguf
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    def required(key):
        if f"{arch}.{key}" not in meta:
            raise ConfigError(f"{path}: GGUF metadata key {arch}.{key!r} is missing")
        return meta[f"{arch}.{key}"]

    def positive(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{path}: GGUF metadata key {arch}.{key} must be a positive integer, got {show(value)}")
        return value

    heads = required("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):  # per-layer counts: must be one value here
        if len(set(np.atleast_1d(heads))) != 1 or len(set(np.atleast_1d(kv_heads))) != 1:
            raise ConfigError(f"{path}: per-layer head counts differ; minielm needs the same in every layer")
        heads, kv_heads = int(np.atleast_1d(heads)[0]), int(np.atleast_1d(kv_heads)[0])
    heads = positive("attention.head_count", heads)  # checked here: d / heads below, before Config's checks
    hidden = positive("embedding_length", required("embedding_length"))
    key_length = get("attention.key_length")
    head_dim = hidden // heads if key_length is None else positive("attention.key_length", key_length)
    layers = required("block_count")
    raw = {
        "model_type": family.model_type,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes list the fastest axis first
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),  # float32 in the file: used as stored
        "layer_norm_eps": get("attention.layer_norm_epsilon", 1e-5),
        "use_parallel_residual": get("use_parallel_residual"),
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_theta": get("rope.freq_base", 10_000.0),
        "sliding_window": get("attention.sliding_window"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
        "final_logit_softcapping": get("final_logit_softcapping"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    rotary = get("rope.dimension_count")
    if rotary and head_dim and rotary != head_dim:
        raw["partial_rotary_factor"] = rotary / head_dim
    raw["rope_scaling"] = _rope_scaling(meta, arch, tensors, raw, path)
    # llama.cpp's built-ins (Gemma 3: every 6th layer global, local RoPE base 10000 without scaling,
    # its own rule for the score scale), where the metadata does not state them; None: not set
    if conventions.sliding_window_pattern is not None:
        pattern = get("attention.sliding_window_pattern", conventions.sliding_window_pattern)
        if isinstance(pattern, list):  # one flag per layer: True where the layer slides
            raw["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            raw["sliding_window_pattern"] = pattern
    raw["rope_local_base_freq"] = conventions.rope_local_base_freq
    if conventions.query_pre_attn_scalar is not None:
        raw["query_pre_attn_scalar"] = conventions.query_pre_attn_scalar(raw)
    if conventions.sliding_window_model_type is not None and raw["sliding_window"]:
        raw["model_type"] = conventions.sliding_window_model_type  # llama with a sliding window: HF's mistral
    if conventions.sliding_window_unused:
        raw["sliding_window"] = None  # Qwen files carry one but do not use it (use_sliding_window false)
    return {k: v for k, v in raw.items() if v is not None}


def _rope_scaling(meta, arch, tensors, raw, path) -> dict | None:
    """rope_scaling for config.json: llama.cpp keeps linear scaling in metadata, and per-frequency
    factors (Llama 3's, Phi-3's longrope) as tensors. Those factors divide the frequencies exactly
    as HF's longrope factors do, so they become longrope settings, with llama.cpp's attention factor."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: one factor per frequency, the same at every length
        factors = _floats(tensors["rope_freqs.weight"], path)
        return {"rope_type": "longrope", "short_factor": factors, "long_factor": factors, "attention_factor": 1.0,
                "original_max_position_embeddings": raw["max_position_embeddings"]}
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:  # Phi-3 longrope
        for pair in ("long", "short"):
            if f"rope_factors_{pair}.weight" not in tensors:
                raise CheckpointError(f"{path}: tensor 'rope_factors_{pair}.weight' is missing (longrope needs both "
                                      f"rope_factors_long and rope_factors_short)")
        return {"rope_type": "longrope",
                "short_factor": _floats(tensors["rope_factors_short.weight"], path),
                "long_factor": _floats(tensors["rope_factors_long.weight"], path),
                "attention_factor": meta.get(f"{arch}.rope.scaling.attn_factor"),
                "original_max_position_embeddings": meta.get(f"{arch}.rope.scaling.original_context_length")}
    if kind in (None, "none"):
        return None
    if kind == "linear":
        if f"{arch}.rope.scaling.factor" not in meta:
            raise ConfigError(f"{path}: GGUF metadata key {arch}.rope.scaling.factor is missing "
                              f"({arch}.rope.scaling.type is linear)")
        return {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    raise ConfigError(f"{path}: GGUF rope scaling type {show(kind)} is not supported; supported: linear, "
                      f"and per-frequency factor tensors (Llama 3, Phi-3 longrope)")


def _floats(tensor, path) -> list:
    return [float(x) for x in dequantize(tensor, path).reshape(-1)]


# ---- tensors --------------------------------------------------------------------------
@functools.cache
def readable(kind) -> bool:
    """Whether minielm reads GGUF tensor type `kind`: F64 itself, every other type that gguf-py
    dequantizes (asked of gguf-py itself, on one block of zeros). Not the integer types (I8 ... I64)."""
    import gguf

    if kind == gguf.GGMLQuantizationType.F64:
        return True
    _, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def check_readable(tensor, path: Path, hf_name: str | None = None) -> None:
    """A CheckpointError naming the tensor (by its HF name too, if given) if minielm cannot read its type."""
    if not readable(tensor.tensor_type):
        which = f"{hf_name!r} ({tensor.name})" if hf_name else repr(tensor.name)
        raise CheckpointError(f"{path}: tensor {which} has GGUF type {tensor.tensor_type.name}, which minielm does "
                              f"not read; expected F64, F32, F16, BF16 or a quantized type that gguf-py dequantizes")


def stored(tensor, path: Path, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of a GGUF tensor's stored bytes (a row: the values of its fastest axis, whole
    blocks of a quantized type), as gguf-py's view shows them (its dtype and shape), but read from
    the file into memory this process owns rather than through the reader's mapping: a file cut
    meanwhile is then a short read and a CheckpointError, where touching the mapping past the new end
    would end the process (SIGBUS)."""
    shape = (stop - start, *tensor.data.shape[1:])
    buffer = torch.empty(math.prod(shape) * tensor.data.dtype.itemsize, dtype=torch.uint8)
    if read_into(path, tensor.data_offset + start * (buffer.numel() // max(1, stop - start)), buffer) != buffer.numel():
        raise CheckpointError(f"{path}: the file changed on disk during this run (it now ends inside tensor "
                              f"{tensor.name!r}); load the checkpoint again")
    return buffer.numpy().view(tensor.data.dtype).reshape(shape)


def dequantize(tensor, path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows start..stop (default: all) of a GGUF tensor's values, in memory this process owns (`stored`):
    F64 as stored, in float64 (gguf-py would not read it); every other type in float32, by gguf-py's
    reference dequantization. A CheckpointError for a type neither reads."""
    import gguf

    check_readable(tensor, path)
    data = stored(tensor, path, start, len(tensor.data) if stop is None else stop)
    if tensor.tensor_type == gguf.GGMLQuantizationType.F64:
        return data.view(np.float64)  # the stored doubles, not rounded through float32
    values = gguf.quants.dequantize(data, tensor.tensor_type)  # float32, the reference
    return np.require(values, values.dtype, ["C", "W"])


class GGUFSource:
    """The tensors of a GGUF file under Hugging Face names, in Hugging Face layout.

    names() -> set of HF names;  info(name) -> (shape, dtype of get());  get(name) -> CPU tensor,
    dequantized and with the converter's changes undone;  origin(name) -> the file.
    Values come as `dequantize` gives them: F64 as stored, every other type as float32 (exact for
    F32, F16 and BF16; for a quantized type, its reference dequantization), and as float64 where the
    norm offset was subtracted. `stamp` is the file's `file_stamp`, taken before its header was read:
    each read checks the file against it before and after (`check_unchanged`).
    """

    def __init__(self, path: Path, reader, config: Config, stamp: tuple):
        self.path, self.reader, self.config, self.stamp = Path(path), reader, config, stamp
        self.arch = self.reader.fields["general.architecture"].contents()
        self.conventions = GGUF_ARCHITECTURES[self.arch].gguf
        self.tensors = {t.name: t for t in self.reader.tensors if t.name not in ROPE_FACTOR_TENSORS}
        to_hf = hf_names(self.arch, self.config)
        # a tensor minielm does not know keeps its GGUF name: checked_plan then reports it as unexpected
        self.hf_to_gguf = {to_hf.get(name, name): name for name in self.tensors}

    def names(self) -> set:
        return set(self.hf_to_gguf)

    def info(self, name: str) -> tuple:
        """Shape and dtype; a CheckpointError, before anything is read, for a type minielm cannot read."""
        tensor = self.tensors[self.hf_to_gguf[name]]
        check_readable(tensor, self.path, name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
        float64 = tensor.tensor_type.name == "F64" or self._norm_offset(name)
        return shape, torch.float64 if float64 else torch.float32

    def origin(self, name: str) -> str:
        return str(self.path)

    def get(self, name: str) -> torch.Tensor:
        """The tensor in HF layout: dequantized, q/k rows un-permuted (llama), norm offset undone (Gemma)."""
        weight = self.rows(name, 0, self.info(name)[0][0])  # (out, in): HF layout
        permuted = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
        if self.conventions.qk_rows_permuted and name.endswith(permuted):
            heads = self.config.num_attention_heads if ".q_proj" in name else self.config.num_key_value_heads
            weight = unpermute_rows(weight, heads)
        if self._norm_offset(name):  # 1 + w - 1 is exact in float64 for float32 values (and F64 ones in [0.5, 2])
            weight = weight.to(torch.float64) - self.config.norm_offset
        return weight

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the tensor in HF layout, dequantized (for a top-level matrix: nothing to undo)."""
        tensor = self.tensors[self.hf_to_gguf[name]]
        check_unchanged(self.path, self.stamp, name)  # before: a cut file would be read past its end (SIGBUS)
        values = dequantize(tensor, self.path, start, stop)
        check_unchanged(self.path, self.stamp, name)  # after: a rewrite meanwhile would mix old and new
        return torch.from_numpy(values).reshape(stop - start, *self.info(name)[0][1:])

    def quantized_types(self) -> list:
        """The block-quantized GGUF types the file's tensors use (F32, F16, BF16 are exact, not listed)."""
        exact = ("F32", "F16", "BF16", "F64")
        return sorted({t.tensor_type.name for t in self.tensors.values()} - set(exact))

    def _norm_offset(self, name: str) -> bool:
        """Whether the tensor is a norm weight stored with the family's norm offset added: llama.cpp's
        norms multiply by the stored weight, so the converter stored Gemma's 1 + w (GGUFConventions)."""
        return self.config.norm_offset != 0.0 and name.endswith("norm.weight")


def hf_names(arch: str, config: Config) -> dict:
    """GGUF tensor name -> Hugging Face name, for every tensor a decoder of this config has.

    gguf-py's own map (gguf.get_tensor_name_map, the one llama.cpp's converter uses) gives the GGUF
    name of each HF module; asked for every HF name minielm's family map holds, it gives the inverse.
    """
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    to_gguf = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    family = config.family_spec
    prefix, layers = family.prefixes[0], f"{family.prefixes[0]}{family.layers_name}"
    hf = [prefix + k for k in family.top_tensors] + [family.unembedding]
    hf += [f"{layers}.{i}.{k}" for i in range(config.num_hidden_layers) for k in layer_map(config)]
    names = {}
    for name in hf:
        module, _, suffix = name.rpartition(".")  # "...q_proj", "weight"
        gguf_module = to_gguf.get_name(module)
        if gguf_module is not None:
            names[f"{gguf_module}.{suffix}"] = name
    return names


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute` of q/k rows for the llama architecture.

    The converter reorders each head's rows from HF's rotate_half layout (first half, second half)
    to llama.cpp's interleaved pairs: reshape(heads, 2, hd/2, d).swapaxes(1, 2). Here the inverse:
    reshape(heads, hd/2, 2, d).swapaxes(1, 2). (heads*hd, d) -> (heads*hd, d), a pure reordering.
    """
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---- tokenizer --------------------------------------------------------------------------
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # llama.cpp's token types (tokenizer.ggml.token_type)
# llama.cpp's tokenizer models (tokenizer.ggml.model), named after the first model that used each
SENTENCEPIECE = "llama"  # a SentencePiece vocabulary with scores (Llama 2, Gemma, Phi-3)
BYTE_LEVEL_BPE = "gpt2"  # a byte-level BPE vocabulary with merges (Llama 3, Qwen)

# How a byte-level vocabulary splits text before its merges apply, by tokenizer.ggml.pre
# (the regexes of transformers' GGUF tokenizer converter, which follow llama.cpp's).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                        "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}


def gguf_tokenizer(reader, path: Path) -> Tokenizer | None:
    """The tokenizer the file's metadata describes, built with the `tokenizers` library; None if none.

    `llama`: a SentencePiece vocabulary with scores (Llama 2, Gemma): BPE whose merges are implied by
    the vocabulary, best score first, with byte fallback. `gpt2`: a byte-level BPE vocabulary with
    its merges (Llama 3, Qwen). Control tokens (<bos>, <start_of_turn>, ...) are special tokens.
    """
    fields = reader.fields
    if "tokenizer.ggml.model" not in fields or "tokenizer.ggml.tokens" not in fields:
        return None
    kind = fields["tokenizer.ggml.model"].contents()
    arch = fields["general.architecture"].contents()
    family = GGUF_ARCHITECTURES.get(arch)
    conventions = family.gguf if family is not None else GGUFConventions(arch)  # else: Llama 2's ways
    try:
        tokens = fields["tokenizer.ggml.tokens"].contents()
        types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
        if kind == SENTENCEPIECE:
            scores = fields["tokenizer.ggml.scores"].contents() if "tokenizer.ggml.scores" in fields else None
            space_prefix = _field(fields, "tokenizer.ggml.add_space_prefix", True)
            unk_id = token_id_field(fields, "tokenizer.ggml.unknown_token_id", len(tokens), path)
            tok = sentencepiece_bpe(tokens, scores, unk_id, space_prefix, conventions)
            add_bos = _field(fields, "tokenizer.ggml.add_bos_token", True)
        elif kind == BYTE_LEVEL_BPE:
            merges = fields["tokenizer.ggml.merges"].contents()
            tok = byte_level_bpe(tokens, merges, _field(fields, "tokenizer.ggml.pre", None))
            add_bos = _field(fields, "tokenizer.ggml.add_bos_token", False)
        else:
            raise TokenizerError(f"{path}: GGUF tokenizer model {show(kind)} is not supported; "
                                 f"supported: llama (SentencePiece), gpt2 (byte-level BPE)")
        _add_special_tokens(tok, tokens, types)
    except TokenizerError:
        raise
    except Exception as err:
        raise TokenizerError(f"{path}: unreadable GGUF tokenizer metadata ({err})") from None
    bos_id = token_id_field(fields, "tokenizer.ggml.bos_token_id", len(tokens), path)
    return Tokenizer(
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        lambda i: tok.id_to_token(i),
        bos_id if add_bos and bos_id is not None else None,
        len(tokens),
        path,
    )


def _field(fields, key, default):
    return fields[key].contents() if key in fields else default


def token_id_field(fields, key: str, n_tokens: int, path: Path):
    """A special token's id from the metadata (None if absent), refused naming the key unless it is one of
    the file's tokens: an id past the vocabulary was put before every prompt and then blamed as "token id
    99999 at position 0 is outside the model's vocabulary"."""
    value = _field(fields, key, None)
    if value is not None and not 0 <= value < n_tokens:
        raise TokenizerError(f"{path}: {key} = {value} is not a token of the file's vocabulary "
                             f"(tokenizer.ggml.tokens holds {n_tokens} tokens, ids [0, {n_tokens}))")
    return value


def sentencepiece_bpe(tokens: list, scores: list | None, unk_id, space_prefix: bool, conventions: GGUFConventions):
    """A SentencePiece-style BPE tokenizer from a vocabulary with scores.

    SentencePiece BPE merges the adjacent pair whose union is the best-scoring vocabulary entry;
    as explicit merges that is every split of every token into two tokens, ranked by the token's
    score. Gemma's files spell whitespace-only tokens with real spaces and rank merges by position,
    not score (both as transformers' GGUF converter and Gemma's own tokenizer.json have it), and
    put no "▁" before the text. Phi-3 puts its "▁" before every stretch of text, the one after a
    special token (<|user|>) and one before a leading space too, as its own tokenizer.json and
    transformers' GGUF converter do; Llama 2 style puts one before the text only. `conventions`
    (GGUFConventions) says which.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    if conventions.whitespace_tokens_spelled_with_spaces:
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    if conventions.merges_ranked_by_position or scores is None:
        scores = [-i for i in range(len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[unk_id] if unk_id is not None else None
    tok = HFTokenizer(models.BPE(vocab, merges_from_scores(tokens, scores, vocab), unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if conventions.no_space_prefix or not space_prefix:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    elif conventions.space_prefix_before_every_stretch:  # Phi-3: "▁" before each stretch of text, whatever it
        # starts with; the decoder strips the first
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        decode.append(decoders.Strip(content=" ", left=1))
    else:  # Llama 2 style: "▁" before the text, spaces as "▁"; the decoder strips the first space again
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        decode.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(decode)
    return tok


def merges_from_scores(tokens: list, scores: list, vocab: dict) -> list:
    """[(left, right)] for every token that splits into two vocabulary entries, best token score first."""
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, score) for left, right in pairs]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def byte_level_bpe(tokens: list, merges: list, pre: str | None):
    """A byte-level BPE tokenizer (GPT-2 style) from the vocabulary and merges the file lists."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in (
        "llama3", "llama-v3", "llama-bpe")))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok, tokens: list, types: list) -> None:
    """Control tokens (and <unk>) as special tokens, user-defined ones as added tokens: all matched whole
    in text, as llama.cpp and transformers' GGUF tokenizer match them."""
    from tokenizers import AddedToken

    known = [(t, k) for t, k in zip(tokens, types) if tok.token_to_id(t) is not None]  # never new ids
    control = [AddedToken(t, normalized=False, special=True) for t, k in known if k in (UNKNOWN, CONTROL)]
    user = [AddedToken(t, normalized=False, special=False) for t, k in known if k == USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
