"""The pretrain-nb command: list, run and report on the template, course, and one-sentence errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from pretrain_nb.cli import SOLUTION_STUB, main, make_course, resolve_notebooks, student_notebook
from pretrain_nb.core import PretrainNbError

CLI = str(Path(sys.executable).parent / "pretrain-nb")


def cli(*args, env=None):
    return subprocess.run([CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_list_shows_notebooks_papers_and_budgets():
    done = cli("list")
    assert done.returncode == 0, done.stderr
    assert "smoke 60 s on 2 CPU cores, standard 15 min on 2 CPU cores" in done.stdout
    assert "_template" in done.stdout and "Learning representations by back-propagating errors" in done.stdout
    assert "00_core" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "no_such_notebook"], "Unknown notebook 'no_such_notebook'; valid notebooks are: "),
        (
            ["run", "_template", "--profile", "fast"],
            "Unknown profile 'fast'; valid profiles are: full, smoke, standard.",
        ),
        (["run", "--verbose", "_template"], "Unrecognized arguments: --verbose"),
        (["run"], "Name the notebooks to run, or pass --all"),
        (["run", "--all", "_template"], "Give notebook names or --all, not both."),
        (
            ["run", "00", "--profile", "smoke"],
            "matches 00_cli, 00_core, 00_results; give one of them in full.",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["report", "--profile", "nope"], "Unknown profile 'nope'"),
        (["run", "_template", "--seed", "x"], "invalid int value: 'x'"),
        (
            ["run", "14_contrastive"],
            "Notebook '14_contrastive' is now '12_contrastive' (the notebooks are numbered by part)",
        ),
    ],
)
def test_mistakes_are_one_sentence(args, message):
    done = cli(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0]


def test_list_groups_the_notebooks_by_part():
    out = cli("list").stdout
    parts = [line for line in out.splitlines() if line[:2] in {f"{d}x" for d in range(10)}]
    assert parts[0] == "0x foundations" and parts[1] == "1x vision self-supervised"
    assert "8x beyond text and images (no notebook yet)" in parts
    assert out.index("6x science") < out.index("60_knowledge") < out.index("7x adaptation")
    assert out.index("7x adaptation") < out.index("70_task_vectors") < out.index("8x beyond")
    assert out.index("70_task_vectors") < out.index("71_peft_continual") < out.index("8x beyond")
    assert out.index("1x vision") < out.index("10_mim_mae") < out.index("2x language")
    assert out.index("5x architecture") < out.index("50_layernorm")


def test_a_runs_folder_that_cannot_be_made_is_one_sentence(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = {**__import__("os").environ, "PRETRAIN_NB_RUNS_DIR": str(blocker / "runs")}
    done = cli("run", "_template", "--profile", "smoke", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Cannot create the runs folder"), done.stderr
    assert "PRETRAIN_NB_RUNS_DIR" in lines[0]


def test_resolve_by_prefix():
    assert resolve_notebooks(["_templ", "00_core.ipynb", "_template"], ROOT) == ["_template", "00_core"]


def test_run_and_report_on_the_template(tmp_path):
    env = {**__import__("os").environ, "PRETRAIN_NB_RUNS_DIR": str(tmp_path / "runs")}
    done = cli("run", "_template", "--profile", "smoke", "--seed", "1", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "smoke" / "_template"
    rec = json.loads((out / "results.json").read_text())
    assert rec["seeds"] == [1] and rec["claims"][0]["verdict"] == "not assessed"
    assert (out / "_template.ipynb").is_file() and (out / "learning_curves.png").is_file()
    assert "_template" in done.stdout and "ok" in done.stdout and "1 not assessed" in done.stdout

    done = cli("report", "--profile", "smoke", "--out", str(tmp_path / "site"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    md = (tmp_path / "site" / "REPRODUCTION.md").read_text()
    assert "| _template | Learning representations by back-propagating errors (1986) |" in md
    assert "**not assessed**" in md and "MLP: " in md
    index = (tmp_path / "site" / "report" / "index.html").read_text()
    assert '<a href="_template.html">_template</a>' in index
    page = (tmp_path / "site" / "report" / "_template.html").read_text()
    assert "data:image/png;base64" in page, "figures must be inline in the HTML page"


def test_smoke_report_leaves_the_committed_reproduction_alone(tmp_path):
    committed = (ROOT / "REPRODUCTION.md").read_bytes()
    env = {**os.environ, "PRETRAIN_NB_RUNS_DIR": str(tmp_path / "runs")}
    assert cli("run", "_template", "--profile", "smoke", env=env).returncode == 0
    done = cli("report", "--profile", "smoke", env=env)  # no --out: the runs folder, not the repository
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "smoke" / "REPRODUCTION.md").is_file()
    assert (ROOT / "REPRODUCTION.md").read_bytes() == committed
    refused = cli("report", "--profile", "smoke", "--out", str(ROOT), env=env)
    assert refused.returncode == 2 and "Only a standard report writes" in refused.stderr
    assert (ROOT / "REPRODUCTION.md").read_bytes() == committed


def test_report_without_runs(tmp_path):
    env = {**__import__("os").environ, "PRETRAIN_NB_RUNS_DIR": str(tmp_path / "empty")}
    done = cli("report", "--profile", "smoke", "--out", str(tmp_path), env=env)
    assert done.returncode == 2 and "run notebooks first" in done.stderr


def test_course_empties_solutions(tmp_path):
    written = make_course(tmp_path / "course", ROOT)
    assert {p.name for p in written} == {p.name for p in (ROOT / "nbs").glob("*.ipynb")}
    nb = json.loads((tmp_path / "course" / "_template.ipynb").read_text())
    solutions = [c for c in nb["cells"] if "solution" in c["metadata"].get("tags", [])]
    assert solutions and all("".join(c["source"]) == SOLUTION_STUB for c in solutions)
    original = json.loads((ROOT / "nbs" / "_template.ipynb").read_text())
    assert len(nb["cells"]) == len(original["cells"])  # nothing else removed
    with pytest.raises(PretrainNbError, match="must not be nbs/"):
        make_course(ROOT / "nbs", ROOT)


def test_student_notebook_keeps_other_cells():
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {"tags": ["solution"]},
                "source": "x = 1",
                "outputs": [1],
                "execution_count": 3,
            },
            {"cell_type": "code", "metadata": {}, "source": "y = 2", "outputs": [1], "execution_count": 4},
        ]
    }
    out = student_notebook(nb)
    assert out["cells"][0]["source"] == SOLUTION_STUB and out["cells"][1]["source"] == "y = 2"
    assert (
        out["cells"][1]["outputs"] == [] and nb["cells"][0]["source"] == "x = 1"
    )  # the input is not modified


def test_main_returns_exit_codes(capsys):
    assert main(["run", "nope"]) == 2
    assert "valid notebooks are" in capsys.readouterr().err


def _committed(name):
    return json.loads((ROOT / "figures" / name / "results.json").read_text())


def test_verify_compares_a_run_with_the_committed_results(runs_dir, capsys):
    committed = _committed("_template")
    fresh = runs_dir / "standard" / "_template"
    fresh.mkdir(parents=True)
    (fresh / "results.json").write_text(json.dumps(committed))
    assert main(["verify", "_template", "--no-run"]) == 0  # the same numbers: every verdict held
    out = capsys.readouterr().out
    assert (
        "verdict: " in out and "largest relative difference: 0.00%" in out and "0 verdict(s) changed" in out
    )
    changed = json.loads(json.dumps(committed))
    claim = changed["claims"][0]
    claim["verdict"] = "inconclusive" if claim["verdict"] != "inconclusive" else "reproduced"
    first_arm = next(iter(claim["arms"]))
    claim["arms"][first_arm][0] *= 1.01
    (fresh / "results.json").write_text(json.dumps(changed))
    assert main(["verify", "_template", "--no-run"]) == 1  # a changed verdict: exit status 1
    out = capsys.readouterr().out
    assert "CHANGED" in out and "0.99%" in out and f"({first_arm}, value 0)" in out


def test_verify_mistakes_are_one_sentence(runs_dir):
    done = cli("verify", "_template", "--no-run", env=os.environ | {"PRETRAIN_NB_RUNS_DIR": str(runs_dir)})
    assert done.returncode == 2 and "does not exist; run 'pretrain-nb verify _template' without --no-run" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    done = cli("verify")
    assert done.returncode == 2 and "required: NAME" in done.stderr
