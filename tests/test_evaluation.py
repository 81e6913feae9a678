"""Probes, fine-tuning, perplexity, power-law fits (pretrain_nb.evaluation) on problems whose answer is
known."""

import numpy as np
import pytest
import torch
from torch import nn

from pretrain_nb.core import PretrainNbError
from pretrain_nb.evaluation import (
    AttentiveProbe,
    attentive_probe,
    extract_features,
    finetune,
    fit_power_law,
    knn_probe,
    label_subset,
    linear_probe,
    mean_std,
    perplexity,
)


def _blobs(n=600, d=16, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, d, generator=g) * 4
    y = torch.arange(n) % 3
    return centres[y] + noise * torch.randn(n, d, generator=g), y


def test_probes_solve_separable_blobs():
    x, y = _blobs()
    assert linear_probe(x[:400], y[:400], x[400:], y[400:]) > 0.97
    assert knn_probe(x[:400], y[:400], x[400:], y[400:], k=10) > 0.97
    tokens = x[:, None, :] + torch.randn(600, 8, 16, generator=torch.Generator().manual_seed(1))
    assert attentive_probe(tokens[:400], y[:400], tokens[400:], y[400:], steps=150) > 0.95


def test_probes_are_at_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(900, 16, generator=g), torch.randint(3, (900,), generator=g)
    assert linear_probe(x[:600], y[:600], x[600:], y[600:]) < 0.45
    assert knn_probe(x[:600], y[:600], x[600:], y[600:]) < 0.45


def test_attentive_probe_finds_the_informative_token():
    """One token of 8 carries the label and a marker; averaging the tokens drowns it, attention can pick it
    out."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (1000,), generator=g)
    tokens = 3 * torch.randn(1000, 8, 16, generator=g)
    where = torch.randint(8, (1000,), generator=g)  # a different position in each example
    rows = torch.arange(1000)
    tokens[rows, where, 0] = 4.0 * (2 * y - 1)
    tokens[rows, where, 1] = 12.0  # the marker that says "read me"
    mean_acc = linear_probe(tokens[:800].mean(1), y[:800], tokens[800:].mean(1), y[800:])
    att_acc = attentive_probe(tokens[:800], y[:800], tokens[800:], y[800:], steps=300)
    assert mean_acc < 0.8 and att_acc > 0.95, (mean_acc, att_acc)
    assert AttentiveProbe(16, 2, n_queries=3, n_heads=4)(tokens[:5]).shape == (5, 2)


def test_knn_rejects_bad_k():
    x, y = _blobs(30)
    with pytest.raises(PretrainNbError, match="at least 1"):
        knn_probe(x, y, x, y, k=0)


def test_label_subset_is_stratified():
    y = torch.arange(1000) % 10
    idx = label_subset(y, 0.1, seed=0)
    assert len(idx) == 100 and torch.bincount(y[idx]).tolist() == [10] * 10
    assert torch.equal(idx, label_subset(y, 0.1, seed=0)) and not torch.equal(
        idx, label_subset(y, 0.1, seed=1)
    )
    assert torch.bincount(y[label_subset(y, 0.001)]).tolist() == [1] * 10  # at least one per class
    with pytest.raises(PretrainNbError, match=r"in \(0, 1\]"):
        label_subset(y, 0)


def test_finetune_learns():
    x, y = _blobs(600, noise=2.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    assert finetune(model, x[:400], y[:400], x[400:], y[400:], fraction=0.5, steps=150, lr=1e-2) > 0.9


class _Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab) + self.w


def test_perplexity_of_a_uniform_model_is_the_vocabulary():
    assert abs(perplexity(_Uniform(50), torch.randint(50, (10, 9))) - 50) < 1e-3


def test_extract_features_batches_and_restores_mode():
    lin = nn.Linear(4, 2)
    lin.train()
    x = torch.randn(10, 4)
    assert torch.allclose(extract_features(lin, x, batch_size=3), lin(x).detach())
    assert lin.training


def test_mean_std():
    assert mean_std([1, 2, 3]) == (2.0, 1.0) and mean_std([5]) == (5.0, 0.0)


def test_extract_features_puts_the_module_behind_a_method_in_eval_mode():
    net = nn.Sequential(nn.Dropout(0.9), nn.Linear(4, 2))
    net.train()
    x = torch.ones(50, 4)
    a, b = extract_features(net.forward, x), extract_features(net.forward, x)
    assert torch.equal(a, b), "dropout was active: the module behind the method was not put in eval mode"
    assert net.training


def test_fit_power_law_recovers_known_parameters():
    x = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    f = fit_power_law(x, 2.0 + 50.0 * x**-0.5)
    assert f.asymptote == pytest.approx(2.0, abs=2e-3) and f.exponent == pytest.approx(0.5, rel=0.01)
    assert f.scale == pytest.approx(50.0, rel=0.05) and f.r2 > 0.9999
    k = np.arange(1, 7.0)
    f = fit_power_law(k, 3.1 + 0.4 * k**-1.2 + np.random.default_rng(0).normal(0, 0.002, k.size))
    assert f.asymptote == pytest.approx(3.1, abs=0.02) and f.exponent == pytest.approx(1.2, rel=0.2)
    assert np.allclose(f(k), 3.1 + 0.4 * k**-1.2, atol=0.01)
    straight = fit_power_law(
        [1, 2, 3, 4], 3.0 - 0.01 * np.log([1, 2, 3, 4])
    )  # no curvature: the grid's end decides the asymptote
    assert not straight.identified and straight.exponent == pytest.approx(0.05)
    assert fit_power_law(k, 3.1 + 0.4 * k**-1.2).identified
    flat = fit_power_law(
        [1, 2, 3, 4], [2.0, 2.1, 2.05, 2.2]
    )  # rising data: the best non-increasing law is a constant
    assert flat.scale == 0.0 and flat.asymptote == pytest.approx(2.0875) and flat.identified
    with pytest.raises(PretrainNbError, match="at least 3 points"):
        fit_power_law([1, 2], [3, 2])
    with pytest.raises(PretrainNbError, match="positive x"):
        fit_power_law([0, 1, 2], [3, 2, 1])


def test_the_image_recipe_holds_what_the_image_families_share():
    from pretrain_nb.evaluation import ImagePretraining

    recipe = ImagePretraining(steps=200)
    cfg = recipe.train_config(seed=1)
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.eval_every, cfg.warmup_steps) == (
        128,
        2e-3,
        0.05,
        10,
        20,
    )
    assert (recipe.mask_ratio, recipe.finetune_lr, recipe.patch_size, recipe.n_layers) == (0.75, 2e-3, 7, 4)
    assert recipe.vit(28, 1)(torch.rand(2, 1, 28, 28)).shape == (2, 17, 64)
