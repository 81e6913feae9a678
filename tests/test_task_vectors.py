"""Task vectors, LiNeS and aTLAS (pretrain_nb.task_vectors): each test checks a property of the method that a
wrong implementation would break."""

import dataclasses

import numpy as np
import pytest
import torch

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.models import TransformerConfig, ViT
from pretrain_nb.task_vectors import (
    AnisotropicMerge,
    HeadOnEncoder,
    TaskVectorRun,
    accuracy,
    apply_task_vectors,
    block_depth,
    depth_level,
    disentanglement_errors,
    disentanglement_map,
    element_groups,
    encoder_params,
    finetune_encoder,
    fit_head,
    flatten_params,
    learn_coefficients,
    lines_scales,
    multitask_alpha,
    pooled_features,
    predictions,
    run_merging,
    task_labels,
    task_splits,
    task_vector,
    transform_images,
    unflatten_params,
)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return ViT(TransformerConfig(d_model=16, n_layers=3, n_heads=2), image_size=8, patch_size=4)


@pytest.fixture
def images():
    return torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _noise(params, scale=0.01, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in params.items()}


def test_transforms_and_labels():
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(transform_images(x, "rotated").rot90(-1, dims=(2, 3)), x)
    assert torch.equal(transform_images(x, "flipped")[:, :, 0], x[:, :, -1])
    assert torch.equal(transform_images(x, "upright"), x) and torch.equal(transform_images(x, "coarse"), x)
    groups = task_labels(torch.arange(10), "coarse")
    assert groups.tolist() == [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]  # tops, bottoms, footwear, bags
    with pytest.raises(PretrainNbError, match="upright"):
        transform_images(x, "inverted")


def test_each_task_has_its_own_images():
    upright = task_splits("upright", 30, 10, 10)
    coarse = task_splits("coarse", 30, 10, 10)
    # the same transform, but other images: the tasks do not share examples
    assert not torch.equal(upright["train"][0], coarse["train"][0])
    assert torch.equal(upright["test"][0], task_splits("upright", 30, 10, 10)["test"][0])
    assert coarse["val"][1].max() <= 3
    with pytest.raises(PretrainNbError, match="split has"):
        task_splits("rotated", 30_000, 10, 10)


def test_fit_head_folds_the_standardization_into_the_weights():
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=gen) * torch.tensor([1.0, 20, 0.1, 1, 1, 1]) + 5
    y = (x[:, :3] - x[:, :3].mean(0)).div(x[:, :3].std(0)).argmax(1)
    head = fit_head(x, y, 3)
    z = ((x - x.mean(0)) / x.std(0)).double().numpy()
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(z, y.numpy()).predict(z)
    assert (head(x).argmax(1).numpy() == reference).mean() > 0.99
    assert fit_head(x, y, 5)(x).argmax(1).max() < 3  # classes no label showed are never predicted


def test_flatten_round_trip_and_refusal(vit):
    theta = encoder_params(vit)
    back = unflatten_params(flatten_params(theta), theta)
    assert list(back) == list(theta) and all(torch.equal(back[k], theta[k]) for k in theta)
    with pytest.raises(PretrainNbError, match="numbers"):
        unflatten_params(torch.zeros(3), theta)


def test_a_task_vector_with_coefficient_one_recovers_the_fine_tuned_weights_exactly(vit):
    theta = encoder_params(vit)
    finetuned = _noise(theta)
    tau = task_vector(finetuned, theta)
    edited = apply_task_vectors(theta, [tau], [1.0])
    assert all(torch.equal(edited[k], finetuned[k]) for k in theta)  # bit for bit
    unchanged = apply_task_vectors(theta, [torch.zeros_like(tau)], [0.7])
    assert all(torch.equal(unchanged[k], theta[k]) for k in theta)
    # per-weight coefficients: a vector of ones is λ = 1, a vector of zeros leaves θ_0
    ones = apply_task_vectors(theta, [tau], [torch.ones_like(tau)])
    assert all(torch.equal(ones[k], finetuned[k]) for k in theta)
    with pytest.raises(PretrainNbError, match="coefficients"):
        apply_task_vectors(theta, [tau, tau], [1.0])


