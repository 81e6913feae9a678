"""The package is exactly what the notebooks export, and the notebooks are clean: running nbdev-export
and nbdev-clean on a copy of the repository must change nothing."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

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
    _run("nbdev-clean", copy)
    changed = _changed(ROOT / "nbs", copy / "nbs")
    assert not changed, f"nbdev-clean changed {changed}: run nbdev-clean and commit the notebooks"


def test_committed_notebooks_have_no_outputs():
    "Notebooks are committed without outputs: figures/ and the HTML report hold what a run shows."
    import nbformat

    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        with_output = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
        assert not with_output, f"{path.name}: cells {with_output} have outputs; clear them before committing"
