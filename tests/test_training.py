"""The training loop (pretrain_nb.training): schedules at their breakpoints, data order, exact resume,
and the 2-process path against a 1-process run with the same global batch."""

import pytest
import torch

from pretrain_nb.core import PretrainNbError, seed_everything
from pretrain_nb.models import GPT, TransformerConfig, causal_lm_loss
from pretrain_nb.training import (
    TrainConfig,
    batch_indices,
    constant,
    latest_checkpoint,
    make_schedule,
    piecewise,
    train,
    warmup_cosine,
    warmup_stable_decay,
)


def test_cosine_breakpoints():
    f = warmup_cosine(10, 101, min_ratio=0.1)
    assert [f(0), f(4), f(9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0 and abs(f(100) - 0.1) < 1e-12 and abs(f(55) - 0.55) < 1e-12  # midpoint of the decay
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_wsd_breakpoints():
    f = warmup_stable_decay(10, 101, decay_fraction=0.2, min_ratio=0.0)
    assert f(9) == 1.0 and f(80) == 1.0 and f(100) == 0.0 and abs(f(90) - 0.5) < 1e-12


def test_constant_and_piecewise():
    assert constant(0)(0) == 1.0 and constant(4)(1) == 0.5 and constant(4)(10) == 1.0
    f = piecewise([(0, 0.0), (10, 1.0), (20, 0.5)])
    assert [f(-1), f(5), f(10), f(15), f(20), f(99)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.5]
    with pytest.raises(PretrainNbError, match="distinct steps"):
        piecewise([(1, 1.0), (1, 2.0)])


def test_schedule_errors():
    with pytest.raises(PretrainNbError, match="valid schedules are: constant, cosine, wsd"):
        make_schedule("linear", 100)
    with pytest.raises(PretrainNbError, match="warmup <= total"):
        warmup_cosine(200, 100)


def test_batch_indices_cover_each_epoch_once():
    idx = torch.cat([batch_indices(s, 12, 5, seed=3) for s in range(12)])  # 60 positions = 5 epochs
    for e in range(5):
        assert sorted(idx[12 * e : 12 * (e + 1)].tolist()) == list(range(12))
    assert torch.equal(batch_indices(7, 12, 5, seed=3), batch_indices(7, 12, 5, seed=3))
    assert not torch.equal(batch_indices(0, 12, 5, seed=3), batch_indices(0, 12, 5, seed=4))
    in_order = torch.cat([batch_indices(s, 12, 5, seed=3, shuffle=False) for s in range(12)])
    assert (
        in_order.tolist() == list(range(12)) * 5
    )  # shuffle=False keeps the data's order (a curriculum), epoch after epoch


def _setup(vocab=20, n=64):
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randint(vocab, (n, 1), generator=g) + torch.arange(16)
    ) % vocab  # counting sequences: learnable
    cfg = TransformerConfig(vocab_size=vocab, block_size=16, d_model=32, n_layers=2, n_heads=4, dropout=0.1)
    loss = lambda m, b: causal_lm_loss(m(b), b)
    return data, cfg, loss


def _run(tmp=None, stop_after=None, micro=None, steps=12, dropout=0.1):
    data, mcfg, loss = _setup()
    seed_everything(0)
    model = GPT(TransformerConfig(**{**mcfg.__dict__, "dropout": dropout}))
    cfg = TrainConfig(
        steps=steps,
        batch_size=8,
        micro_batch_size=micro,
        lr=1e-2,
        warmup_steps=2,
        eval_every=3,
        checkpoint_every=3 if tmp else 0,
        checkpoint_dir=tmp,
        stop_after=stop_after,
        progress=False,
    )
    hist = train(model, loss, data, cfg, eval_fn=lambda m: {"val_loss": loss(m, data[:8]).item()})
    return hist, model


def test_resume_is_bitwise_identical(tmp_path):
    full, full_model = _run()
    part, _ = _run(tmp_path, stop_after=5)  # interrupted after step 5; the last checkpoint is step 5
    assert len(part) == 1 and latest_checkpoint(tmp_path).name == "step_0000005"
    resumed, resumed_model = _run(tmp_path)
    assert resumed.equals(full), f"{resumed}\n!=\n{full}"
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_training_reduces_loss_and_accumulation_matches():
    hist, _ = _run(steps=30)
    assert hist.val_loss.iloc[-1] < hist.val_loss.iloc[0] - 0.1
    a, _ = _run(micro=8, steps=6, dropout=0.0)  # without dropout the split of the batch must not matter
    b, _ = _run(micro=2, steps=6, dropout=0.0)
    assert torch.allclose(torch.tensor(a.val_loss.values), torch.tensor(b.val_loss.values), atol=1e-5)


def test_batch_must_split_evenly():
    data, mcfg, loss = _setup()
    with pytest.raises(PretrainNbError, match="must split evenly"):
        train(GPT(mcfg), loss, data, TrainConfig(steps=1, batch_size=8, micro_batch_size=3, progress=False))


# ---- the multi-process path: 2 CPU processes (gloo) started by torchrun, against 1 process ----
# (torchrun starts fresh interpreters; forking a process that already ran torch ops can deadlock in OpenMP)

WORKER = """
import sys, torch
from accelerate import Accelerator
sys.path.insert(0, {tests!r})
from test_training import one_training_run
acc = Accelerator(cpu=True)
model = one_training_run(acc, micro=2)
if acc.is_main_process:
    torch.save(acc.unwrap_model(model).state_dict(), {out!r})
acc.wait_for_everyone()
"""


def one_training_run(accelerator, micro):
    "5 steps, global batch 8, no dropout: the same run whatever the number of processes."
    data, mcfg, loss = _setup()
    seed_everything(0)
    model = GPT(TransformerConfig(**{**mcfg.__dict__, "dropout": 0.0}))
    train(
        model,
        loss,
        data,
        TrainConfig(steps=5, batch_size=8, micro_batch_size=micro, lr=1e-2, eval_every=5, progress=False),
        accelerator=accelerator,
    )
    return model


def test_two_processes_match_one(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from accelerate import Accelerator

    out, script = tmp_path / "two.pt", tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), out=str(out)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out)
    one = one_training_run(Accelerator(cpu=True), micro=4).state_dict()
    seed_everything(0)
    init = GPT(
        TransformerConfig(**{**_setup()[1].__dict__, "dropout": 0.0})
    ).state_dict()  # the same initialisation
    for k, v in one.items():
        assert torch.allclose(v, two[k], atol=1e-5), f"{k} differs by {(v - two[k]).abs().max():.2e}"
    assert max((two[k] - init[k]).abs().max() for k in two) > 1e-3  # the parameters did train


