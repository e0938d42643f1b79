"""The minielm command, end to end in a child process, on a real tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch

import minielm
import minielm.fast_sweep
import minielm.linear_map
import minielm.report
from minielm.checkpoint import StreamedLayers
from minielm.cli import CHECK_PROMPT, main


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
    # the next-token table is the model's own, computed here in-process
    model = minielm.load(tiny_with_tokenizer)
    ids = model.tokenizer.encode("And God said, Let there be")
    top = torch.topk(torch.softmax(model.logits(ids)[-1], dim=-1), 5)
    assert report["tokens"] == [model.tokenizer.token(i) for i in ids]
    assert [t["token"] for t in report["top"]] == [model.tokenizer.token(int(i)) for i in top.indices]
    assert [t["probability"] for t in report["top"]] == pytest.approx(top.values.tolist(), rel=1e-12)
    assert report["next_token"] == model.tokenizer.token(int(top.indices[0]))
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


def reconstruction_column(stdout) -> dict:
    """{target: reconstruction error} from the table `minielm check` prints."""
    rows = [line.rsplit(None, 3) for line in stdout.splitlines() if line.startswith(("attention", "mlp", "layer", "final"))]
    return {target: float(rec) for target, rec, _, _ in rows}


def test_float32_check_reports_honestly(tiny_with_tokenizer, capsys):
    """In float32 the check reports float32 round-off (measured, not float64's), within the float32 bound."""
    assert main(["check", "--model", str(tiny_with_tokenizer), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    errors = reconstruction_column(out)
    assert len(errors) == 3 * 2  # each layer and module of the 2 layers, the last layer as 'final'
    model = minielm.load(tiny_with_tokenizer, dtype="float32")
    measured = minielm.equivalent_linear_map(model, model.tokenizer.encode(CHECK_PROMPT)).relative_error()
    assert errors["final"] == pytest.approx(measured, rel=0.02)  # printed to two digits
    assert 1e-9 < max(errors.values()) < 1e-4
    assert "(within 1e-04 for float32)" in out
    assert f"reconstruction {max(errors.values()):.1e}" in out.splitlines()[-1]


# The bounds `minielm check` must hold each half-precision dtype to, stated here rather than read from
# minielm.cli.CHECK_BOUNDS (measured on the shipped model).
HALF_PRECISION_BOUNDS = {"bfloat16": 1e-1, "float16": 1e-2}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_check_passes_within_its_own_bound(tiny_with_tokenizer, dtype, monkeypatch, capsys):
    """bfloat16 and float16 get bounds of their own: a correct model passes, and the verdict states the
    bound of that dtype. An error of twice that bound (the vs-autograd difference replaced by it) fails:
    exit status 1 and ABOVE in the verdict, so the bound the check applies is no looser than stated."""
    bound = HALF_PRECISION_BOUNDS[dtype]
    assert main(["check", "--model", str(tiny_with_tokenizer), "--dtype", dtype]) == 0
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert f"(within {bound:.0e} for {dtype})" in verdict
    monkeypatch.setattr(minielm.cli, "relative_max", lambda a, b: 2 * bound)
    assert main(["check", "--model", str(tiny_with_tokenizer), "--dtype", dtype]) == 1
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith(f"worst error {2 * bound:.1e}, in the ") and f"(ABOVE {bound:.0e} for {dtype})" in verdict


def test_check_fails_above_the_float64_bound(tiny_with_tokenizer, monkeypatch, capsys):
    """`minielm check` exits 1 and says ABOVE when a frozen factor is wrong by 1e-12 (an error
    of about 1e-12: above float64's 1e-13, far below float32's bound)."""
    assert main(["check", "--model", str(tiny_with_tokenizer)]) == 0
    assert "within 1e-13 for float64" in capsys.readouterr().out
    exact = minielm.fast_sweep.folded_mlp

    def slightly_wrong(*args):  # the MLP gate φ_t, off by a relative 1e-12 in the sweep only
        W_D, gate, W_U = exact(*args)
        return W_D, gate * (1 + 1e-12), W_U

    monkeypatch.setattr(minielm.fast_sweep, "folded_mlp", slightly_wrong)
    assert main(["check", "--model", str(tiny_with_tokenizer)]) == 1
    out = capsys.readouterr().out
    errors = reconstruction_column(out)
    assert 1e-13 < errors["final"] < 1e-10
    assert "ABOVE 1e-13 for float64" in out


def test_check_fails_on_an_error_only_the_autograd_column_sees(tiny_with_tokenizer, monkeypatch, capsys):
    """Operators wrong only in directions orthogonal to each x_t still reconstruct y (N_t x_t = 0), so
    the reconstruction and probability columns stay at round-off; the vs-autograd column sees the
    error, and the verdict (the worst of every column) fails and names that column."""
    exact = minielm.cli.equivalent_linear_map

    def wrong_off_the_inputs(model, ids, **kwargs):
        elm = exact(model, ids, **kwargs)
        x = elm.inputs  # (T, d)
        w = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
        w -= (w * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True) * x  # (T, d): w_t ⟂ x_t
        u = torch.randn(x.shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))  # (d,)
        elm.operators += 1e-3 * u[None, :, None] * w[:, None, :]  # J_t + u w_tᵀ: the same J_t x_t
        return elm

    monkeypatch.setattr(minielm.cli, "equivalent_linear_map", wrong_off_the_inputs)
    assert main(["check", "--model", str(tiny_with_tokenizer)]) == 1
    out = capsys.readouterr().out
    assert max(reconstruction_column(out).values()) < 1e-13  # the reconstruction alone would pass
    assert "in the vs autograd column (ABOVE 1e-13 for float64)" in out.splitlines()[-1]
    assert main(["check", "--model", str(tiny_with_tokenizer), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["worst_column"] == "vs_autograd" and report["worst"] > 1e-6


def test_explain_with_exactly_zero_operators(tiny_with_tokenizer, tmp_path):
    """The tiny checkpoint as a Mistral whose every layer slides a window of 2: the first tokens of a
    longer prompt reach y through no path (J_t = 0 exactly). --json is still valid JSON (the stable
    rank of a zero operator is 0, not NaN) and --html writes the page (log chart of an all-zero spectrum)."""
    import shutil

    sliding = tmp_path / "sliding"
    shutil.copytree(tiny_with_tokenizer, sliding)
    config = json.loads((sliding / "config.json").read_text())
    (sliding / "config.json").write_text(json.dumps(dict(config, model_type="mistral", sliding_window=2)))
    result = run("explain", "And God said, Let there be light", "--model", sliding, "--json", "--html",
                 tmp_path / "r.html")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    ranks = [row["stable_rank"] for row in report["per_token"]]
    assert ranks[0] == 0.0 and ranks[-1] >= 1  # the first token is outside the receptive field
    assert (tmp_path / "r.html").read_text().count('class="panel"') == len(report["tokens"])


def test_distributed_outside_torchrun_is_one_line(tiny_with_tokenizer, tmp_path, monkeypatch, capsys):
    """--distributed without torchrun's RANK and WORLD_SIZE is refused in the argument checks (it ended
    in an internal ValueError from torch.distributed), before the model loads."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(minielm.cli, "load", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    out = tmp_path / "ops.safetensors"
    assert main(["operators", "hi", "--model", str(tiny_with_tokenizer), "--out", str(out), "--distributed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--distributed runs under torchrun (RANK and WORLD_SIZE" in err
    assert not out.exists()
    monkeypatch.setenv("RANK", "0")  # set by hand, without torchrun's rendezvous address: refused too (it was an
    monkeypatch.setenv("WORLD_SIZE", "1")  # internal ValueError from init_process_group, exit 1)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["operators", "hi", "--model", str(tiny_with_tokenizer), "--out", str(out), "--distributed"]) == 2
    assert "--distributed runs under torchrun (MASTER_ADDR" in capsys.readouterr().err and not out.exists()


def test_an_output_path_cannot_overwrite_the_checkpoint(tiny_with_tokenizer, tmp_path, capsys):
    """Any output path inside the checkpoint directory being read (also through a symlinked folder, or
    a hard link to one of its files), or the GGUF file being read, is refused before anything is
    written; the checkpoint's files stay as they were."""
    import shutil

    checkpoint = tmp_path / "ck"
    shutil.copytree(tiny_with_tokenizer, checkpoint)
    before = {f.name: f.read_bytes() for f in checkpoint.iterdir()}
    (tmp_path / "link").symlink_to(checkpoint)
    os.link(checkpoint / "config.json", tmp_path / "hard.json")
    for out in (checkpoint / "model.safetensors", checkpoint / "new.safetensors", tmp_path / "ck" / ".." / "ck" / "x",
                tmp_path / "link" / "model.safetensors", tmp_path / "hard.json"):
        for flag in (["operators", "hi", "--out"], ["explain", "hi", "--html"], ["layers", "hi", "--plot"]):
            assert main([*flag[:2], "--model", str(checkpoint), flag[2], str(out)]) == 2, (flag, out)
            assert "would overwrite the checkpoint being read" in capsys.readouterr().err
    assert main(["operators", "hi", "--model", str(tmp_path / "link"), "--out", str(checkpoint / "x")]) == 2
    assert {f.name: f.read_bytes() for f in checkpoint.iterdir()} == before
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # refused before it is read
    assert main(["operators", "hi", "--model", str(gguf), "--out", str(tmp_path / "." / "model.gguf")]) == 2
    assert "would overwrite the checkpoint being read" in capsys.readouterr().err and gguf.read_bytes() == b"GGUF"


def test_an_output_path_cannot_overwrite_the_prompt_file(tiny_with_tokenizer, tmp_path, monkeypatch, capsys):
    """--out, --html or --plot naming the file the prompt is read from (also through a symlink) is refused
    before the model loads (the prompt file had been replaced by the operators); so is an --out that
    is a device, which had been refused only after the model had loaded, as out=."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("In the beginning")
    (tmp_path / "link.txt").symlink_to(prompt)
    monkeypatch.setattr(minielm.cli, "load", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    for flag in (["operators", "--out"], ["explain", "--html"], ["layers", "--plot"]):
        for read, written in ((prompt, prompt), (tmp_path / "link.txt", tmp_path / "." / "prompt.txt")):
            assert main([flag[0], "--prompt-file", str(read), "--model", str(tiny_with_tokenizer),
                         flag[1], str(written)]) == 2, (flag, read, written)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is a file the prompt is read from" in err, err
    assert prompt.read_text() == "In the beginning"
    assert main(["operators", "hi", "--model", str(tiny_with_tokenizer), "--out", os.devnull]) == 2
    assert "--out /dev/null: not a regular file" in capsys.readouterr().err


def test_output_paths_tried_by_every_rank_at_once(tmp_path, monkeypatch):
    """Under torchrun every rank tries --out for writing at the same moment: a rank whose try-file
    another rank has already removed goes on (it had ended in an internal FileNotFoundError, exit 1)."""
    out, close = tmp_path / "ops.safetensors", os.close

    def close_then_another_rank_removes(fd):
        close(fd)
        out.unlink(missing_ok=True)

    monkeypatch.setattr(minielm.cli.os, "close", close_then_another_rank_removes)
    assert minielm.cli.writable_output(out, "--out") == out and not out.exists()


def test_html_is_written_beside_then_renamed(tiny_with_tokenizer, tmp_path, monkeypatch):
    """--html goes to a temporary file beside the target, then os.replace: a write that fails half-way
    leaves the old report as it was, and no temporary file behind."""
    old = tmp_path / "report.html"
    old.write_text("the old report")
    monkeypatch.setattr(minielm.cli, "explain_page", lambda *a: "<html>" + "x" * 10_000 + "\ud800")  # unencodable
    assert main(["explain", "And God", "--model", str(tiny_with_tokenizer), "--html", str(old)]) != 0
    assert old.read_text() == "the old report" and sorted(tmp_path.iterdir()) == [old]


def test_steer_says_when_nothing_changed(tiny_with_tokenizer, capsys):
    """A steered line identical to the baseline (λ too small for the model) comes with a one-line note;
    a push that changes the text comes without it."""
    common = ["steer", "And God called", "--concept", "the waters", "--layer", "1", "--model", str(tiny_with_tokenizer),
              "--max-new-tokens", "8"]
    assert main([*common, "--scale", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].removeprefix("baseline") == lines[2].removeprefix("steered ")
    assert lines[3] == "note      no change at scale 0: the steered text is the baseline; try a larger --scale"
    assert main([*common, "--scale", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].removeprefix("baseline") != lines[2].removeprefix("steered ")


def test_gguf_flags_are_checked_against_its_metadata_before_loading(tmp_path, monkeypatch, capsys):
    """For a GGUF file the bounds come from its metadata (read without the weights), as config.json's do:
    --layer, -k and --max-new-tokens out of range are one line each, before the model loads."""
    from gguf import GGMLQuantizationType
    from test_gguf import gguf_and_reference

    path, _ = gguf_and_reference("llama", GGMLQuantizationType.F32, tmp_path)
    capsys.readouterr()  # transformers' progress bars, while the file was written
    config = minielm.cli.model_config(path)
    assert config.num_hidden_layers >= 1  # the metadata, read without loading
    monkeypatch.setattr(minielm.cli, "load", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    L, d, positions = config.num_hidden_layers, config.hidden_size, config.max_position_embeddings
    for argv, flag in ((["steer", "hi", "--concept", "c", "--layer", str(L)], "--layer"),
                       (["explain", "hi", "-k", str(d + 1)], "-k"),
                       (["generate", "hi", "--max-new-tokens", str(positions)], "--max-new-tokens")):
        assert main([*argv, "--model", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"minielm: error: {flag}") and err.count("\n") == 1, err


def test_stream_flag(tiny_with_tokenizer, monkeypatch, capsys):
    """--stream loads the model streamed, and the report is the same as without it."""
    loaded = []

    def load_and_keep(*args, **kwargs):
        loaded.append(minielm.load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(minielm.cli, "load", load_and_keep)
    reports = []
    for flags in ([], ["--stream"]):
        assert main(["explain", "And God said", "--model", str(tiny_with_tokenizer), "--json", *flags]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert not isinstance(loaded[0].weights["layers"], StreamedLayers)
    assert isinstance(loaded[1].weights["layers"], StreamedLayers)
    assert reports[0] == reports[1]


def test_explain_no_autograd_skips_the_cross_check(tiny_with_tokenizer, tmp_path, monkeypatch, capsys):
    """--no-autograd never calls the detached Jacobian, and every view says the cross-check was skipped;
    without the flag the same patched call is made (so the patch is where explain looks)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the autograd cross-check ran")

    monkeypatch.setattr(minielm.cli, "detached_jacobian", forbidden)
    prompt = ["explain", "And God said", "--model", str(tiny_with_tokenizer), "--quiet"]
    assert main(prompt) == 1  # an internal error, named
    assert "the autograd cross-check ran" in capsys.readouterr().err
    assert main(prompt + ["--no-autograd", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["autograd_relative_difference"] is None
    html = tmp_path / "r.html"
    assert main(prompt + ["--no-autograd", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "autograd        skipped (--no-autograd)" in out and "reconstruction" in out
    assert "skipped (--no-autograd)" in html.read_text()


def test_explain_skip_positions_leaves_them_out_of_the_stacked_spectrum(tiny_with_tokenizer, capsys):
    """--skip-positions 0,2: the stacked section is the SVD of the other positions' operators (computed here
    from the API's map), its input side never points at a position left out, the per-token table keeps every
    token, and the text names what was left out."""
    prompt = "And God said, Let there be"
    model = minielm.load(tiny_with_tokenizer)
    ids = model.tokenizer.encode(prompt)
    operators = minielm.equivalent_linear_map(model, ids).operators
    args = ["explain", prompt, "--model", str(tiny_with_tokenizer), "--quiet", "--no-autograd", "-k", "4"]
    assert main(args + ["--skip-positions", "2,0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    kept = [t for t in range(len(ids)) if t not in (0, 2)]
    expected = torch.linalg.svdvals(torch.cat([operators[t] for t in kept], dim=1))[:4]
    assert report["singular_values"] == pytest.approx(expected.tolist(), rel=1e-12)
    assert report["skipped_positions"] == [0, 2] and len(report["per_token"]) == len(ids)
    assert all(row["input_position"] in kept for row in report["decoded"])
    assert main(args + ["--skip-positions", "0"]) == 0
    out = capsys.readouterr().out
    assert f"stacked operator [J_1 … J_T] without position 0 ({model.tokenizer.token(ids[0])}): " in out
    assert main(args + ["--json"]) == 0  # without the flag: every position, as before
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_positions"] == []
    assert report["singular_values"] == pytest.approx(torch.linalg.svdvals(torch.cat(list(operators), dim=1))[:4].tolist(),
                                                      rel=1e-12)


def test_every_report_names_its_model_and_prompt_and_the_files_written(tiny_with_tokenizer, tmp_path, capsys):
    """layers and check start as explain does (the model, its shape, the prompt: check's default shown);
    --plot and --html end the text with one line naming the file; with --json that line goes to stderr."""
    model = str(tiny_with_tokenizer)
    header = f"model   {model}  (llama, d="
    assert main(["check", "--model", model, "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(header) and lines[1].startswith(f"prompt  {CHECK_PROMPT!r}")
    plot = tmp_path / "l.png"
    assert main(["layers", "And God", "--model", model, "--quiet", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(header) and lines[1].startswith("prompt  'And God'")
    assert lines[-1] == f"wrote {plot}  (stable rank and σ1 by layer, --plot)" and plot.exists()
    assert main(["explain", "And God", "--model", model, "--json", "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # the JSON alone
    assert f"wrote {plot}" in captured.err


# ---- the command's thread settings (minielm/__main__.py's THREAD_DEFAULTS) -----------------------------
ENTRY = """
import sys
import minielm.__main__ as entry
if sys.argv[1] == "torch first":
    import torch
entry.THREAD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
code = entry.main(["generate", "And God", "--model", sys.argv[2], "--max-new-tokens", "1", "--quiet"])
import os
print(os.environ.get("OMP_WAIT_POLICY"))
sys.exit(code)
"""


def openmp_settings(tiny_with_tokenizer, how: str, **env) -> tuple:
    """(what OpenMP itself was set to, as its OMP_DISPLAY_ENV=VERBOSE lines on stderr show it, and the
    command's OMP_WAIT_POLICY afterwards), for the entry point run with THREAD_DEFAULTS = PASSIVE."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    done = subprocess.run([sys.executable, "-c", ENTRY, how, str(tiny_with_tokenizer)], capture_output=True, text=True,
                          env=dict(base, OMP_DISPLAY_ENV="VERBOSE", **env))
    assert done.returncode == 0, done.stderr
    shown = {line.split("=")[0].strip(): line.split("=")[1].strip(" '") for line in done.stderr.splitlines()
             if line.strip().startswith(("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))}
    return shown, done.stdout.splitlines()[-1]


def test_the_command_sets_its_thread_defaults_before_torch_loads_openmp(tiny_with_tokenizer):
    """Where the user set nothing, THREAD_DEFAULTS reach OpenMP (GNU OpenMP's spin count drops from its
    default 300000 to 0 with OMP_WAIT_POLICY=PASSIVE); a user's own setting wins; and a program that
    imported torch before calling the entry point keeps its environment (it would do nothing then)."""
    untouched, _ = openmp_settings(tiny_with_tokenizer, "torch first")
    if "GOMP_SPINCOUNT" not in untouched:
        pytest.skip("not GNU OpenMP (torch's Linux wheels use it): its settings cannot be read back")
    assert untouched == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"}  # libgomp's defaults
    assert openmp_settings(tiny_with_tokenizer, "torch first")[1] == "None"
    assert openmp_settings(tiny_with_tokenizer, "fresh") == ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
                                                              "PASSIVE")
    user, policy = openmp_settings(tiny_with_tokenizer, "fresh", OMP_WAIT_POLICY="ACTIVE")
    assert user["OMP_WAIT_POLICY"] == "ACTIVE" and policy == "ACTIVE"


def test_the_readme_states_the_thread_defaults():
    from pathlib import Path

    from minielm.__main__ import THREAD_DEFAULTS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("**Threads.**"))
    assert all(f"`{name}={value}`" in line for name, value in THREAD_DEFAULTS.items()), line
