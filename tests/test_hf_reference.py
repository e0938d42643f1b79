"""The oracle itself: the float64-patched Hugging Face reference against stock Hugging Face."""

from pathlib import Path

import pytest
import torch
from conftest import PROMPT
from hf_reference import FAMILIES, _LowPrecisionDetector, assert_no_low_precision, check_reference
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("case", list(FAMILIES))
def test_reference_agrees_with_stock_hugging_face(case, checkpoints, references):
    """The patch changes precision, not semantics: the float64 logits agree with stock float32
    transformers to 1e-4, and no float32 or lower tensor takes part in computing them."""
    assert torch.equal(check_reference(checkpoints[case], PROMPT), references[case])
    assert_no_low_precision(checkpoints[case], PROMPT)


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "phi3_longrope"])
def test_stock_float64_is_not_all_float64(case, checkpoints, references):
    """Negative control: stock transformers loaded with dtype=float64 still computes parts in
    float32; the detector sees it, and its logits miss the reference by float32 round-off."""
    model = AutoModelForCausalLM.from_pretrained(Path(checkpoints[case]), dtype=torch.float64,
                                                 attn_implementation="eager").eval()
    detector = _LowPrecisionDetector()
    with torch.no_grad(), detector:
        logits = model(input_ids=torch.tensor([PROMPT]), use_cache=False).logits[0]
    assert any("torch.float32" in offender for offender in detector.offenders)
    error = float((logits - references[case]).abs().max() / references[case].abs().max())
    assert 1e-12 < error < 1e-5
