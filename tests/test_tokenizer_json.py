"""A checkpoint whose tokenizer is a tokenizer.json (Llama 3, Qwen, Gemma style), against transformers' reading of it."""

import json
import shutil

import pytest
import tokenizers
from conftest import TEXT
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

import minielm

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SAMPLE = "And God said, Let there be light: and there was light. Naïve café ☃ 1234"


def byte_level_bpe(bos_in_post_processor: bool) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer trained on a few verses; BOS (id 0) added by its post-processor if asked."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 3, trainer)
    if bos_in_post_processor:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tok


def checkpoint_with(directory, weights_from, tok, settings):
    """The weights of `weights_from` with `tok` as tokenizer.json and `settings` as tokenizer_config.json."""
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(weights_from / name, directory / name)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, **settings}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("bos_in_post_processor, settings, adds_bos", [
    (True, {}, True),  # Llama 3: the post-processor puts BOS first
    (False, {}, False),  # Qwen: no BOS anywhere
    (True, {"add_bos_token": True}, True),  # Gemma: both say so
    (True, {"add_bos_token": False}, False),  # tokenizer_config.json overrules the post-processor
    (False, {"add_bos_token": True}, True),
])
def test_tokenizer_json_checkpoint(tiny_with_tokenizer, tmp_path, bos_in_post_processor, settings, adds_bos):
    tok = byte_level_bpe(bos_in_post_processor)
    directory = checkpoint_with(tmp_path / "ckpt", tiny_with_tokenizer, tok, settings)
    model = minielm.load(directory)
    reference = AutoTokenizer.from_pretrained(directory)
    ids = model.tokenizer.encode(SAMPLE)
    pieces = reference(SAMPLE, add_special_tokens=False).input_ids
    assert ids == [tok.token_to_id(BOS)] * adds_bos + pieces
    if bos_in_post_processor == adds_bos:  # where the two files agree, exactly as transformers reads the checkpoint
        assert ids == reference(SAMPLE).input_ids  # (transformers 5's generic fast tokenizer ignores add_bos_token)
    assert model.tokenizer.decode(ids[int(adds_bos):]) == SAMPLE  # byte-level BPE round-trips exactly
    assert [model.tokenizer.token(i) for i in ids] == reference.convert_ids_to_tokens(ids)
    # and the model runs on them: an exact map, and text out
    assert minielm.equivalent_linear_map(model, ids).relative_error() < 1e-13
    assert isinstance(model.generate("And God", 4), str)