def test_task_arithmetic_adds_the_vectors(vit):
    theta = encoder_params(vit)
    tau_a = task_vector(_noise(theta, seed=3), theta)
    tau_b = task_vector(_noise(theta, seed=4), theta)
    merged = flatten_params(apply_task_vectors(theta, [tau_a, tau_b], [0.5, 0.25]))
    expected = flatten_params(theta) + 0.5 * tau_a + 0.25 * tau_b
    assert torch.allclose(merged, expected.float().double(), atol=1e-7)


def test_block_depth_and_groups(vit):
    theta = encoder_params(vit)
    depths = {block_depth(k) for k in theta}
    assert depths == {None, 0, 1, 2}
    levels = {depth_level(k, 3) for k in theta}
    assert levels == {-1, 0, 1, 2, 3}  # before the blocks, each block, the final norm
    assert depth_level("trunk.ln_f.weight", 3) == 3 and depth_level("cls_token", 3) == -1
    groups = element_groups(theta)
    assert groups.numel() == flatten_params(theta).numel()
    assert torch.equal(torch.bincount(groups), torch.tensor([p.numel() for p in theta.values()]))


def test_lines_keeps_alpha_in_the_first_block_and_alpha_plus_beta_in_the_last(vit):
    theta = encoder_params(vit)
    alpha, beta = 0.2, 0.6
    scales = lines_scales(theta, 3, alpha, beta)
    by_depth = {}
    for name, part in zip(theta, torch.split(scales, [p.numel() for p in theta.values()])):
        by_depth.setdefault(block_depth(name), set()).update(part.tolist())
    single = {d: v.pop() for d, v in by_depth.items() if len(v) == 1}
    assert len(single) == len(by_depth)  # one scale per depth
    assert single[0] == alpha and single[2] == pytest.approx(alpha + beta)
    assert single[1] == pytest.approx(alpha + beta / 2)  # linear in depth
    assert single[None] == alpha  # embeddings, class token and final norm: α
    with pytest.raises(PretrainNbError, match="at least 2"):
        lines_scales(theta, 1, alpha, beta)
    tau = task_vector(_noise(theta), theta)
    assert multitask_alpha([tau, tau, -tau, tau]) == pytest.approx(0.25)  # 1/T for task arithmetic
    half = multitask_alpha([tau, tau], merged=tau)  # a merged vector half the sum's length
    assert half == pytest.approx(1.0)  # (‖2τ‖ / ‖τ‖) / 2


def test_atlas_learns_tasks_times_blocks_coefficients_and_nothing_else(vit, images):
    theta = encoder_params(vit)
    vectors = [task_vector(_noise(theta, seed=s), theta) for s in (5, 6)]
    merge = AnisotropicMerge(vit, theta, vectors)
    learned = [p for p in merge.parameters() if p.requires_grad]
    assert len(learned) == 1 and learned[0].numel() == 2 * len(theta)
    assert AnisotropicMerge(vit, theta, vectors, blockwise=False).coefficients.shape == (2, 1)
    assert torch.allclose(merge(images), pooled_features(vit, images, theta))  # Λ = 0 is θ_0
    with torch.no_grad():
        merge.coefficients.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    by_hand = apply_task_vectors(theta, vectors, [c.double() for c in merge.per_weight()])
    assert all(torch.allclose(merge.params()[k], by_hand[k], atol=1e-6) for k in theta)
    merge(images).square().sum().backward()
    assert merge.coefficients.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())  # the encoder is frozen


def test_learn_coefficients_returns_the_best_epochs_lambda(vit, images):
    theta = encoder_params(vit)
    labels = torch.arange(12) % 3
    head = fit_head(pooled_features(vit, images).detach(), labels, 3)
    vectors = [task_vector(_noise(theta, 0.3, seed=s), theta) for s in (7, 8)]
    merge = AnisotropicMerge(vit, theta, vectors)
    data = [(images, labels)] * 2
    lam, scores = learn_coefficients(merge, [head, head], data, data, [1.0, 1.0], 4, 0.1, 6, seed=0)
    with torch.no_grad():
        merge.coefficients.copy_(lam)
        kept = accuracy(vit, merge.params(), head, data[0])
    assert len(scores) == 4 and kept == pytest.approx(max(scores))


