"""GPT-2's tokenizer files (vocab.json + merges.txt, no tokenizer.json), against transformers' GPT2Tokenizer.

The files are trained here, byte-level BPE, with the `tokenizers` library; transformers' own
GPT2Tokenizer reading the same two files is the oracle.
"""

import pytest
from conftest import TEXT
from transformers import GPT2Tokenizer

from minielm.tokenizer import load_tokenizer

SAMPLES = ["In the beginning God created the heaven and the earth.", " leading space, and  two spaces",
           "numbers 12345 and it's a 'quote'", "end<|endoftext|>next", "naïve café — “quotes” 😀", "\n\nnewlines\t"]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp("gpt2_tokenizer")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([TEXT] * 3, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    trainer.save_model(str(directory))  # vocab.json, merges.txt
    return directory


def test_vocab_and_merges_encode_as_gpt2_tokenizer(gpt2_files):
    ours = load_tokenizer(gpt2_files)
    theirs = GPT2Tokenizer(str(gpt2_files / "vocab.json"), str(gpt2_files / "merges.txt"))
    assert ours is not None and ours.bos_id is None  # GPT-2 adds no BOS
    for text in SAMPLES:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids) == text
    end = theirs.convert_tokens_to_ids("<|endoftext|>")
    assert end in ours.encode("a<|endoftext|>b")  # the end-of-text token is matched whole
