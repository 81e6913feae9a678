"""The papermill harness: every notebook in nbs/ runs end to end in the smoke profile, in a fresh kernel,
into a temporary runs folder, offline, within its budget, and writes results.json and its figures."""

import json

import nbformat
import pytest

from conftest import NOTEBOOK_TIMES, ROOT
from pretrain_nb.cli import execute_notebook, notebook_card, notebook_files
from pretrain_nb.core import load_profile
from pretrain_nb.results import RESULTS_KEYS, VERDICTS

NOTEBOOKS = list(notebook_files(ROOT))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell(name):
    "Exactly one cell tagged `parameters`, and it sets `profile` and `seed`."
    nb = nbformat.read(notebook_files(ROOT)[name], as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters', expected exactly 1"
    names = {
        line.split("=")[0].strip()
        for line in tagged[0].source.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert {"profile", "seed"} <= names, (
        f"{name}: the parameters cell sets {sorted(names)}, it needs profile and seed"
    )


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_profile(name, runs_dir):
    profile = load_profile("smoke")
    assert profile.runs_dir == runs_dir.resolve()
    summary = execute_notebook(name, profile, seed=0, progress=False, root=ROOT)
    NOTEBOOK_TIMES.append((name, summary["wall_time_s"], profile.budget_s))
    assert summary["error"] is None, (
        f"{name} failed: {summary['error']} (executed copy: {summary['executed']})"
    )

    out = runs_dir / "smoke" / name
    record = json.loads((out / "results.json").read_text())
    assert set(RESULTS_KEYS) <= set(record), f"results.json lacks {set(RESULTS_KEYS) - set(record)}"
    assert record["notebook"] == name and record["profile"] == "smoke" and record["seeds"] == [0]
    for fig in record["figures"]:
        assert (out / f"{fig}.png").is_file(), f"figure {fig}.png missing"
        assert (out / f"{fig}.csv").is_file() or (out / f"{fig}.json").is_file(), f"data behind {fig} missing"
    for claim in record["claims"]:
        assert claim["verdict"] == "not assessed", "claims are not assessed in the smoke profile"
        assert claim["quote"] and claim["arms"] and claim["rule"]
    assert all(c["verdict"] in VERDICTS for c in record["claims"])
    if notebook_card(notebook_files(ROOT)[name])["kind"] in ("family", "template"):
        assert record["figures"], f"{name} saved no figure"
    assert summary["wall_time_s"] <= profile.budget_s, (
        f"{name} took {summary['wall_time_s']:.1f} s in the smoke profile; "
        f"the budget is {profile.budget_s:.0f} s"
    )
