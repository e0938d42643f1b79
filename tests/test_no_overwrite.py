"""Nothing overwritten (issue 26): a file minielm writes is always a new file of its own, renamed over the
path asked for. A `.partial` or a temporary name that is already there (a stale file, a symbolic link,
a hard link to the checkpoint's weights) is never written through: each once overwrote the file it led to.
"""

import os
import signal
from pathlib import Path

import pytest
from conftest import PROMPT

import minielm
import minielm.cli
import minielm.operators_file


@pytest.fixture
def checkpoint(checkpoints, tmp_path):
    """A copy of the tiny llama checkpoint (its weights must stay byte for byte what they were)."""
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    for file in checkpoints["llama"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


def plant(kind: str, partial: Path, victim: Path) -> None:
    """A `.partial` already at `partial`: a symbolic link or a hard link to `victim`, or a stale file."""
    if kind == "symlink":
        partial.symlink_to(victim)
    elif kind == "hard link":
        os.link(victim, partial)
    else:
        partial.write_bytes(b"left by a run killed with SIGKILL")


@pytest.mark.parametrize("kind", ["symlink", "hard link", "stale file"])
def test_a_partial_already_there_is_never_written_through(kind, checkpoint, tmp_path):
    """out=P with P.partial a link to the checkpoint's model.safetensors (or a stale file): refused before any
    work, naming P.partial; the weights, the link and P are as they were."""
    model = minielm.load(checkpoint)
    weights = checkpoint / "model.safetensors"
    before = weights.read_bytes()
    out = tmp_path / "ops.safetensors"
    partial = tmp_path / "ops.safetensors.partial"
    plant(kind, partial, weights)
    planted = partial.read_bytes()
    with pytest.raises(minielm.OutputError, match=f"{partial}: already exists"):
        minielm.equivalent_linear_map(model, PROMPT, out=out)
    assert weights.read_bytes() == before and os.path.lexists(partial) and partial.read_bytes() == planted
    assert not out.exists()


def test_a_partial_planted_after_the_checks_is_never_written_through(checkpoint, tmp_path, monkeypatch):
    """A link made at P.partial between the checks and the file's creation (a race): the creation itself is
    exclusive (O_EXCL | O_NOFOLLOW), so it fails naming P.partial and removes nothing it did not make."""
    model = minielm.load(checkpoint)
    weights = checkpoint / "model.safetensors"
    before = weights.read_bytes()
    partial = tmp_path / "ops.safetensors.partial"
    create = minielm.operators_file.create

    def planted_first(path, *args):
        partial.symlink_to(weights)
        return create(path, *args)

    monkeypatch.setattr(minielm.operators_file, "create", planted_first)
    with pytest.raises(minielm.OutputError, match=f"{partial}: already exists"):
        minielm.equivalent_linear_map(model, PROMPT, out=tmp_path / "ops.safetensors")
    assert weights.read_bytes() == before and partial.is_symlink()


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_the_command_line_refuses_a_linked_partial(kind, tiny_with_tokenizer, tmp_path, capsys):
    """`minielm operators PROMPT --out P` with P.partial linked to an unrelated file: exit 2, one line
    naming P.partial, before the model loads; the file is unchanged."""
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"an unrelated file")
    out = tmp_path / "ops.safetensors"
    plant(kind, tmp_path / "ops.safetensors.partial", victim)
    code = minielm.cli.main(["operators", "In the beginning", "--model", str(tiny_with_tokenizer), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{out}.partial: already exists" in err
    assert victim.read_bytes() == b"an unrelated file" and not out.exists()


@pytest.mark.parametrize("flag", ["--html", "--plot"])
@pytest.mark.parametrize("kind", ["symlink", "hard link", "stale file"])
def test_html_and_plot_never_write_through_a_name_already_there(flag, kind, tiny_with_tokenizer, tmp_path):
    """--html and --plot write a temporary file beside the target and rename it over: a file already at
    the name that temporary would have (here the old fixed `.NAME.PID.tmp`) is neither written nor removed."""
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"an unrelated file")
    target = tmp_path / ("report.html" if flag == "--html" else "figure.png")
    old_name = tmp_path / f".{target.name}.{os.getpid()}.tmp"
    plant(kind, old_name, victim)
    planted = old_name.read_bytes()
    assert minielm.cli.main(["explain", "In the beginning", "--model", str(tiny_with_tokenizer), "-k", "2",
                             flag, str(target)]) == 0
    assert victim.read_bytes() == b"an unrelated file" and old_name.read_bytes() == planted
    assert target.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([victim.name, old_name.name, target.name])


def test_sigterm_during_operators_cleans_up_as_sigint_does(tiny_with_tokenizer, tmp_path, monkeypatch, capsys):
    """SIGTERM while the rows are written: one line, exit 143 (128 + SIGTERM), and no .partial left (it left
    the whole half-written file); the handler is the caller's again afterwards."""
    out = tmp_path / "ops.safetensors"
    write_rows = minielm.operators_file.write_rows

    def terminated(*args):
        write_rows(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(minielm.operators_file, "write_rows", terminated)
    def ignored(signum, frame):  # the caller's own handler (SIGTERM's default would end the test run)
        pass

    before = signal.signal(signal.SIGTERM, ignored)
    try:
        code = minielm.cli.main(["operators", "In the beginning", "--model", str(tiny_with_tokenizer),
                                 "--out", str(out), "--block", "10"])
        assert signal.getsignal(signal.SIGTERM) is ignored
    finally:
        signal.signal(signal.SIGTERM, before)
    assert (code, capsys.readouterr().err) == (143, "minielm: terminated\n")
    assert list(tmp_path.iterdir()) == []
