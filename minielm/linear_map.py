"""The equivalent linear map: one d × d operator J_t per input token.

Freeze every factor A(x*) of a forward pass (see model.py). The network is then
linear in its input vectors, and its output at the last position is

    y = Σ_t J_t x_t (+ b when the checkpoint has biases),   J_t = ∂y/∂x_t with A frozen,

exactly: the sum reproduces the model's own y to float64 round-off.

This module makes the map of a prompt: the forward pass at x* that records the factors
and every intermediate state (`traced`), the target y and its seed ∂y/∂(point)
(`target_values`), then the reverse sweep from that seed (minielm/sweep.py states the
method; minielm/fast_sweep.py is the one that runs), in memory, into a file
(minielm/operators_file.py) or over the ranks of torch.distributed (minielm/distributed.py).

`detached_jacobian` computes the same operators through autograd, from a forward pass
whose factors are frozen: an independent path for checking.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checks, operators_file
from .distributed import check_same_prompt, gather_rows, rank_and_size, rows_of
from .errors import InputError, OutputError
from .fast_sweep import sweep_in_blocks
from .model import Frozen, Model, States


# ---- the forward pass at x*, with every intermediate state ------------------------------------
def trace(model: Model, x, frozen: Frozen | None = None):
    """The forward pass on x (T, d), keeping every intermediate state: the residual
    stream after each layer, and each layer's attention and MLP outputs, each (T, d);
    and the factors. With `frozen` given the pass is linear in x, and its value at
    x = 0 is the affine part (nonzero only for checkpoints with biases)."""
    states = States()
    _, frozen = model.forward(x, frozen, states=states)
    return states.output, states.attention, states.mlp, frozen


@torch.no_grad()  # no gradient flows from here: a streamed model's layers then share their cast buffers
def traced(model: Model, ids):
    """x (T, d), the factors, and every intermediate state (States: 'output' = the residual
    stream after each layer, 'attention', 'mlp'), at x and at 0 (the affine part)."""
    x = model.embed(ids)  # (T, d)
    states = States()
    _, frozen = model.forward(x, states=states)
    if model.config.affine:
        at_zero = States()
        model.forward(torch.zeros_like(x), frozen, states=at_zero)
    else:  # without biases the frozen pass is linear: exactly 0 at x = 0, so it is not run
        zeros = [torch.zeros_like(x)] * model.config.num_hidden_layers
        at_zero = States(zeros, zeros, zeros)
    return x, frozen, states, at_zero


def target_values(model: Model, states: States, states0: States, layer: int, component: str):
    """y and b of a target at the last position, (d,) each, and its seed ∂y/∂(point) (d, d): for a
    residual stream the frozen final norm's Jacobian (the final norm applied to it, as in Golden
    (2025)); for a module's output, taken as it is, the identity."""
    if component != "output":
        y = states[component][layer][-1]
        return y, states0[component][layer][-1], torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
    # y = N_f(h^ℓ_T): the final norm, its 1/ρ frozen at this layer's own residual stream
    y, inv_rho = model.final_norm(states.output[layer][-1])
    bias = model.final_norm(states0.output[layer][-1], inv_rho)[0]
    return y, bias, model.final_norm_jacobian(inv_rho)


