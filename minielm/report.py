"""A report to look at: one self-contained HTML file (or a Jupyter cell) for one prompt.

    minielm explain "In the beginning God created the" --html report.html

The page holds everything inline (CSS, a few lines of JavaScript, SVG charts) and
fetches nothing: a Content-Security-Policy forbids it. Python renders every view;
the script only switches which token's view is shown when a token is clicked.

    tokens        coloured by their share of y, (J_t x_t)·y / ‖y‖²
    token view    the clicked token's J_t: its singular values, and its top singular
                  vectors decoded (output side through the unembedding, input side
                  by cosine similarity to the embeddings)
    emergence     the predicted token's rank and probability read off the residual
                  stream after each layer and off each attention and MLP output
    attribution   the logit split exactly by source token × layer × module
    exactness     how closely the linear map reproduces the model

`page(...)` is the whole document; `fragment(...)` the same body for Jupyter, which
`EquivalentLinearMap._repr_html_` and `Attribution._repr_html_` return. Those two are attached
here (`attach_notebook_views`), from above: the maps themselves know nothing of HTML.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import math
import os
import secrets
from pathlib import Path

import torch

from . import checks
from .exact_attribution import Attribution, attribution
from .errors import InputError
from .interpret import (COMPONENTS, align_signs, decode_inputs, decode_outputs, forward_order, model_token, svd_ready,
                        token_shares)
from .linear_map import EquivalentLinearMap, target_name, target_values, traced

# Said in explain --html's exactness section: what the report leaves to the commands that make 3L maps.
LAYERS_NOTE = ("every layer's and module's own map is not made here: minielm check gives the reconstruction "
               "error of each, minielm layers their spectra")
SCHEMA_VERSION = 1  # of the --json output of explain, layers and check (README: "The first result")

# One line per section, shared by the terminal output and the HTML report.
LEGENDS = {
    "next": "the model's own next-token probabilities, softmax(W_U y), top 5",
    "exactness": "how closely the linear map y = Σ_t J_t x_t (+ b) reproduces the model; "
                 "float64 round-off is about 1e-15",
    "per_token": "share of y = (J_t x_t)·y / ‖y‖² (with b's share b·y / ‖y‖², they sum to 1); stable rank = ‖J_t‖_F² / σ1² "
                 "(how many directions J_t uses); σ1 = J_t's largest singular value (its largest gain)",
    "stacked": "σ = singular value of [J_1 … J_T]; output side = tokens with the largest W_U u (sign: u·y ≥ 0); "
               "@token: input-side block of v with the largest norm, read as the embeddings nearest in cosine",
    "token": "J_t of the clicked token: all its singular values σ_k (log scale), and its top singular vectors "
             "decoded: u_k through the unembedding (sign: u_k·y ≥ 0), v_k by cosine to the embeddings",
    "layers": "each target's stacked operator [J_1 … J_T]: σ1, σ2 = top singular values; stable rank = "
              "‖J‖_F² / σ1²; rec. error = ‖Σ J_t x_t + b − y‖ / ‖y‖; top output singular vector = W_U u_1 "
              "decoded; target decoded = W_U y (logit lens)",
    "targets": "targets in forward order: 'attention ℓ' and 'mlp ℓ' = that module's output at the last "
               "position; 'layer ℓ' = the residual stream after layer ℓ with the final norm; 'final' = y",
    "check": "reconstruction = ‖Σ J_t x_t + b − y‖ / ‖y‖; probabilities = max |softmax(W_U Σ J_t x_t) − "
             "p_model| (residual-stream targets); vs autograd = max |J − J_autograd| / max |J| (final only)",
    "emergence": "the predicted token's rank (1 = top) and probability under W_U, read off the residual stream "
                 "after each layer (final norm applied) and off each module's output (as it is, no norm)",
    "attribution": "the logit z of the predicted token split exactly: z = Σ cells + direct path + biases; "
                   "a cell = what source token s sends to z through that layer's module (blue raises z, red lowers it)",
    "steer_eval": "lift = log-mass of the concept's tokens, steered − unsteered, as the next token and averaged over "
                  "the continuation; hits = concept tokens generated; NLL = mean −log p of the continuation under the "
                  "unsteered model (fluency cost); repetition = share of repeated bigrams; first row = unsteered",
}


def pyplot():
    """matplotlib's pyplot, drawing to files only (every plot of minielm gets it here); an InputError if
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("plots need matplotlib: pip install 'minielm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_format(path, what: str = "plot") -> str:
    """The image format of a plot path, from its suffix (png when there is none: the file gets exactly the
    name given, never a suffix added); an InputError naming `what` for a format matplotlib cannot write."""
    pyplot()  # matplotlib must be there
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().removeprefix(".") or "png"
    if suffix not in formats:
        raise InputError(f"{what} {path}: unsupported image format {suffix!r}; expected one of "
                         f"{', '.join(sorted(formats))}")
    return suffix


@contextlib.contextmanager
def replacing(path):
    """A new file beside `path`, open for binary writing, renamed over `path` (os.replace) when the block
    ends: a failed or interrupted write leaves the old file, if any, as it was, and no half-written one.
    A symlink's target is the file replaced. What is not a regular file (a device such as /dev/stdout or
    /dev/full, a pipe) is written as it is: renaming over it would replace the device itself."""
    if os.path.exists(path) and not os.path.isfile(path):  # links followed: /dev/stdout is a pipe or a terminal
        with open(path, "wb") as f:
            yield f
        return
    path = Path(os.path.realpath(path))  # a link's target is the file replaced
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # a fresh name: nothing there to touch
    fd = checks.new_file(temporary)
    try:
        with open(fd, "wb") as f:
            yield f
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # made by this call (new_file): ours to remove


def save_figure(fig, path, what: str = "plot") -> None:
    """Write a matplotlib figure to `path` (its format from the suffix) through `replacing`, and close it."""
    plt = pyplot()
    try:
        with replacing(path) as f:
            fig.savefig(f, dpi=120, format=plot_format(path, what))
    finally:
        plt.close(fig)


COLOURS = {"output": "#1f77b4", "attention": "#ff7f0e", "mlp": "#2ca02c"}
NAMES = {"output": "residual stream", "attention": "attention", "mlp": "MLP"}


# ---- small HTML pieces ------------------------------------------------------------------------
def esc(text) -> str:
    return html.escape(str(text), quote=True)


def tint(value: float, scale: float) -> str:
    """A background for a signed value: blue for positive, red for negative, stronger with |value|/scale."""
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    rgb = "31,119,180" if value >= 0 else "214,39,40"
    return f"background: rgba({rgb},{alpha:.3f})" + ("; color: #fff" if alpha > 0.6 else "")


def section(title: str, legend: str, body: str) -> str:
    return f'<section><h2>{esc(title)}</h2><p class="legend">{esc(legend)}</p>{body}</section>'


def table(header: list, rows: list) -> str:
    """rows: lists of (already escaped) cell HTML; a cell may be a (html, style) pair."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{c[1]}">{c[0]}</td>' if isinstance(c, tuple) else f"<td>{c}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def chart(series: list, title: str, log_y: bool = False, x_labels: list | None = None, invert: bool = False,
          width: int = 420, height: int = 190) -> str:
    """An inline SVG line chart. series: [(label, colour, [y...])], x = 0, 1, ... (or x_labels)."""
    left, right, top, bottom = 52, 10, 34 if len(series) > 1 else 22, 30
    values = [v for _, _, ys in series for v in ys if v is not None and (v > 0 or not log_y)]
    lo, hi = (min(values), max(values)) if values else (1.0, 10.0) if log_y else (0.0, 1.0)  # empty: a default
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    lo, hi = f(lo), f(hi)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(ys) for _, _, ys in series)

    def xy(i, v):
        x = left + (width - left - right) * (i / max(1, n - 1))
        frac = (f(v) - lo) / (hi - lo)
        y = top + (height - top - bottom) * (frac if invert else 1 - frac)
        return f"{x:.1f},{y:.1f}"

    lines = []
    for label, colour, ys in series:
        points = " ".join(xy(i, v) for i, v in enumerate(ys) if v is not None and (v > 0 or not log_y))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{points}">'
                     f"<title>{esc(label)}</title></polyline>")
        if len(ys) <= 40:
            lines += [f'<circle r="2.5" fill="{colour}" cx="{xy(i, v).split(",")[0]}" cy="{xy(i, v).split(",")[1]}">'
                      f"<title>{esc(label)} {i}: {v:.4g}</title></circle>"
                      for i, v in enumerate(ys) if v is not None and (v > 0 or not log_y)]
    ticks = []
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        y = top + (height - top - bottom) * (frac if invert else 1 - frac)
        text = f"{10 ** v:.3g}" if log_y else f"{v:.3g}"
        ticks.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{text}</text>'
                     f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
    labels = x_labels or [str(i) for i in range(n)]
    step = max(1, n // 12)
    ticks += [f'<text x="{xy(i, 1.0 if log_y else lo).split(",")[0]}" y="{height - bottom + 14}" '
              f'text-anchor="middle">{esc(labels[i])}</text>' for i in range(0, n, step)]
    key = "".join(f'<tspan fill="{c}">■ {esc(lab)}</tspan>   ' for lab, c, _ in series) if len(series) > 1 else ""
    return (f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<text x="{left}" y="13" class="title">{esc(title)}</text><text x="{left}" y="27">{key}</text>'
            + "".join(ticks) + "".join(lines) + "</svg>")


# ---- the views -------------------------------------------------------------------------------
def tokens_view(tokens: list, shares: list, selected: int) -> str:
    scale = max(abs(s) for s in shares) or 1.0
    buttons = "".join(
        f'<button class="tok{" sel" if t == selected else ""}" data-t="{t}" style="{tint(s, scale)}" '
        f'title="token {t}: share {s:.4f}">{esc(tok)}</button>' for t, (tok, s) in enumerate(zip(tokens, shares)))
    return f'<div class="tokens">{buttons}</div>'


def token_panels(model, elm, tokens: list, selected: int, k: int = 3) -> str:
    """One panel per token (only `selected` visible): J_t's spectrum and its top k triplets decoded."""
    J = svd_ready(elm.operators)
    U, S, Vh = torch.linalg.svd(J)  # (T, d, d), (T, d), (T, d, d)
    T, k = len(tokens), min(k, S.shape[1])
    u, v = align_signs(U[:, :, :k].to(elm.output.dtype), Vh[:, :k].mT.to(elm.output.dtype), elm.output)  # (T, d, k)
    # every token's triplets decoded together: the unembedding and the embeddings are read once
    outputs = decode_outputs(model, u.permute(1, 0, 2).reshape(-1, T * k))  # column t·k + i: token t's u_i
    inputs = decode_inputs(model, v.permute(1, 0, 2).reshape(-1, T * k))
    panels = []
    for t, tok in enumerate(tokens):
        rows = [[f"{float(S[t, i]):.4g}", esc(" ".join(w for w, _ in outputs[t * k + i])),
                 esc(" ".join(w for w, _ in inputs[t * k + i]))] for i in range(k)]
        spectrum = chart([("σ_k", COLOURS["output"], [float(s) for s in S[t]])],
                         f"singular values of J_{t} ({tok})", log_y=True, x_labels=[str(i + 1) for i in range(S.shape[1])])
        hidden = "" if t == selected else " hidden"
        panels.append(f'<div class="panel" data-t="{t}"{hidden}><h3>token {t}: {esc(tok)}</h3>{spectrum}'
                      + table(["σ", "output side (unembedding)", "input side (cosine to embeddings)"], rows)
                      + "</div>")
    return "".join(panels)


def emergence_rows(model, ids, token: int) -> list:
    """For every target in forward order (each layer's residual stream, final norm applied, and each
    attention and MLP output at the last position): `token`'s rank (1 = top) and probability under W_U.
    The targets are the model's own values, from one forward pass: no map is needed to read them (each
    target's own map, and its reconstruction error, is `minielm check`'s)."""
    _, _, states, states0 = traced(model, ids)
    targets = sorted([(layer, c) for layer in range(model.config.num_hidden_layers) for c in COMPONENTS],
                     key=forward_order)
    y = torch.stack([target_values(model, states, states0, layer, c)[0] for layer, c in targets])  # (3L, d)
    logits = model.unembed(y)  # (3L, V): W_U read once for all targets
    ranks = (logits > logits[:, token:token + 1]).sum(dim=1) + 1  # (3L,)
    probabilities = torch.softmax(logits, dim=1)[:, token]  # (3L,)
    return [{"layer": layer, "component": c, "target": target_name(model, layer, c), "rank": int(rank),
             "probability": float(p)} for (layer, c), rank, p in zip(targets, ranks, probabilities)]


def emergence_view(rows: list, token_text: str) -> str:
    layers = sorted({r["layer"] for r in rows})
    by = {(r["layer"], r["component"]): r for r in rows}
    series = lambda field: [(NAMES[c], COLOURS[c], [by[(i, c)][field] for i in layers]) for c in COMPONENTS]
    charts = (chart(series("rank"), f"rank of {token_text}", log_y=True, invert=True, x_labels=[f"L{i}" for i in layers])
              + chart(series("probability"), f"probability of {token_text}", x_labels=[f"L{i}" for i in layers]))
    body = table(["target", "rank", "probability"],
                 [[esc(r["target"]), str(r["rank"]), f"{r['probability']:.4f}"] for r in rows])
    return f'<div class="charts">{charts}</div><details><summary>as a table</summary>{body}</details>'


def attribution_view(attr, tokens: list | None = None) -> str:
    """The table (T, L, 2) as a heatmap, one row per source token, with the identity that sums it."""
    T, L, _ = attr.table.shape
    tokens = tokens or [str(t) for t in range(T)]
    cells = attr.table.double()
    scale = float(cells.abs().max()) or 1.0
    header = ["source"] + [f"L{i} {name}" for i in range(L) for name in ("attn", "MLP")] + ["direct", "row sum"]
    rows = []
    for s in range(T):
        row = [esc(tokens[s])]
        row += [(f"{float(cells[s, i, c]):+.3f}", tint(float(cells[s, i, c]), scale)) for i in range(L) for c in (0, 1)]
        direct = float(attr.embedding[s])
        row += [(f"{direct:+.3f}", tint(direct, scale)), f"{float(cells[s].sum()) + direct:+.3f}"]
        rows.append(row)
    return table(header, rows) + f'<p class="identity">{esc(identity_text(attr))}</p>'


def identity_text(attr) -> str:
    total = attr.total()
    norm = " + norm_bias" if attr.norm_bias else ""
    return (f"logit z = {attr.logit:.6f};  table.sum() + embedding.sum() + bias.sum(){norm} = total() = {total:.6f} "
            f"(difference {abs(total - attr.logit):.1e});  table.sum() alone = {float(attr.table.sum()):.6f}, "
            f"not z: it leaves out the direct path x_T → y ({float(attr.embedding.sum()):.6f}) "
            f"and the modules' biases ({float(attr.bias.sum()):.6f})"
            + (f" and the final LayerNorm's bias ({attr.norm_bias:.6f})" if attr.norm_bias else ""))


def exactness_view(figures: dict, layers_note: bool = False) -> str:
    items = [("reconstruction ‖Σ J_t x_t + b − y‖ / ‖y‖", figures.get("relative_error")),
             ("probabilities max |p_reconstructed − p|", figures.get("probability_error")),
             ("autograd max |J − J_autograd| / max |J|", figures.get("autograd_relative_difference")),
             ("attribution |total() − z| / |z|", figures.get("attribution_error"))]
    body = table(["quantity", "value"], [[esc(name), f"{value:.1e}"] for name, value in items if value is not None]
                 + ([[esc(items[2][0]), "skipped (--no-autograd)"]]  # explain's JSON holds null there
                    if "autograd_relative_difference" in figures and figures["autograd_relative_difference"] is None
                    else []))
    if layers_note:
        body += f"<p>{esc(LAYERS_NOTE)}</p>"
    return body


# ---- assembling a report --------------------------------------------------------------------
CSS = """
.minielm { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px; }
.minielm h1 { font-size: 20px; margin: 0.2em 0; } .minielm h2 { font-size: 16px; margin: 1.2em 0 0.1em; }
.minielm h3 { font-size: 14px; margin: 0.4em 0; }
.minielm .legend { color: #555; font-size: 12.5px; margin: 0 0 0.5em; }
.minielm .tokens { display: flex; flex-wrap: wrap; gap: 3px; }
.minielm .tok { font: 14px ui-monospace, monospace; border: 1px solid #bbb; border-radius: 4px; padding: 2px 5px;
  cursor: pointer; color: #111; }
.minielm .tok.sel { outline: 2px solid #111; }
.minielm table { border-collapse: collapse; font-size: 12.5px; margin: 0.3em 0; }
.minielm th, .minielm td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; white-space: nowrap; }
.minielm svg.chart { font: 10px system-ui, sans-serif; margin-right: 12px; }
.minielm svg .title { font-size: 12px; } .minielm svg .grid { stroke: #eee; }
.minielm .charts { display: flex; flex-wrap: wrap; } .minielm .identity { font-size: 12.5px; color: #333; }
.minielm .scroll { overflow-x: auto; }
"""

# Clicking a token shows its panel. Scoped to one report's element, so several can share a notebook.
SCRIPT = """
(function () {
  var root = document.getElementById("%(id)s");
  function show(t) {
    root.querySelectorAll(".panel").forEach(function (p) { p.hidden = p.dataset.t !== t; });
    root.querySelectorAll(".tok").forEach(function (b) { b.classList.toggle("sel", b.dataset.t === t); });
  }
  root.querySelectorAll(".tok").forEach(function (b) {
    b.addEventListener("click", function () { show(b.dataset.t); });
  });
})();
"""

# In the standalone page only: errors and blocked fetches are recorded from the first line on, and
# page.html#selftest clicks another token and writes what it saw into <pre id="selftest"> (for tests).
RECORDER = """
window.minielmErrors = [];
window.addEventListener("error", function (e) { window.minielmErrors.push("error: " + e.message); });
document.addEventListener("securitypolicyviolation", function (e) {
  window.minielmErrors.push("blocked: " + e.blockedURI); });
"""

SELFTEST = """
window.addEventListener("load", function () {
  if (location.hash !== "#selftest") return;
  var visible = function () { return document.querySelector(".panel:not([hidden])").dataset.t; };
  var before = visible();
  var other = Array.prototype.find.call(document.querySelectorAll(".tok"),
                                        function (b) { return b.dataset.t !== before; });
  if (other) other.click();
  var out = document.createElement("pre");
  out.id = "selftest";
  out.textContent = JSON.stringify({before: before, clicked: other ? other.dataset.t : null, after: visible(),
    selected: document.querySelector(".tok.sel").dataset.t, panels: document.querySelectorAll(".panel").length,
    errors: window.minielmErrors});
  document.body.appendChild(out);
});
"""

_ids = itertools.count()


def fragment(title: str, sections: list) -> str:
    """The report body: a <div> with its own style and script (Jupyter's _repr_html_, or the page)."""
    ident = f"minielm-report-{next(_ids)}"
    return (f'<div class="minielm" id="{ident}"><style>{CSS}</style><h1>{esc(title)}</h1>{"".join(sections)}'
            f"<script>{SCRIPT % {'id': ident}}</script></div>")


def page(title: str, sections: list) -> str:
    """A whole offline document: everything inline, and a policy that forbids any fetch."""
    policy = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            f"<title>{esc(title)}</title><script>{RECORDER}</script></head>"
            f"<body>{fragment(title, sections)}<script>{SELFTEST}</script></body></html>\n")


