"""Text <-> token ids, from a checkpoint's tokenizer.json, tokenizer.model, or vocab.json + merges.txt.

BOS follows the checkpoint: `add_bos_token` in tokenizer_config.json when it
says so; otherwise whatever tokenizer.json's post-processor adds, or, for a
sentencepiece model, BOS when it defines one. Text is encoded without any
other special tokens.

Every failure is a TokenizerError naming the tokenizer file: a file that
cannot be read, text that cannot be encoded (a lone surrogate), ids that
cannot be decoded, an empty prompt when there is no BOS to run on.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path

from .errors import TokenizerError, show


class Tokenizer:
    def __init__(self, encode_text, decode_ids, id_to_piece, bos_id, vocab_size, path=None):
        self._encode, self._decode, self._piece = encode_text, decode_ids, id_to_piece
        self.bos_id = bos_id  # prepended by encode(); None when the checkpoint adds no BOS
        self.vocab_size = vocab_size  # ids are in [0, vocab_size)
        self.path = path  # the tokenizer file, for messages

    def _where(self) -> str:
        return f"{self.path}: " if self.path is not None else ""

    def encode(self, text: str) -> list:
        if not isinstance(text, str):
            raise TokenizerError(f"{self._where()}expected text (str) to encode, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TokenizerError(f"{self._where()}text is not valid Unicode: {show(text[err.start:err.end])} "
                                 f"at position {err.start} (a lone surrogate) cannot be encoded") from None
        try:
            pieces = [int(i) for i in self._encode(text)]
        except Exception as err:
            raise TokenizerError(f"{self._where()}cannot tokenize {show(text, 40)} ({err})") from None
        ids = ([self.bos_id] if self.bos_id is not None else []) + pieces
        if not ids:
            raise TokenizerError(f"{self._where()}empty prompt, and this tokenizer adds no BOS token "
                                 f"(add_bos_token is false or there is none): expected at least one token")
        return ids

    def decode(self, ids) -> str:
        ids = self._as_ints(ids)
        try:
            return self._decode(ids)
        except Exception as err:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            what = f"token id {bad[0]} (vocabulary [0, {self.vocab_size}))" if bad else show(ids, 40)
            raise TokenizerError(f"{self._where()}cannot decode {what} ({err})") from None

    def token(self, i: int) -> str:
        """The piece of one token id, as the tokenizer spells it."""
        (i,) = self._as_ints([i])
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"{self._where()}token id {i} is outside the vocabulary [0, {self.vocab_size})")
        try:
            return self._piece(i)
        except Exception as err:
            raise TokenizerError(f"{self._where()}no piece for token id {i} ({err})") from None

    def _as_ints(self, ids) -> list:
        try:
            return [operator.index(i) for i in ids]
        except (TypeError, ValueError) as err:
            raise TokenizerError(f"{self._where()}expected integer token ids, got {show(ids, 40)} ({err})") from None


def check_vocabulary(tokenizer, config, config_path) -> None:
    """A tokenizer whose ids reach past the model's vocabulary belongs to another model: every
    such id would index past the embedding. Named at load, rather than as a bad token id later."""
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"{tokenizer.path}: the tokenizer has token ids up to {tokenizer.vocab_size - 1}, but "
                             f"{config_path} says vocab_size={config.vocab_size}: the tokenizer and the weights "
                             f"do not belong to the same model")


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer, or None when it ships none."""
    settings = _read_settings(directory / "tokenizer_config.json")
    if (directory / "tokenizer.json").is_file():
        return _from_tokenizer_json(directory / "tokenizer.json", settings)
    if (directory / "tokenizer.model").is_file():
        return _from_sentencepiece(directory / "tokenizer.model", settings)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return _from_vocab_and_merges(directory / "vocab.json", directory / "merges.txt", settings)
    return None


def _read_settings(path: Path) -> dict:
    """tokenizer_config.json as a dict ({} when there is none), with `add_bos_token` checked."""
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise TokenizerError(f"{path}: cannot read ({err})") from None
    if not isinstance(settings, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    if settings.get("add_bos_token") is None:
        settings.pop("add_bos_token", None)  # null: not said
    elif not isinstance(settings["add_bos_token"], bool):
        raise TokenizerError(f"{path}: add_bos_token must be true or false, got {show(settings['add_bos_token'])}")
    return settings


def _token_text(token):
    return token.get("content") if isinstance(token, dict) else token


def _from_tokenizer_json(path: Path, settings: dict) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as err:
        raise TokenizerError(f"{path}: unreadable tokenizer ({err})") from None
    return _wrapped(tok, path, settings)


def _from_vocab_and_merges(vocab: Path, merges: Path, settings: dict) -> Tokenizer:
    """The files GPT-2's checkpoints ship without a tokenizer.json: a byte-level BPE (vocab.json, merges.txt),
    read as transformers' GPT2Tokenizer reads them, its end-of-text token (and any special token that
    tokenizer_config.json names) matched whole in text."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    try:
        tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=settings.get("add_prefix_space") is True)
        tok.decoder = decoders.ByteLevel()
        named = {_token_text(settings.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special = sorted(t for t in named | {"<|endoftext|>"} if isinstance(t, str) and tok.token_to_id(t) is not None)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    except Exception as err:
        raise TokenizerError(f"{vocab}: unreadable tokenizer ({err})") from None
    return _wrapped(tok, vocab, settings)


def _wrapped(tok, path: Path, settings: dict) -> Tokenizer:
    """A `tokenizers` tokenizer as minielm's Tokenizer, BOS as the module's docstring says."""
    try:
        bos_text = _token_text(settings.get("bos_token"))
        bos_id = tok.token_to_id(bos_text) if isinstance(bos_text, str) else None
        if "add_bos_token" in settings:
            add_bos = settings["add_bos_token"]
        else:  # ask the post-processor whether it puts a special token first
            with_special = tok.encode("a", add_special_tokens=True).ids
            plain = tok.encode("a", add_special_tokens=False).ids
            add_bos = len(with_special) > len(plain) and with_special[1:len(plain) + 1] == plain
            bos_id = with_special[0] if add_bos else None
        vocab_size = 1 + max(tok.get_vocab(with_added_tokens=True).values(), default=-1)  # ids: 0 .. max
    except Exception as err:
        raise TokenizerError(f"{path}: unreadable tokenizer ({err})") from None
    return Tokenizer(
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        lambda i: tok.id_to_token(i),
        bos_id if add_bos else None,
        vocab_size,
        path,
    )


def _from_sentencepiece(path: Path, settings: dict) -> Tokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as err:
        raise TokenizerError(f"{path}: unreadable sentencepiece model ({err})") from None
    add_bos = settings.get("add_bos_token", True) and sp.bos_id() >= 0
    return Tokenizer(sp.EncodeAsIds, sp.DecodeIds, sp.IdToPiece, sp.bos_id() if add_bos else None, sp.GetPieceSize(),
                     path)
