"""Profiles, seeding, paths and figures (pretrain_nb.core)."""

import json

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from conftest import ROOT
from pretrain_nb.core import (
    _PROFILE_KEYS,
    PretrainNbError,
    environment_info,
    git_commit,
    load_profile,
    make_accelerator,
    map_runs,
    profile_names,
    repo_root,
    settings_from,
    run_paths,
    save_figure,
    seed_everything,
)


def test_three_profiles_with_budgets():
    assert profile_names(ROOT / "settings.ini") == ["smoke", "standard", "full"]
    smoke, standard, full = (load_profile(n) for n in ("smoke", "standard", "full"))
    assert (smoke.budget_s, standard.budget_s, full.budget_s) == (60, 900, 3600)
    assert smoke.budget_hardware == standard.budget_hardware == "2 CPU cores"
    assert standard.n_seeds >= 3 and standard.assess_claims and not smoke.assess_claims
    assert not smoke.hub_data and not standard.hub_data and full.hub_data
    assert standard.seeds == [standard.base_seed + i for i in range(standard.n_seeds)]


def test_every_settings_key_has_a_comment():
    "Each key is documented where it is defined, in [DEFAULT], by a comment on the line above."
    lines = (ROOT / "settings.ini").read_text().splitlines()
    start = lines.index("[DEFAULT]")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("["))
    keys = [
        (i, line)
        for i, line in enumerate(lines[start:end], start)
        if "=" in line and not line.startswith("#")
    ]
    assert [line.split("=")[0].strip() for _, line in keys] == list(_PROFILE_KEYS)
    for i, line in keys:
        assert lines[i - 1].startswith("# "), f"settings.ini line {i + 1} ({line!r}) has no comment above it"


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(
        PretrainNbError, match=r"Unknown profile 'fast'; valid profiles are: full, smoke, standard\."
    ):
        load_profile("fast")


def test_unknown_setting_lists_the_valid_ones():
    prof = load_profile("smoke")
    with pytest.raises(PretrainNbError, match="valid profile settings are: .*budget_s"):
        prof["budget"]
    with pytest.raises(AttributeError, match="valid profile settings are"):
        prof.budget


def _write_settings(tmp_path, extra: str):
    text = (ROOT / "settings.ini").read_text() + extra
    path = tmp_path / "settings.ini"
    path.write_text(text)
    return path


def test_unknown_key_in_settings_file(tmp_path):
    path = _write_settings(tmp_path, "\n[weird]\nbudget_seconds = 5\n")
    with pytest.raises(
        PretrainNbError, match=r"\[weird\] has unknown key\(s\) budget_seconds; valid keys are"
    ):
        load_profile("weird", path)


def test_bad_values_are_named(tmp_path):
    path = _write_settings(tmp_path, "\n[bad]\nn_seeds = three\n")
    with pytest.raises(PretrainNbError, match=r"n_seeds = 'three' is not a valid int"):
        load_profile("bad", path)
    path = _write_settings(tmp_path, "\n[bad]\ndevice = tpu\n")
    with pytest.raises(PretrainNbError, match="valid values are: cpu, auto, cuda"):
        load_profile("bad", path)


def test_missing_settings_file(tmp_path):
    with pytest.raises(PretrainNbError, match="does not exist"):
        load_profile("smoke", tmp_path / "nope.ini")


def test_repo_root_outside_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("PRETRAIN_NB_ROOT", raising=False)
    with pytest.raises(PretrainNbError, match="set PRETRAIN_NB_ROOT"):
        repo_root(tmp_path)
    monkeypatch.setenv("PRETRAIN_NB_ROOT", str(tmp_path))
    with pytest.raises(PretrainNbError, match="holds no settings.ini"):
        repo_root()


def test_runs_dir_override(runs_dir):
    assert load_profile("smoke").runs_dir == runs_dir.resolve()
    paths = run_paths("x_test", load_profile("smoke"))
    assert paths.out == runs_dir.resolve() / "smoke" / "x_test" and paths.out.is_dir()
    assert paths.reference == ROOT / "figures" / "x_test"