def map_sections(model, elm, figures: dict) -> list:
    """Tokens, the clicked token's view and the exactness figures: what one EquivalentLinearMap holds."""
    tokens = [model_token(model, i) for i in elm.ids]
    shares = figures["shares"]
    selected = max(range(len(shares)), key=lambda t: abs(shares[t]))
    return [
        section("tokens, coloured by share of y", LEGENDS["per_token"].split(";")[0]
                + "; blue pushes towards y, red away; click a token", tokens_view(tokens, shares, selected)),
        section("the clicked token's operator J_t", LEGENDS["token"], token_panels(model, elm, tokens, selected)),
    ]


def explain_page(model, elm, figures: dict) -> str:
    """The `explain --html` report. `figures`: explain's JSON (tokens, per_token shares, exactness);
    with the logit lens through the layers (emergence: one forward pass) and the attribution table (one
    reverse pass carrying a row per module) added here, both cheap beside the map itself. Every layer's
    and module's own map is not made (3L maps cost several times the final one): `minielm check` and
    `minielm layers` make them."""
    tokens = figures["tokens"]
    figures = dict(figures, shares=[row["share"] for row in figures["per_token"]])
    sections = map_sections(model, elm, figures)
    attr = attribution(model, elm.ids)  # of the predicted token
    next_id = attr.token
    rows = emergence_rows(model, elm.ids, next_id)
    figures["attribution_error"] = abs(attr.total() - attr.logit) / (abs(attr.logit) or 1.0)  # relative, as above
    shown = repr(model_token(model, next_id))
    sections += [
        section(f"emergence of the prediction {model_token(model, next_id)!r} through the layers",
                LEGENDS["emergence"], emergence_view(rows, shown)),
        section(f"attribution of the logit of {model_token(model, next_id)!r}: source token × layer × module",
                LEGENDS["attribution"], f'<div class="scroll">{attribution_view(attr, tokens)}</div>'),
    ]
    sections.append(section("exactness", LEGENDS["exactness"], exactness_view(figures, layers_note=True)))
    top = figures["top"][0]
    title = f"minielm: {' '.join(tokens)[:80]} → {top['token']!r} ({top['probability']:.3f})"
    return page(title, sections)


