"""The operators against autograd through Hugging Face's own modelling code.

The autograd cross-check in test_linear_map runs minielm's forward with minielm's frozen
factors. Here the detached Jacobian is taken through the float64 Hugging Face model
instead, the freezing done where Hugging Face computes each factor: the output of
`torch.rsqrt` in its RMSNorm modules (1/ρ), of the softmax in its attention (P), and of
the activation in its MLP (the gate φ(W_G u)) is detached as it is produced. Nothing of
minielm takes part on that side, so a factor minielm froze differently, or an operator
it assembled wrongly, shows up as a difference.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT
from hf_reference import FAMILIES, float64_everywhere, load_hf_float64
from torch.overrides import TorchFunctionMode

import minielm

# Where Hugging Face computes each factor that minielm freezes: calls whose output is detached.
FACTORS = {
    "norm": {torch.rsqrt, torch.Tensor.rsqrt},  # 1/ρ = rsqrt(mean(h²) + ε) in every RMSNorm
    "softmax": {F.softmax, torch.softmax, torch.Tensor.softmax},  # the attention probabilities P
    "gate": {F.silu, F.gelu},  # φ(W_G u): a gated MLP's activation (SiLU, or GELU with tanh)
}
PLAIN_GATES = {torch.tanh, torch.Tensor.tanh}  # GPT-2's gelu_new, ½z(1 + tanh(…)): s(z) is the tanh's part


def frozen_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm with its 1/σ detached (Hugging Face's LayerNorm is one call: decomposed here)."""
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach() * weight + bias


def frozen_gelu(z, approximate="none"):
    """A plain MLP's F.gelu, z·s(z), with s(z) detached: Φ(z), or its tanh form."""
    if approximate == "tanh":
        s = 0.5 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3)))
    else:
        s = 0.5 * (1 + torch.erf(z / 2 ** 0.5))
    return z * s.detach()


class DetachFactors(TorchFunctionMode):
    """Detach the output of every call that computes one of the given factors; in a plain MLP
    (`plain`), the factor s(z) of the activation z·s(z) instead. LayerNorm counts as a norm."""

    def __init__(self, kinds, plain=False):
        super().__init__()
        self.kinds, self.plain = set(kinds), plain
        self.seen = {k: 0 for k in kinds}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm and "norm" in self.kinds:
            self.seen["norm"] += 1
            return frozen_layer_norm(*args, **kwargs)
        if self.plain and "gate" in self.kinds and func in (F.gelu, *PLAIN_GATES):
            self.seen["gate"] += 1
            return frozen_gelu(*args, **kwargs) if func is F.gelu else func(*args, **kwargs).detach()
        out = func(*args, **kwargs)
        for kind in self.seen:
            if func in FACTORS[kind] and not (self.plain and kind == "gate"):
                self.seen[kind] += 1
                out = out.detach()
        return out


def hf_detached_jacobian(hf, x, kinds=tuple(FACTORS), plain=False):
    """∂y/∂x_t (T, d, d) of Hugging Face's forward, y its final-normed last hidden state, with
    the factors of `kinds` detached inside its modules. Also the count of detached calls by kind.
    x are the input vectors without learned positions (Hugging Face adds those itself)."""
    mode = DetachFactors(kinds, plain)

    def last_hidden(inputs):  # (T, d) -> (d,)
        return hf.base_model(inputs_embeds=inputs[None], use_cache=False).last_hidden_state[0, -1]

    with float64_everywhere(), mode:
        J = torch.autograd.functional.jacobian(last_hidden, x)  # (d, T, d)
    return J.permute(1, 0, 2), mode.seen


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3", "qwen2", "gpt2",
                                  "gpt_neox", "gpt_neox_sequential"])
def test_operators_match_autograd_through_hugging_face(case, checkpoints):
    model = minielm.load(checkpoints[case])
    hf = load_hf_float64(checkpoints[case]).requires_grad_(False)
    elm = minielm.equivalent_linear_map(model, PROMPT)
    x = elm.inputs.clone()  # (T, d): the vectors entering the first block (Gemma's √d scale included)
    if "positions" in model.weights:  # GPT-2: Hugging Face adds the position rows to what it is given
        x = x - model.weights["positions"][:len(PROMPT)]
    plain = model.config.family_spec.mlp == "plain"
    J, seen = hf_detached_jacobian(hf, x, plain=plain)
    L = model.config.num_hidden_layers
    assert seen["softmax"] >= L and seen["gate"] >= L and seen["norm"] >= 2 * L + 1  # each factor was found
    assert relative(elm.operators, J) < 1e-12
    # each freezing is needed: leave any one out and Hugging Face's Jacobian is another matrix
    for kind in FACTORS:
        partly, _ = hf_detached_jacobian(hf, x, [k for k in FACTORS if k != kind], plain)
        assert relative(elm.operators, partly) > 1e-6, kind
