"""The errors minielm raises: one base class, one subclass per kind of fault.

Every message names the file, key, tensor or argument at fault and what was
expected, so that the command line can print it as a single line.
"""


class MinielmError(Exception):
    """Base class of every error minielm raises on purpose."""


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
