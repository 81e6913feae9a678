"""Contrastive pre-training (pretrain_nb.contrastive): augmentations, InfoNCE, DCL, the model and one run."""

import pytest
import torch
import torch.nn.functional as F

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.contrastive import (
    SIMCLR_AUGMENTATIONS,
    ContrastiveRun,
    SimCLR,
    SmallCNN,
    _per_image,
    brightness_contrast,
    dcl_loss,
    downstream_tasks,
    gaussian_blur,
    gaussian_noise,
    info_nce_loss,
    pca_2d,
    random_erasing,
    random_flip,
    random_resized_crop,
    simclr_augment,
)


def _by_hand(z1, z2, t, decoupled):
    "The losses written out with loops over views, as in the papers' equations."
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        pos = torch.exp(z[i] @ z[j] / t)
        neg = sum(torch.exp(z[i] @ z[k] / t) for k in range(n2) if k not in (i, j))
        total += (-(z[i] @ z[j]) / t + torch.log(neg)) if decoupled else -torch.log(pos / (pos + neg))
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_losses_match_the_formulas_written_out(t):
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(info_nce_loss(z1, z2, t), _by_hand(z1, z2, t, False), atol=1e-5)
    assert torch.allclose(dcl_loss(z1, z2, t), _by_hand(z1, z2, t, True), atol=1e-5)


def test_dcl_is_infonce_without_the_positive_in_the_denominator():
    torch.manual_seed(1)
    z1, z2 = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    t = 0.3
    z = torch.cat([z1, z2])
    s = z @ z.T / t
    pos = torch.cat([torch.diagonal(s, 6), torch.diagonal(s, -6)])
    partner = (torch.arange(12) + 6) % 12
    negatives = ~torch.eye(12, dtype=torch.bool) & ~F.one_hot(partner, 12).bool()
    neg_lse = torch.logsumexp(s.masked_fill(~negatives, float("-inf")), dim=1)
    # InfoNCE_i = DCL_i + log(1 + exp(pos_i) / sum_neg_i), averaged
    assert torch.allclose(
        info_nce_loss(z1, z2, t), dcl_loss(z1, z2, t) + F.softplus(pos - neg_lse).mean(), atol=1e-5
    )
    assert dcl_loss(z1, z2, t) < info_nce_loss(z1, z2, t)


@pytest.mark.parametrize("loss", [info_nce_loss, dcl_loss, lambda a, b, t: dcl_loss(a, b, t, sigma=0.5)])
def test_losses_ignore_batch_order_and_send_gradients_to_both_views(loss):
    torch.manual_seed(2)
    z1, z2 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    perm = torch.randperm(6)
    assert torch.allclose(loss(z1, z2, 0.5), loss(z1[perm], z2[perm], 0.5), atol=1e-6)
    # the two views play symmetric roles
    assert torch.allclose(loss(z1, z2, 0.5), loss(z2, z1, 0.5), atol=1e-6)
    loss(z1, z2, 0.5).backward()
    assert z1.grad.abs().sum() > 0
    assert z2.grad.abs().sum() > 0
    # pairing each view with another image's view must cost more
    aligned = F.normalize(z1.detach() + 0.05 * torch.randn(6, 8), dim=1)
    assert loss(z1.detach(), aligned, 0.5) < loss(z1.detach(), aligned[torch.roll(torch.arange(6), 1)], 0.5)


def test_dclw_weights_hard_positives_more():
    torch.manual_seed(3)
    z1 = F.normalize(torch.randn(4, 8), dim=1)
    z2 = z1.clone()
    z2[0] = F.normalize(torch.randn(8), dim=0)  # one hard (dissimilar) positive pair
    assert not torch.allclose(dcl_loss(z1, z2, 0.5, sigma=0.5), dcl_loss(z1, z2, 0.5))
    with pytest.raises(PretrainNbError, match="temperature must be positive"):
        info_nce_loss(z1, z2, 0.0)
    with pytest.raises(PretrainNbError, match="same shape"):
        dcl_loss(z1, z2[:3], 0.5)


def test_per_image_draws_one_number_per_image_for_all_its_pixels():
    torch.manual_seed(0)
    draws = _per_image(500, 1, 1, 1)
    assert draws.numel() == 500
    spread = draws * torch.ones(500, 3, 6, 6)
    assert (spread == draws).all()  # every channel and pixel of an image gets the image's draw
    assert draws.unique().numel() > 490  # and (almost) every image its own
    assert 0 <= draws.min() <= draws.max() < 1


def test_augmentations_are_per_image_batched_and_keep_the_range():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    for aug in (
        random_resized_crop,
        random_flip,
        brightness_contrast,
        gaussian_blur,
        gaussian_noise,
        random_erasing,
        simclr_augment,
    ):
        y = aug(x)
        assert y.shape == x.shape, aug.__name__
        assert 0 <= y.min() <= y.max() <= 1, aug.__name__
    changed = (simclr_augment(x) - x).abs().flatten(1).sum(1) > 0
    assert changed.float().mean() > 0.9
    flipped = random_flip(x, p=0.5)
    is_flipped = (flipped == x.flip(-1)).flatten(1).all(1)
    assert 10 < is_flipped.sum() < 54, "each image flips on its own coin"