def map_html(elm) -> str:
    """EquivalentLinearMap._repr_html_: the tokens, each J_t's view, and the reconstruction error; None
    for a map loaded from a file without its model (nothing to decode tokens with: Jupyter then falls
    back to the plain repr)."""
    if elm.model is None:
        return None
    figures = {"shares": [float(s) for s in token_shares(elm)], "relative_error": elm.relative_error()}
    title = f"EquivalentLinearMap ({elm.target}): {len(elm.ids)} operators J_t of {elm.operators.shape[1]}²"
    return fragment(title, map_sections(elm.model, elm, figures)
                    + [section("exactness", LEGENDS["exactness"], exactness_view(figures))])


def attribution_html(attr, tokens: list | None = None) -> str:
    """Attribution._repr_html_: the heatmap and the identity that sums it to the logit."""
    return fragment(f"Attribution of the logit of token id {attr.token}",
                    [section("source token × layer × module", LEGENDS["attribution"],
                             f'<div class="scroll">{attribution_view(attr, tokens)}</div>')])


def attach_notebook_views() -> None:
    """Give the maps and attributions their Jupyter view (`_repr_html_`). Called by the package's front
    (minielm/__init__.py) when a public name is first used, so that the core never imports the report."""
    EquivalentLinearMap._repr_html_ = map_html
    Attribution._repr_html_ = attribution_html


