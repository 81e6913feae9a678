"""environment.yml and pyproject.toml name the same packages, with the same version bounds."""

import re
import tomllib

import yaml

from conftest import ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project, project["dependencies"] + project["optional-dependencies"]["dev"]


def test_environment_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    project, reqs = _requirements()
    assert any(d.startswith("python") for d in conda) and "pip" in conda
    py = next(d for d in conda if d.startswith("python"))
    assert py.replace("python", "").lstrip("=>") >= project["requires-python"].lstrip(">=")
    listed = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    wanted = {_name(r): r.replace(" ", "") for r in reqs}
    only_env = set(listed.items()) - set(wanted.items())
    only_pyproject = set(wanted.items()) - set(listed.items())
    assert listed == wanted, (
        f"environment.yml and pyproject.toml differ: only in environment.yml {only_env}, "
        f"only in pyproject {only_pyproject}"
    )
    assert any(r.startswith("-e") and "." in r for r in pip), "environment.yml must install this project"
