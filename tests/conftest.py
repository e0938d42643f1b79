"""Shared fixtures: tiny random checkpoints of every family, saved once per session."""

import pytest
import torch
from hypothesis import settings

from hf_reference import EDGE_CASES, FAMILIES, hf_float64_logits, save_tiny_checkpoint

# The fuzz tests draw the same examples on every run, so that a suite that passed passes again
# (CI lands on one run); `pytest --hypothesis-profile explore` draws new ones.
settings.register_profile("same every run", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile("same every run")

# 16 tokens: longer than every sliding window in the tiny configs (4 and 5), so the windows bind.
PROMPT = [1, 17, 5, 88, 2, 41, 9, 60, 33, 7, 12, 99, 3, 71, 25, 50]

# The devices to parametrize over: `@pytest.mark.parametrize("device", DEVICES)`. CUDA cases are
# always collected, and show as SKIPPED with the reason on a machine without a CUDA device.
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
DEVICES = ["cpu", CUDA]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """case name -> directory of a saved tiny random checkpoint (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for case in FAMILIES:
        save_tiny_checkpoint(case, root / case, seed=0)
        paths[case] = root / case
    return paths


@pytest.fixture(scope="session")
def edge_checkpoints(tmp_path_factory):
    """case name -> directory of a tiny checkpoint of each configuration in EDGE_CASES, saved on first use."""
    root, paths = tmp_path_factory.mktemp("edge_cases"), {}

    def path(case):
        if case not in paths:
            save_tiny_checkpoint(case, root / case, seed=0)
            paths[case] = root / case
        return paths[case]
    return path


@pytest.fixture(scope="session")
def references(checkpoints):
    """case name -> float64 Hugging Face logits (T, V) for PROMPT."""
    return {case: hf_float64_logits(path, PROMPT) for case, path in checkpoints.items()}


TEXT = """In the beginning God created the heaven and the earth.
And the earth was without form, and void; and darkness was upon the face of the deep.
And the Spirit of God moved upon the face of the waters.
And God said, Let there be light: and there was light.
And God saw the light, that it was good: and God divided the light from the darkness.
And God called the light Day, and the darkness he called Night.
And the evening and the morning were the first day.
"""


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory):
    """A random Llama-style checkpoint with a real sentencepiece tokenizer trained on a few verses."""
    import sys
    from pathlib import Path

    import sentencepiece

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from bench import random_checkpoint

    root = tmp_path_factory.mktemp("tiny_tok")
    (root / "corpus.txt").write_text(TEXT * 3)
    (root / "ckpt").mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "ckpt" / "tokenizer"), vocab_size=320,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True, minloglevel=2)
    (root / "ckpt" / "tokenizer.vocab").unlink()
    random_checkpoint(root / "ckpt", d=48, layers=2, f=96, heads=4, kv_heads=2, vocab=320, seed=1)
    return root / "ckpt"
