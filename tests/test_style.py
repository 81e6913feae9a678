"""The shape of the code: ruff formats and passes the notebooks' cells, the tests and the scripts; every line
of the package fits in 110 columns; family modules build on the foundation modules and never on each other;
every notebook is numbered by its part."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from pretrain_nb.cli import PARTS, notebook_files

RUFF = str(Path(sys.executable).parent / "ruff")
FOUNDATION = {"core", "results", "cli", "data", "models", "training", "evaluation", "bench"}
PACKAGE = ROOT / "pretrain_nb"


def _ruff(*args):
    return subprocess.run([RUFF, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_format_leaves_every_file_unchanged():
    done = _ruff("format", "--check", "nbs", "tests", "scripts")
    assert done.returncode == 0, (
        f"run `ruff format nbs tests scripts`:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
    )


def test_ruff_check_is_clean():
    done = _ruff("check", "nbs", "tests", "scripts")
    assert done.returncode == 0, done.stdout[-4000:]


def test_package_lines_fit_in_110_columns():
    """The exported modules are the cells ruff checked, plus nbdev's own __all__ (wrapped at 120). nbdev also
    writes _modidx.py and the package docstring of __init__.py (one line per module's summary)."""
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("_modidx.py", "__init__.py"):
            continue
        in_all = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            in_all = line.startswith("__all__") or (in_all and line.startswith(" "))
            if len(line) > 110 and not in_all:
                long.append(f"{path.name}:{number} ({len(line)})")
    assert not long, f"lines over 110 columns: {long}"


def _imported_modules(path: Path) -> set[str]:
    "The pretrain_nb modules a module imports (relative or absolute, at any depth of the file)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("pretrain_nb."):
                found.add(node.module.split(".")[1])
            elif node.module == "pretrain_nb":
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pretrain_nb.")}
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("module", MODULES)
def test_modules_import_only_the_foundation(module):
    "A family module imports foundation modules only: what two families need lives in the foundation."
    imported = _imported_modules(PACKAGE / f"{module}.py") - {module}
    others = imported - FOUNDATION
    kind = "foundation" if module in FOUNDATION else "family"
    assert not others, f"{kind} module {module} imports the family module(s) {sorted(others)}"


def test_the_import_check_catches_a_family_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .mim_mae import MAE\nfrom pretrain_nb.ul2 import Vocab\nimport pretrain_nb.models\n")
    assert _imported_modules(bad) == {"mim_mae", "ul2", "models"}


def test_every_notebook_has_its_part_number():
    for name in notebook_files(ROOT):
        assert name == "_template" or re.fullmatch(r"\d\d_[a-z0-9_]+", name), f"{name}: not NN_name"
        assert name == "_template" or name[0] in PARTS, f"{name}: {name[0]}x is not a part"
