"""`minielm.load`: a checkpoint -> a Model in one compute dtype on one device.

A checkpoint is named by a local directory, a GGUF file, a Hugging Face model id found in the
local cache (never the network), or nothing at all for the model shipped inside the package.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch

from . import checks
from .checkpoint import SafetensorsSource, file_stamp, in_linear_layout, load_weights
from .config import Config, generation_eos_token_id
from .errors import CheckpointError, InputError, show
from .gguf import GGUFSource, gguf_config, gguf_tokenizer, read_gguf
from .model import Model
from .tokenizer import check_vocabulary, load_tokenizer

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


# ---- what a model name means: the shipped model, a directory, or a Hugging Face model id -------------
SHIPPED = "kjv-tiny"
MODEL_ID = re.compile(r"(?P<org>[\w.-]+)/(?P<name>[\w.-]+)(@(?P<revision>[\w.-]+(/[\w.-]+)*))?")
COMMIT = re.compile(r"[0-9a-f]{40}")


def shipped_model() -> Path:
    """Where the shipped model is: inside the installed package (a wheel puts it at
    minielm/weights/kjv-tiny), or at the top of the repository (a checkout, an editable install)."""
    package = Path(__file__).resolve().parent
    candidates = [package / "weights" / SHIPPED, package.parent / "weights" / SHIPPED]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def hub_cache() -> Path:
    """The local Hugging Face hub cache, found as huggingface_hub finds it (huggingface_hub/constants.py):
    $HF_HUB_CACHE, else the older $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub; `~` and environment variables
    in HF_HOME and in the result expanded, as there. A variable set to "" counts as set, as there."""
    def expand(path: str) -> str:
        return os.path.expandvars(os.path.expanduser(path))

    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = expand(os.environ.get("HF_HOME", os.path.join(cache, "huggingface")))
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return Path(expand(os.environ.get("HF_HUB_CACHE", legacy)))


def link_failure(path: Path) -> str:
    """Why following the link at `path` fails: 'a symbolic link loop', or the system's own words."""
    try:
        os.stat(path)
    except OSError as err:
        return "a symbolic link loop" if err.errno == errno.ELOOP else err.strerror or str(err)
    return "it changed while being read"


def from_hub_cache(model_id: str, org: str, name: str, revision: str | None) -> Path:
    """The snapshot directory of `org/name` at `revision` (default: main) in the local hub cache.

    Layout: <cache>/models--org--name/refs/<branch or tag> holds a commit hash, and
    snapshots/<commit>/ holds the files. A full commit hash may also be given directly.
    Nothing is fetched: a model that is not there is a CheckpointError saying where we looked."""
    repo = hub_cache() / f"models--{org}--{name}"
    revision = revision or "main"
    ref = repo / "refs" / revision
    searched = [ref]
    if ref.is_symlink() and not ref.exists():  # is_file() says False for a loop, which read as "not cached"
        raise CheckpointError(f"{ref}: the Hugging Face cache ref is a symbolic link that leads nowhere "
                              f"({link_failure(ref)}); expected a file holding a commit hash")
    try:
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{ref}: unreadable Hugging Face cache ref; expected a commit hash ({err})") from None
    if commit is None and COMMIT.fullmatch(revision):
        commit = revision
    if commit is not None and COMMIT.fullmatch(commit):
        snapshot = repo / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot
        searched.append(snapshot)
    have = sorted(p.name for p in (repo / "snapshots").iterdir()) if (repo / "snapshots").is_dir() else []
    found = f"; the cache holds snapshots {', '.join(have)}" if have else ""
    raise CheckpointError(f"{model_id}: no such checkpoint directory ({Path.cwd() / model_id}), and not in the "
                          f"local Hugging Face cache "
                          f"(searched {', '.join(map(str, searched))}{found}). minielm never downloads: get it "
                          f"once with `hf download {org}/{name}{' --revision ' + revision if revision != 'main' else ''}` "
                          f"(set HF_HUB_CACHE or HF_HOME if your cache is elsewhere), or pass a checkpoint directory")