# ---- the public object -----------------------------------------------------------------------
@dataclass
class EquivalentLinearMap:
    """y = Σ_t J_t x_t + b for one prompt, with everything needed to check and read it."""

    model: Model
    ids: list
    operators: torch.Tensor  # (T, d, d): J_t
    inputs: torch.Tensor  # (T, d): x_t, the vectors entering the first block
    output: torch.Tensor  # (d,): y, the target computed by the model itself
    bias: torch.Tensor  # (d,): b, the affine part (zero for bias-free checkpoints)
    frozen: Frozen
    target: str = "final"  # what y is: "final", or "layer L", "attention L", "mlp L"

    def __repr__(self) -> str:
        """One line (the dataclass's own repr printed every tensor): what the map is and how exact."""
        T, d = self.inputs.shape
        return (f"EquivalentLinearMap(target={self.target!r}, T={T}, d={d}, "
                f"dtype={str(self.operators.dtype).removeprefix('torch.')}, "
                f"relative_error={self.relative_error():.1e})")

    def reconstruct(self) -> torch.Tensor:
        """Σ_t J_t x_t + b: (d,)."""
        return torch.einsum("tij,tj->i", self.operators, self.inputs) + self.bias

    def relative_error(self) -> float:
        """‖Σ_t J_t x_t + b − y‖ / ‖y‖."""
        error = self.reconstruct().double() - self.output.double()  # measured in float64 whatever the dtype
        return float(torch.linalg.vector_norm(error) / torch.linalg.vector_norm(self.output.double()))

    def logits(self) -> torch.Tensor:
        """Next-token logits (V,) from the reconstruction (final-normed targets only)."""
        return self.unembedded(self.reconstruct())

    def probabilities(self) -> torch.Tensor:
        """Next-token probabilities (V,) from the reconstruction."""
        return torch.softmax(self.logits(), dim=-1)

    def model_probabilities(self) -> torch.Tensor:
        """The model's own next-token probabilities for the same target: (V,)."""
        return torch.softmax(self.unembedded(self.output), dim=-1)

    def unembedded(self, y) -> torch.Tensor:
        """Logits (V,) of a vector y (d,) of this target: a residual-stream target, with its model."""
        if self.model is None:
            raise InputError("logits need the model: minielm.load_operators(path, model)")
        if self.target.startswith(("attention", "mlp")):
            raise InputError(f"logits are defined for residual-stream targets, not {self.target!r}")
        return self.model.unembed(y.to(self.model.device))  # a file's map is on the CPU


BLOCK_BYTES = 2**30  # with out=: rows are swept in blocks of about this many bytes of G


