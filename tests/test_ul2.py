"""UL2 (pretrain_nb.ul2): span corruption statistics and round trip, the denoisers' sequences, the
target-only loss, the objectives' mode tokens, one run."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.data import PAD_ID
from pretrain_nb.models import GPT, TransformerConfig
from pretrain_nb.ul2 import (
    DENOISERS,
    OBJECTIVE_MIXES,
    UL2Result,
    UL2Run,
    Vocab,
    denoise_batch,
    measure,
    noise_mask,
    pretrain_ul2,
    span_corrupt,
    span_counts,
    span_lengths,
    target_loss,
    target_token_losses,
    ul2_loss,
    undo_span_corruption,
    unigram_loss,
)

VOCAB = Vocab(base=100, n_sentinels=16)


@pytest.mark.parametrize("rate,mean_span", [(0.15, 3.0), (0.5, 8.0), (0.3, 2.0), (0.5, 3.0)])
def test_noise_mask_hides_the_set_fraction_in_the_set_number_of_spans(rate, mean_span):
    torch.manual_seed(0)
    L = 48
    n_noise, n_spans = span_counts(L, rate, mean_span)
    assert n_noise == round(rate * L)
    # mean span = hidden / spans, within rounding
    assert abs(n_noise / n_spans - mean_span) <= mean_span / 2
    m = noise_mask(2000, L, rate, mean_span)
    starts = m & ~F.pad(m, (1, 0))[:, :-1]
    assert (m.sum(1) == n_noise).all()
    assert (starts.sum(1) == n_spans).all()
    assert not m[:, 0].any()  # T5 layout: a visible segment first
    first_start = starts.float().argmax(1)
    assert first_start.float().std() > 0.5  # span positions vary across rows


def test_span_lengths_are_positive_and_sum_to_the_total():
    torch.manual_seed(1)
    lengths = span_lengths(500, 24, 3)
    assert (lengths >= 1).all()
    assert (lengths.sum(1) == 24).all()
    assert lengths.float().mean().item() == 8.0
    assert len({tuple(r.tolist()) for r in lengths}) > 50


@pytest.mark.parametrize("denoiser", ["R", "X"])
def test_span_corruption_round_trips_and_has_the_predicted_lengths(denoiser):
    torch.manual_seed(2)
    tokens = torch.randint(4, 100, (64, 48))
    mask = noise_mask(64, 48, **DENOISERS[denoiser])
    inputs, targets = span_corrupt(tokens, mask, VOCAB)
    n_noise, n_spans = span_counts(48, **DENOISERS[denoiser])
    assert inputs.shape == (64, 48 - n_noise + n_spans)
    assert targets.shape == (64, n_noise + n_spans)
    # the targets reconstruct the input exactly
    assert undo_span_corruption(inputs, targets, VOCAB) == tokens.tolist()
    assert torch.equal(targets[:, 0], torch.full((64,), VOCAB.sentinel(0)))


def test_too_many_spans_for_the_sentinels_is_one_sentence():
    with pytest.raises(PretrainNbError, match="more than the 2 sentinels"):
        span_corrupt(torch.randint(4, 100, (2, 48)), noise_mask(2, 48, 0.5, 2.0), Vocab(100, 2))
    with pytest.raises(PretrainNbError, match=r"must lie in \(0, 1\)"):
        span_counts(48, 1.0, 3.0)


def test_denoiser_sequences_mark_exactly_the_targets():
    torch.manual_seed(3)
    blocks = torch.randint(4, 100, (16, 48))
    seq, is_t = denoise_batch(blocks, "X", VOCAB, 60)
    n_noise, n_spans = span_counts(48, **DENOISERS["X"])
    assert (seq[:, 0] == VOCAB.mode("X")).all()
    assert (is_t.sum(1) == n_noise + n_spans).all()
    assert seq[~is_t][-1] == PAD_ID
    seq, is_t = denoise_batch(blocks, "S", VOCAB, 60)
    cut = 48 + 1 - is_t.sum(1)  # prefix length including the mode token
    assert ((cut - 1 >= 12) & (cut - 1 <= 36)).all()
    assert torch.equal(seq[:, 1:49], blocks)
    with pytest.raises(PretrainNbError, match="valid denoisers are"):
        denoise_batch(blocks, "Q", VOCAB, 60)


def test_target_loss_reads_only_the_targets():
    torch.manual_seed(4)
    model = GPT(TransformerConfig(vocab_size=VOCAB.size, block_size=60, d_model=16, n_layers=1, n_heads=2))
    seq, is_t = denoise_batch(torch.randint(4, 100, (4, 48)), "R", VOCAB, 60)
    logits = model(seq)[:, :-1]
    manual = torch.stack(
        [F.cross_entropy(logits[b, t - 1], seq[b, t]) for b in range(4) for t in range(1, 60) if is_t[b, t]]
    ).mean()
    assert torch.allclose(target_loss(model, seq, is_t), manual, atol=1e-5)
    losses, weights = target_token_losses(model, seq, is_t)
    assert losses.shape == weights.shape == (4, 59)
    assert torch.equal(weights.bool(), is_t[:, 1:])  # the weight of position t: is token t + 1 a target
    assert torch.allclose((losses * weights).sum() / weights.sum(), manual, atol=1e-5)
    for objective in ("causal LM", "span corruption", "prefix LM", "MoD"):
        assert math.isfinite(ul2_loss(objective, VOCAB, 60)(model, torch.randint(4, 100, (6, 48))).item())
    with pytest.raises(PretrainNbError, match="valid UL2 objectives are"):
        ul2_loss("BART", VOCAB, 60)


def test_each_objective_uses_mode_tokens_as_its_mix_says():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, sequences):
            self.seen.append(sequences)
            return torch.zeros(*sequences.shape, VOCAB.size)

    blocks = torch.randint(4, 100, (6, 48))
    for objective, mix in OBJECTIVE_MIXES.items():
        recorder = Recorder()
        ul2_loss(objective, VOCAB, 60)(recorder, blocks)
        has_mode = (recorder.seen[0] >= VOCAB.base + VOCAB.n_sentinels).any(1)
        assert has_mode.all() == mix.mode_tokens
        assert has_mode.any() == mix.mode_tokens
    assert not OBJECTIVE_MIXES["span corruption"].mode_tokens
    assert OBJECTIVE_MIXES["MoD"].mode_tokens


def test_the_run_settings_keep_their_schedule():
    tcfg = UL2Run().train_config(seed=2)
    assert (tcfg.steps, tcfg.batch_size, tcfg.lr, tcfg.weight_decay) == (600, 32, 2e-3, 0.01)
    assert tcfg.warmup_steps == tcfg.eval_every == 60
    assert tcfg.schedule == "cosine"
    assert tcfg.seed == 2
    assert UL2Run(steps=5).train_config(seed=0).eval_every == 1


def test_one_run_repeats_exactly():
    smoke = load_profile("smoke")
    settings = dict(steps=3, batch_size=6, d_model=16, n_layers=1, n_heads=2, max_files=10, n_eval=16)
    a = pretrain_ul2(seed=0, profile=smoke, objective="MoD", **settings)
    b = pretrain_ul2(seed=0, profile=smoke, objective="MoD", **settings)
    assert isinstance(a, UL2Result)
    assert (a.run.objective, a.run.steps, a.seed) == ("MoD", 3, 0)
    assert a.continuation_loss == b.continuation_loss
    assert a.infill_loss == b.infill_loss
    assert a.history == b.history
    assert len(a.history["step"]) == 3
    assert 0 <= a.exact_match_X <= 1
    assert math.isfinite(a.infill_loss_R)


def test_the_unigram_baseline_is_the_cross_entropy_of_the_training_frequencies():
    train = torch.tensor([[0, 0, 0, 1]])  # add-one smoothed over 3 ids: p = 4/7, 2/7, 1/7
    held_out = torch.tensor([[0, 2]])
    expected = -(math.log(4 / 7) + math.log(1 / 7)) / 2
    assert unigram_loss(train, held_out, 3) == pytest.approx(expected)
    torch.manual_seed(0)
    noise = torch.randint(0, 50, (2, 50_000))
    assert unigram_loss(noise[0], noise[1], 50) == pytest.approx(math.log(50), abs=0.01)


def test_measure_scores_each_task_in_both_formats():
    torch.manual_seed(0)
    vocab = Vocab(100)
    model = GPT(TransformerConfig(vocab_size=vocab.size, block_size=60, d_model=16, n_layers=1, n_heads=2))
    blocks = torch.randint(4, 100, (8, 48))
    for mode_tokens in (True, False):
        scores = measure(model, blocks, vocab, 60, mode_tokens=mode_tokens)
        for key in ("left_infill_loss_R", "left_infill_loss_X", "left_infill_loss", "continuation_span_loss"):
            assert math.isfinite(scores[key])
        # an untrained decoder is about uniform in every format
        assert abs(scores["left_infill_loss"] - math.log(vocab.size)) < 0.5
        assert abs(scores["continuation_span_loss"] - math.log(vocab.size)) < 0.5
        assert measure(model, blocks, vocab, 60, mode_tokens=mode_tokens) == scores