def resolve_checkpoint(path) -> Path:
    """The checkpoint that `path` names: None or 'kjv-tiny' the shipped model; an existing
    directory (or file) itself; 'org/name' or 'org/name@revision' a snapshot in the local
    Hugging Face cache."""
    if path is None or (path == SHIPPED and not Path(path).exists()):
        model = shipped_model()
        if not model.is_dir():
            raise CheckpointError(f"{model}: the shipped model {SHIPPED} is not installed; reinstall minielm, "
                                  f"or pass a checkpoint directory")
        return model
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"checkpoint path must be a str or a path, got {type(path).__name__}")
    if os.fspath(path) == "":
        raise InputError("checkpoint path is empty; expected a checkpoint directory, a model id 'org/name', "
                         "or nothing for the shipped model")
    checks.path_fits("checkpoint path", path)
    candidate = Path(path)
    if candidate.exists():
        return candidate
    model_id = MODEL_ID.fullmatch(path) if isinstance(path, str) else None
    if model_id and ".." not in re.split("[/@]", path):  # nothing that climbs out of the cache
        return from_hub_cache(path, model_id["org"], model_id["name"], model_id["revision"])
    raise CheckpointError(f"{candidate}: no such checkpoint directory")


def load(path=None, dtype=torch.float64, device="cpu", stream=False) -> Model:
    """Load a checkpoint: a local Hugging Face directory (config.json, *.safetensors, tokenizer),
    a GGUF file (`*.gguf`, llama.cpp's format: quantized tensors are dequantized), a model id
    'org/name' or 'org/name@revision' from the local Hugging Face cache (offline), or, with no
    path or "kjv-tiny", the model shipped with minielm.

    Reads only: nothing is written, nothing is downloaded. Raises InputError for a bad dtype or
    device, CheckpointError, ConfigError or TokenizerError, naming the file and what was
    expected, for a missing, broken or unsupported checkpoint, a tensor with non-finite values,
    or a tokenizer whose ids reach past config.json's vocab_size. A checkpoint without a
    tokenizer loads; `model.tokenizer` then raises TokenizerError.

    With `stream=True` each layer is cast to `dtype` (and moved to `device`) only while it
    runs, into buffers that every layer reuses: for models larger than memory in float64.
    The embedding and unembedding are held in the file's dtype, and so are the layers
    once read where they all fit in memory that way (`model.weights["layers"].resident`,
    decided at load: they and the buffers take at most 90 % of the memory available);
    else each use reads its layer from the file again. On a GPU, while a layer runs, the
    next one is read ahead on a background thread and copied to the GPU on a side stream,
    where it waits in the file's dtype. Results are the same as without streaming. A file
    truncated or rewritten before a tensor is read (once when resident, at each use
    otherwise) is a CheckpointError.
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    stream = checks.boolean("stream", stream)
    directory = resolve_checkpoint(path)
    if directory.is_file() and directory.suffix.lower() == ".gguf":
        return load_gguf(directory, dtype, device, stream)
    if directory.is_file():
        raise CheckpointError(f"{directory}: is a file; expected a checkpoint directory (config.json, *.safetensors) "
                              f"or a .gguf file")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config = Config.from_file(directory / "config.json")
    tokenizer = load_tokenizer(directory)
    check_vocabulary(tokenizer, config, directory / "config.json")
    source = in_linear_layout(SafetensorsSource(directory), config)  # GPT-2's Conv1D, GPT-NeoX's fused q/k/v
    weights = load_weights(source, config, dtype, device, stream, where=directory)
    eos = generation_eos_token_id(directory / "generation_config.json", config)
    return Model(config, weights, tokenizer, directory, dtype, device, eos_token_id=eos)


def load_gguf(path: Path, dtype, device, stream) -> Model:
    """A GGUF file: config and tokenizer from its metadata, weights dequantized (minielm/gguf.py)."""
    stamp = file_stamp(path)  # before the header is read: a change from here on is seen at every read
    reader = read_gguf(path)
    config = gguf_config(reader, path)
    source = GGUFSource(path, reader, config, stamp)
    tokenizer = gguf_tokenizer(reader, path)
    check_vocabulary(tokenizer, config, f"{path} (GGUF metadata)")
    weights = load_weights(source, config, dtype, device, stream, where=path)
    model = Model(config, weights, tokenizer, path, dtype, device)
    model.dequantized_from = source.quantized_types()  # e.g. ['Q4_K', 'Q6_K']: the model is their dequantization
    return model
