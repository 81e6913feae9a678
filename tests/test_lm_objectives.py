"""Language-model objectives (pretrain_nb.lm_objectives): corruption statistics, what each objective's loss
reads, ELECTRA's labels and gradients, FLOPs against the models' weights, the objectives' table, the probe
data, one run."""

import math

import pytest
import torch
from torch import nn

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.data import MASK_ID, N_SPECIAL, PAD_ID, STATEMENT_KINDS, code_blocks, statement_kind_lines
from pretrain_nb.lm_objectives import (
    OBJECTIVES,
    Discriminator,
    Electra,
    ObjectiveResult,
    ObjectiveRun,
    bag_of_tokens_probe,
    bracket_change,
    bracket_depth,
    depth_probe,
    detector_flops,
    electra_flops,
    generator_config,
    get_objective,
    lm_flops,
    mask_tokens,
    masked_lm_flops,
    objective_data,
    pretrain_objective,
    replaced_labels,
    select_positions,
    substitute_random,
    token_position_probe,
    token_sample,
)
from pretrain_nb.models import GPT, MaskedLM, TransformerConfig, causal_lm_loss

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
    inputs, labels = mask_tokens(x, V)
    sel = labels != -100
    n = int(sel.sum())
    assert torch.equal(labels[sel], x[sel])  # the selected positions are the targets
    assert torch.equal(inputs[~sel], x[~sel])  # and only they change
    masked = (inputs[sel] == MASK_ID).float().mean().item()
    same = (inputs[sel] == x[sel]).float().mean().item()
    other = ((inputs[sel] != MASK_ID) & (inputs[sel] != x[sel])).float().mean().item()
    p_collide = 1 / (V - N_SPECIAL)  # a random replacement can equal the original
    assert _within(masked, 0.8, n)
    assert _within(same, 0.1 + 0.1 * p_collide, n)
    assert _within(other, 0.1 * (1 - p_collide), n)
    assert (inputs[sel & (inputs != MASK_ID)] >= N_SPECIAL).all()  # random tokens are never special
    assert not sel[x < N_SPECIAL].any()


def test_substitution_and_the_equal_sample_counts_as_original_rule():
    torch.manual_seed(2)
    x = _tokens()
    inputs, sel = substitute_random(x, V)
    assert torch.equal(inputs[~sel], x[~sel])
    assert (inputs[sel] >= N_SPECIAL).all()
    labels = replaced_labels(inputs, x)
    assert torch.equal(labels.bool(), inputs != x)
    same = sel & (inputs == x)
    assert same.any()
    assert (labels[same] == 0).all()  # drawn equal to the original: labelled original
    assert _within((labels[sel] == 1).float().mean().item(), 1 - 1 / (V - N_SPECIAL), int(sel.sum()))


def test_electra_shares_embeddings_and_the_discriminator_loss_does_not_train_the_generator():
    cfg = TransformerConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4)
    torch.manual_seed(0)
    model = get_objective("electra").model(cfg)
    assert isinstance(model, Electra)
    assert model.generator.embedding is model.discriminator.encoder.tok_emb
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
    # sampling is under no_grad: only the generator's own MLM loss reaches it
    assert torch.allclose(grads[0], grads[1])
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


def _linear_weights(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_flops_are_six_times_the_models_matmul_weights_plus_attention():
    cfg = TransformerConfig(vocab_size=300, d_model=48, n_layers=2, n_heads=4)
    T = 40
    attention = 12 * cfg.n_layers * T * cfg.d_model
    vocabulary = cfg.vocab_size * cfg.d_model  # the tied heads' scores through the embedding matrix
    assert lm_flops(cfg, T) == 6 * _linear_weights(GPT(cfg)) + attention
    assert masked_lm_flops(cfg, T) == 6 * (_linear_weights(MaskedLM(cfg)) + vocabulary) + attention
    assert detector_flops(cfg, T) == 6 * _linear_weights(Discriminator(cfg)) + attention
    generator = Electra(cfg).generator
    g_attention = 12 * generator.cfg.n_layers * T * generator.cfg.d_model
    generator_cost = 6 * (_linear_weights(generator) + vocabulary) + g_attention
    assert electra_flops(cfg, T) - detector_flops(cfg, T) == generator_cost


class _Recorder(nn.Module):
    "Zero logits over `width` classes (or one per token), recording the inputs."

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.seen = []

    def forward(self, idx):
        self.seen.append(idx)
        return torch.zeros(*idx.shape, *([self.width] if self.width else []))


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_reads_what_its_corruption_says(name):
    objective = get_objective(name)
    x = _tokens(32, 48)
    torch.manual_seed(7)
    model = objective.model(TransformerConfig(vocab_size=V, block_size=48, d_model=16, n_layers=1, n_heads=2))
    torch.manual_seed(3)
    corruption = objective.corrupt(model, x, V, 0.15)
    assert corruption.inputs.shape == corruption.targets.shape == corruption.selected.shape == x.shape
    assert torch.equal(corruption.inputs[~corruption.selected], x[~corruption.selected])
    if objective.detects:  # a replaced (1) or original (0) label at every position
        assert torch.equal(corruption.targets.bool(), corruption.inputs != x)
    elif name == "clm":  # nothing corrupted; the next token everywhere but at the end
        assert torch.equal(corruption.targets[:, :-1], x[:, 1:])
        assert not corruption.selected.any()
    else:  # the original token at the selected positions, nothing elsewhere
        assert torch.equal(corruption.targets != -100, corruption.selected)
        assert torch.equal(corruption.targets[corruption.selected], x[corruption.selected])
    # the training loss is the registered loss of this corruption: the same random numbers, the same loss
    torch.manual_seed(3)
    trained = objective.loss_fn(V)(model, x)
    torch.manual_seed(3)
    assert torch.equal(trained, objective.loss(model, objective.corrupt(model, x, V, 0.15)))
    recorder = _Recorder(None if objective.detects else V)
    if name != "electra":  # a uniform model: ln |V| per token predicted, ln 2 per label
        torch.manual_seed(3)
        uniform = objective.loss_fn(V)(recorder, x).item()
        assert uniform == pytest.approx(math.log(2) if objective.detects else math.log(V), abs=1e-5)
        assert torch.equal(recorder.seen[0], corruption.inputs)


def test_the_causal_lm_loss_is_the_shared_next_token_loss():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, block_size=48, d_model=16, n_layers=1, n_heads=2)
    model = GPT(cfg)
    x = _tokens(8, 48)
    assert torch.equal(get_objective("clm").loss_fn(V)(model, x), causal_lm_loss(model(x), x))


