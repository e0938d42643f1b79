"""Shared fixtures: tiny random checkpoints of every family, saved once per session."""

import pytest
import torch

from hf_reference import FAMILIES, hf_float64_logits, save_tiny_checkpoint

# 16 tokens: longer than every sliding window in the tiny configs (4 and 5), so the windows bind.
PROMPT = [1, 17, 5, 88, 2, 41, 9, 60, 33, 7, 12, 99, 3, 71, 25, 50]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
def references(checkpoints):
    """case name -> float64 Hugging Face logits (T, V) for PROMPT."""
    return {case: hf_float64_logits(path, PROMPT) for case, path in checkpoints.items()}
