"""The HTML report: in a real headless browser, and as Jupyter's _repr_html_."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minielm
from minielm.interpret import token_shares

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import browser  # noqa: E402  (tools/browser.py: headless Chromium)

PROMPT = "And God said, Let there be light"


@pytest.fixture(scope="module")
def report(tiny_with_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    done = subprocess.run([sys.executable, "-m", "minielm.cli", "explain", PROMPT, "--model", str(tiny_with_tokenizer),
                           "--html", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return path


def test_report_is_self_contained(report):
    text = report.read_text(encoding="utf-8")
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert not re.search(r"""(src|href)\s*=|@import|url\(|fetch\(|XMLHttpRequest""", text)


@pytest.mark.skipif(browser.chromium() is None and not os.environ.get("CI"),
                    reason="no chromium on PATH (.ci/run installs Debian's chromium; CI never skips this)")
def test_report_in_headless_chromium(report, tiny_with_tokenizer, tmp_path):
    result = browser.selftest(report)
    assert result["errors"] == []  # no script error, nothing blocked by the no-fetch policy
    assert result["panels"] == len(minielm.load(tiny_with_tokenizer).tokenizer.encode(PROMPT))  # one per token
    assert result["clicked"] != result["before"]  # clicking another token ...
    assert result["after"] == result["clicked"] == result["selected"]  # ... shows its view and marks it
    png = tmp_path / "report.png"
    browser.screenshot(report, png, 800, 600)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.fixture(scope="module")
def model(tiny_with_tokenizer):
    return minielm.load(tiny_with_tokenizer, dtype=torch.float64)


def test_map_repr_html(model):
    ids = model.tokenizer.encode(PROMPT)
    elm = minielm.equivalent_linear_map(model, ids)
    page = elm._repr_html_()
    assert page.count('class="panel"') == len(ids) and page.count('<button class="tok') == len(ids)
    shares = token_shares(elm)
    shown = [float(x) for x in re.findall(r'title="token \d+: share (-?[0-9.]+)"', page)]
    assert shown == pytest.approx(shares.tolist(), abs=1e-4)  # the colours' values are the shares


def test_map_repr_html_with_exactly_zero_operators(checkpoints):
    """Tokens outside every sliding window have J_t = 0 exactly: their log-scale spectrum chart has no
    point to draw and gets a default range (it crashed in log10(0)); the rest of the page is drawn."""
    from conftest import PROMPT

    from minielm.report import chart

    model = minielm.load(checkpoints["mistral"])
    elm = minielm.equivalent_linear_map(model, PROMPT)
    assert not elm.operators[0].any()
    page = elm._repr_html_()
    assert page.count('class="panel"') == len(PROMPT)
    empty = chart([("σ_k", "#000", [0.0, 0.0])], "zero", log_y=True)
    assert "<polyline" in empty and "<circle" not in empty  # axes, no points


def test_map_from_a_file_without_its_model_has_no_html(model, tmp_path):
    """A map loaded without its model cannot decode tokens: _repr_html_ returns None (Jupyter then
    shows the plain repr), and with the model it draws the page."""
    ids = model.tokenizer.encode(PROMPT)
    minielm.equivalent_linear_map(model, ids, out=tmp_path / "ops.safetensors")
    assert minielm.load_operators(tmp_path / "ops.safetensors")._repr_html_() is None
    assert "<div" in minielm.load_operators(tmp_path / "ops.safetensors", model)._repr_html_()


def test_attribution_repr_states_the_identity(model):
    ids = model.tokenizer.encode(PROMPT)
    attr = minielm.attribution(model, ids)
    text = repr(attr)
    assert f"logit={attr.logit:.6g}" in text and f"total()={attr.total():.6g}" in text and "table.sum()" in text
    page = attr._repr_html_()
    cells = [float(x) for x in re.findall(r'<td style="[^"]*">([+-][0-9.]+)</td>', page)]
    T, L, _ = attr.table.shape
    expected = torch.cat([attr.table.reshape(T, 2 * L), attr.embedding[:, None]], dim=1).flatten().tolist()
    assert cells == pytest.approx(expected, abs=1e-3)  # the heatmap is the table, row by row, with the direct path
    assert f"total() = {attr.total():.6f}" in page and f"logit z = {attr.logit:.6f}" in page


def test_exactness_table_states_the_attribution_error_relative_to_the_logit(report, tiny_with_tokenizer):
    """Under "round-off is about 1e-15", an absolute error on a logit of 24.5 read as 30× that."""
    model = minielm.load(tiny_with_tokenizer)
    attr = minielm.attribution(model, model.tokenizer.encode(PROMPT))
    shown = re.search(r"attribution \|total\(\) − z\| / \|z\|</td><td>([^<]*)<", report.read_text(encoding="utf-8"))
    assert shown, "the exactness table has no relative attribution row"
    assert shown.group(1) == f"{abs(attr.total() - attr.logit) / abs(attr.logit):.1e}"


def emergence_table(page: str) -> dict:
    """{target: (rank, probability)} from the report's emergence table ("as a table")."""
    body = page[page.index("<summary>as a table</summary>"):]
    body = body[:body.index("</table>")]
    return {target: (int(rank), float(p))
            for target, rank, p in re.findall(r"<tr><td>([^<]*)</td><td>(\d+)</td><td>([0-9.]+)</td></tr>", body)}


def test_emergence_is_the_logit_lens_of_the_model_itself(report, tiny_with_tokenizer):
    """The emergence table, read off one forward pass (no map), against Hugging Face's own states: the
    residual stream after each layer through its final norm and lm_head, and each attention and MLP
    module's output at the last position through lm_head alone (as it is, no norm)."""
    from hf_reference import load_hf_float64

    hf = load_hf_float64(tiny_with_tokenizer)
    ids = minielm.load(tiny_with_tokenizer).tokenizer.encode(PROMPT)
    modules = {}
    hooks = [getattr(layer, name).register_forward_hook(
        lambda module, args, out, key=(i, name): modules.__setitem__(key, (out[0] if isinstance(out, tuple) else out)[0, -1]))
        for i, layer in enumerate(hf.model.layers) for name in ("self_attn", "mlp")]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    for hook in hooks:
        hook.remove()
    token = int(out.logits[0, -1].argmax())
    L = len(hf.model.layers)
    residual = {f"layer {i}": hf.model.norm(out.hidden_states[i + 1][0, -1]) for i in range(L - 1)}
    residual["final"] = out.hidden_states[L][0, -1]  # Hugging Face's last hidden state has the final norm applied
    targets = {**residual, **{f"{'attention' if name == 'self_attn' else 'mlp'} {i}": v
                              for (i, name), v in modules.items()}}
    expected = {}
    with torch.no_grad():
        for target, h in targets.items():
            logits = hf.lm_head(h)
            expected[target] = (int((logits > logits[token]).sum()) + 1, float(torch.softmax(logits, -1)[token]))
    shown = emergence_table(report.read_text(encoding="utf-8"))
    assert sorted(shown) == sorted(expected)
    for target, (rank, p) in expected.items():
        assert shown[target][0] == rank and shown[target][1] == pytest.approx(p, abs=1e-4), target


def test_html_does_not_make_every_layers_map(tiny_with_tokenizer, tmp_path, monkeypatch):
    """`explain --html` costs about what `explain` costs: it makes the final map only (the emergence is a
    forward pass, the attribution 2L one-row sweeps), and says where every layer's and module's map is."""
    import minielm.cli
    import minielm.layer_maps
    from minielm.report import LAYERS_NOTE

    def refused(*args, **kwargs):
        raise AssertionError("explain --html made every layer's and module's map")

    for name in ("all_layer_maps", "forward_layer_maps", "reverse_layer_maps"):
        monkeypatch.setattr(minielm.layer_maps, name, refused)
    made = []
    equivalent_linear_map = minielm.cli.equivalent_linear_map
    monkeypatch.setattr(minielm.cli, "equivalent_linear_map",
                        lambda *a, **k: made.append(1) or equivalent_linear_map(*a, **k))
    path = tmp_path / "report.html"
    assert minielm.cli.main(["explain", PROMPT, "--model", str(tiny_with_tokenizer), "--html", str(path), "--quiet"]) == 0
    assert made == [1]
    assert html_text(path.read_text(encoding="utf-8")).count(LAYERS_NOTE) == 1


def html_text(page: str) -> str:
    """The page's text as a reader sees it: tags dropped, entities decoded."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", page))
