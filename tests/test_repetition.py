"""The repetition notebook's pieces (pretrain_nb.repetition): the unique-budget sampler, ensembles,
distillation, one run and its result."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.models import GPT, TransformerConfig, causal_lm_loss, lm_loss
from pretrain_nb.repetition import (
    RepetitionRun,
    distillation_loss,
    ensemble_log_probs,
    ensemble_loss,
    sample_order,
    train_on_repeats,
    unique_budget,
)
from pretrain_nb.training import RunResult, TrainConfig, train


def test_unique_budget_size_nesting_and_errors():
    blocks = torch.arange(1000).unsqueeze(1)
    b2 = unique_budget(blocks, steps=40, batch_size=10, epochs=2, seed=3)
    b8 = unique_budget(blocks, steps=40, batch_size=10, epochs=8, seed=3)
    assert len(b2) == 200 and len(b8) == 50 and len(set(b2.flatten().tolist())) == 200  # distinct blocks
    # smaller budgets are nested in larger ones
    assert set(b8.flatten().tolist()) <= set(b2.flatten().tolist())
    # the seed picks the blocks
    assert not torch.equal(b8, unique_budget(blocks, steps=40, batch_size=10, epochs=8, seed=4))
    with pytest.raises(
        PretrainNbError,
        match=r"divides steps x batch_size = 400 \(up to 64: 1, 2, 4, 5, 8, 10, 16, 20, 25, 40, 50\), not 3",
    ):
        unique_budget(blocks, 40, 10, epochs=3)
    with pytest.raises(
        PretrainNbError, match="need 4000 distinct blocks but the corpus has 1000; use at least 4 epochs"
    ):
        unique_budget(blocks, 400, 10, epochs=1)


def test_sample_order_repeats_each_block_once_per_epoch():
    n, steps, bs, epochs = 24, 18, 4, 3
    order = sample_order(n, steps, bs, seed=1)
    assert order.shape == (steps, bs) and int(order.max()) < n
    per_epoch = order.flatten().view(epochs, n)
    for e in range(epochs):
        assert sorted(per_epoch[e].tolist()) == list(range(n))
    assert not torch.equal(per_epoch[0], per_epoch[1])  # a new permutation each epoch


def test_training_loop_sees_exactly_the_budget_epochs_times():
    corpus = torch.randint(0, 20, (500, 9))
    budget = unique_budget(corpus, steps=15, batch_size=8, epochs=5, seed=0)  # 24 blocks, 5 epochs
    seen = []

    def recording_loss(model, batch):
        seen.append(batch.clone())
        return lm_loss(model, batch)

    model = GPT(TransformerConfig(vocab_size=20, block_size=9, d_model=8, n_layers=1, n_heads=2))
    train(model, recording_loss, budget, TrainConfig(steps=15, batch_size=8, eval_every=15, progress=False))
    rows = torch.cat(seen)
    corpus_rows = {tuple(r) for r in corpus.tolist()}
    budget_rows = [tuple(r) for r in budget.tolist()]
    assert all(tuple(r) in set(budget_rows) for r in rows.tolist())  # nothing from outside the budget
    counts = {r: 0 for r in budget_rows}
    for r in rows.tolist():
        counts[tuple(r)] += 1
    assert set(counts.values()) == {5} and set(budget_rows) <= corpus_rows


def test_ensemble_is_the_renormalized_mean_log_probability():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=11, block_size=7, d_model=8, n_layers=1, n_heads=2)
    models = [GPT(cfg) for _ in range(3)]
    for m in models:  # make the members disagree more than their near-uniform initialisation does
        for p in m.parameters():
            p.data.mul_(20)
    idx = torch.randint(0, 11, (4, 7))
    with torch.no_grad():
        log_p = ensemble_log_probs(models, idx)
        logits = torch.stack([m(idx) for m in models])
    assert torch.allclose(log_p, F.log_softmax(logits.mean(0), -1), atol=1e-5)  # = softmax of the mean logit
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(4, 7), atol=1e-5)
    probability_mean = torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(3)
    assert not torch.allclose(log_p, probability_mean, atol=1e-3)  # not a mixture of the distributions
    with torch.no_grad():
        assert ensemble_loss(models[:1], idx) == pytest.approx(
            causal_lm_loss(models[0](idx), idx).item(), rel=1e-5
        )
    member_mean = np.mean([ensemble_loss([m], idx) for m in models])
    # never above the mean member; strictly below when they disagree
    assert ensemble_loss(models, idx) < member_mean


def test_distillation_loss():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=9, block_size=6, d_model=8, n_layers=1, n_heads=2)
    student, teacher = GPT(cfg), GPT(cfg)
    idx = torch.randint(0, 9, (3, 6))
    with torch.no_grad():
        own = ensemble_log_probs([student], idx)
        other = ensemble_log_probs([teacher], idx)
        assert distillation_loss(student, (idx, own)).item() == pytest.approx(0.0, abs=1e-6)
        assert distillation_loss(student, (idx, other)).item() > 1e-4
        assert distillation_loss(student, (idx, other), weight=0.0).item() == pytest.approx(
            lm_loss(student, idx).item(), rel=1e-5
        )
        kl = (
            F.kl_div(
                F.log_softmax(student(idx)[:, :-1], -1), other[:, :-1], log_target=True, reduction="none"
            )
            .sum(-1)
            .mean()
        )
        assert distillation_loss(student, (idx, other)).item() == pytest.approx(kl.item(), rel=1e-5)


TINY = dict(n_layers=1, d_model=16, steps=16, batch_size=8, eval_every=8, n_val_blocks=16, warmup_steps=2)


def test_run_is_deterministic_counts_epochs_and_rejects_unknown_settings():
    profile = load_profile("smoke")
    a = train_on_repeats(seed=0, profile=profile, keep_weights=True, epochs=4, **TINY)
    b = train_on_repeats(seed=0, profile=profile, epochs=4, **TINY)
    assert a.final_loss == b.final_loss and a.history == b.history
    assert a.n_unique_blocks == 32 and a.history["epochs_seen"][-1] == 4.0
    assert a.rise == pytest.approx(a.final_loss - a.best_loss)
    assert a.weights is not None and b.weights is None
    assert isinstance(a, RunResult) and a.run == RepetitionRun(**TINY, epochs=4) and a.seed == 0
    c = train_on_repeats(seed=0, profile=profile, epochs=4, weight_decay=3.0, **TINY)
    assert c.final_loss != a.final_loss and c.run.weight_decay == 3.0
    with pytest.raises(
        PretrainNbError,
        match="Unknown RepetitionRun setting 'epoch'; valid RepetitionRun settings are: batch_size",
    ):
        train_on_repeats(seed=0, profile=profile, epoch=4, **TINY)


def test_distillation_run_moves_the_student_towards_its_teachers():
    profile = load_profile("smoke")
    teachers = [
        train_on_repeats(seed=s, profile=profile, keep_weights=True, epochs=2, **TINY).weights for s in (0, 1)
    ]
    student = train_on_repeats(seed=5, profile=profile, teachers=teachers, epochs=2, **TINY)
    plain = train_on_repeats(seed=5, profile=profile, epochs=2, **TINY)
    assert math.isfinite(student.final_loss) and student.final_loss != plain.final_loss
    # the KL to the teachers falls
    assert student.history["train_loss"][-1] < student.history["train_loss"][0]