def equivalent_linear_map(model: Model, ids, layer: int | None = None, component: str = "output",
                          out=None, block: int | None = None, distributed: bool = False):
    """The per-token operators J_t (T, d, d) of the frozen model for the prompt `ids`.

    By default y is the final-normed hidden state at the last position (what the
    unembedding reads). With `layer=L`: the residual stream after layer L with the
    final norm applied, as in Golden (2025); with `component='attention'` or
    'mlp' too: that module's output at the last position (no norm).
    No autograd is used: this works under torch.inference_mode().

    Memory: the operators, one layer, and the sweep's scratch (64 MiB, or an eighth of
    the block). `block=r` sweeps r of the d output rows at a time (default: all of them).
    With `out=PATH` the operators go to a safetensors file a block at a time (default
    blocks of about 1 GiB) and come back memory-mapped (`minielm.load_operators`): for
    maps larger than memory. With `distributed=True`, under torchrun, the rows are split
    over the ranks (see minielm.distributed): rank 0 returns the map and the others None,
    or with `out=` every rank writes its rows and all return the file's map.
    """
    ids = checked_ids(model, ids)
    layer, component = checked_target(model, layer, component)
    block = checks.optional_integer("block", block, 1, why="output rows swept at a time")
    distributed = checks.boolean("distributed", distributed)
    out = None if out is None else checked_out(model, out)
    rank, ranks = rank_and_size(distributed)
    if distributed:
        c = model.config
        check_same_prompt(ids, (layer, ("output", "attention", "mlp").index(component), c.hidden_size,
                                c.num_hidden_layers, c.vocab_size, model.dtype.itemsize), model.device)
    x, frozen, states, states0 = traced(model, ids)
    y, bias, seed = target_values(model, states, states0, layer, component)
    (T, d), name = x.shape, target_name(model, layer, component)
    rows = rows_of(rank, ranks, d)  # this process's output rows: all of them unless distributed
    if out is None:
        operators = sweep_in_blocks(model, frozen, seed[rows], layer, component, block)
        operators = gather_rows(operators, d, rank, ranks) if distributed else operators
        return None if operators is None else EquivalentLinearMap(model, ids, operators, x, y, bias, frozen, name)
    block = block or max(1, BLOCK_BYTES // (T * d * x.element_size()))
    operators_file.write(out, T, d, x.dtype, {"target": name, "model": str(model.directory),
                                             "weights": model.fingerprint()}, ids, x, y, bias,
                         rows.start, lambda write: sweep_in_blocks(model, frozen, seed[rows], layer, component,
                                                                   block, write), distributed)
    elm = load_operators(out)
    elm.model, elm.frozen = model, frozen
    return elm


def load_operators(path, model=None) -> EquivalentLinearMap:
    """The EquivalentLinearMap stored at `path` by equivalent_linear_map(..., out=), its tensors
    memory-mapped from a private copy of the file (copy-on-write: changing them changes nothing on disk;
    a file cut or rewritten afterwards changes nothing in them; see minielm.operators_file). With the model that
    computed it, logits and probabilities work too; another model is refused: one whose weights'
    fingerprint (Model.fingerprint) differs from the file's, or, for a file written without one,
    whose embedding of the stored ids differs from the stored inputs."""
    tensors, metadata = operators_file.read(path, model)
    return EquivalentLinearMap(model, tensors["ids"].tolist(), tensors["operators"], tensors["inputs"],
                               tensors["output"], tensors["bias"], None, metadata.get("target", "final"))


def checked_out(model: Model, out) -> str:
    """`out` as the real path the operators will be written to (beside it as .partial, then renamed
    over it: so a link's target, never a device), or an error: not a file path, not a regular file,
    or a file of the checkpoint that `model` was loaded from; or something already at out.partial."""
    if not isinstance(out, (str, os.PathLike)) or os.fspath(out) in ("", b"") or "\0" in str(os.fspath(out)):
        raise InputError(f"out must be a file path, got {out!r}")
    checks.path_fits("out", out, OutputError)
    checks.path_fits("out", out, OutputError, suffix=".partial")
    if os.path.exists(out) and not os.path.isfile(out):
        raise OutputError(f"out={out}: not a regular file (a directory, a device or a pipe); "
                          "the operators are written into a file and mapped back from it")
    if model.directory is not None and checks.overwrites(Path(out), Path(model.directory)):
        raise OutputError(f"out={out}: would overwrite the checkpoint being read ({model.directory}); "
                          "write it somewhere else")
    operators_file.refuse_existing_partial(out)
    return os.path.realpath(out)


def checked_ids(model: Model, ids) -> list:
    """`model` is a Model and `ids` its token ids (a list of ints), or an InputError."""
    checks.instance("model", model, Model, "from minielm.load")
    return model.check_ids(ids)


def checked_target(model: Model, layer, component):
    """(layer, component) of a target, checked: layer None is the model's output (component 'output'
    only); a layer in [-L, L) counts from the bottom, or from the top when negative."""
    component = checks.one_of("component", component, ("output", "attention", "mlp"))
    L = model.config.num_hidden_layers
    if layer is None:
        if component != "output":
            raise InputError(f"component={component!r} needs a layer: pass layer=L with L in [0, {L})")
        return L - 1, "output"
    return checks.integer("layer", layer, -L, L, why=f"the model has {L} layers; negative counts from the top") % L, \
        component


def target_name(model: Model, layer: int, component: str) -> str:
    """'final' (the model's output), 'layer ℓ' (residual stream after ℓ), 'attention ℓ' or 'mlp ℓ'."""
    if component == "output":
        return "final" if layer == model.config.num_hidden_layers - 1 else f"layer {layer}"
    return f"{component} {layer}"


def detached_jacobian(model: Model, ids) -> torch.Tensor:
    """J_t (T, d, d) by autograd: the Jacobian of the frozen forward pass at x*.

    The factors A(x*) are computed once without gradients and handed back to the
    forward pass, which is the same as detaching them: only the linear path
    carries gradient. Vectorized over the d outputs, as in Golden (2025).
    """
    ids = checked_ids(model, ids)
    with torch.no_grad():
        x = model.embed(ids)
        _, frozen = model.forward(x)

    def last_output(inputs):
        return model.forward(inputs, frozen)[0][-1]  # (d,)

    J = torch.autograd.functional.jacobian(last_output, x, vectorize=True)  # (d, T, d)
    return J.permute(1, 0, 2).contiguous()  # (T, d, d)
