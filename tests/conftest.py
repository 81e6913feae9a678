"""Shared fixtures. Tests never touch the network: the Hugging Face libraries are put in offline mode and
their cache is pointed at a temporary folder before anything imports them."""

import functools
import hashlib
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="pretrain-nb-hf-"))
os.environ["PRETRAIN_NB_HEADLESS"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_TIMES: list[tuple[str, float, float]] = []  # (notebook, wall seconds, budget seconds)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    "A temporary runs folder: notebooks executed by a test never write into the repository."
    d = tmp_path / "runs"
    monkeypatch.setenv("PRETRAIN_NB_RUNS_DIR", str(d))
    return d


def pytest_terminal_summary(terminalreporter):
    if NOTEBOOK_TIMES:
        terminalreporter.section("notebook wall times (smoke profile)")
        for name, wall, budget in NOTEBOOK_TIMES:
            terminalreporter.write_line(f"{name:<34} {wall:6.1f} s  (budget {budget:.0f} s)")


def git_filter(path: Path) -> str | None:
    "The clean filter git applies to `path` (from .gitattributes and the git config), or None."
    try:
        attr = subprocess.run(
            ["git", "check-attr", "filter", "--", str(path)], cwd=ROOT, capture_output=True, text=True
        )
    except FileNotFoundError:  # no git on this machine
        return None
    name = attr.stdout.strip().rsplit(": ", 1)[-1] if attr.returncode == 0 else "unspecified"
    if name in ("unspecified", "unset", ""):
        return None
    done = subprocess.run(
        ["git", "config", "--get", f"filter.{name}.clean"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or None


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.cache
def _staged_blob_ids() -> dict[Path, str]:
    "The blob id git's index holds for each tracked file."
    try:
        done = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        return {}
    ids = {}
    for entry in done.stdout.split("\0"):
        if entry:
            meta, name = entry.split("\t", 1)
            ids[(ROOT / name).resolve()] = meta.split()[1]
    return ids


def committed_text(path: Path) -> str:
    """What `git add` would store for `path`: the file passed through its clean filter
    (pretrain-nb-git-clean for nbs/*.ipynb once scripts/setup.sh has configured it), else the file as it
    is. A student's working copy may hold outputs that JupyterLab saved; the tests judge what would be
    committed."""
    raw = path.read_bytes()
    if _git_blob_id(raw) == _staged_blob_ids().get(path.resolve()):
        return raw.decode()  # the file is byte for byte what git stores: nothing to filter (and fast)
    command = git_filter(path)
    if command is None:
        return raw.decode()
    with open(path, "rb") as f:
        done = subprocess.run(command, shell=True, stdin=f, capture_output=True, cwd=ROOT)
    assert done.returncode == 0, f"the git filter {shlex.split(command)[0]} failed on {path}: {done.stderr!r}"
    return done.stdout.decode()
