"""The shipped model is part of the package: a wheel built from the repository, installed into a
fresh virtual environment, runs `minielm explain` from a directory far from the repository.

Offline: the wheel is built without build isolation (setuptools is already installed) and the
virtual environment borrows torch and the other dependencies from this interpreter's own site
directories, named in a `.pth` file (`--system-site-packages` would not do: from inside a venv it
gives the base interpreter's packages, without torch); the wheel itself is installed with
`--no-deps --no-index`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in (ROOT / "weights" / "kjv-tiny").iterdir())


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True, **kwargs)


def test_wheel_ships_the_model_and_runs_from_anywhere(tmp_path):
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".venv*"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        source, "-w", tmp_path / "dist")
    (wheel,) = (tmp_path / "dist").glob("minielm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert sorted(Path(n).name for n in archive.namelist() if n.startswith("minielm/weights/kjv-tiny/")) == SHIPPED

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # This interpreter's site directories (its venv's, the system's or the user's, whichever it runs from),
    # after the venv's own: torch and pip come from there, minielm from the wheel. Their .pth files are not
    # read, so an editable minielm installed here stays out.
    borrowed = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site_packages / "borrowed-site-packages.pth").write_text("".join(f"{p}\n" for p in borrowed))
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository is not on the path
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    installed = site_packages / "minielm"
    where = run(python, "-c", "import minielm; print(minielm.__file__); print(minielm.load('kjv-tiny').directory); "
                "print(minielm.load().directory)", cwd=elsewhere, env=env).stdout.split()
    assert where == [str(installed / "__init__.py")] + [str(installed / "weights" / "kjv-tiny")] * 2

    result = run(venv / "bin" / "minielm", "explain", "In the beginning", cwd=elsewhere, env=env)
    assert result.stdout.startswith(f"model   {installed / 'weights' / 'kjv-tiny'}  (llama, d=384, 4 layers")
    assert "next token" in result.stdout


def test_ci_installs_and_tests_as_the_readme_says():
    """.ci/run, in its fresh venv, runs the README's development install and the README's test command."""
    readme_commands = {line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()}
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    venv = next(i for i, line in enumerate(ci) if line.startswith(". ") and line.endswith('/bin/activate"'))
    install = next(i for i, line in enumerate(ci) if line.startswith("python -m pip install") and "-e" in line.split())
    test = next(i for i, line in enumerate(ci) if line.startswith("python -m pytest"))
    assert venv < install < test
    assert ci[install].replace("python -m ", "", 1).replace("--quiet ", "") in readme_commands
    assert ci[test] in readme_commands
