"""Shared fixtures. Tests never touch the network: the Hugging Face libraries are put in offline mode and
their cache is pointed at a temporary folder before anything imports them."""

import os
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
