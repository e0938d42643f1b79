"""Text <-> token ids, from a checkpoint's tokenizer.json or tokenizer.model.

BOS follows the checkpoint: `add_bos_token` in tokenizer_config.json when it
says so; otherwise whatever tokenizer.json's post-processor adds, or, for a
sentencepiece model, BOS when it defines one. Text is encoded without any
other special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TokenizerError


class Tokenizer:
    def __init__(self, encode_text, decode_ids, id_to_piece, bos_id, vocab_size):
        self._encode, self._decode, self._piece = encode_text, decode_ids, id_to_piece
        self.bos_id = bos_id  # prepended by encode(); None when the checkpoint adds no BOS
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list:
        if not isinstance(text, str):
            raise TokenizerError(f"expected text, got {type(text).__name__}")
        ids = ([self.bos_id] if self.bos_id is not None else []) + list(self._encode(text))
        if not ids:
            raise TokenizerError("empty prompt, and this tokenizer adds no BOS token: nothing to run")
        return ids

    def decode(self, ids) -> str:
        return self._decode(list(ids))

    def token(self, i: int) -> str:
        """The piece of one token id, as the tokenizer spells it."""
        return self._piece(int(i))


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer, or None when it ships none."""
    settings = _read_json(directory / "tokenizer_config.json")
    if (directory / "tokenizer.json").is_file():
        return _from_tokenizer_json(directory / "tokenizer.json", settings)
    if (directory / "tokenizer.model").is_file():
        return _from_sentencepiece(directory / "tokenizer.model", settings)
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None


def _token_text(token):
    return token.get("content") if isinstance(token, dict) else token


def _from_tokenizer_json(path: Path, settings: dict) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as err:
        raise TokenizerError(f"{path}: unreadable tokenizer ({err})") from None
    bos_text = _token_text(settings.get("bos_token"))
    bos_id = tok.token_to_id(bos_text) if bos_text else None
    if "add_bos_token" in settings:
        add_bos = bool(settings["add_bos_token"])
    else:  # ask the post-processor whether it puts a special token first
        with_special = tok.encode("a", add_special_tokens=True).ids
        plain = tok.encode("a", add_special_tokens=False).ids
        add_bos = len(with_special) > len(plain) and with_special[1:len(plain) + 1] == plain
        bos_id = with_special[0] if add_bos else None
    return Tokenizer(
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        lambda i: tok.id_to_token(i),
        bos_id if add_bos else None,
        tok.get_vocab_size(),
    )


def _from_sentencepiece(path: Path, settings: dict) -> Tokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as err:
        raise TokenizerError(f"{path}: unreadable sentencepiece model ({err})") from None
    add_bos = settings.get("add_bos_token", True) and sp.bos_id() >= 0
    return Tokenizer(sp.EncodeAsIds, sp.DecodeIds, sp.IdToPiece, sp.bos_id() if add_bos else None, sp.GetPieceSize())
