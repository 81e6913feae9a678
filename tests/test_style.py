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
FOUNDATION = {"core", "results", "cli", "data", "models", "training", "evaluation", "bench", "site"}
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


def _is_check(node) -> bool:
    "An assert, or a raise of AssertionError (the `try: ... except: ... else: raise` demos)."
    if isinstance(node, ast.Assert):
        return True
    return isinstance(node, ast.Raise) and "AssertionError" in ast.unparse(node.exc or ast.Constant(""))


@pytest.mark.parametrize("name", list(notebook_files(ROOT)))
def test_every_exported_definition_is_followed_by_a_demo_that_checks_it(name):
    """fastai-course style: an export cell that defines something is followed (the parameters cell aside) by
    a code cell that is not exported and asserts something."""
    import nbformat

    cells = [
        c for c in nbformat.read(ROOT / "nbs" / f"{name}.ipynb", as_version=4).cells if c.cell_type == "code"
    ]
    cells = [c for c in cells if "parameters" not in c.metadata.get("tags", [])]
    missing = []
    for cell, after in zip(cells, [*cells[1:], None]):
        if not cell.source.startswith("#| export"):
            continue
        defined = [
            n.name for n in ast.parse(cell.source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        ]
        demo = after is not None and not after.source.startswith("#| export")
        if defined and not (demo and any(_is_check(n) for n in ast.walk(ast.parse(after.source)))):
            missing.append(", ".join(defined))
    assert not missing, f"{name}: no demo with an assertion after the export cell of {missing}"


def test_every_module_says_which_notebook_it_comes_from_and_is_listed_in_the_package():
    init = (PACKAGE / "__init__.py").read_text()
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        source = re.search(r"Source: `nbs/(\w+)\.ipynb`\.$", doc)
        assert source, (
            f"{path.name}: the module docstring must end with its notebook (Source: `nbs/NAME.ipynb`.)"
        )
        assert (ROOT / "nbs" / f"{source[1]}.ipynb").is_file(), (
            f"{path.name} names a notebook that does not exist"
        )
        assert f"`pretrain_nb.{path.stem}`" in init, (
            f"pretrain_nb.{path.stem} is missing from __init__'s Modules"
        )
        assert "this notebook" not in doc.lower(), (
            f"{path.name}: the docstring describes a notebook, not the module"
        )
