"""PEFT and continual learning (pretrain_nb.peft_continual): each test checks a property of the method that a
wrong implementation would break."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.models import TransformerConfig, ViT
from pretrain_nb.peft_continual import (
    LoRA,
    SVFit,
    AdaptationRun,
    ScaledBranch,
    SeenClasses,
    adapter_parameters,
    align_classifier,
    class_stream,
    finetune_stream,
    nmc_matrix,
    peft_model,
    peft_splits,
    predict,
    run_adaptation,
    train_classifier,
)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return ViT(TransformerConfig(d_model=16, n_layers=2, n_heads=2), image_size=8, patch_size=4)


@pytest.fixture
def images():
    return torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_lora_starts_as_the_frozen_layer_and_trains_only_its_factors():
    torch.manual_seed(0)
    base = nn.Linear(6, 9, bias=False)
    x = torch.randn(4, 6)
    lora = LoRA(base, rank=3, rows=[slice(0, 3), slice(6, 9)])
    assert torch.equal(lora(x), base(x))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * 3 * (6 + 3)
    with torch.no_grad():
        lora.B[0].normal_()
    out = lora(x)
    assert not torch.allclose(out[:, :3], base(x)[:, :3])
    assert torch.equal(out[:, 3:], base(x)[:, 3:])  # rows outside the blocks are untouched
    out.sum().backward()
    assert base.weight.grad is None


def test_svfit_starts_exactly_and_moves_only_singular_values():
    torch.manual_seed(0)
    base = nn.Linear(5, 10, bias=False)
    x = torch.randn(7, 5)
    svfit = SVFit(base, rank=2)
    assert torch.equal(svfit(x), base(x))
    assert sum(p.numel() for p in svfit.parameters() if p.requires_grad) == 2
    full = SVFit(base, rank=None)
    with torch.no_grad():
        full.s[0].mul_(3.0)  # every singular value tripled: the whole map tripled
    assert torch.allclose(full(x), 3 * base(x), atol=1e-5)
    full(x).sum().backward()
    assert base.weight.grad is None and full.s[0].grad is not None


def test_scaled_branch_starts_at_one():
    branch = ScaledBranch(nn.Linear(3, 3))
    x = torch.randn(2, 3)
    assert torch.equal(branch(x), branch.branch(x)) and branch.gamma.item() == 1.0


@pytest.mark.parametrize("method,rank", [("probe", None), ("full", None), ("lora", 4), ("svfit-qv", None),
                                         ("svfit", 2), ("difffit", None)])  # fmt: skip
def test_each_method_starts_as_the_frozen_encoder_and_trains_what_it_says(vit, images, method, rank):
    reference = vit.eval()(images)
    model, groups = peft_model(vit, method, 3, rank)
    assert torch.equal(model.encoder.eval()(images), reference)
    grouped = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert grouped == trainable  # the optimizer sees exactly the trainable parameters
    F.cross_entropy(model(images), torch.arange(8) % 3).backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == trainable  # every trainable parameter, and nothing frozen, gets a gradient
    assert all(p.grad is None for p in vit.parameters())  # the encoder passed in is never touched


def test_parameter_counts_match_their_formulas(vit):
    d, L = 16, 2
    count = lambda m, r=None: adapter_parameters(peft_model(vit, m, 3, r)[0])
    assert count("probe") == 0
    assert count("lora", 8) == L * 2 * 8 * (d + d)
    assert count("svfit-qv") == L * 2 * d and count("lora", 8) == 16 * count("svfit-qv")
    assert count("svfit", 2) == L * 6 * 2
    gammas = 2 * L
    norms = sum(p.numel() for n, p in vit.named_parameters() if ".ln" in n)
    assert count("difffit") == gammas + norms + vit.patch_embed.bias.numel()
    model, groups = peft_model(vit, "difffit", 3)
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0] and len(groups[1]["params"]) == gammas
    with pytest.raises(PretrainNbError, match="probe"):
        peft_model(vit, "bitfit", 3)


def test_training_leaves_frozen_weights_alone(vit, images):
    labels = torch.arange(8) % 2
    model, groups = peft_model(vit, "svfit-qv", 2)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_classifier(model, groups, (images, labels), epochs=20, lr=1e-2, batch_size=8, seed=0)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert (predict(model, images) == labels).float().mean() > 0.5


def test_downstream_tasks():
    digits = peft_splits("digits", 30, 10, 10)
    assert digits["train"][0].shape == (30, 1, 28, 28) and digits["train"][0].max() <= 1
    assert set(digits["train"][1].tolist()) <= set(range(10))
    with pytest.raises(PretrainNbError, match="fewer than"):
        peft_splits("digits", 5000, 10, 10)
    with pytest.raises(PretrainNbError, match="digits"):
        peft_splits("cifar", 10, 10, 10)


def test_class_stream_splits_the_classes_in_order():
    stream = class_stream(5, 4, 2)
    assert [t["classes"] for t in stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for t in stream:
        assert set(t["train"][1].tolist()) == set(t["classes"]) and len(t["test"][0]) == 4
    with pytest.raises(PretrainNbError, match="equal tasks"):
        class_stream(3, 4, 2)


def _two_tasks(images):
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    return [
        {"classes": [0], "train": (images[:4], zeros), "test": (images[:4], zeros)},
        {"classes": [1], "train": (images[4:], ones), "test": (images[4:], ones)},
    ]


def test_nmc_cannot_forget(vit, images):
    acc = nmc_matrix(vit, _two_tasks(images))
    assert acc[0, 0] == 1.0 and np.isnan(acc[0, 1])  # one class seen: always right; task 1 not yet tested
    # a frozen encoder: task 0's accuracy after task 1 depends only on the two means, not on training order
    again = nmc_matrix(vit, _two_tasks(images))
    assert np.array_equal(np.nan_to_num(acc), np.nan_to_num(again))


def test_classifier_alignment_separates_sampled_classes():
    head = nn.Linear(2, 4)
    stats = {
        1: (torch.tensor([2.0, 2.0]), 0.05 * torch.eye(2)),
        3: (torch.tensor([-2.0, -2.0]), 0.05 * torch.eye(2)),
    }
    align_classifier(head, stats, samples=64, steps=60, lr=0.1, seed=0)
    masked = SeenClasses(head, [1, 3], 4)
    assert masked(torch.tensor([[2.0, 2.0], [-2.0, -2.0]])).argmax(1).tolist() == [1, 3]


def test_a_learning_rate_of_zero_freezes_the_encoder(vit, images):
    before = {n: p.clone() for n, p in vit.named_parameters()}
    acc, rep = finetune_stream(vit, _two_tasks(images), lr=1e-2, backbone_scale=0.0, epochs=3, batch_size=4)
    assert rep == nmc_matrix(vit, _two_tasks(images))[1].mean()  # a frozen encoder keeps NMC's representation
    assert acc.shape == (2, 2) and np.isnan(acc[0, 1]) and np.isfinite(acc[1]).all()
    assert all(torch.equal(p, before[n]) for n, p in vit.named_parameters())  # a copy was trained


TINY = AdaptationRun(d_model=16, n_layers=2, n_heads=2, n_train=30, n_val=10, n_test=10, peft_epochs=1,
                     batch_size=10, lrs=(1e-3, 1e-2), full_lrs=(1e-4, 1e-3),
                     configs=(("probe", None), ("lora", 2)),
                     per_class_train=6, per_class_test=3, align_samples=8, align_steps=3)  # fmt: skip


def test_run_adaptation_repeats_exactly():
    with torch.random.fork_rng():
        torch.manual_seed(5)
        state = TINY.encoder().state_dict()
    a, b = (run_adaptation(0, load_profile("smoke"), state, **dataclasses.asdict(TINY)) for _ in range(2))
    assert [r["test"] for r in a.peft] == [r["test"] for r in b.peft]
    assert all(np.array_equal(a.continual[m], b.continual[m], equal_nan=True) for m in a.continual)
    assert {r["method"] for r in a.peft} == {"probe", "lora"} and a.peft[0]["lr"] in TINY.lrs


def test_settings_refuse_unknown_methods():
    with pytest.raises(PretrainNbError, match="PEFT method"):
        AdaptationRun(configs=(("bitfit", None),))
