"""`minielm.load`: a local checkpoint directory or GGUF file -> a Model in one compute dtype on one device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import SafetensorsSource, load_weights
from .config import Config
from .errors import CheckpointError, InputError, show
from .gguf import GGUFSource, gguf_config, gguf_tokenizer, read_gguf
from .model import Model
from .tokenizer import load_tokenizer

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """A torch floating dtype, from a dtype or its name ('float64', 'float32', ...)."""
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype not in DTYPES.values():
        raise InputError(f"unsupported dtype {show(dtype)}; expected one of {', '.join(DTYPES)}")
    return dtype


def resolve_device(device) -> torch.device:
    """A usable torch device, or an InputError saying why not."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {show(device)}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} is not available: no CUDA device on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"unsupported device {str(device)!r}; expected 'cpu' or 'cuda'")
    return device


def load(path, dtype=torch.float64, device="cpu", stream=False) -> Model:
    """Load a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer),
    or a GGUF file (`*.gguf`, llama.cpp's format; quantized tensors are dequantized).

    Reads only: nothing is written into the directory. Raises InputError for a bad
    dtype or device, CheckpointError, ConfigError or TokenizerError, naming the file
    and what was expected, for a missing, broken or unsupported checkpoint. A checkpoint
    without a tokenizer loads; `model.tokenizer` then raises TokenizerError.

    With `stream=True` each layer is read from the file and cast to `dtype` (and moved
    to `device`) only while it runs: for models larger than memory in float64. The
    embedding and unembedding are held in the file's dtype. Results are the same as
    without streaming.
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"checkpoint path must be a str or a path, got {type(path).__name__}")
    directory = Path(path)
    if not isinstance(stream, bool):
        raise InputError(f"stream must be True or False, got {stream!r}")
    if directory.is_file() and directory.suffix.lower() == ".gguf":
        return load_gguf(directory, dtype, device, stream)
    if directory.is_file():
        raise CheckpointError(f"{directory}: is a file; expected a checkpoint directory (config.json, *.safetensors) "
                              f"or a .gguf file")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config = Config.from_file(directory / "config.json")
    weights = load_weights(SafetensorsSource(directory), config, dtype, device, stream, where=directory)
    return Model(config, weights, load_tokenizer(directory), directory, dtype, device)


def load_gguf(path: Path, dtype, device, stream) -> Model:
    """A GGUF file: config and tokenizer from its metadata, weights dequantized (minielm/gguf.py)."""
    reader = read_gguf(path)
    config = gguf_config(reader, path)
    source = GGUFSource(path, reader, config)
    weights = load_weights(source, config, dtype, device, stream, where=path)
    model = Model(config, weights, gguf_tokenizer(reader, path), path, dtype, device)
    model.dequantized_from = source.quantized_types()  # e.g. ['Q4_K', 'Q6_K']: the model is their dequantization
    return model
