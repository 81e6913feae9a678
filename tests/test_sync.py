"""The package is exactly what the notebooks export, and the notebooks are clean: running nbdev-export
and nbdev-clean on a copy of the repository must change nothing. The copy holds the notebooks as git would
commit them (through the clean filter that scripts/setup.sh configures), so outputs that JupyterLab
saved into a working copy do not fail these tests; outputs that would be committed do."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, committed_text, git_filter

BIN = Path(sys.executable).parent


def _copy(tmp_path):
    dst = tmp_path / "repo"
    dst.mkdir()
    for name in ("nbs", "pretrain_nb", "pyproject.toml", "settings.ini", "README.md"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(
                src, dst / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
            )
        elif src.exists():
            shutil.copy2(src, dst / name)
    for nb in (ROOT / "nbs").glob("*.ipynb"):
        (dst / "nbs" / nb.name).write_text(committed_text(nb))
    return dst


def _changed(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__", ".ipynb_checkpoints"])
    out = [f"{b}/{n}" for n in cmp.diff_files + cmp.left_only + cmp.right_only]
    for sub in cmp.common_dirs:
        out += _changed(a / sub, b / sub)
    return out


def _run(cmd, cwd):
    done = subprocess.run([str(BIN / cmd)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed: {done.stderr[-2000:]}"


def test_package_matches_notebooks(tmp_path):
    copy = _copy(tmp_path)
    _run("nbdev-export", copy)
    changed = _changed(ROOT / "pretrain_nb", copy / "pretrain_nb")
    assert not changed, f"nbdev-export changed {changed}: run nbdev-export and commit the package"


def test_notebooks_are_clean(tmp_path):
    copy = _copy(tmp_path)
    committed = tmp_path / "committed"
    shutil.copytree(copy / "nbs", committed)
    _run("nbdev-clean", copy)
    changed = _changed(committed, copy / "nbs")
    assert not changed, f"nbdev-clean changed {changed}: run nbdev-clean and commit the notebooks"


def test_committed_notebooks_have_no_outputs():
    "Notebooks are committed without outputs: figures/ and the HTML report hold what a run shows."
    import nbformat

    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = nbformat.reads(committed_text(path), as_version=4)
        with_output = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
        assert not with_output, (
            f"{path.name}: cells {with_output} would be committed with outputs; run 'bash scripts/setup.sh' "
            "(it installs the git filter that strips them) or clear them before committing"
        )


def test_the_git_filter_strips_what_jupyterlab_saves(tmp_path):
    """A notebook as JupyterLab saves it after 'Run All' (outputs, execution counts, the kernel's
    language_info, widget state, cell timing) comes out of the filter exactly as committed."""
    import json

    path = ROOT / "nbs" / "_template.ipynb"
    command = git_filter(path)
    if command is None:
        pytest.skip("the git clean filter is not configured here: run 'bash scripts/setup.sh'")
    committed = committed_text(path)  # the working copy may hold a student's outputs already
    nb = json.loads(committed)
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.7", "pygments_lexer": "ipython3"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = i + 1
        cell["metadata"]["execution"] = {"iopub.status.idle": "2026-12-02T06:00:00Z"}
        cell["metadata"]["scrolled"] = True
        cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["0.20000000298023224\n"]}]
    saved = tmp_path / "nbs" / path.name
    saved.parent.mkdir()
    saved.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    with open(saved, "rb") as f:
        done = subprocess.run(command, shell=True, stdin=f, capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == committed, "the filter left something JupyterLab added"
