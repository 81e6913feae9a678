"""Language-model objectives (pretrain_nb.lm_objectives): corruption statistics, ELECTRA's labels and
gradients, FLOPs, the objectives' table, the probe data, one run."""

import math

import pytest
import torch

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.data import MASK_ID, N_SPECIAL, PAD_ID, STATEMENT_KINDS, code_blocks, statement_kind_lines
from pretrain_nb.lm_objectives import (
    OBJECTIVES,
    Electra,
    ObjectiveResult,
    ObjectiveRun,
    generator_config,
    get_objective,
    mlm_corrupt,
    objective_data,
    pretrain_objective,
    replaced_labels,
    select_positions,
    substitute_random,
)
from pretrain_nb.models import TransformerConfig

V = 100


def _tokens(n=4000, t=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(N_SPECIAL, V, (n, t), generator=g)
    x[:, ::8] = PAD_ID  # special tokens sprinkled in: never selected
    return x


def _within(p_hat, p, n, z=5.0):
    return abs(p_hat - p) < z * math.sqrt(p * (1 - p) / n)


def test_selection_rate_and_special_tokens_never_selected():
    torch.manual_seed(0)
    x = _tokens()
    sel = select_positions(x, 0.15)
    ordinary = x >= N_SPECIAL
    assert not sel[~ordinary].any()
    assert _within(sel[ordinary].float().mean().item(), 0.15, int(ordinary.sum()))
    for bad in (0.0, 1.0):
        with pytest.raises(PretrainNbError, match=r"must lie in \(0, 1\)"):
            select_positions(x, bad)


def test_mlm_80_10_10_split_within_binomial_tolerance():
    torch.manual_seed(1)
    x = _tokens()
    inputs, labels = mlm_corrupt(x, V)
    sel = labels != -100
    n = int(sel.sum())
    assert torch.equal(labels[sel], x[sel]) and torch.equal(
        inputs[~sel], x[~sel]
    )  # only selected positions change, and are the targets
    masked = (inputs[sel] == MASK_ID).float().mean().item()
    same = (inputs[sel] == x[sel]).float().mean().item()
    other = ((inputs[sel] != MASK_ID) & (inputs[sel] != x[sel])).float().mean().item()
    p_collide = 1 / (V - N_SPECIAL)  # a random replacement can equal the original
    assert (
        _within(masked, 0.8, n)
        and _within(same, 0.1 + 0.1 * p_collide, n)
        and _within(other, 0.1 * (1 - p_collide), n)
    )
    assert (inputs[sel & (inputs != MASK_ID)] >= N_SPECIAL).all()  # random tokens are never special
    assert not sel[x < N_SPECIAL].any()


def test_substitution_and_the_equal_sample_counts_as_original_rule():
    torch.manual_seed(2)
    x = _tokens()
    inputs, sel = substitute_random(x, V)
    assert torch.equal(inputs[~sel], x[~sel]) and (inputs[sel] >= N_SPECIAL).all()
    labels = replaced_labels(inputs, x)
    assert torch.equal(labels.bool(), inputs != x)
    same = sel & (inputs == x)
    assert same.any() and (labels[same] == 0).all()  # drawn equal to the original: labelled original
    assert _within((labels[sel] == 1).float().mean().item(), 1 - 1 / (V - N_SPECIAL), int(sel.sum()))


def test_electra_shares_embeddings_and_the_discriminator_loss_does_not_train_the_generator():
    cfg = TransformerConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4)
    torch.manual_seed(0)
    model = get_objective("electra").model(cfg)
    assert isinstance(model, Electra) and model.generator.embedding is model.discriminator.encoder.tok_emb
    assert generator_config(cfg).d_model == 8
    x = _tokens(8, 32)
    grads = []
    for weight in (0.0, 50.0):
        model.zero_grad()
        torch.manual_seed(5)
        get_objective("electra").loss_fn(V, disc_weight=weight)(model, x).backward()
        grads.append(
            torch.cat(
                [
                    p.grad.flatten()
                    for n, p in model.generator.named_parameters()
                    if not n.startswith("embedding")
                ]
            )
        )
    assert torch.allclose(
        grads[0], grads[1]
    )  # sampling is under no_grad: only the generator's own MLM loss reaches it
    assert any(p.grad.abs().sum() > 0 for p in model.discriminator.head.parameters())


