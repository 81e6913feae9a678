"""Masked image modeling (pretrain_nb.mim_mae): masking, the encoder's positions, MAE, MR-MAE's mimic loss, EP and one run."""

import pytest
import torch
import torch.nn.functional as F

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.evaluation import attentive_probe
from pretrain_nb.mim_mae import (
    MAE,
    EfficientProbe,
    PatchEncoder,
    gather_tokens,
    mae_step_loss,
    masked_patch_loss,
    mim_job,
    mimic_loss,
    normalize_patches,
    random_masking,
    sincos_positions_2d,
)
from pretrain_nb.models import TransformerConfig, patchify, unpatchify

CFG = TransformerConfig(d_model=32, n_layers=2, n_heads=4)
DEC = TransformerConfig(d_model=16, n_layers=1, n_heads=2)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_masking_hides_exactly_round_ratio_n_per_sample_and_restore_inverts_the_shuffle(ratio):
    torch.manual_seed(0)
    N = 49
    keep, mask, restore = random_masking(64, N, ratio)
    assert (mask.sum(1) == round(ratio * N)).all() and keep.shape == (64, N - round(ratio * N))
    assert not mask.gather(1, keep).any()  # the kept patches are exactly the unmasked ones
    assert torch.equal(torch.sort(keep, 1).values, torch.stack([(~m).nonzero().flatten() for m in mask]))
    shuffle = restore.argsort(1)
    ids = torch.arange(N).expand(64, N)
    assert torch.equal(ids.gather(1, shuffle).gather(1, restore), ids)
    assert len({tuple(k.tolist()) for k in keep}) > 60  # per-sample masks, not one mask for the batch


def test_masking_rejects_ratios_that_leave_nothing_or_are_out_of_range():
    for bad in (1.0, -0.1):
        with pytest.raises(PretrainNbError, match=r"mask_ratio must lie in \[0, 1\)"):
            random_masking(2, 16, bad)
    with pytest.raises(PretrainNbError, match="leaves no visible patch"):
        random_masking(2, 16, 0.99)


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


def test_patchify_round_trip_for_the_mim_patch_sizes():
    x = torch.rand(2, 3, 28, 28)
    for p in (4, 7, 14):
        assert torch.equal(unpatchify(patchify(x, p), p, 3, 28, 28), x)


def test_positions_travel_with_their_patches():
    torch.manual_seed(0)
    enc = PatchEncoder(CFG).eval()
    x = torch.rand(2, 1, 28, 28)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    full, shuffled = enc(x), enc(x, keep=perm)
    # attention is permutation-equivariant, so a patch keeps its output wherever it sits in the sequence,
    # which holds only if its grid position was added before the reordering
    assert torch.allclose(shuffled[:, 1:], gather_tokens(full[:, 1:], perm), atol=1e-5)
    assert torch.allclose(shuffled[:, 0], full[:, 0], atol=1e-5)
    no_pos = PatchEncoder(CFG, positions="none").eval()
    no_pos.load_state_dict(enc.state_dict())
    hidden = enc(x, keep=perm, hide_positions=torch.ones(2, 16, dtype=torch.bool))
    assert torch.allclose(hidden, no_pos(x, keep=perm), atol=1e-5)
    assert not torch.allclose(hidden, shuffled, atol=1e-3)
    with pytest.raises(PretrainNbError, match="valid position encodings are"):
        PatchEncoder(CFG, positions="learned")


def test_sincos_positions_are_distinct_and_need_a_width_divisible_by_four():
    pos = sincos_positions_2d(4, 32)
    assert pos.shape == (16, 32) and torch.cdist(pos, pos).add(torch.eye(16) * 9).min() > 0.1
    with pytest.raises(PretrainNbError, match="divisible by 4"):
        sincos_positions_2d(4, 30)


