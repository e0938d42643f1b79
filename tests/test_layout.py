"""The package's layers, as the README's "Layout" states them: who may import whom.

Every import counts, those inside functions too, and so does a module named to
`importlib.import_module` (the package's front loads its public names that way).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minielm"

# The method and the sweeps below it: no files, no ranks, no report, no command line.
CORE = {"model", "sweep", "fast_sweep"}
CORE_MAY_REACH = {"model", "sweep", "fast_sweep", "generation", "config", "families", "rope", "checks", "errors",
                  "progress"}


# The README's "Layout" table, row by row: a module may import from its own row and the rows above.
LAYERS = [
    {"errors", "progress", "checks"},
    {"families", "config", "rope"},
    {"model", "generation"},
    {"checkpoint", "gguf", "tokenizer", "loader"},
    {"sweep", "fast_sweep"},
    {"linear_map", "operators_file", "distributed", "cost"},
    {"exact_attribution", "layer_maps", "interpret", "spectra", "matrix_free", "steering"},
    {"report", "cli", "__main__", "__init__"},
]


def imports_of(path: Path) -> set:
    """The minielm modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            else:  # from . import x, y
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minielm."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minielm.")}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).startswith(".")):
            found.add(node.args[0].value[1:])
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {m for m in found if m in modules} - {path.stem}


def graph() -> dict:
    return {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}


def cycle(edges: dict) -> list | None:
    """One import cycle [a, b, ..., a], or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def reach(edges: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    assert cycle(graph()) is None


def test_the_cycle_finder_finds_one():
    """The check above can fail: an import inside a function that closes a loop is a cycle."""
    edges = graph()
    edges["model"] = edges["model"] | {"linear_map"}  # model -> linear_map -> model
    assert cycle(edges) is not None
    assert "report" in imports_of(PACKAGE / "cli.py")  # imports inside functions and at the top are both seen


def test_only_the_command_line_and_the_front_import_the_report():
    """The report (HTML, plots) sits on top: the command line uses it, and the package's front attaches its
    Jupyter views (`_repr_html_`) to the maps; nothing below imports it."""
    importers = {module for module, imported in graph().items() if "report" in imported}
    assert importers == {"cli", "__init__"}


def test_every_module_imports_only_from_its_layer_and_above():
    row = {module: k for k, layer in enumerate(LAYERS) for module in layer}
    edges = graph()
    assert set(edges) <= set(row), f"modules missing from LAYERS (and the README's Layout): {set(edges) - set(row)}"
    upward = [(a, b) for a, imported in edges.items() for b in imported if row[b] > row[a]]
    assert upward == []


def test_the_core_reaches_no_files_ranks_or_report():
    """The model and the sweeps import, even indirectly, nothing that reads or writes files, speaks to other
    ranks or renders a report."""
    edges = graph()
    for module in CORE:
        assert reach(edges, module) <= CORE_MAY_REACH, module
