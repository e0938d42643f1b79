"""tools/walkthrough.ipynb runs end to end: every cell, in a fresh kernel, on the shipped model."""

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))


def test_the_walkthrough_runs_and_is_the_committed_one():
    pytest.importorskip("nbclient", reason="executing the walkthrough needs nbclient: pip install -e '.[test]'")
    pytest.importorskip("ipykernel", reason="executing the walkthrough needs ipykernel: pip install -e '.[test]'")
    import nbformat
    from make_walkthrough import build, execute

    committed = nbformat.read(TOOLS / "walkthrough.ipynb", as_version=4)
    source = [(c.cell_type, c.source) for c in committed.cells]
    assert source == [(c.cell_type, c.source) for c in build().cells], \
        "tools/walkthrough.ipynb is not tools/make_walkthrough.py's: run python tools/make_walkthrough.py"
    assert all(c.outputs for c in committed.cells if c.cell_type == "code"), "committed without its outputs"
    execute(committed)  # a failing cell raises CellExecutionError, naming the cell and its traceback
