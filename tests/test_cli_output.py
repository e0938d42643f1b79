"""What the command line shows: live progress on a terminal only, prompts from files and stdin,
legends, one row order, and versioned JSON."""

import errno
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

import minielm

COMMAND = [sys.executable, "-m", "minielm.cli"]
ARG_MAX_STRLEN = 131072  # Linux's limit on one command-line argument (MAX_ARG_STRLEN, 32 pages)


def run(*args, stdin=None):
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, input=stdin)


def run_with_terminal_stderr(*args):
    """The command with stderr on a pseudo-terminal (as a person at a terminal sees it), stdout piped."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    child = subprocess.Popen([*COMMAND, *map(str, args)], stdout=subprocess.PIPE, stderr=follower,
                             stdin=subprocess.DEVNULL)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError as err:  # EIO: the child closed the terminal
            if err.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        seen += chunk
    stdout = child.stdout.read()
    child.wait()
    os.close(leader)
    return child.returncode, stdout.decode(), seen.decode(errors="replace")


# ---- progress ---------------------------------------------------------------------------------
def test_layers_shows_live_progress_on_a_terminal(tiny_with_tokenizer):
    code, stdout, terminal = run_with_terminal_stderr("layers", "And God saw the light", "--model", tiny_with_tokenizer)
    assert code == 0, terminal
    bars = re.findall(r"\r(forward|reverse pass|forward pass of ∂h/∂x|spectra)[^\r\n]*?(\d+)/(\d+)", terminal)
    assert len(bars) >= 6, terminal  # several updates: passes over the layers, then the targets' spectra
    assert {name for name, _, _ in bars} >= {"forward", "spectra"}
    assert any(done == total for _, done, total in bars) and any(done != total for _, done, total in bars)
    assert "\r" not in stdout and "it/s" not in stdout and "layer/s" not in stdout  # never mixed into stdout
    assert "final" in stdout


def test_piped_or_quiet_shows_nothing(tiny_with_tokenizer):
    piped = run("layers", "And God saw the light", "--model", tiny_with_tokenizer)
    assert piped.returncode == 0 and piped.stderr == b""
    code, stdout, terminal = run_with_terminal_stderr("layers", "And God saw the light", "--model",
                                                      tiny_with_tokenizer, "--quiet")
    assert code == 0 and terminal == "" and "final" in stdout


# ---- prompts from anywhere --------------------------------------------------------------------
LONG = ARG_MAX_STRLEN + 10_000  # characters: more than one command-line argument can carry (Linux), so
# such a prompt comes from a file or stdin


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_long_prompt_is_read_whole(tiny_with_tokenizer, tmp_path, via):
    """A prompt of more than 128 KB whose meaning is in its last bytes: spaces (which the
    tokenizer folds into one) and then the words. Read whole, it is the short prompt."""
    words = "And God saw the light"
    text = " " * LONG + words
    path = tmp_path / "prompt.txt"
    path.write_text(text + "\n", encoding="utf-8")
    args = ["--prompt-file", path] if via == "file" else ["-"]
    long = run("explain", *args, "--model", tiny_with_tokenizer, "--json", stdin=path.read_bytes() if via == "stdin" else None)
    short = run("explain", words, "--model", tiny_with_tokenizer, "--json")
    assert long.returncode == 0, long.stderr
    long, short = json.loads(long.stdout), json.loads(short.stdout)
    assert long["tokens"] == short["tokens"] and long["top"] == short["top"]


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_too_long_prompt_is_tokenized_then_rejected(tiny_with_tokenizer, tmp_path, via):
    text = ("And God said, Let there be light: and there was light. " * 4000)[:LONG] + " the end"
    path = tmp_path / "prompt.txt"
    path.write_bytes(text.encode("utf-8"))
    n = len(minielm.load(tiny_with_tokenizer).tokenizer.encode(text))  # every byte, tokenized
    args = ["--prompt-file", path] if via == "file" else ["-"]
    done = run("generate", *args, "--model", tiny_with_tokenizer, stdin=text.encode() if via == "stdin" else None)
    message = done.stderr.decode()
    assert done.returncode == 2 and message.count("\n") == 1 and "Traceback" not in message
    assert f"{n} tokens exceed max_position_embeddings=" in message  # the whole prompt, tokenized, counted


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_invalid_utf8_is_one_line(tiny_with_tokenizer, tmp_path, via):
    data = "And God said".encode() + b"\xff\xfe light"
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    args = ["--prompt-file", path] if via == "file" else ["-"]
    done = run("layers", *args, "--model", tiny_with_tokenizer, stdin=data if via == "stdin" else None)
    message = done.stderr.decode()
    assert done.returncode == 2 and message.count("\n") == 1
    assert "not UTF-8: byte 0xff at offset 12" in message and ("stdin" if via == "stdin" else str(path)) in message


def test_every_prompt_taking_command_reads_files(tiny_with_tokenizer, tmp_path):
    prompt, concept = tmp_path / "prompt.txt", tmp_path / "concept.txt"
    prompt.write_text("And God called\n")
    concept.write_text("the waters\n")
    model = ["--model", tiny_with_tokenizer]
    generated = run("generate", "--prompt-file", prompt, *model, "--max-new-tokens", 4)
    assert generated.returncode == 0 and generated.stdout.decode().startswith("And God called")  # newline dropped
    steered = run("steer", "-", "--concept-file", concept, "--layer", 1, *model, "--max-new-tokens", 4,
                  stdin=b"And God called\n")
    assert steered.returncode == 0 and "'the waters'" in steered.stdout.decode()
    checked = run("check", "--prompt-file", prompt, *model, "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["tokens"] == len(
        minielm.load(tiny_with_tokenizer).tokenizer.encode("And God called"))
    both = run("explain", "text", "--prompt-file", prompt, *model)
    none = run("explain", *model)
    assert both.returncode == none.returncode == 2 and b"not both" in both.stderr and b"no prompt" in none.stderr


# ---- legends, order, JSON ---------------------------------------------------------------------
def sections(text: str) -> list:
    """(header, the line after it) for every unindented section header of a report."""
    lines = text.splitlines()
    return [(line, lines[i + 1]) for i, line in enumerate(lines[:-1]) if line and not line.startswith(" ")
            and i > 1 and not lines[i - 1].startswith(("  ", "target"))]


def test_every_section_has_a_legend(tiny_with_tokenizer):
    explained = run("explain", "And God saw", "--model", tiny_with_tokenizer).stdout.decode()
    headers = [h for h, _ in sections(explained)]
    assert [h.split()[0] for h in headers] == ["next", "exactness", "per", "stacked"]
    assert all(after.startswith("  # ") for _, after in sections(explained))
    for command in (["layers", "And God saw"], ["check"]):
        out = run(*command, "--model", tiny_with_tokenizer).stdout.decode().splitlines()
        table = next(i for i, line in enumerate(out) if line.startswith("target"))
        assert out[table - 1].startswith("  # ") and out[table - 2].startswith("  # ")  # columns, and the targets


def test_texts_state_the_bias_and_what_the_flags_take(tiny_with_tokenizer, checkpoints):
    """The exactness line and the shares' legend include b (biased checkpoints: y = Σ J_t x_t + b, and
    the token shares sum to 1 only with b's share); --model names every kind of checkpoint; steer's
    description names its default recipe."""
    from minielm.interpret import token_shares
    from minielm.report import LEGENDS

    explained = run("explain", "And God saw", "--model", tiny_with_tokenizer).stdout.decode()
    assert "reconstruction  ‖Σ J_t x_t + b − y‖ / ‖y‖" in explained
    assert "with b's share b·y / ‖y‖², they sum to 1" in LEGENDS["per_token"]
    model = minielm.load(checkpoints["qwen2"])  # q/k/v biases: b ≠ 0
    elm = minielm.equivalent_linear_map(model, [1, 17, 5, 88])
    b_share = float(elm.bias @ elm.output / (elm.output @ elm.output))
    assert abs(b_share) > 1e-3 and float(token_shares(elm).sum()) + b_share == pytest.approx(1, abs=1e-12)
    helped = run("steer", "--help").stdout.decode()
    assert "a GGUF file" in " ".join(helped.split()) and "default actadd" in " ".join(helped.split())


def test_check_and_layers_list_the_same_targets_in_the_same_order(tiny_with_tokenizer):
    layers = json.loads(run("layers", "And God saw", "--model", tiny_with_tokenizer, "--json").stdout)
    checked = json.loads(run("check", "--model", tiny_with_tokenizer, "--json").stdout)
    names = [row["target"] for row in layers["targets"]]
    assert names == [row["target"] for row in checked["rows"]]
    assert names[:3] == ["attention 0", "mlp 0", "layer 0"] and names[-1] == "final"


def test_json_carries_the_schema_version(tiny_with_tokenizer):
    from minielm.report import SCHEMA_VERSION

    for command in (["explain", "And"], ["layers", "And"], ["check"]):
        out = json.loads(run(*command, "--model", tiny_with_tokenizer, "--json").stdout)
        assert out["schema_version"] == SCHEMA_VERSION


def explanation(tokens: list) -> dict:
    """explain's report (its JSON) for prompt `tokens`, every figure made up."""
    return {"model": "m", "dtype": "float64", "tokens": tokens, "relative_error": 1e-16, "probability_error": 1e-16,
            "autograd_relative_difference": 1e-15,
            "top": [{"token": t, "probability": 0.1} for t in tokens[:5]],
            "per_token": [{"token": t, "share": 0.25, "stable_rank": 1.5, "sigma1": 2.0} for t in tokens],
            "decoded": [{"sigma": 3.0, "output_tokens": tokens, "input_position": i, "input_tokens": tokens}
                        for i in range(len(tokens))]}


