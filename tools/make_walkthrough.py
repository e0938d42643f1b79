"""Write tools/walkthrough.ipynb from the cells below and execute it in place, outputs kept:

    python tools/make_walkthrough.py

Edit the cells here, never the notebook: it is this script's output (tests/test_walkthrough.py runs it).
Needs nbformat, nbclient and ipykernel (the `test` extra).
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

CELLS = [
    ("md", """# The equivalent linear map, by hand

minielm's idea in one line: every nonlinear operation of the decoder is written as **A(x)·x**, a factor
computed from the input times the input. Compute the factors once for a prompt, then *freeze* them:
the whole network becomes linear in its input embeddings, and

$$y = \\sum_t J_t\\, x_t \\;(+\\, b)$$

holds exactly (to float64 round-off) for that prompt. This notebook builds the $J_t$ by hand, one
operation at a time, on the model shipped with minielm (Llama-shaped: d = 384, 4 layers, RMSNorm,
grouped-query attention, a SiLU-gated MLP), and checks each step against the library."""),
    ("code", """import torch

import minielm
from minielm.model import attention, rms_norm
from minielm.sweep import reference_sweep

torch.set_printoptions(precision=3, sci_mode=True)
torch.manual_seed(0)  # the random test vectors below
model = minielm.load()  # the shipped model, float64
config = model.config
ids = model.tokenizer.encode("In the beginning God created the")
x = model.embed(ids)  # (T, d): the vectors entering the first block
T, d = x.shape
print(T, "tokens:", [model.tokenizer.token(i) for i in ids], "  d =", d, " dtype:", x.dtype)"""),
    ("md", """## 1. RMSNorm: the factor is 1/ρ

$N(h) = \\mathrm{diag}(w)\\, h / \\rho(h)$ with $\\rho(h) = \\sqrt{\\mathrm{mean}(h^2) + \\epsilon}$.
`rms_norm` returns the output and the factor 1/ρ, one scalar per position. Handed back, the factor is
not recomputed, and the norm is linear in h."""),
    ("code", """w0 = model.weights["layers"][0]
u, inv_rho = rms_norm(x, w0.attn_norm, config.norm_offset, config.norm_eps)
print("1/ρ per position:", inv_rho.flatten())

frozen_norm = lambda h: rms_norm(h, w0.attn_norm, config.norm_offset, config.norm_eps, inv_rho)[0]
h1, h2 = torch.randn_like(x), torch.randn_like(x)
gap = frozen_norm(2 * h1 + h2) - 2 * frozen_norm(h1) - frozen_norm(h2)
print(f"frozen: N(2h1 + h2) − 2N(h1) − N(h2) = {float(gap.abs().max() / frozen_norm(2 * h1 + h2).abs().max()):.1e} (relative)")
live = rms_norm(2 * x, w0.attn_norm, config.norm_offset, config.norm_eps)[0]
print(f"live:   N(2x) − 2N(x) = {float((live - 2 * u).abs().max() / u.abs().max()):.2f} (relative): not linear")"""),
    ("md", """## 2. Attention: the factor is P

$o_t = W_O \\sum_s P[t,s]\\, W_V u_s$ per head. Everything nonlinear (queries, keys, RoPE, softmax, the
causal mask) lives in the probabilities P; with P frozen, attention is a fixed mix of value vectors."""),
    ("code", """positions = torch.arange(T)
a, P = attention(u, w0, config, config.layer_types[0], positions)
print("P:", tuple(P.shape), "(heads, queries, keys); rows sum to 1:", bool(torch.allclose(P.sum(-1), torch.ones(()).double())))
print("the last position's attention, head 0:", P[0, -1])

frozen_attention = lambda v: attention(v, w0, config, config.layer_types[0], positions, probs=P)[0]
print("frozen attention reproduces a:", float((frozen_attention(u) - a).abs().max()))"""),
    ("md", """## 3. The MLP: the factor is the gate

$m = W_D\\,(\\varphi(W_G u) \\odot W_U u)$. The gate $\\varphi(W_G u)$ is the factor (one value per hidden
unit and position); frozen, the MLP is the matrix $W_D\\, \\mathrm{diag}(\\text{gate})\\, W_U$."""),
    ("code", """h = x + a  # the residual stream after attention (this family has no post-norms)
u2, inv_rho2 = model.norm(h, w0.mlp_norm)
m, gate = model.mlp(u2, w0)
print("gate:", tuple(gate.shape), " frozen MLP reproduces m:", float((model.mlp(u2, w0, gate)[0] - m).abs().max()))"""),
    ("md", """## 4. Freeze the whole forward pass

`model.forward` returns every factor (`Frozen`); handed back, the pass is linear in x."""),
    ("code", """y_all, frozen = model.forward(x)
y_frozen, _ = model.forward(x, frozen)
print("frozen pass at x reproduces y:", float((y_frozen - y_all).abs().max()))
x1, x2 = torch.randn_like(x), torch.randn_like(x)
f = lambda v: model.forward(v, frozen)[0]
print(f"and is linear: {float((f(x1 + x2) - f(x1) - f(x2)).abs().max() / f(x1 + x2).abs().max()):.1e} (relative)")"""),
    ("md", """## 5. J_t by hand for one layer

Target: the residual stream after layer 0 at the last position T, with the final norm applied,
$y = N_f(h^0_T)$. Following the stream backwards, with every factor frozen:

- final norm: $N_f' = \\mathrm{diag}(w_f)/\\rho_f$;
- MLP sublayer $h^0_T = h_T + m_T$: $\\;I + W_D\\, \\mathrm{diag}(\\text{gate}_T)\\, W_U\\, \\mathrm{diag}(w_\\text{mlp})/\\rho_{2,T}$;
- attention sublayer $h_T = x_T + a_T$: $\\;\\delta_{tT} I + \\sum_\\text{heads} P[T,t]\\; W_O^{(\\text{head})} W_V^{(\\text{kv})}\\, \\mathrm{diag}(w_\\text{attn})/\\rho_t$.