def test_flops_rank_the_objectives_and_count_the_generator():
    cfg = TransformerConfig(vocab_size=512, d_model=64, n_layers=3, n_heads=4)
    f = {o: objective.flops_per_token(cfg, 64) for o, objective in OBJECTIVES.items()}
    assert f["rts"] < f["clm"] < f["mlm"] == f["slm"] < f["electra"]
    g = generator_config(cfg)
    gen = (
        6 * (g.n_layers * 12 * g.d_model**2 + 2 * 64 * g.d_model + 64 * 512)
        + 12 * g.n_layers * 64 * g.d_model
    )
    assert math.isclose(f["electra"] - f["rts"], gen)
    with pytest.raises(PretrainNbError, match="valid objectives are"):
        get_objective("t5")


def test_steps_come_from_the_flop_budget_unless_given():
    runs = {o: ObjectiveRun(objective=o) for o in OBJECTIVES}
    cfg = runs["mlm"].model_config()
    for o, run in runs.items():
        tokens = run.batch_size * run.block_size
        assert run.total_steps() == round(
            run.budget_flops / (get_objective(o).flops_per_token(cfg, 64) * tokens)
        )
        tcfg = run.train_config(seed=1)
        assert (tcfg.steps, tcfg.eval_every, tcfg.warmup_steps) == (
            run.total_steps(),
            run.total_steps() // 4,
            run.total_steps() // 10,
        )
    assert ObjectiveRun(steps=7).total_steps() == 7
    assert ObjectiveRun(budget_flops=1.0).total_steps() == 4  # at least one step per probe


def test_every_objective_trains_and_a_run_repeats_exactly():
    smoke = load_profile("smoke")
    settings = dict(
        budget_flops=3e8,
        d_model=16,
        n_layers=1,
        n_heads=2,
        batch_size=8,
        block_size=32,
        max_files=10,
        per_class=15,
        n_evals=1,
    )
    a = pretrain_objective(seed=0, profile=smoke, objective="electra", **settings)
    b = pretrain_objective(seed=0, profile=smoke, objective="electra", **settings)
    assert isinstance(a, ObjectiveResult) and a.run.objective == "electra" and a.seed == 0
    assert a.history["train_loss"] == b.history["train_loss"] and a.final_accuracy == b.final_accuracy
    assert 0 <= a.final_accuracy <= 1 and a.steps >= 1
    for o in ("clm", "mlm", "rts", "slm"):
        assert math.isfinite(
            pretrain_objective(seed=0, profile=smoke, objective=o, **settings).history["train_loss"][-1]
        )
    data = objective_data(512, 32, 10, 15)
    labels = data["probe_test"][2]
    assert (
        len(labels) <= 15 * len(STATEMENT_KINDS)
        and labels.bincount().max() <= 15
        and (data["probe_test"][1].sum(1) > 0).all()
    )
    with pytest.raises(PretrainNbError, match="valid ObjectiveRun settings"):
        pretrain_objective(seed=0, profile=smoke, objectve="mlm")


def test_the_probe_data_are_the_packages_code_blocks_and_statement_lines():
    data = objective_data(512, 32, 10, 15)
    code = code_blocks(512, 32, 10)
    lines = statement_kind_lines(code["tokenizer"], per_class=15)
    assert torch.equal(data["blocks"], code["blocks"]) and data["vocab_size"] == code["vocab_size"]
    for split in ("probe_train", "probe_test"):
        assert all(torch.equal(a, b) for a, b in zip(data[split], lines[split]))
