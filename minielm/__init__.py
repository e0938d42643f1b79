"""minielm: exact equivalent linear mappings of decoder language models.

    import minielm, torch
    model = minielm.load(dtype=torch.float64)          # the shipped model; or a directory, a GGUF file, an org/name id
    elm = minielm.equivalent_linear_map(model, model.tokenizer.encode("In the beginning"))
    elm.relative_error()        # ‖Σ_t J_t x_t − y‖ / ‖y‖, float64 round-off

The public names, and the module each lives in. They are imported on first use (PEP 562), so that
`import minielm` itself loads nothing heavy: the `minielm` command can then answer a Ctrl-C that
comes while torch is still being imported with its one line (minielm/__main__.py).
"""

import importlib

WHERE = {
    "load": "loader", "Model": "model",
    "equivalent_linear_map": "linear_map", "EquivalentLinearMap": "linear_map", "load_operators": "linear_map",
    "detached_jacobian": "linear_map", "attribution": "exact_attribution", "Attribution": "exact_attribution",
    "singular_vectors": "spectra",
    "MinielmError": "errors", "CheckpointError": "errors", "ConfigError": "errors", "TokenizerError": "errors",
    "InputError": "errors", "NumericalError": "errors", "OutputError": "errors",
}
__all__ = list(WHERE)


def __getattr__(name):
    if name not in WHERE:
        raise AttributeError(f"module 'minielm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{WHERE[name]}", __name__), name)
    if WHERE[name] in ("linear_map", "exact_attribution"):  # their Jupyter views live in the report, above them
        importlib.import_module(".report", __name__).attach_notebook_views()
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