$J_t$ is their product."""),
    ("code", """hd, group = config.head_dim, config.num_attention_heads // config.num_key_value_heads
h0 = h + m  # the stream after layer 0
final = torch.diag(model.weights["final_norm"]) * model.final_norm(h0[-1])[1]  # N_f' (frozen at this stream)
mlp = torch.eye(d).double() + w0.w_down @ torch.diag(gate[-1]) @ w0.w_up @ torch.diag(w0.mlp_norm) * inv_rho2[-1]

J0 = torch.zeros(T, d, d, dtype=x.dtype)
for t in range(T):
    attn = torch.eye(d).double() if t == T - 1 else torch.zeros(d, d).double()
    for head in range(config.num_attention_heads):
        kv = head // group  # grouped-query attention: heads share key-value heads
        W_O = w0.wo[:, head * hd:(head + 1) * hd]
        W_V = w0.wv[kv * hd:(kv + 1) * hd]
        attn = attn + P[head, -1, t] * W_O @ W_V @ torch.diag(w0.attn_norm) * inv_rho[t]
    J0[t] = final @ mlp @ attn

library = minielm.equivalent_linear_map(model, ids, layer=0)
print("by hand vs minielm.equivalent_linear_map(layer=0):", float((J0 - library.operators).abs().max() / J0.abs().max()))
print("Σ J_t x_t vs y:", float((torch.einsum("tij,tj->i", J0, x) - library.output).norm() / library.output.norm()))"""),
    ("md", """## 6. The whole model

Every layer is the same three factors. `reference_sweep` pulls rows back through the frozen layers from
the top: seeded with the final norm's Jacobian at the last position, it returns $J_t = \\partial y / \\partial x_t$
for all t at once. The library's `equivalent_linear_map` uses a faster sweep; they must agree."""),
    ("code", """seed = model.final_norm_jacobian(frozen.final_norm[-1])  # (d, d): ∂y/∂h at the top
J = reference_sweep(model, frozen, seed, layer=config.num_hidden_layers - 1)  # (T, d, d)
elm = minielm.equivalent_linear_map(model, ids)
y = elm.output
print("reference sweep vs the library's:", float((J - elm.operators).abs().max() / J.abs().max()))
print("‖Σ J_t x_t − y‖ / ‖y‖ =", float((torch.einsum("tij,tj->i", J, x) - y).norm() / y.norm()), "  (b = 0: no biases)")"""),
    ("md", """## 7. Against autograd

The frozen factors are constants, so $J_t$ is the Jacobian of the model *with those factors detached*
from the graph. `minielm.detached_jacobian` gets it by autograd; it is not the ordinary Jacobian of the
model (that one also differentiates the factors)."""),
    ("code", """J_autograd = minielm.detached_jacobian(model, ids)
print("max |J − J_autograd| / max |J| =", float((J - J_autograd).abs().max() / J.abs().max()))"""),
    ("md", """## 8. Reading the map: spectrum and attribution

Stack the operators side by side, $[J_1 \\dots J_T]$ (d × T·d), and take its singular values. Each
token's share of y is $(J_t x_t)\\cdot y / \\lVert y\\rVert^2$. The top output singular vector is read
through the unembedding. The first token `<s>` often carries the largest operator while sending little
to y: an attention sink (README, "Reading a result")."""),
    ("code", """from minielm.interpret import decode_output, stacked_svd, token_shares

svd = stacked_svd(elm, 3)
print("σ of [J_1 … J_T]:", svd.S)
print("u_1 through the unembedding:", [tok for tok, _ in decode_output(model, svd.U[:, 0])])
for t, share in enumerate(token_shares(elm)):
    print(f"  {model.tokenizer.token(ids[t]):<12} share {share:+.3f}   ‖J_t‖₂ = {torch.linalg.matrix_norm(J[t], ord=2):7.2f}")"""),
    ("code", """attr = minielm.attribution(model, ids)  # the predicted token's logit z, split by source × layer × module
print("predicted:", model.tokenizer.token(attr.token), f"  logit z = {attr.logit:.6f},  total() = {attr.total():.6f}")
print("table (T, layers, [attention, MLP]):", tuple(attr.table.shape))
print("what each source token sends to z, summed over layers and modules:", attr.table.sum((1, 2)) + attr.embedding)"""),
    ("md", """## 9. Why float32 breaks exactness

The identity is exact only for the arithmetic the model actually ran. Cast the same operators and inputs to
float32 and Σ J_t x_t misses y by float32 round-off, about 1e-7 relative: eight orders of magnitude above
float64's. A model run in float32 has the same floor: its own map reproduces it only to float32 round-off.
Attributions and shares read off such a map carry that error, so minielm computes in float64."""),
    ("code", """J32, x32 = elm.operators.float(), x.float()
print("float64: ", float((torch.einsum("tij,tj->i", J, x) - y).norm() / y.norm()))
print("float32: ", float((torch.einsum("tij,tj->i", J32, x32).double() - y).norm() / y.norm()))
model32 = minielm.load(dtype=torch.float32)
print("a float32 model's own map:", minielm.equivalent_linear_map(model32, ids).relative_error())"""),
]


def build() -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
                      for kind, text in CELLS]
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = 120) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel (in tools/); a failing cell raises nbclient's CellExecutionError."""
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return notebook


if __name__ == "__main__":
    nbformat.write(execute(build()), HERE / "walkthrough.ipynb")
