"""The continual pre-training notebook's pieces (pretrain_nb.continual): schedules, replay, quality,
averaging, one phase and its result."""

import numpy as np
import pytest
import torch

from pretrain_nb.continual import (
    PHASE_SCHEDULES,
    PhaseRun,
    annealed,
    average_states,
    infinite_schedule,
    noise_graded,
    phase_blocks,
    repeated_cosine,
    replay_mix,
    rewarm_cosine,
    train_phase,
)
from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.training import RunResult, batch_indices, warmup_cosine


def test_rewarm_cosine_breakpoints_and_continuity():
    s = rewarm_cosine(total=100, warmup=10, peak=0.5, start=0.1, floor=0.2)
    # linear from the old rate to the peak
    assert s(0) == pytest.approx(0.1 + 0.4 / 10) and s(9) == pytest.approx(0.5)
    # cosine from the peak to floor * peak
    assert s(10) == pytest.approx(0.5) and s(99) == pytest.approx(0.2 * 0.5)
    values = np.array([s(t) for t in range(100)])
    assert np.all(np.diff(values[:10]) > 0) and np.all(np.diff(values[10:]) <= 1e-12)
    assert np.abs(np.diff(values)).max() < 0.05  # no jumps
    with pytest.raises(PretrainNbError, match="warmup must be"):
        rewarm_cosine(10, 10)


def test_repeated_cosine_restarts_every_phase():
    s = repeated_cosine([50, 30, 30], warmup=5, floor=0.1)
    first = warmup_cosine(5, 50, 0.1)
    assert all(s(t) == pytest.approx(first(t)) for t in range(50))
    for start, length in ((50, 30), (80, 30)):
        assert s(start - 1) == pytest.approx(0.1)  # the previous phase ended decayed
        assert s(start) == pytest.approx(1 / 5)  # and the next one warms up again from scratch
        assert s(start + length - 1) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # past the last phase: its final value


def test_infinite_schedule_and_annealed():
    s = infinite_schedule(warmup=10, cooldown=40, level=0.4)
    assert s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0) and s(50) == pytest.approx(0.4)
    assert all(s(t) == pytest.approx(0.4) for t in (60, 1000, 10**6))  # constant for ever
    # the warmup's own increments are the largest steps
    assert max(abs(s(t + 1) - s(t)) for t in range(200)) <= 0.1 + 1e-9
    a = annealed(s, start=100, steps=20, floor=0.0)
    assert all(a(t) == s(t) for t in range(100))
    assert a(100) == pytest.approx(0.4 * (1 - 1 / 20)) and a(119) == pytest.approx(0.0) and a(500) == 0.0
    with pytest.raises(PretrainNbError, match="at least 1 step"):
        annealed(s, 10, 0)


def test_replay_mix_gives_the_ratio_exactly_and_spreads_it_over_batches():
    new, old = torch.zeros(5000, 3, dtype=torch.long), torch.ones(5000, 3, dtype=torch.long)
    blocks, is_old = replay_mix(new, old, n=3200, ratio=0.2, seed=1)
    assert len(blocks) == 3200 and int(is_old.sum()) == 640 and torch.equal(blocks[:, 0].bool(), is_old)
    # the share of old blocks in each batch of one epoch
    shares = torch.stack([is_old[batch_indices(s, 3200, 32, seed=0)].float().mean() for s in range(100)])
    # over an epoch the batches hold exactly the ratio; within a batch it varies like sampling
    # without replacement
    assert shares.mean().item() == pytest.approx(0.2, abs=1e-6)
    assert 0.04 < shares.std().item() < 0.1
    assert shares.max() < 0.5
    assert int(replay_mix(new, old, 100, 0.0)[1].sum()) == 0
    with pytest.raises(PretrainNbError, match=r"in \[0, 1\)"):
        replay_mix(new, old, 10, 1.0)
    with pytest.raises(PretrainNbError, match="need 2000 new and 8000 old blocks"):
        replay_mix(new, old, 10000, 0.8)


def test_noise_graded_changes_tokens_in_proportion_to_the_level():
    clean = torch.zeros(200, 2000, dtype=torch.long)
    noisy, level = noise_graded(clean, max_noise=0.5, vocab_size=100, seed=3)
    changed = (noisy != 0).float().mean(1)
    expected = 0.5 * level * (1 - 1 / 100)  # a random token equals the original one time in 100
    # binomial spread: sd about 0.01 per block
    assert torch.allclose(changed, expected, atol=0.05)
    assert level.min() >= 0 and level.max() <= 1
    assert torch.equal(noisy, noise_graded(clean, 0.5, 100, seed=3)[0])
    assert not torch.equal(noisy, noise_graded(clean, 0.5, 100, seed=4)[0])
    assert torch.equal(noise_graded(clean, 0.0, 100)[0], clean)
    with pytest.raises(PretrainNbError, match=r"max_noise must be in \[0, 1\]"):
        noise_graded(clean, 1.5, 100)


def test_average_states():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor(7)}
    avg = average_states([a, b])
    assert avg["w"].tolist() == [1.0, 3.0] and avg["n"].item() == 7  # integer buffers from the last state
    assert torch.equal(average_states([a])["w"], a["w"])
    with pytest.raises(PretrainNbError, match="at least one"):
        average_states([])


def fake_data(n_new: int = 3000, vocab: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "A": {"train": torch.randint(0, vocab, (500, 8), generator=g)},
        "B": {"train": torch.randint(0, vocab, (n_new, 8), generator=g)},
        "C": {"train": torch.randint(0, vocab, (500, 8), generator=g)},
        "vocab_size": vocab,
    }


