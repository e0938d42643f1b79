"""The minielm command, end to end in a child process, on a real tokenizer."""

import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "minielm.cli", *map(str, args)], capture_output=True, text=True)


def test_explain_json(tiny_with_tokenizer, tmp_path):
    plot = tmp_path / "explain.png"
    result = run("explain", "And God said, Let there be", "--model", tiny_with_tokenizer, "--json", "--plot", plot)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("tokens", "next_token", "top", "relative_error", "singular_values", "decoded"):
        assert key in report
    assert report["relative_error"] < 1e-13 and report["autograd_relative_difference"] < 1e-12
    assert report["top"][0]["token"] == report["next_token"] and len(report["top"]) == 5
    assert sum(t["share"] for t in report["per_token"]) == pytest.approx(1.0, abs=1e-12)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_table_and_other_commands(tiny_with_tokenizer, tmp_path):
    result = run("explain", "the light", "--model", tiny_with_tokenizer)
    assert result.returncode == 0 and "reconstruction" in result.stdout and "stable rank" in result.stdout
    result = run("check", "--model", tiny_with_tokenizer)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "attention 1" in result.stdout and "within 1e-13" in result.stdout
    result = run("layers", "And God saw the light", "--model", tiny_with_tokenizer, "--plot", tmp_path / "l.png")
    assert result.returncode == 0 and "mlp 0" in result.stdout and (tmp_path / "l.png").stat().st_size > 10_000
    result = run("steer", "And God called", "--concept", "the waters", "--layer", "1", "--model", tiny_with_tokenizer,
                 "--max-new-tokens", "8")
    assert result.returncode == 0 and "baseline" in result.stdout and "steered" in result.stdout
    result = run("generate", "And God", "--model", tiny_with_tokenizer, "--max-new-tokens", "5")
    assert result.returncode == 0 and result.stdout.startswith("And God")


def test_float32_check_reports_honestly(tiny_with_tokenizer):
    result = run("check", "--model", tiny_with_tokenizer, "--dtype", "float32")
    assert result.returncode == 0 and "float32" in result.stdout