# ---- steering's trade-off plot (minielm steer-eval --plot) ---------------------------------
def plot_tradeoff(results: list, path) -> None:
    """Lift against fluency cost, one panel per (concept, prompt): colour = recipe, marker = layer,
    size = λ; the unsteered continuation is the black star (matplotlib). Written to exactly `path`, in
    the format of its suffix (png without one; matplotlib itself would add '.png' to the name)."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    colours = {"minielm": "tab:blue", "paper": "tab:orange", "actadd": "tab:green"}
    layers = sorted({r["layer"] for result in results for r in result["rows"]})
    markers = dict(zip(layers, "osD^vP*Xh<>p" * 4))
    fig, axes = plt.subplots(1, len(results), figsize=(5.4 * len(results), 4.8), squeeze=False)
    for ax, result in zip(axes[0], results):
        rows = result["rows"]
        ranks = {scale: k for k, scale in enumerate(sorted({r["scale"] for r in rows}))}
        for r in rows:
            ax.scatter(r["nll"], r["continuation_lift"], s=18 + 28 * ranks[r["scale"]], marker=markers[r["layer"]],
                       c=colours.get(r["method"], "grey"), alpha=0.7, edgecolors="none")
        ax.scatter([result["baseline"]["nll"]], [0.0], marker="*", s=200, c="black", zorder=3)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_yscale("symlog", linthresh=1.0)  # a few runs collapse far below zero
        ax.set_xlabel("fluency cost: NLL of the steered text under the unsteered model (nats/token)", fontsize=8)
        ax.set_ylabel("lift: concept log-mass, steered − unsteered (nats, symlog)", fontsize=8)
        ax.set_title(f"{result['concept']!r}\n← {result['prompt']!r}", fontsize=9)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=m) for m, c in colours.items()]
    handles += [Line2D([], [], ls="", marker=markers[layer], color="grey", label=f"layer {layer}") for layer in layers]
    handles += [Line2D([], [], ls="", marker="*", color="black", markersize=10, label="unsteered")]
    fig.legend(handles=handles, fontsize=8, loc="center right", title="size: λ", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 0.9 / fig.get_figwidth(), 1))
    save_figure(fig, path)
