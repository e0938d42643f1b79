"""Model ids from the local Hugging Face cache, offline: `minielm.load("org/name[@revision]")`.

A temporary cache is laid out as huggingface_hub lays it out (blobs, snapshot folders of symbolic
links, refs naming commits), and the environment variables are pointed at it. Nothing may touch
the network: the command-line check runs with sockets disabled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minielm
from minielm.errors import CheckpointError, InputError
from minielm.loader import hub_cache, resolve_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench import random_checkpoint  # noqa: E402

COMMITS = {"main": "a" * 40, "v1.0": "b" * 40}
IDS = [1, 17, 5, 88]
VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def word_level_tokenizer(path: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def add_snapshot(cache: Path, repo_id: str, ref: str, commit: str, seed: int) -> Path:
    """One snapshot of `repo_id` in `cache`: files in blobs/ by content hash, linked from snapshots/<commit>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = repo.parent / f"files-{seed}"
    random_checkpoint(files, d=16, layers=2, f=32, heads=2, kv_heads=1, vocab=128, seed=seed)
    word_level_tokenizer(files / "tokenizer.json", 128)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.move(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    files.rmdir()
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A hub cache holding org/tiny at main (seed 0) and at tag v1.0 (seed 1)."""
    cache = tmp_path_factory.mktemp("hub")
    for seed, (ref, commit) in enumerate(COMMITS.items()):
        add_snapshot(cache, "org/tiny", ref, commit, seed)
    return cache


@pytest.fixture
def only(monkeypatch):
    """Clear every cache variable, then set the ones given."""
    def setenv(**values):
        for name in VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return setenv


def snapshot_of(cache: Path, revision: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / COMMITS[revision]


@pytest.mark.parametrize("model_id, revision", [("org/tiny", "main"), ("org/tiny@main", "main"),
                                                ("org/tiny@v1.0", "v1.0"), ("org/tiny@" + "b" * 40, "v1.0")])
def test_model_id_resolves_to_its_snapshot(cache, only, model_id, revision):
    only(HF_HUB_CACHE=cache)
    model = minielm.load(model_id)
    assert model.directory == snapshot_of(cache, revision)
    direct = minielm.load(snapshot_of(cache, revision))
    assert torch.equal(model.logits(IDS), direct.logits(IDS))


def test_revisions_hold_different_weights(cache, only):
    only(HF_HUB_CACHE=cache)
    assert not torch.equal(minielm.load("org/tiny").logits(IDS), minielm.load("org/tiny@v1.0").logits(IDS))


# Where the cache is, asked of huggingface_hub itself (it reads the environment once, at import: a child
# process per environment), never written here from the same belief as minielm's code.
ASK_HUGGINGFACE_HUB = "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"


def huggingface_hub_cache() -> Path:
    """huggingface_hub.constants.HF_HUB_CACHE under this process's environment."""
    result = subprocess.run([sys.executable, "-c", ASK_HUGGINGFACE_HUB], capture_output=True, text=True,
                            env=dict(os.environ), check=True)
    return Path(result.stdout.removesuffix("\n"))


# {root}: a temporary directory ({{ }}: a brace); HOME is {root}/home and $PLACE is {root}/place in every one
ENVIRONMENTS = [
    {}, {"HF_HUB_CACHE": "{root}/hub"}, {"HUGGINGFACE_HUB_CACHE": "{root}/legacy"},
    {"HF_HUB_CACHE": "{root}/hub", "HUGGINGFACE_HUB_CACHE": "{root}/legacy"}, {"HF_HOME": "{root}/hf"},
    {"HF_HOME": "{root}/hf", "HUGGINGFACE_HUB_CACHE": "{root}/legacy"},
    {"HF_HOME": "{root}/hf", "XDG_CACHE_HOME": "{root}/x"},
    {"XDG_CACHE_HOME": "{root}/xdg"}, {"HF_HOME": "~/hf"}, {"HF_HOME": "$PLACE/hf"}, {"HF_HUB_CACHE": "~/hub"},
    {"HF_HUB_CACHE": "${{PLACE}}/hub"}, {"HUGGINGFACE_HUB_CACHE": "~/legacy"}, {"XDG_CACHE_HOME": "~/xdg"},
    {"XDG_CACHE_HOME": "$PLACE/xdg"}, {"HF_HUB_CACHE": "$NOT_SET/hub"}, {"HF_HOME": "~"},
    {"HF_HUB_CACHE": ""}, {"HF_HOME": ""}, {"XDG_CACHE_HOME": ""},
]


@pytest.fixture
def environment(only, monkeypatch, tmp_path):
    """Set one of ENVIRONMENTS (and HOME, PLACE); clear the other cache variables."""
    def setenv(values: dict):
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("PLACE", str(tmp_path / "place"))
        monkeypatch.delenv("NOT_SET", raising=False)
        only(**{name: value.format(root=tmp_path) for name, value in values.items()})
    return setenv


@pytest.mark.parametrize("values", ENVIRONMENTS, ids=lambda values: " ".join(f"{k}={v}" for k, v in values.items()))
def test_the_cache_is_where_huggingface_hub_puts_it(environment, values):
    environment(values)
    assert hub_cache() == huggingface_hub_cache()


@pytest.mark.parametrize("values", [{}, {"HF_HUB_CACHE": "{root}/hub"}, {"HUGGINGFACE_HUB_CACHE": "~/legacy"},
                                    {"HF_HOME": "$PLACE/hf"}, {"XDG_CACHE_HOME": "~/xdg"}], ids=str)
def test_a_model_id_loads_from_where_huggingface_hub_puts_the_cache(cache, environment, values):
    environment(values)
    hub = huggingface_hub_cache()
    hub.parent.mkdir(parents=True, exist_ok=True)
    hub.symlink_to(cache)
    assert minielm.load("org/tiny").directory == hub / "models--org--tiny" / "snapshots" / COMMITS["main"]


def test_hf_hub_cache_comes_before_hf_home(cache, only, tmp_path):
    only(HF_HUB_CACHE=cache, HF_HOME=tmp_path / "elsewhere")
    assert minielm.load("org/tiny").directory == snapshot_of(cache, "main")


def test_a_local_directory_comes_before_the_cache(cache, only, tmp_path, monkeypatch):
    only(HF_HUB_CACHE=cache)
    shutil.copytree(snapshot_of(cache, "v1.0"), tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert minielm.load("org/tiny").directory == Path("org/tiny")


@pytest.mark.parametrize("model_id, searched, advice", [
    ("org/absent", ["models--org--absent/refs/main"], "`hf download org/absent`"),
    ("org/tiny@v2", ["models--org--tiny/refs/v2"], "`hf download org/tiny --revision v2`"),
    ("org/tiny@" + "c" * 40, ["models--org--tiny/refs/" + "c" * 40, "models--org--tiny/snapshots/" + "c" * 40],
     "--revision " + "c" * 40),
])
def test_a_model_not_in_the_cache_names_where_it_looked(cache, only, model_id, searched, advice):
    only(HF_HUB_CACHE=cache)
    with pytest.raises(CheckpointError) as info:
        minielm.load(model_id)
    message = str(info.value)
    assert message.startswith(f"{model_id}: no such checkpoint directory ({Path.cwd() / model_id}), and not in "
                              f"the local Hugging Face cache (searched ")
    for path in searched:
        assert str(cache / path) in message
    assert advice in message and "minielm never downloads" in message


def test_a_ref_that_is_not_text_is_one_line(only, tmp_path):
    cache = tmp_path / "hub"
    add_snapshot(cache, "org/bad", "main", COMMITS["main"], 0)
    ref = cache / "models--org--bad" / "refs" / "main"
    ref.write_bytes(b"\xff\xfe" + COMMITS["main"].encode())
    only(HF_HUB_CACHE=cache)
    with pytest.raises(CheckpointError) as info:
        minielm.load("org/bad")
    assert str(info.value) == (f"{ref}: unreadable Hugging Face cache ref; expected a commit hash ('utf-8' codec "
                               f"can't decode byte 0xff in position 0: invalid start byte)")


def test_snapshot_listed_when_the_ref_is_missing(cache, only):
    only(HF_HUB_CACHE=cache)
    with pytest.raises(CheckpointError, match=f"the cache holds snapshots {'a' * 40}, {'b' * 40}"):
        minielm.load("org/tiny@nope")


@pytest.mark.parametrize("model_id", ["org/../tiny", "../org/tiny", "org/tiny@../../x", "org/tiny@/abs"])
def test_ids_that_would_leave_the_cache_are_not_ids(cache, only, model_id):
    only(HF_HUB_CACHE=cache)
    with pytest.raises(CheckpointError, match="no such checkpoint directory$"):
        minielm.load(model_id)


def test_empty_path_is_refused(only):
    with pytest.raises(InputError, match="checkpoint path is empty"):
        minielm.load("")


def test_shipped_model_by_name_or_by_nothing(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # from any directory
    assert resolve_checkpoint("kjv-tiny") == resolve_checkpoint(None) == ROOT / "weights" / "kjv-tiny"
    assert minielm.load().config.vocab_size == 4096


# The command line, offline: every socket operation fails in the child.
OFFLINE = """
import json, socket, sys

def refuse(*args, **kwargs):
    raise OSError("the test disabled the network")

socket.socket.connect = socket.socket.connect_ex = socket.socket.sendto = refuse
socket.create_connection = socket.getaddrinfo = refuse
import minielm.cli
code = minielm.cli.main(sys.argv[1:])
print(json.dumps({"code": code, "hub": "huggingface_hub" in sys.modules}), file=sys.stderr)
"""


def test_command_line_with_model_id_offline(cache):
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", OFFLINE, "generate", "w5 w7 w9", "--model", "org/tiny@v1.0",
                             "--max-new-tokens", "4"], capture_output=True, text=True, env=env)
    assert json.loads(result.stderr.strip()) == {"code": 0, "hub": False}, result.stderr[-2000:]
    model = minielm.load(snapshot_of(cache, "v1.0"))
    assert result.stdout.split() == ["w5", "w7", "w9"] + model.generate("w5 w7 w9", 4).split()
