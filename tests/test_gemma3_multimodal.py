"""A multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration, vision tower included):
minielm reads its language model and matches Hugging Face's float64 logits."""

import pytest
import torch
from conftest import PROMPT
from hf_reference import FAMILIES, float64_everywhere, hf_float64_logits, randomize_
from safetensors.torch import load_file, save_file
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

import minielm


def tiny_multimodal_config() -> Gemma3Config:
    text = FAMILIES["gemma3_text"]()
    # Real Gemma 3 checkpoints have no final soft-capping, and Hugging Face's multimodal class
    # ignores it (only Gemma3ForCausalLM applies it): leave it out so both read the same model.
    text.final_logit_softcapping = None
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4)
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        boi_token_index=141, eoi_token_index=142, image_token_index=143)


@pytest.fixture(scope="module")
def multimodal_checkpoint(tmp_path_factory):
    """The checkpoint as transformers saves it (language_model.model.*), in float64."""
    directory = tmp_path_factory.mktemp("gemma3_multimodal")
    with float64_everywhere():
        model = Gemma3ForConditionalGeneration._from_config(tiny_multimodal_config(), dtype=torch.float64)
    randomize_(model.model.language_model, seed=0)
    model.save_pretrained(directory)
    return directory


def renamed(source, directory):
    """The same checkpoint with the names newer transformers use in memory: model.language_model.*,
    model.vision_tower.*, model.multi_modal_projector.*."""
    directory.mkdir()
    (directory / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    names = {}
    for name in tensors:
        if name.startswith("language_model.model."):
            names[name] = "model.language_model." + name.removeprefix("language_model.model.")
        elif name.startswith(("vision_tower.", "multi_modal_projector.")):
            names[name] = "model." + name
        else:
            names[name] = name
    save_file({names[k]: v for k, v in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("layout", ["language_model.model", "model.language_model"])
def test_multimodal_gemma3_matches_hugging_face(multimodal_checkpoint, tmp_path, layout):
    directory = multimodal_checkpoint if layout == "language_model.model" else renamed(multimodal_checkpoint, tmp_path / "renamed")
    names = load_file(directory / "model.safetensors").keys()
    assert any(n.startswith(layout + ".layers.") for n in names)
    assert any("vision_tower." in n for n in names) and any("multi_modal_projector." in n for n in names)

    model = minielm.load(directory)
    assert model.config.model_type == "gemma3" and model.config.num_hidden_layers == 3
    reference = hf_float64_logits(directory, PROMPT)  # Gemma3ForConditionalGeneration, all float64
    logits = model.logits(PROMPT)
    assert float((logits - reference).abs().max() / reference.abs().max()) < 1e-12
    assert minielm.equivalent_linear_map(model, PROMPT).relative_error() < 1e-13