def test_disentanglement_error_is_zero_without_edits_and_symmetric(vit, images):
    theta = encoder_params(vit)
    labels = torch.arange(12) % 3
    head = fit_head(pooled_features(vit, images).detach(), labels, 3)
    data = [(images, labels), (images.flip(3), labels)]
    zero = torch.zeros_like(flatten_params(theta))
    big = [task_vector(_noise(theta, 1.0, seed=s), theta) for s in (9, 10)]
    assert disentanglement_errors(vit, theta, [zero, zero], [head, head], data, [(0, 1)]) == [0.0]
    (forward,) = disentanglement_errors(vit, theta, big, [head, head], data, [(0, 1)])
    (swapped,) = disentanglement_errors(vit, theta, big[::-1], [head, head], data[::-1], [(0, 1)])
    assert forward > 0 and forward == swapped
    # several pairs at once give what each pair gives alone
    three = [*big, zero]
    both = disentanglement_errors(vit, theta, three, [head] * 3, [*data, data[0]], [(0, 1), (1, 2)])
    assert both[0] == forward
    xi = disentanglement_map(vit, theta, big, [head, head], data, [0.0, 1.0])
    assert xi[0][0] == 0.0 and xi[1][1] == forward


def test_finetuning_moves_the_encoder_only(vit, images):
    labels = torch.arange(12) % 3
    head = fit_head(pooled_features(vit, images).detach(), labels.roll(1), 3)  # a head that reads it wrong
    theta = encoder_params(vit)
    before = accuracy(vit, theta, head, (images, labels))
    head_weight = head.weight.clone()
    tuned = finetune_encoder(vit, head, (images, labels), steps=40, lr=3e-3, batch_size=12, seed=0)
    assert accuracy(vit, tuned, head, (images, labels)) > before
    assert torch.equal(head.weight, head_weight)  # the head is frozen
    assert all(torch.equal(p, theta[n]) for n, p in vit.named_parameters())  # θ_0 is untouched
    model = HeadOnEncoder(vit, head)
    assert torch.equal(model(images).argmax(1), predictions(vit, None, head, images))


TINY = TaskVectorRun(d_model=16, n_layers=2, n_heads=2, n_train=64, n_head=40, n_val=30, n_learn=15,
                     n_test=20, steps=2, batch_size=16, grid_size=2, n_alphas=2, atlas_epochs=1, map_size=2,
                     map_images=10)  # fmt: skip


def _tiny_run(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(123)
        state = TINY.encoder().state_dict()
    return run_merging(seed, load_profile("smoke"), state, **dataclasses.asdict(TINY))


def test_run_merging_repeats_exactly_and_the_plain_edit_is_the_fine_tuned_model():
    a, b = _tiny_run(), _tiny_run()
    # the plain edit (α = 1) is the fine-tuned model itself, bit for bit
    assert all(a.single[t]["no_edit"]["accuracies"][k] == a.finetuned[k, k] for k, t in enumerate(TINY.tasks))
    assert np.array_equal(a.finetuned, b.finetuned)
    assert a.merged["aTLAS"]["test"] == b.merged["aTLAS"]["test"]
    assert a.disentanglement == b.disentanglement
    assert set(a.merged) == {"task arithmetic", "LiNeS", "LiNeS (α = λ*)", "aTLAS", "isotropic"}
    assert set(a.pixels) == set(TINY.tasks) and all(0 <= v <= 1 for v in a.pixels.values())
    assert a.atlas["coefficients"].shape == (4, len(dict(TINY.encoder().named_parameters())))


def test_settings_are_refused_in_one_sentence():
    with pytest.raises(PretrainNbError, match="n_learn"):
        TaskVectorRun(n_learn=500, n_val=500)
    with pytest.raises(PretrainNbError, match="tasks must be"):
        TaskVectorRun(tasks=("upright", "inverted"))
    with pytest.raises(PretrainNbError, match="n_head"):
        TaskVectorRun(n_head=0)
    with pytest.raises(PretrainNbError):
        TaskVectorRun.from_settings({"lambda": 0.3})
