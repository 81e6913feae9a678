"""Position prediction (MP3, DropPos) and Selfie (pretrain_nb.mim_pretext): hiding, the losses' targets,
and the runs."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.mim_pretext import (
    PRETEXT_METHODS,
    PositionPredictor,
    PretextResult,
    PretextRun,
    Selfie,
    finetune_flops_per_image,
    finetune_fractions,
    hide_random_positions,
    position_confusion,
    position_prediction_loss,
    pretext_flops_per_image,
    pretrain_pretext,
    selfie_accuracy,
    selfie_loss,
    trained_pretext_model,
)
from pretrain_nb.evaluation import ImagePretraining
from pretrain_nb.models import (
    TransformerConfig,
    ViT,
    gather_tokens,
    patchify,
    random_masking,
    unpatchify,
    vit_flops_per_image,
)

CFG = TransformerConfig(d_model=32, n_layers=2, n_heads=4)


def _place_coded_images(n: int, seed: int = 0) -> torch.Tensor:
    "Images whose 7x7 patch at place i has brightness (i + 1) / 17 plus noise: content that says its place."
    g = torch.Generator().manual_seed(seed)
    level = (torch.arange(16) + 1).float() / 17
    patches = level[None, :, None] + 0.02 * torch.randn(n, 16, 49, generator=g)
    return unpatchify(patches, 7, 1, 28, 28)


@pytest.mark.parametrize("fraction,expected", [(0.25, 2), (0.75, 6), (1.0, 8), (0.01, 1)])
def test_hiding_withholds_an_exact_share_per_row_at_random_places(fraction, expected):
    torch.manual_seed(0)
    hide = hide_random_positions(200, 8, fraction)
    assert (hide.sum(1) == expected).all()
    if expected < 8:
        # per-row draws
        assert len({tuple(r.tolist()) for r in hide}) >= min(10, math.comb(8, expected))
    with pytest.raises(PretrainNbError, match=r"must lie in \(0, 1\]"):
        hide_random_positions(2, 8, 0.0)


def test_without_positions_the_predictor_is_permutation_equivariant():
    torch.manual_seed(0)
    model = PositionPredictor(ViT(CFG, positions="none")).eval()
    x = torch.rand(2, 1, 28, 28)
    ident, perm = torch.arange(16).expand(2, 16), torch.stack([torch.randperm(16), torch.randperm(16)])
    # MP3's premise: with no positions, reordering the patches only reorders the predictions
    assert torch.allclose(model(x, perm), gather_tokens(model(x, ident), perm), atol=1e-5)


def test_position_loss_targets_the_true_places_so_a_model_can_learn_them():
    torch.manual_seed(0)
    model = PositionPredictor(ViT(CFG, positions="none"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _place_coded_images(64)
    for _ in range(150):
        loss = position_prediction_loss(model, x, mask_ratio=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * math.log(16)
    conf = position_confusion(model, _place_coded_images(50, seed=1))
    assert conf.sum() == 50 * 16
    assert (conf.sum(1) == 50).all()
    assert conf.diagonal().sum() / conf.sum() > 0.9


def test_selfie_scores_the_masked_places_against_the_masked_patches_with_the_diagonal_as_target():
    scores = torch.randn(3, 5, 5)
    manual = torch.stack([-F.log_softmax(scores[b, i], 0)[i] for b in range(3) for i in range(5)]).mean()
    assert torch.allclose(selfie_loss(scores), manual, atol=1e-6)
    assert selfie_accuracy(torch.eye(5).expand(3, 5, 5) * 10) == 1.0
    torch.manual_seed(0)
    model = Selfie(ViT(CFG, positions="sincos"))
    assert model(torch.rand(2, 1, 28, 28), 0.75).shape == (2, 12, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _place_coded_images(64)
    for _ in range(150):
        loss = selfie_loss(model(x, 0.75))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    with torch.no_grad():
        accuracy = selfie_accuracy(model(_place_coded_images(50, seed=1), 0.75))
    # chance is 1/12; learnable only if place i is scored against patch i (0.49 on one CPU, 0.5+ on others)
    assert accuracy > 0.3


def test_selfie_candidates_are_the_masked_patches_and_queries_see_only_the_visible_ones():
    torch.manual_seed(0)
    model = Selfie(ViT(CFG, positions="sincos")).eval()
    x = torch.rand(3, 1, 28, 28)
    torch.manual_seed(1)
    with torch.no_grad():
        scores = model(x, 0.75)
    torch.manual_seed(1)
    _, _, restore = random_masking(3, 16, 0.75)
    masked = restore.argsort(dim=1)[:, 4:]  # the places of the score's rows and columns
    order = torch.randperm(12)
    patches = patchify(x, 7).clone()
    rows = torch.arange(3)[:, None]
    patches[rows, masked] = patches[rows, masked[:, order]]  # shuffle the contents of the masked places
    torch.manual_seed(1)  # the same masks
    with torch.no_grad():
        shuffled = model(unpatchify(patches, 7, 1, 28, 28), 0.75)
    # the candidates' columns are shuffled with them; every place's query is unchanged
    assert torch.allclose(shuffled, scores[:, :, order], atol=1e-5)


def test_the_run_defaults_are_those_of_the_pretext_runs():
    run = PretextRun()
    assert (run.steps, run.batch_size, run.lr, run.weight_decay) == (1000, 128, 2e-3, 0.05)
    assert run.mask_ratio == 0.75
    assert (run.d_model, run.n_layers, run.n_heads, run.patch_size) == (64, 4, 4, 7)
    assert (run.method, run.position_drop, run.finetune_lr, run.finetune_batch) == ("mp3", 0.75, 2e-3, 64)
    assert run.finetune_plan == ((0.01, 100), (0.05, 150), (1.0, 500))
    # the image recipe and the pretext fields only: the MAE decoder, mimic and probe settings are MAERun's
    own = {f.name for f in dataclasses.fields(PretextRun)} - {
        f.name for f in dataclasses.fields(ImagePretraining)
    }
    assert own == {"method", "position_drop", "finetune_plan", "finetune_batch"}
    assert (run.n_pretrain, run.n_probe_train, run.n_probe_test) == (54_000, 6_000, 5_000)
    cfg = run.train_config(seed=1)
    assert (cfg.warmup_steps, cfg.eval_every, cfg.seed) == (100, 50, 1)
    assert run.positions == "none"
    assert PretextRun(method="droppos").positions == "sincos"


def test_each_method_is_registered_once_with_its_model_loss_positions_and_diagnostics():
    assert list(PRETEXT_METHODS) == ["mp3", "droppos", "selfie"]
    assert PRETEXT_METHODS["mp3"].positions == "none"
    assert PRETEXT_METHODS["droppos"].positions == "sincos"
    assert PRETEXT_METHODS["selfie"].model is Selfie
    x = _place_coded_images(4)
    for name, method in PRETEXT_METHODS.items():
        assert PretextRun(method=name).pretext is method
        torch.manual_seed(0)
        model = method.model(ViT(CFG, positions=method.positions)).eval()
        torch.manual_seed(1)
        loss = method.loss(model, x, mask_ratio=0.5, position_drop=0.75)
        assert loss.ndim == 0
        assert loss.item() > 0
        fields = method.diagnostics(model, x, mask_ratio=0.5, n_show=2)
        assert set(fields) <= {f.name for f in dataclasses.fields(PretextResult)}
    # MP3 predicts every visible token's place whatever position_drop says; DropPos the share it withholds
    model = PositionPredictor(ViT(CFG, positions="none"))
    values = {}
    for name, drop in (("mp3", 0.25), ("droppos", 1.0), ("droppos", 0.25)):
        torch.manual_seed(2)
        values[name, drop] = PRETEXT_METHODS[name].loss(model, x, mask_ratio=0.5, position_drop=drop).item()
    assert values["mp3", 0.25] == values["droppos", 1.0]
    assert values["mp3", 0.25] != values["droppos", 0.25]


def test_runs_repeat_exactly_fine_tune_on_the_plan_and_refuse_wrong_settings():
    pytest.importorskip("sklearn")
    smoke = load_profile("smoke")
    settings = dict(
        steps=3,
        batch_size=16,
        n_pretrain=64,
        n_probe_train=100,
        n_probe_test=40,
        d_model=32,
        n_layers=1,
        finetune_plan=((0.1, 2), (1.0, 3)),
    )
    try:
        a = pretrain_pretext(seed=0, profile=smoke, method="mp3", mask_ratio=0.5, **settings)
    except PretrainNbError as e:
        pytest.skip(f"Fashion-MNIST is not installed here: {e}")
    b = pretrain_pretext(seed=0, profile=smoke, method="mp3", mask_ratio=0.5, **settings)
    assert isinstance(a, PretextResult)
    assert a.run.method == "mp3"
    assert a.run.mask_ratio == 0.5
    assert a.final_loss == b.final_loss
    assert a.history["step"][-1] == 3
    assert a.confusion.sum() == 40 * 16
    assert a.placements.shape == (6, 16)
    assert 0 <= a.position_accuracy <= 1
    assert math.isnan(a.selection_accuracy)
    s = pretrain_pretext(seed=0, profile=smoke, method="selfie", **settings)
    assert 0 <= s.selection_accuracy <= 1
    assert s.confusion is None
    assert math.isnan(s.position_accuracy)
    rows = finetune_fractions(
        seed=0, profile=smoke, encoder_state=a.encoder, positions="none", finetune_seeds=(0, 7), **settings
    )
    assert [(r["fraction"], r["finetune_seed"], r["steps"]) for r in rows] == [
        (0.1, 0, 2),
        (0.1, 7, 2),
        (1.0, 0, 3),
        (1.0, 7, 3),
    ]
    again = finetune_fractions(
        seed=0, profile=smoke, encoder_state=a.encoder, positions="none", fractions=(1.0,), **settings
    )
    assert [r["accuracy"] for r in again] == [rows[2]["accuracy"]]
    with pytest.raises(PretrainNbError, match="valid pretext methods are"):
        pretrain_pretext(seed=0, profile=smoke, method="jigsaw", **settings)
    with pytest.raises(PretrainNbError, match="valid PretextRun settings are"):
        finetune_fractions(seed=0, profile=smoke, encoder_state=None, probe_steps=5, **settings)


def test_step_flops_count_the_visible_tokens_and_the_heads():
    mp3 = PretextRun(method="mp3", mask_ratio=0.5)
    full = dataclasses.replace(mp3, mask_ratio=0.0)
    d = mp3.d_model
    # nothing masked: the encoder of a ViT on all 16 patches, plus the position classifier on each token
    assert pretext_flops_per_image(full) == vit_flops_per_image(full.vit(28, 1)) + 6 * 16 * d * 16
    # half masked: 9 tokens instead of 17, so less than 9/17 of the encoder's cost (attention is quadratic)
    assert pretext_flops_per_image(mp3) < 9 / 17 * pretext_flops_per_image(full)
    # fine-tuning: every token, and the classifier once per image
    assert finetune_flops_per_image(mp3) == vit_flops_per_image(mp3.vit(28, 1, n_classes=10))
    selfie = PretextRun(method="selfie", mask_ratio=0.75)
    # 4 visible tokens and the class token in the encoder (12 masked places and patches in the head)
    assert pretext_flops_per_image(selfie) < pretext_flops_per_image(mp3)


def test_a_run_keeps_its_pretext_head_and_the_trained_model_can_be_rebuilt():
    pytest.importorskip("sklearn")
    smoke = load_profile("smoke")
    settings = dict(steps=3, batch_size=16, n_pretrain=64, n_probe_train=100, n_probe_test=40, d_model=32)
    try:
        mp3 = pretrain_pretext(seed=0, profile=smoke, method="mp3", mask_ratio=0.5, n_layers=1, **settings)
    except PretrainNbError as e:
        pytest.skip(f"Fashion-MNIST is not installed here: {e}")
    selfie = pretrain_pretext(seed=0, profile=smoke, method="selfie", n_layers=1, **settings)
    assert set(mp3.head) == {"head.weight", "head.bias"}
    assert {k.split(".")[0] for k in selfie.head} == {"query_net", "candidate_net"}
    test_images = PretextRun(n_layers=1, **settings).images()["probe_test"][0]
    rebuilt = trained_pretext_model(mp3)
    assert not rebuilt.training
    assert position_confusion(rebuilt, test_images).tolist() == mp3.confusion.tolist()
    model = trained_pretext_model(selfie)
    torch.manual_seed(0)
    with torch.no_grad():
        picked = selfie_accuracy(model(test_images, 0.75))
    assert picked == selfie.selection_accuracy  # selfie_diagnostics scores under the masks of seed 0