def test_notebook_name_must_be_a_stem(runs_dir):
    with pytest.raises(PretrainNbError, match="file stem"):
        run_paths("../escape", load_profile("smoke"))


def test_same_seed_same_numbers_on_cpu():
    def train_a_bit(seed):
        gen = seed_everything(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(20):
            x = torch.randn(32, 8, generator=gen)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b, c = train_a_bit(3), train_a_bit(3), train_a_bit(4)
    assert torch.equal(a, b), "same seed must give bitwise identical parameters on the CPU"
    assert not torch.equal(a, c), "a different seed must give different parameters"


def _train_job(seed, profile):
    """A job for map_runs: a few seeded SGD steps in whatever process runs it; returns the weights, pid and
    threads."""
    import os

    gen = seed_everything(seed)
    w = torch.zeros(4)
    for _ in range(10):
        x = torch.randn(16, 4, generator=gen)
        w -= 0.1 * 2 * x.T @ (x @ w - x.sum(1)) / 16
    return w, os.getpid(), torch.get_num_threads()


def _defined_in_a_notebook(seed, profile):
    return _train_job(seed, profile)


_defined_in_a_notebook.__module__ = "__main__"  # as a function defined in a notebook's cell is


def test_map_runs_in_processes_matches_one_after_another():
    import dataclasses
    import os

    standard = load_profile("standard")
    assert standard.parallel_runs == 2
    jobs = [dict(seed=s) for s in (0, 1, 2)]
    together = map_runs(_train_job, jobs, standard)
    alone = map_runs(_train_job, jobs, dataclasses.replace(standard, parallel_runs=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(together, alone)), (
        "results must not depend on where a job ran"
    )
    assert not torch.equal(together[0][0], together[1][0])
    assert {pid for _, pid, _ in together} - {os.getpid()} and all(pid == os.getpid() for _, pid, _ in alone)
    assert {threads for _, _, threads in together} == {1}, "two runs at once on 2 threads get one thread each"
    with pytest.raises(PretrainNbError, match="import it from pretrain_nb"):
        map_runs(_defined_in_a_notebook, jobs, standard)
    with pytest.raises(PretrainNbError, match="parallel_runs must be at least 1"):
        map_runs(_train_job, jobs, dataclasses.replace(standard, parallel_runs=0))


def test_settings_from_builds_the_dataclass_or_names_the_valid_keys():
    import dataclasses

    @dataclasses.dataclass
    class Sweep:
        steps: int = 10
        lr: float = 1e-3

    assert settings_from(Sweep, {"lr": 0.1}) == Sweep(10, 0.1)
    with pytest.raises(
        PretrainNbError, match="Unknown Sweep setting 'step'; valid Sweep settings are: lr, steps"
    ):
        settings_from(Sweep, {"step": 5})


def test_bad_seed():
    with pytest.raises(PretrainNbError, match="non-negative integer"):
        seed_everything(-1)


def test_accelerator_on_cpu():
    acc = make_accelerator(load_profile("standard"))
    assert acc.device.type == "cpu" and acc.mixed_precision == "no"


def test_save_figure_writes_png_and_data(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    written = save_figure(fig, "curve", tmp_path, data=pd.DataFrame({"x": [1, 2], "y": [3, 4]}))
    assert [p.name for p in written] == ["curve.png", "curve.csv"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(written[1]).y.tolist() == [3, 4]
    written = save_figure(fig, "hist", tmp_path, data={"bins": torch.arange(3), "n": 2})
    assert json.loads(written[1].read_text()) == {"bins": [0, 1, 2], "n": 2}
    with pytest.raises(PretrainNbError, match="letters, digits"):
        save_figure(fig, "../bad name", tmp_path)
    plt.close(fig)


def test_environment_and_git():
    info = environment_info()
    assert info["versions"]["torch"] == torch.__version__
    assert info["hardware"]["cpu_count"] >= 1
    assert set(git_commit(ROOT)) == {"commit", "dirty"}