def test_mae_encoder_never_sees_the_masked_patches():
    torch.manual_seed(0)
    model = MAE(CFG, DEC).eval()
    x = torch.rand(4, 1, 28, 28)
    torch.manual_seed(1)
    pred, mask, latent, keep = model(x, 0.75)
    assert latent.shape == (4, 1 + 4, 32) and pred.shape == (4, 16, 49)
    noisy = patchify(x, 7).clone()
    noisy[mask] = torch.rand_like(noisy[mask])  # change only the masked patches
    torch.manual_seed(1)
    pred2, mask2, latent2, _ = model(unpatchify(noisy, 7, 1, 28, 28), 0.75)
    assert torch.equal(mask, mask2) and torch.allclose(latent, latent2) and torch.allclose(pred, pred2)


def test_normalized_targets_have_zero_mean_and_unit_variance_per_patch():
    p = normalize_patches(torch.rand(3, 16, 49) * 5 + 2)
    assert torch.allclose(p.mean(-1), torch.zeros(3, 16), atol=1e-5) and torch.allclose(
        p.var(-1, unbiased=False), torch.ones(3, 16), atol=1e-3
    )


def test_mr_mae_loss_adds_the_mimic_term_and_leaves_the_teacher_frozen():
    torch.manual_seed(0)
    teacher = PatchEncoder(CFG)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = MAE(CFG, DEC, mimic_dim=32)
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(3)
    plain = mae_step_loss(0.75)(student, x)
    torch.manual_seed(3)
    mixed = mae_step_loss(0.75, teacher=teacher, mimic_weight=1.0)(student, x)
    assert mixed > plain
    mixed.backward()
    assert student.mimic_head.weight.grad is not None and all(
        p.grad is None and not p.requires_grad for p in teacher.parameters()
    )
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    t = torch.randn(2, 5, 32)
    assert mimic_loss(F.layer_norm(t, (32,)), t).item() < 1e-10 and mimic_loss(t, t) > 0


def test_efficient_probe_attention_is_a_distribution_and_finds_a_needle():
    probe = EfficientProbe(16, 2, n_queries=2)
    a = probe.attention(torch.randn(5, 8, 16))
    assert a.shape == (5, 2, 8) and torch.allclose(a.sum(-1), torch.ones(5, 2))
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
        a = mim_job("pretrain", seed=0, profile=smoke, **settings)
    except PretrainNbError as e:
        pytest.skip(f"Fashion-MNIST is not installed here: {e}")
    b = mim_job("pretrain", seed=0, profile=smoke, **settings)
    assert (
        a["final_loss"] == b["final_loss"]
        and a["recon_error"] == b["recon_error"]
        and a["shown"]["pasted"].shape == (8, 1, 28, 28)
    )
    ev = mim_job(
        "evaluate", seed=0, profile=smoke, encoder_state=a["encoder"], finetune_fraction=1.0, **settings
    )
    assert ev["kind"] == "evaluate" and all(0 <= ev[k] <= 1 for k in ("linear", "ep", "finetune"))
    with pytest.raises(PretrainNbError, match="needs teacher_state"):
        mim_job("pretrain", seed=0, profile=smoke, mimic_weight=1.0, **settings)
    with pytest.raises(PretrainNbError, match="valid MIM job kinds are"):
        mim_job("distill", seed=0)
    with pytest.raises(PretrainNbError, match="valid MAERun settings"):
        mim_job("pretrain", seed=0, profile=smoke, maskratio=0.5)


def test_mean_pool_probe_is_a_linear_map_of_the_mean_patch_token():
    from pretrain_nb.mim_mae import MeanPoolProbe

    probe = MeanPoolProbe(8, 3)
    tokens = torch.randn(5, 1 + 4, 8)
    assert torch.allclose(probe(tokens), probe.head(tokens[:, 1:].mean(1)))
    tokens2 = tokens.clone()
    tokens2[:, 0] += 100.0  # the class token is not used
    assert torch.allclose(probe(tokens2), probe(tokens))
