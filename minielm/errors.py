"""The errors minielm raises: one base class, one subclass per kind of fault.

Every message names the file, key, tensor or argument at fault and what was
expected, and is a single line (line breaks in a message, say from a wrapped
library error, are folded into spaces), so that the command line can print it
as one line.
"""

import re

_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


class MinielmError(Exception):
    """Base class of every error minielm raises on purpose."""

    def __init__(self, message="", *args):
        super().__init__(_LINE_BREAKS.sub(" ", str(message)).strip(), *args)


class CheckpointError(MinielmError):
    """A checkpoint directory or weights file is missing, broken or inconsistent."""


class ConfigError(MinielmError):
    """config.json is missing, unreadable, or describes an unsupported model."""


class TokenizerError(MinielmError):
    """No usable tokenizer, or text that cannot be tokenized."""


class InputError(MinielmError):
    """A bad argument: prompt, token ids, dtype, device, layer index, ..."""


class NumericalError(MinielmError):
    """Non-finite values appeared in the forward pass."""


class OutputError(MinielmError):
    """A result could not be written: an unwritable path, a closed pipe, a full disk."""


def show(value, limit: int = 60) -> str:
    """repr(value), shortened to `limit` characters: for quoting bad values in one-line messages."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer with too many digits, a structure nested too deep
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"
