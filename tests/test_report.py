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
