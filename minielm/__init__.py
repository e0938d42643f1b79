"""minielm: exact equivalent linear mappings of decoder language models.

    import minielm, torch
    model = minielm.load(dtype=torch.float64)          # the shipped model; or a directory, a GGUF file, an org/name id
    elm = minielm.equivalent_linear_map(model, model.tokenizer.encode("In the beginning"))
    elm.relative_error()        # ‖Σ_t J_t x_t − y‖ / ‖y‖, float64 round-off
"""

from .errors import (CheckpointError, ConfigError, InputError, MinielmError, NumericalError, OutputError,
                     TokenizerError)
from .linear_map import Attribution, EquivalentLinearMap, attribution, detached_jacobian, equivalent_linear_map
from .loader import load
from .model import Model
from .operators_file import load_operators
from .spectra import singular_vectors

__all__ = [
    "load", "Model",
    "equivalent_linear_map", "EquivalentLinearMap", "load_operators", "detached_jacobian", "attribution", "Attribution",
    "singular_vectors",
    "MinielmError", "CheckpointError", "ConfigError", "TokenizerError", "InputError", "NumericalError", "OutputError",
]