def test_run_settings_build_the_train_config_a_family_states():
    import dataclasses

    from pretrain_nb.training import RunResult, RunSettings, TrainConfig, history_columns

    @dataclasses.dataclass
    class Sweep(RunSettings):
        width: int = 8
        steps: int = 200
        lr: float = 1e-3

    cfg = Sweep().train_config(seed=5)
    expected = TrainConfig(
        steps=200,
        batch_size=32,
        lr=1e-3,
        weight_decay=0.1,
        schedule="cosine",
        warmup_steps=20,
        eval_every=20,
        seed=5,
        progress=False,
    )
    assert cfg == expected
    assert Sweep(warmup_steps=0, eval_every=7).train_config(0, shuffle=False).shuffle is False
    assert Sweep(steps=5).train_config(0).warmup_steps == 1  # at least one warmup step
    assert Sweep.from_settings({"width": 4, "steps": 10}) == Sweep(width=4, steps=10)
    with pytest.raises(PretrainNbError, match="valid Sweep settings are: .*width"):
        Sweep.from_settings({"widht": 4})
    history = __import__("pandas").DataFrame({"step": [1, 2], "train_loss": [0.5, 0.4], "lr": [1.0, 0.5]})
    result = RunResult(Sweep(), 0, history_columns(history, "step", "train_loss"))
    assert result.history == {"step": [1, 2], "train_loss": [0.5, 0.4]} and result.run.width == 8
