"""Masked image modeling (pretrain_nb.mim_mae): MAE, MR-MAE's mimic loss, EP, and one run of each kind.
Masking, positions and the encoder are pretrain_nb.models' blocks (tests/test_models.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.evaluation import attentive_probe
from pretrain_nb.mim_mae import (
    MAE,
    EfficientProbe,
    EncoderEvaluation,
    MAEResult,
    MAERun,
    MeanPoolProbe,
    evaluate_encoder,
    mae_step_loss,
    masked_patch_loss,
    masked_share,
    mimic_loss,
    normalize_patches,
    pretrain_mae,
    pretraining_flops,
)
from pretrain_nb.models import TransformerConfig, ViT, flops_per_token, patchify, random_masking, unpatchify

CFG = TransformerConfig(d_model=32, n_layers=2, n_heads=4)
DEC = TransformerConfig(d_model=16, n_layers=1, n_heads=2)


def test_masked_patch_loss_ignores_visible_patches_and_matches_the_formula():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 16, 49), torch.randn(3, 16, 49)
    _, mask, _ = random_masking(3, 16, 0.75)
    expected = torch.stack(
        [((pred[b, i] - target[b, i]) ** 2).mean() for b in range(3) for i in range(16) if mask[b, i]]
    ).mean()
    assert torch.allclose(masked_patch_loss(pred, target, mask), expected, atol=1e-6)
    assert torch.allclose(
        masked_patch_loss(torch.where(mask[..., None], pred, pred + 10), target, mask), expected, atol=1e-6
    )


def test_mae_encoder_never_sees_the_masked_patches():
    torch.manual_seed(0)
    model = MAE(CFG, DEC).eval()
    x = torch.rand(4, 1, 28, 28)
    torch.manual_seed(1)
    pred, mask, latent, keep = model(x, 0.75)
    assert latent.shape == (4, 1 + 4, 32)
    assert pred.shape == (4, 16, 49)
    noisy = patchify(x, 7).clone()
    noisy[mask] = torch.rand_like(noisy[mask])  # change only the masked patches
    torch.manual_seed(1)
    pred2, mask2, latent2, _ = model(unpatchify(noisy, 7, 1, 28, 28), 0.75)
    assert torch.equal(mask, mask2)
    assert torch.allclose(latent, latent2)
    assert torch.allclose(pred, pred2)


def test_normalized_targets_have_zero_mean_and_unit_variance_per_patch_as_in_maes_code():
    x = torch.rand(3, 16, 49) * 5 + 2
    p = normalize_patches(x)
    assert torch.allclose(p.mean(-1), torch.zeros(3, 16), atol=1e-5)
    # MAE's forward_loss: (target - mean) / (var + 1e-6) ** 0.5 with torch's default, unbiased, var
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
    assert torch.allclose(p, (x - mean) / (var + 1.0e-6) ** 0.5, atol=1e-6)
    assert torch.allclose(p.var(-1, unbiased=True), torch.ones(3, 16), atol=1e-3)


def test_masked_share_is_the_share_that_random_masking_hides():
    for n in (16, 49, 64):
        for ratio in (0.25, 0.5, 0.75, 0.875, 0.9):
            _, mask, _ = random_masking(4, n, ratio)
            assert mask.float().mean().item() == pytest.approx(masked_share(ratio, n))
    assert masked_share(0.9, 16) == 0.875  # the arm once labelled 0.9 hid 14 of 16 patches
    assert masked_share(0.75, 49) == 37 / 49


def test_pretraining_flops_follow_the_visible_patches_and_count_the_teacher():
    run = MAERun()
    # fewer visible patches, cheaper steps; a finer grid, dearer ones; a teacher's forward pass adds to each
    assert (
        pretraining_flops(MAERun(mask_ratio=0.25))
        > pretraining_flops(run)
        > pretraining_flops(MAERun(mask_ratio=0.875))
    )
    assert pretraining_flops(MAERun(patch_size=4)) > 2 * pretraining_flops(run)
    extra = pretraining_flops(run, teacher=True) - pretraining_flops(run)
    # the teacher's forward pass (a third of a training pass) over all 16 patches and the class token
    teacher_forward = 17 * flops_per_token(run.transformer_config(), 17, out_features=0, in_features=49) / 3
    assert extra == pytest.approx(teacher_forward + 6 * 4 * 64 * 64)


def test_mr_mae_loss_adds_the_mimic_term_and_leaves_the_teacher_frozen():
    torch.manual_seed(0)
    teacher = ViT(CFG, positions="sincos")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = MAE(CFG, DEC, mimic_dim=32)
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(3)
    plain = mae_step_loss(0.75)(student, x)
    torch.manual_seed(3)
    mixed = mae_step_loss(0.75, teacher=teacher, mimic_weight=1.0)(student, x)
    assert mixed > plain
    mixed.backward()
    assert student.mimic_head.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    t = torch.randn(2, 5, 32)
    assert mimic_loss(F.layer_norm(t, (32,)), t).item() < 1e-10
    assert mimic_loss(t, t) > 0


def test_efficient_probe_attention_is_a_distribution_and_finds_a_needle():
    probe = EfficientProbe(16, 2, n_queries=2)
    a = probe.attention(torch.randn(5, 8, 16))
    assert a.shape == (5, 2, 8)
    assert torch.allclose(a.sum(-1), torch.ones(5, 2))
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randn(600, 8, 16, generator=g), torch.randint(0, 2, (600,), generator=g)
    where = torch.randint(0, 8, (600,), generator=g)
    tokens[torch.arange(600), where, 0] = 4.0 * (2 * y - 1)
    tokens[torch.arange(600), where, 1] = 6.0
    assert (
        attentive_probe(
            tokens[:400], y[:400], tokens[400:], y[400:], steps=300, probe=EfficientProbe(16, 2, 2)
        )
        > 0.9
    )
    with pytest.raises(PretrainNbError, match="divisible by n_queries"):
        EfficientProbe(10, 2, n_queries=4)


# MAERun's defaults before it was built on RunSettings, ViTSettings and ImageSettings
MAE_DEFAULTS = dict(
    mask_ratio=0.75,
    norm_pix=False,
    mimic_weight=0.0,
    steps=1000,
    batch_size=128,
    lr=2e-3,
    weight_decay=0.05,
    d_model=64,
    n_layers=4,
    n_heads=4,
    decoder_d_model=32,
    decoder_layers=1,
    patch_size=7,
    dataset="fashion-mnist",
    n_pretrain=54_000,
    n_probe_train=6_000,
    n_probe_test=5_000,
    probe_steps=1000,
    ep_queries=4,
    finetune_steps=500,
    finetune_lr=2e-3,
)


def test_the_run_defaults_are_those_of_the_mae_runs():
    run = MAERun()
    assert {k: getattr(run, k) for k in MAE_DEFAULTS} == MAE_DEFAULTS
    cfg = run.train_config(seed=3)
    # a tenth of the steps warms up, twenty evaluations, AdamW's betas as MAE's
    assert (cfg.schedule, cfg.warmup_steps, cfg.eval_every, cfg.seed) == ("cosine", 100, 50, 3)
    assert cfg.betas == (0.9, 0.95)
    # the notebooks that reuse MAE's encoder read its kind of positions from the settings
    assert run.positions == "sincos"
    assert MAE(run.transformer_config(), run.decoder_config()).encoder.positions.kind == run.positions


def test_one_run_repeats_exactly_and_wrong_settings_are_one_sentence():
    pytest.importorskip("sklearn")
    smoke = load_profile("smoke")
    settings = dict(
        steps=4,
        batch_size=16,
        n_pretrain=64,
        n_probe_train=60,
        n_probe_test=40,
        probe_steps=5,
        finetune_steps=3,
        d_model=32,
        n_layers=1,
    )
    try:
        a = pretrain_mae(seed=0, profile=smoke, **settings)
    except PretrainNbError as e:
        pytest.skip(f"Fashion-MNIST is not installed here: {e}")
    b = pretrain_mae(seed=0, profile=smoke, **settings)
    assert isinstance(a, MAEResult)
    assert a.run == MAERun(**settings)
    assert a.seed == 0
    assert a.final_loss == b.final_loss
    assert a.recon_error == b.recon_error
    assert a.shown["pasted"].shape == (8, 1, 28, 28)
    assert a.history["step"][-1] == 4
    ev = evaluate_encoder(
        seed=0, profile=smoke, encoder_state=a.encoder, source=a.run, finetune_fraction=1.0, **settings
    )
    assert isinstance(ev, EncoderEvaluation)
    # the evaluation records what it evaluated (the pre-training run) apart from how (its own settings)
    assert ev.source == a.run
    assert ev.settings.probe_steps == 5
    assert ev.finetune_fraction == 1.0
    assert all(0 <= x <= 1 for x in (ev.linear, ev.ep, ev.linear_adamw, ev.finetune))
    frozen_only = evaluate_encoder(seed=0, profile=smoke, encoder_state=a.encoder, source=a.run, **settings)
    assert math.isnan(frozen_only.finetune)
    assert frozen_only.finetune_fraction is None
    assert frozen_only.linear == ev.linear
    assert frozen_only.ep == ev.ep  # the probes do not depend on whether the encoder is fine-tuned after
    random_init = evaluate_encoder(seed=0, profile=smoke, encoder_state=None, **settings)
    assert random_init.source is None
    # the linear probe alone: the same accuracy, no attentive probes trained
    linear_only = evaluate_encoder(
        seed=0, profile=smoke, encoder_state=a.encoder, source=a.run, attentive=False, **settings
    )
    assert linear_only.linear == ev.linear
    assert math.isnan(linear_only.ep) and math.isnan(linear_only.linear_adamw)
    with pytest.raises(PretrainNbError, match="source"):
        evaluate_encoder(seed=0, profile=smoke, encoder_state=a.encoder, **settings)
    with pytest.raises(PretrainNbError, match="source"):
        evaluate_encoder(seed=0, profile=smoke, encoder_state=None, source=a.run, **settings)
    with pytest.raises(PretrainNbError, match="needs teacher_state"):
        pretrain_mae(seed=0, profile=smoke, mimic_weight=1.0, **settings)
    with pytest.raises(PretrainNbError, match="valid MAERun settings"):
        pretrain_mae(seed=0, profile=smoke, maskratio=0.5)


def test_mean_pool_probe_is_a_linear_map_of_the_mean_patch_token():
    probe = MeanPoolProbe(8, 3)
    tokens = torch.randn(5, 1 + 4, 8)
    assert torch.allclose(probe(tokens), probe.head(tokens[:, 1:].mean(1)))
    tokens2 = tokens.clone()
    tokens2[:, 0] += 100.0  # the class token is not used
    assert torch.allclose(probe(tokens2), probe(tokens))
