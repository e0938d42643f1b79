"""GPT-2 and GPT-NeoX through every command: a tiny random checkpoint of each, with GPT-2's own tokenizer
files (vocab.json + merges.txt, trained here), as a user would run them. Exactness against Hugging Face is
tested with the other families (test_engine, test_linear_map, test_hf_autograd, test_gguf)."""

import pytest
import torch
from conftest import TEXT
from hf_reference import FAMILIES, randomize_
from transformers import AutoModelForCausalLM

import minielm
from minielm.cli import main

PROMPT = "And God said"


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def checkpoint(request, tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp(request.param)
    config = FAMILIES[request.param]()
    config.vocab_size = 320  # a byte-level vocabulary has at least 256 tokens
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, 0)
    model.save_pretrained(directory)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator([TEXT] * 3, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer.save_model(str(directory))
    return directory


def test_every_command(checkpoint, tmp_path, capsys):
    model = ["--model", str(checkpoint)]
    for command in (["explain", PROMPT, "--html", str(tmp_path / "report.html")], ["check"], ["layers", PROMPT],
                    ["generate", PROMPT, "--max-new-tokens", "4"], ["explain", PROMPT, "--stream"],
                    ["operators", PROMPT, "--out", str(tmp_path / "ops.safetensors")],
                    ["steer", PROMPT, "--concept", "light", "--max-new-tokens", "3", "--scale", "2"]):
        assert main(command + model) == 0, command
        assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "report.html").stat().st_size > 0


def test_every_api(checkpoint, tmp_path):
    model = minielm.load(checkpoint)
    ids = model.tokenizer.encode(PROMPT)
    elm = minielm.equivalent_linear_map(model, ids, out=tmp_path / "ops.safetensors")
    assert elm.relative_error() < 1e-13 and elm.bias.abs().max() > 0  # biases everywhere: an affine map
    assert minielm.load_operators(tmp_path / "ops.safetensors", model).relative_error() < 1e-13
    attr = minielm.attribution(model, ids)
    assert abs(attr.total() - attr.logit) < 1e-12 and attr.norm_bias != 0  # the final LayerNorm's bias counted
    _, S, _ = minielm.singular_vectors(model, ids, k=2)  # matrix-free, against the dense operators' SVD
    dense = torch.linalg.svdvals(elm.operators.permute(1, 0, 2).reshape(elm.operators.shape[1], -1))
    assert torch.allclose(S, dense[:2], rtol=1e-8)
    streamed = minielm.load(checkpoint, stream=True)
    assert torch.equal(minielm.equivalent_linear_map(streamed, ids).operators, elm.operators)
