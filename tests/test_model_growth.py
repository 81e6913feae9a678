"""Growth operators, layer similarity, crossings and one growth run (pretrain_nb.model_growth), and the FLOP
count of models that change shape or are masked (pretrain_nb.models)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.model_growth import (
    GrowthRun,
    aki_width,
    ema,
    flops_to_reach,
    fpi_width,
    layer_similarity,
    linear_cka,
    run_growth,
    stack_depth,
    width_maps,
    zero_depth,
)
from pretrain_nb.models import GPT, TransformerConfig, flops_per_token, lm_loss, training_flops


def trained_like(n_layers=2, d_model=16, n_heads=2, seed=0):
    "A small GPT whose weights have moved away from their initialisation (zeros and ones no longer special)."
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=23, block_size=12, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


IDX = torch.randint(23, (5, 12), generator=torch.Generator().manual_seed(1))


def test_flops_by_hand_for_a_masked_model_and_a_run_of_two_shapes():
    cfg = TransformerConfig(vocab_size=10, block_size=8, d_model=4, n_layers=2, n_heads=2)
    # per layer: qkv 3*16 + output 16 + MLP 2*4*16 = 192 weights; head 4*10 = 40; attention 12*L*T*d
    dense = 6 * (2 * 192 + 40) + 12 * 2 * 8 * 4
    assert flops_per_token(cfg) == dense
    assert flops_per_token(cfg, masked=100) == dense - 600
    one_layer = dataclasses.replace(cfg, n_layers=1)
    assert training_flops([(one_layer, 5), (cfg, 7)]) == 5 * flops_per_token(one_layer) + 7 * dense
    assert training_flops([(cfg, 3, 100)]) == 3 * (dense - 600)
    with pytest.raises(PretrainNbError, match="masked"):
        flops_per_token(cfg, masked=10_000)
    with pytest.raises(PretrainNbError, match="negative"):
        training_flops([(cfg, -1)])


def test_stacking_copies_every_layer_where_the_design_says():
    small = trained_like(n_layers=2)
    big = stack_depth(small, 8)
    assert big.cfg.n_layers == 8
    for i, block in enumerate(big.trunk.blocks):
        source = small.trunk.blocks[i % 2].state_dict()
        assert all(torch.equal(v, source[k]) for k, v in block.state_dict().items())
    for name in ("tok_emb.weight", "trunk.pos_emb", "trunk.ln_f.weight"):
        assert torch.equal(big.state_dict()[name], small.state_dict()[name])
    assert big.head.weight is big.tok_emb.weight  # still tied
    with pytest.raises(PretrainNbError, match="multiple"):
        stack_depth(small, 5)


@pytest.mark.parametrize("grow", [lambda m: zero_depth(m, 6), fpi_width])
def test_function_preserving_operators_leave_the_outputs_unchanged(grow):
    small = trained_like()
    big = grow(small).eval()
    with torch.no_grad():
        assert torch.allclose(big(IDX), small(IDX), atol=1e-5)
        assert abs(lm_loss(big, IDX).item() - lm_loss(small, IDX).item()) < 1e-5


@pytest.mark.parametrize("grow", [lambda m: stack_depth(m, 6), aki_width])
def test_stacking_and_aki_change_the_function(grow):
    small = trained_like()
    with torch.no_grad():
        assert (grow(small).eval()(IDX) - small(IDX)).abs().max() > 1e-2


def test_fpi_duplicates_every_unit_and_aki_takes_new_units_from_the_next_layer():
    small = trained_like(n_layers=3)
    m = width_maps(small.cfg)
    fpi, aki = fpi_width(small), aki_width(small)
    d, hidden = small.cfg.d_model, 4 * small.cfg.d_model
    fc_fpi, fc_aki = fpi.trunk.blocks[0].mlp.fc.weight, aki.trunk.blocks[0].mlp.fc.weight
    assert torch.equal(fc_fpi[:hidden], fc_fpi[hidden:])  # copies
    assert torch.equal(fc_aki[:hidden], fc_fpi[:hidden])  # the original units are FPI's
    assert torch.equal(fc_aki[hidden:], fpi.trunk.blocks[1].mlp.fc.weight[hidden:])  # new ones: layer 1's
    last = aki.trunk.blocks[2].mlp.fc.weight
    assert torch.equal(last, fpi.trunk.blocks[2].mlp.fc.weight)  # the last layer has no next one
    # outgoing weights of duplicated inputs are divided by the number of copies
    proj = fpi.trunk.blocks[0].mlp.proj.weight
    assert torch.allclose(proj[:d, :hidden] * 2, small.trunk.blocks[0].mlp.proj.weight)
    assert m["new_hidden"].sum() == hidden and m["new_head"].sum() == d == m["new_resid"].sum()
    # AKI: the new residual rows written by the attention and MLP outputs come from the next layer too, so
    # the two halves of the residual stream differ (FPI keeps them equal: [x, x])
    out_aki, out_fpi = aki.trunk.blocks[0].mlp.proj.weight, fpi.trunk.blocks[0].mlp.proj.weight
    assert torch.equal(out_aki[d:], fpi.trunk.blocks[1].mlp.proj.weight[d:])
    assert torch.equal(out_aki[:d], out_fpi[:d])
    with torch.no_grad():
        stream = aki.trunk.blocks[0](aki.tok_emb(IDX))
        copies = fpi.trunk.blocks[0](fpi.tok_emb(IDX))
    assert not torch.allclose(stream[..., :d], stream[..., d:], atol=1e-3)
    assert torch.allclose(copies[..., :d], copies[..., d:], atol=1e-6)


def test_width_growth_copies_heads_so_rotary_positions_survive_and_refuses_post_ln():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=23, block_size=12, d_model=8, n_layers=2, n_heads=2, pos="rotary")
    small = GPT(cfg).eval()
    wide = fpi_width(small).eval()
    assert wide.cfg.n_heads == 4 and wide.cfg.head_dim == cfg.head_dim  # new heads, not wider ones
    with torch.no_grad():
        assert torch.allclose(wide(IDX), small(IDX), atol=1e-5)
    with pytest.raises(PretrainNbError, match="Pre-LN"):
        fpi_width(GPT(dataclasses.replace(cfg, norm="post")))
    with pytest.raises(PretrainNbError, match="Pre-LN"):
        zero_depth(GPT(dataclasses.replace(cfg, norm="post", pos="learned")), 2)


def test_linear_cka_is_one_for_rotated_scaled_copies_and_symmetric():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert linear_cka(x, 0.5 * x @ q) == pytest.approx(1.0, abs=1e-9)
    y = torch.randn(100, 4, generator=g)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    sim = layer_similarity(stack_depth(trained_like(), 4), IDX)
    assert sim.shape == (4, 4) and np.allclose(np.diag(sim), 1)


def test_ema_and_the_crossing():
    assert np.allclose(ema([3.0, 3.0]), 3.0)
    assert ema([0.0, 6.0], span=2)[-1] == pytest.approx(4.0)  # weight 2/3 on the newest value
    assert flops_to_reach([0, 10, 20], [5.0, 3.0, 1.0], 2.0) == pytest.approx(15.0)
    assert flops_to_reach([0, 10], [5.0, 3.0], 1.0) == math.inf


def test_growth_run_matches_the_scratch_budget_and_knows_its_operators():
    for op in ("stack", "zero_depth", "fpi_width", "aki_width"):
        run = GrowthRun(operator=op)
        small = run.small_steps * run.tokens_per_step() * flops_per_token(run.small_config(65))
        grown = run.grown_steps(65) * run.tokens_per_step() * flops_per_token(run.target_config(65))
        budget = run.budget_flops(65)
        assert abs(small + grown - budget) <= run.tokens_per_step() * flops_per_token(run.target_config(65))
    assert GrowthRun(operator="stack").small_config(65).n_layers == 2
    narrow = GrowthRun(operator="aki_width").small_config(65)
    assert narrow.d_model == 32 and narrow.n_heads == 4 and narrow.head_dim == 8
    with pytest.raises(PretrainNbError, match="valid operators"):
        GrowthRun(operator="grow")
    with pytest.raises(PretrainNbError, match="whole budget"):
        GrowthRun(operator="stack", small_steps=100_000).grown_steps(65)


def test_run_growth_repeats_exactly_and_spends_the_budget():
    profile = dataclasses.replace(load_profile("smoke"), cpu_threads=0)
    settings = dict(
        n_layers=4, d_model=16, n_heads=2, depth_factor=2, steps=8, small_steps=3, batch_size=4,
        block_size=16, eval_every=4, n_val_blocks=4, n_similarity_blocks=2,
    )  # fmt: skip
    a = run_growth(0, profile, operator="zero_depth", **settings)
    b = run_growth(0, profile, operator="zero_depth", **settings)
    assert a.history == b.history
    assert a.history["phase"][0] == "small" and a.history["phase"][-1] == "target"
    small_steps = max(st for st, ph in zip(a.history["step"], a.history["phase"]) if ph == "small")
    target_steps = a.history["step"][-1]
    assert a.history["tokens"][-1] == (small_steps + target_steps) * 4 * 16  # batch 4 x 16 characters
    assert abs(a.history["flops"][-1] - a.budget_flops) / a.budget_flops < 0.2  # to a step of 8
    assert a.loss_at_growth == pytest.approx(a.loss_small, abs=1e-5)  # zero-init: no jump
    scratch = run_growth(0, profile, operator="scratch", **settings)
    assert scratch.loss_small is None and scratch.history["flops"][-1] == pytest.approx(scratch.budget_flops)