def test_crop_of_the_whole_image_is_the_identity_and_blur_preserves_constants():
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x, atol=1e-5)
    const = torch.full((4, 1, 28, 28), 0.3)
    assert torch.allclose(gaussian_blur(const, p=1.0), const, atol=1e-6)
    img = torch.zeros(1, 1, 28, 28)
    img[..., 14, 14] = 1
    blurred = gaussian_blur(img, sigma=(1.0, 1.0), p=1.0)
    # a normalized kernel
    assert blurred[..., 14, 14] < 1
    assert blurred.sum().item() == pytest.approx(1.0, rel=1e-5)
    erased = random_erasing(torch.ones(16, 1, 28, 28), p=1.0, area=(0.1, 0.1))
    frac = 1 - erased.flatten(1).mean(1)
    assert ((frac > 0.05) & (frac < 0.16)).all()


def test_model_returns_unit_projections_and_downstream_tasks_are_well_formed():
    model = SimCLR(SmallCNN(channels=3, width=8))
    h, z = model(torch.rand(5, 3, 32, 32))
    assert h.shape == (5, 32)
    assert z.shape == (5, 64)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    x, y = torch.rand(9, 1, 28, 28), torch.arange(9) % 10
    tasks = downstream_tasks(x, y)
    assert torch.equal(tasks["rotated classes"][0][0, 0], torch.rot90(x[0, 0], 1))
    assert tasks["brightness level"][1].tolist() == [0, 1, 2] * 3
    assert torch.allclose(tasks["brightness level"][0][0], 0.45 * x[0])
    emb = pca_2d(torch.randn(50, 6) * torch.tensor([5.0, 2, 1, 1, 1, 1]))
    assert emb.shape == (50, 2)
    assert emb[:, 0].var() > emb[:, 1].var()


def test_one_pretraining_run_repeats_exactly():
    from pretrain_nb.contrastive import pretrain_contrastive

    pytest.importorskip("sklearn")
    settings = dict(
        n_pretrain=64, n_probe_train=60, n_probe_test=40, epochs=1.0, batch_size=16, width=4, loss="DCL"
    )
    try:
        a = pretrain_contrastive(seed=0, profile=load_profile("smoke"), **settings)
    except PretrainNbError as e:
        pytest.skip(f"Fashion-MNIST is not installed here: {e}")
    b = pretrain_contrastive(seed=0, profile=load_profile("smoke"), **settings)
    assert a.run.total_steps() == 4
    assert a.history["step"] == [4], "one evaluation, at the end"
    assert a.knn_pre == b.knn_pre
    assert a.final_loss == b.final_loss
    assert a.run.loss == "DCL"
    assert 0 <= a.knn_pre <= 1
    assert a.embedding_pre.shape == (40, 2)
    assert a.weights is None
    with pytest.raises(PretrainNbError, match="valid ContrastiveRun settings"):
        pretrain_contrastive(seed=0, profile=load_profile("smoke"), batchsize=16)


def test_run_settings_keep_the_defaults_and_count_steps_from_epochs():
    from pretrain_nb.training import TrainConfig

    run = ContrastiveRun()
    assert (run.batch_size, run.lr, run.weight_decay, run.epochs, run.loss, run.temperature) == (
        256,
        1e-3,
        1e-4,
        2.0,
        "InfoNCE",
        0.5,
    )
    assert (run.dataset, run.n_pretrain, run.n_probe_train, run.n_probe_test) == (
        "fashion-mnist",
        10_000,
        5_000,
        2_000,
    )
    assert run.total_steps() == round(2.0 * 10_000 / 256)
    assert ContrastiveRun(steps=7).total_steps() == 7
    # the TrainConfig the run function used before the shared RunSettings, field by field
    small = ContrastiveRun(n_pretrain=512, batch_size=16, epochs=1.0, lr=2e-3)
    steps = small.total_steps()
    assert small.train_config(3) == TrainConfig(
        steps=steps,
        batch_size=16,
        lr=2e-3,
        weight_decay=1e-4,
        schedule="cosine",
        warmup_steps=max(1, steps // 10),
        eval_every=steps,
        seed=3,
        progress=False,
    )


def test_an_augmentation_can_be_left_out_and_an_unknown_name_is_one_sentence():
    images = torch.rand(6, 1, 28, 28)
    torch.manual_seed(0)
    full = simclr_augment(images)
    torch.manual_seed(0)
    assert torch.equal(simclr_augment(images, skip=()), full), "no skip: the same draws, the same view"
    assert torch.equal(simclr_augment(images, skip=tuple(SIMCLR_AUGMENTATIONS)), images)
    torch.manual_seed(0)
    no_crop = simclr_augment(images, skip=("crop",))
    assert not torch.equal(no_crop, full)
    with pytest.raises(PretrainNbError, match="crop"):
        simclr_augment(images, skip=("colour",))
    assert ContrastiveRun(skip_augmentations=("blur",)).skip_augmentations == ("blur",)


def test_head_outputs_are_the_projections_before_normalization():
    model = SimCLR(SmallCNN(width=4)).eval()
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        g = model.head_outputs(images)
        assert torch.allclose(F.normalize(g, dim=-1), model.projections(images), atol=1e-6)
        assert g.shape == (5, 64)