def test_steps_come_from_the_flop_budget_unless_given():
    runs = {o: ObjectiveRun(objective=o) for o in OBJECTIVES}
    cfg = runs["mlm"].model_config()
    for o, run in runs.items():
        tokens = run.batch_size * run.block_size
        assert run.total_steps() == round(
            run.budget_flops / (get_objective(o).flops_per_token(cfg, 64) * tokens)
        )
        tcfg = run.train_config(seed=1)
        assert tcfg.steps == run.total_steps()
        assert tcfg.eval_every == run.total_steps() // 4
        assert tcfg.warmup_steps == run.total_steps() // 10
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
    assert isinstance(a, ObjectiveResult)
    assert (a.run.objective, a.seed) == ("electra", 0)
    assert a.history["train_loss"] == b.history["train_loss"]
    assert a.final_accuracy == b.final_accuracy
    assert 0 <= a.final_accuracy <= 1
    assert a.steps >= 1
    for o in ("clm", "mlm", "rts", "slm"):
        assert math.isfinite(
            pretrain_objective(seed=0, profile=smoke, objective=o, **settings).history["train_loss"][-1]
        )
    data = objective_data(512, 32, 10, 15)
    labels = data["probe_test"][2]
    assert len(labels) <= 15 * len(STATEMENT_KINDS)
    assert labels.bincount().max() <= 15
    assert (data["probe_test"][1].sum(1) > 0).all()
    with pytest.raises(PretrainNbError, match="valid ObjectiveRun settings"):
        pretrain_objective(seed=0, profile=smoke, objectve="mlm")


def test_the_probe_data_are_the_packages_code_blocks_and_statement_lines():
    data = objective_data(512, 32, 10, 15)
    code = code_blocks(512, 32, 10)
    lines = statement_kind_lines(code["tokenizer"], per_class=15)
    assert torch.equal(data["blocks"], code["blocks"])
    assert data["vocab_size"] == code["vocab_size"]
    for split in ("probe_train", "probe_test"):
        assert all(torch.equal(a, b) for a, b in zip(data[split], lines[split]))


def test_the_bag_of_tokens_baseline_ignores_order_and_padding():
    data = objective_data(512, 32, 10, 15)
    accuracy = bag_of_tokens_probe(data)
    ids, mask, labels = data["probe_test"]
    assert accuracy > labels.bincount().max().item() / len(labels)  # better than the majority kind
    torch.manual_seed(0)
    order = torch.argsort(torch.rand(ids.shape), 1)
    shuffled = data | {"probe_test": (ids.gather(1, order), mask.gather(1, order), labels)}
    assert bag_of_tokens_probe(shuffled) == accuracy
    # a padded position counts for nothing, whatever id it holds
    other_padding = data | {"probe_test": (torch.where(mask, ids, N_SPECIAL + 1), mask, labels)}
    assert bag_of_tokens_probe(other_padding) == accuracy


def test_bracket_depth_counts_the_brackets_open_after_each_token():
    data = objective_data(512, 32, 10, 15)
    tokenizer = data["tokenizer"]
    change = bracket_change(tokenizer)
    assert change.shape == (data["vocab_size"],)
    # by hand: the text of every token, its brackets counted character by character
    for i in range(data["vocab_size"]):
        text = tokenizer.decode([i])
        assert change[i] == sum(text.count(c) for c in "([{") - sum(text.count(c) for c in ")]}")
    line = tokenizer.encode("f(a[b], {c: (d)})")
    ids = torch.tensor([line.tolist() + [PAD_ID, PAD_ID]])
    depth = bracket_depth(ids, ids != PAD_ID, change, deepest=3)
    text_so_far = ""
    for t, d in zip(line.tolist(), depth[0].tolist()):
        text_so_far += tokenizer.decode([t])
        opened = sum(text_so_far.count(c) for c in "([{") - sum(text_so_far.count(c) for c in ")]}")
        assert d == min(3, max(0, opened))
    assert depth[0, -2:].tolist() == [-1, -1]  # padding
    assert bracket_depth(ids, ids != PAD_ID, change, deepest=1).max() == 1


def test_the_depth_probe_and_its_no_context_baseline():
    data = objective_data(512, 32, 10, 15)
    ids, mask, _ = data["probe_test"]
    sample = token_sample(mask, 50)
    assert len(sample) == 50 and mask.flatten()[sample].all()
    assert torch.equal(sample, token_sample(mask, 50))  # drawn once from the seed
    assert len(token_sample(mask, 10**9)) == mask.sum()
    baseline = token_position_probe(data)
    depths = bracket_depth(ids, mask, bracket_change(data["tokenizer"]))
    majority = depths[depths >= 0].bincount().max().item() / mask.sum().item()
    assert baseline > majority
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=512, block_size=32, d_model=16, n_layers=1, n_heads=2)
    accuracy = depth_probe(MaskedLM(cfg), data)
    assert 0 < accuracy <= 1