def test_phase_blocks_subsets_quality_and_order():
    data = fake_data()
    full, shuffle = phase_blocks(PhaseRun(steps=10, batch_size=16), data, seed=0)
    assert full.shape == (160, 8) and shuffle
    # the seed picks the pool
    assert not torch.equal(full, phase_blocks(PhaseRun(steps=10, batch_size=16), data, seed=1)[0])
    subset, _ = phase_blocks(PhaseRun(steps=10, batch_size=16, subset_epochs=4), data, seed=0)
    assert torch.equal(subset, full[:40])  # a random quarter of the same pool
    noisy, level = noise_graded(full, 0.5, 16, seed=0)
    graded, _ = phase_blocks(PhaseRun(steps=10, batch_size=16, max_noise=0.5), data, seed=0)
    assert torch.equal(graded, noisy)  # the same noise in every arm of a seed
    top, _ = phase_blocks(
        PhaseRun(steps=10, batch_size=16, max_noise=0.5, subset_epochs=4, quality="top"), data, seed=0
    )
    # the cleanest quarter
    assert sorted(map(tuple, top.tolist())) == sorted(map(tuple, noisy[level.argsort()[:40]].tolist()))
    ascending, shuffle = phase_blocks(
        PhaseRun(steps=10, batch_size=16, max_noise=0.5, quality="ascending"), data, seed=0
    )
    # noisiest first, in order
    assert not shuffle and torch.equal(ascending, noisy[level.argsort(descending=True)])
    mixed, _ = phase_blocks(PhaseRun(steps=10, batch_size=16, replay=0.25), data, seed=0)
    in_a = {tuple(r) for r in data["A"]["train"].tolist()}
    assert sum(tuple(r) in in_a for r in mixed.tolist()) == 40
    with pytest.raises(PretrainNbError, match="valid domains are: A, B, C"):
        phase_blocks(PhaseRun(domain="D"), data, 0)
    with pytest.raises(PretrainNbError, match="subset_epochs \\(3\\) must divide"):
        phase_blocks(PhaseRun(steps=10, batch_size=16, subset_epochs=3), data, 0)
    with pytest.raises(PretrainNbError, match="need a mixed-quality pool"):
        phase_blocks(PhaseRun(steps=10, batch_size=16, quality="top"), data, 0)


TINY = dict(n_layers=1, d_model=16, steps=12, batch_size=8, eval_every=4, n_val_blocks=16, warmup_steps=2)


def test_train_phase_branch_is_an_exact_resume_and_the_main_trajectory_runs_every_step():
    profile = load_profile("smoke")
    settings = TINY | dict(schedule="infinite", level=0.5, anneal_steps=4)
    straight = train_phase(seed=0, profile=profile, **settings)
    branched = train_phase(seed=0, profile=profile, branch_at=8, **settings)
    assert straight.final == branched.final and straight.history == branched.history
    assert all(torch.equal(straight.weights[k], branched.weights[k]) for k in straight.weights)
    # the main trajectory is the phase run to its last step without the anneal: the same tokens as the copy
    unannealed = train_phase(seed=0, profile=profile, **(settings | dict(anneal_steps=0)))
    assert all(torch.equal(unannealed.weights[k], branched.main_weights[k]) for k in unannealed.weights)
    assert not all(torch.equal(branched.main_weights[k], branched.weights[k]) for k in branched.weights)
    assert straight.main_weights is None and straight.final_averaged is None
    assert branched.lr[7] == pytest.approx(0.5 * 3e-3) and branched.lr[-1] == pytest.approx(0.0)
    assert straight.history["step"] == [0, 4, 8, 12]  # the loss before training is the first point
    assert isinstance(straight, RunResult) and straight.run == PhaseRun(**settings) and straight.seed == 0


def test_train_phase_continues_from_weights_and_averages():
    profile = load_profile("smoke")
    first = train_phase(seed=0, profile=profile, domain="A", schedule="rewarm", start=0.0, **TINY)
    cont = train_phase(
        seed=0, profile=profile, init_weights=first.weights, average_last=2, domain="B", **TINY
    )
    # starts where A ended
    assert cont.history["loss_A"][0] == pytest.approx(first.final["loss_A"], rel=1e-6)
    assert set(cont.final_averaged) == {"loss_A", "loss_B", "loss_C"} and cont.final_averaged != cont.final
    with pytest.raises(PretrainNbError, match="Unknown PhaseRun setting 'domian'"):
        train_phase(seed=0, profile=profile, domian="B", **TINY)


def test_phase_schedules_are_registered_once_and_reach_the_loop():
    # every name a phase can give builds a schedule function, which train_config hands to the shared loop
    for name in PHASE_SCHEDULES:
        run = PhaseRun(schedule=name, steps=40, warmup_steps=4, anneal_steps=8)
        multiplier = run.train_config(seed=0).lr_schedule()
        assert all(multiplier(t) == run.schedule_fn()(t) for t in range(40))
    assert PhaseRun().train_config(seed=0).lr_schedule()(PhaseRun.warmup_steps - 1) == pytest.approx(1.0)
    # a change given to train_config still wins
    assert PhaseRun().train_config(seed=0, schedule="constant").schedule == "constant"
    with pytest.raises(PretrainNbError, match="valid schedules are: constant, infinite, rewarm"):
        PhaseRun(schedule="cosine").train_config(seed=0)
