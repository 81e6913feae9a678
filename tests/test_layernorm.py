"""LayerNorm placements' diagnostics and LayerNorm removal (pretrain_nb.layernorm)."""

import math

import pytest
import torch
from torch import nn

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.layernorm import (
    FixedScaleNorm,
    PlacementRun,
    angular_distance,
    fixed_subset,
    layer_grad_norms,
    layernorm_input_scales,
    layernorm_names,
    layernorm_removal_run,
    placement_setup,
    remove_layernorms,
    removal_stages,
    skip_layer_loss_change,
    skipping_block,
    stream_profile,
    token_variance,
    train_placement,
)
from pretrain_nb.models import GPT, TransformerConfig, lm_loss


def tiny_gpt(norm="pre", seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(
        TransformerConfig(vocab_size=13, block_size=8, d_model=16, n_layers=3, n_heads=2, norm=norm, **kw)
    ).eval()


IDX = torch.randint(13, (4, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm", ["pre", "post", "peri", "mix"])
def test_layer_grad_norms_match_backward_and_leave_grad_alone(norm):
    model = tiny_gpt(norm)
    norms = layer_grad_norms(model, lm_loss(model, IDX))
    assert all(p.grad is None for p in model.parameters()), "the diagnostic must not write into .grad"
    lm_loss(model, IDX).backward()
    by_hand = torch.stack(
        [torch.sqrt(sum(p.grad.pow(2).sum() for p in b.parameters())) for b in model.trunk.blocks]
    )
    assert norms.shape == (3,) and torch.allclose(norms, by_hand, rtol=1e-5)
    assert len(set(norms.tolist())) == 3  # one distinct number per block, not a global norm repeated


def test_angular_distance_and_variance_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert angular_distance(a, 3 * a) == pytest.approx(0.0, abs=1e-6)
    assert angular_distance(a, -a) == pytest.approx(1.0)
    assert angular_distance(a, a.flip(-1)) == pytest.approx(0.5)  # orthogonal rows
    assert token_variance(torch.tensor([[1.0, 3.0], [0.0, 0.0]])) == pytest.approx(0.5)  # (1 + 0) / 2


def test_stream_profile_matches_a_hand_forward_pass():
    model = tiny_gpt("pre")
    prof = stream_profile(model, IDX)
    with torch.no_grad():
        x = model.tok_emb(IDX) + model.trunk.pos_emb[:, :8]
        for layer, block in enumerate(model.trunk.blocks):
            y = block(x)
            assert prof["variance"][layer] == pytest.approx(y.var(-1, unbiased=False).mean().item(), rel=1e-5)
            cos = ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).clamp(-1, 1)
            assert prof["angle"][layer] == pytest.approx(
                (torch.arccos(cos) / math.pi).mean().item(), rel=1e-4
            )
            x = y


def test_skipping_a_block_is_the_identity_and_is_undone():
    model = tiny_gpt("pre")
    with torch.no_grad():
        full = model(IDX)
        with skipping_block(model, 1):
            skipped = model(IDX)
        x = model.tok_emb(IDX) + model.trunk.pos_emb[:, :8]
        by_hand = model.head(model.trunk.ln_f(model.trunk.blocks[2](model.trunk.blocks[0](x))))
        assert torch.allclose(skipped, by_hand, atol=1e-6)
        assert torch.equal(model(IDX), full), "the hook must be removed after the with-block"
    with pytest.raises(PretrainNbError, match=r"layer must be in 0\.\.2"):
        with skipping_block(model, 3):
            pass


def test_skip_layer_loss_change_is_zero_for_a_block_that_adds_nothing():
    model = tiny_gpt("pre")
    with torch.no_grad():  # a Pre-LN block whose output projections are zero is exactly the identity
        model.trunk.blocks[1].attn.proj.weight.zero_()
        model.trunk.blocks[1].mlp.proj.weight.zero_()
    change = skip_layer_loss_change(model, lm_loss, IDX)
    assert change.shape == (3,) and change[1] == pytest.approx(0.0, abs=1e-6) and abs(change[0]) > 1e-4


def test_fixed_scale_norm_is_layernorm_when_every_token_has_that_scale():
    ln = nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(5, 6)
    # every row: standard deviation 2.5
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True) * 2.5 + 7
    fixed = FixedScaleNorm(ln, math.sqrt(2.5**2 + ln.eps))
    assert torch.allclose(fixed(x), ln(x), atol=1e-5)
    assert fixed.weight is ln.weight and fixed.bias is ln.bias
    assert not torch.allclose(fixed(2 * x), ln(2 * x), atol=1e-2), "a fixed scale must not adapt to the input"
    with pytest.raises(PretrainNbError, match="must be positive"):
        FixedScaleNorm(ln, 0.0)


def test_layernorm_input_scales_measure_the_input_std():
    model = tiny_gpt("pre")
    scales = layernorm_input_scales(model, ["trunk.blocks.0.ln1"], IDX)
    x = model.tok_emb(IDX) + model.trunk.pos_emb[:, :8]
    assert scales["trunk.blocks.0.ln1"] == pytest.approx(
        torch.sqrt(x.var(-1, unbiased=False) + 1e-5).mean().item(), rel=1e-5
    )


def test_removal_stages_group_by_block_and_end_with_the_final_norm():
    assert removal_stages(tiny_gpt("pre")) == [
        [f"trunk.blocks.{i}.ln1", f"trunk.blocks.{i}.ln2"] for i in range(3)
    ] + [["trunk.ln_f"]]
    assert removal_stages(tiny_gpt("peri"))[0] == [
        "trunk.blocks.0.ln1",
        "trunk.blocks.0.ln2",
        "trunk.blocks.0.ln1_out",
        "trunk.blocks.0.ln2_out",
    ]
    # no final norm
    assert removal_stages(tiny_gpt("post"))[-1] == [
        "trunk.blocks.2.ln1",
        "trunk.blocks.2.ln2",
    ]


def test_remove_layernorms_removes_all_and_finetunes_after_each_stage():
    model = tiny_gpt("pre")
    calls = []
    table = remove_layernorms(
        model,
        IDX,
        finetune=lambda m, k: calls.append((k, len(layernorm_names(m)))),
        evaluate=lambda m: lm_loss(m, IDX).item(),
    )
    assert layernorm_names(model) == [] and sum(isinstance(m, FixedScaleNorm) for m in model.modules()) == 7
    assert calls == [(1, 5), (2, 3), (3, 1), (4, 0)], "fine-tune once per stage, after that stage's swap"
    assert table.layernorms_left.tolist() == [7, 5, 3, 1, 0]
    # calibrated scales keep the untrained model close
    assert abs(table.loss.iloc[-1] - table.loss.iloc[0]) < 0.5


def test_train_placement_records_diagnostics_and_repeats_exactly():
    settings = dict(
        norm="mix",
        n_layers=2,
        d_model=16,
        n_heads=2,
        block_size=16,
        steps=4,
        batch_size=4,
        warmup_steps=1,
        eval_every=2,
        n_val_blocks=8,
        n_probe_blocks=4,
        mix_post_fraction=0.5,
    )
    prof = load_profile("smoke")
    a = train_placement(seed=0, profile=prof, **settings)
    b = train_placement(seed=0, profile=prof, **settings)
    h = a.history_frame()
    assert h.step.tolist() == [2, 4] and h.norm.tolist() == ["mix", "mix"] and a.run.mix_post_fraction == 0.5
    assert {"val_loss", "grad_norm_0", "grad_norm_1", "variance_1", "angle_0"} <= set(h.columns)
    assert a.skip.shape == (2,) and a.weights is None
    assert h.equals(b.history_frame()), "same seed, same numbers"
    assert not h.val_loss.equals(train_placement(seed=1, profile=prof, **settings).history_frame().val_loss)
    with pytest.raises(PretrainNbError, match="valid.*n_layers"):
        train_placement(seed=0, profile=prof, depth=3)


def test_fixed_subset_ignores_the_global_random_state():
    x = torch.arange(100)
    torch.manual_seed(0)
    a = fixed_subset(x, 10, seed=7)
    torch.manual_seed(1)
    b = fixed_subset(x, 10, seed=7)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 10
    assert not torch.equal(a, fixed_subset(x, 10, seed=8))


def test_the_sweep_functions_run_in_spawned_processes():
    """The notebooks' standard profile runs train_placement two at a time in fresh processes: same numbers
    as in-process."""
    import dataclasses
    from pretrain_nb.core import map_runs

    standard = load_profile("standard")
    settings = dict(
        n_layers=2,
        d_model=16,
        n_heads=2,
        block_size=16,
        steps=3,
        batch_size=4,
        warmup_steps=1,
        eval_every=3,
        n_val_blocks=8,
        n_probe_blocks=4,
    )
    jobs = [dict(seed=0, norm="peri", **settings), dict(seed=1, norm="post", **settings)]
    threads = torch.get_num_threads()
    try:
        together = map_runs(train_placement, jobs, standard)
        alone = map_runs(train_placement, jobs, dataclasses.replace(standard, parallel_runs=1, cpu_threads=1))
    finally:
        # the in-process runs set one thread; give the rest of the session its threads back
        torch.set_num_threads(threads)
    for a, b in zip(together, alone):
        assert a.history_frame().equals(b.history_frame()) and (a.skip == b.skip).all()


def test_placement_run_keeps_the_defaults_and_the_train_config():
    from pretrain_nb.training import TrainConfig

    run = PlacementRun()
    assert (run.n_layers, run.d_model, run.n_heads, run.block_size, run.norm) == (12, 64, 4, 64, "pre")
    # the TrainConfig the run function used before the shared RunSettings, field by field
    assert run.train_config(5) == TrainConfig(
        steps=300,
        batch_size=32,
        lr=2e-3,
        warmup_steps=30,
        schedule="cosine",
        eval_every=25,
        seed=5,
        progress=False,
    )
    cfg = PlacementRun(norm="mix", mix_post_fraction=0.5).model_config(vocab_size=88)
    assert (cfg.vocab_size, cfg.n_layers, cfg.d_model) == (88, 12, 64)
    assert (cfg.norm, cfg.mix_post_fraction) == ("mix", 0.5)


TINY_RUN = dict(n_layers=2, d_model=16, n_heads=2, block_size=16, n_val_blocks=8, n_probe_blocks=4)
TINY_RUN |= dict(steps=2, batch_size=4, warmup_steps=1, eval_every=2)


def test_placement_setup_batch_from_batch_seed_and_model_from_seed():
    run = PlacementRun.from_settings(TINY_RUN)
    a = placement_setup(run, seed=0, batch_seed=1)
    other_seed = placement_setup(run, seed=1, batch_seed=1)
    other_batch = placement_setup(run, seed=0, batch_seed=2)
    assert a.val.shape == (8, 16) and a.fixed_batch.shape == (4, 16)
    assert torch.equal(a.fixed_batch, other_seed.fixed_batch)
    assert not torch.equal(a.fixed_batch, other_batch.fixed_batch)
    assert torch.equal(a.model.tok_emb.weight, other_batch.model.tok_emb.weight)
    assert not torch.equal(a.model.tok_emb.weight, other_seed.model.tok_emb.weight)


def test_layernorm_removal_run_and_its_control():
    prof = load_profile("smoke")
    trained = train_placement(seed=0, profile=prof, keep_weights=True, diagnostics=False, **TINY_RUN)
    args = dict(seed=0, profile=prof, weights=trained.weights, steps_per_stage=1, finetune_batch_size=4)
    removed = layernorm_removal_run(remove=True, **args, **TINY_RUN)
    kept = layernorm_removal_run(remove=False, **args, **TINY_RUN)
    # Pre-LN, 2 blocks: two LayerNorms per block and the final one
    assert removed.layernorms_left.tolist() == [5, 3, 1, 0]
    assert kept.layernorms_left.tolist() == [5, 5, 5, 5]
    assert removed.loss.iloc[0] == kept.loss.iloc[0]  # both start from the trained weights
    assert set(removed.arm) == {"LayerNorm removed"} and set(kept.arm) == {"LayerNorm kept (control)"}
    with pytest.raises(PretrainNbError, match="Unknown PlacementRun setting 'lr_finetune'"):
        layernorm_removal_run(lr_finetune=1e-3, **args, **TINY_RUN)