ODD_TOKENS = ["a\nb", "\r", "שלום", "\u202eevil", "\x1b[2J", "unbelievably_long_decoded_piece", "日本語", "ok"]


def test_odd_tokens_keep_the_rows_and_columns(capsys):
    """Newlines, terminal escapes and bidirectional controls escaped, right-to-left text followed by a
    left-to-right mark, long pieces cut with an ellipsis: one row per token, its columns where the header says."""
    from types import SimpleNamespace

    from minielm.cli import print_explanation
    from minielm.interpret import width

    model = SimpleNamespace(config=SimpleNamespace(model_type="llama", hidden_size=4, num_hidden_layers=1))
    print_explanation(explanation(ODD_TOKENS), model)
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out and "\u202e" not in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per token")) + 2
    rows = lines[start:start + len(ODD_TOKENS)]
    assert [row.split()[0] for row in rows] == [str(t) for t in range(len(ODD_TOKENS))]  # one line per token
    assert {width(row.split(" 0.250")[0]) for row in rows} == {23}  # the share starts in the same column
    assert "unbelievably_…" in out and "שלום\u200e" in out and "\\u202eevil" in out and "a\\nb" in out
    stacked = lines[-len(ODD_TOKENS):]
    assert {width(row.split(" @")[0]) for row in stacked} == {53}  # the input side starts in the same column
