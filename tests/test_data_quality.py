"""Data quality, metadata and membership (pretrain_nb.data_quality): each test checks a property of the method
that a wrong implementation would break."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain_nb.core import PretrainNbError, load_profile
from pretrain_nb.data_quality import (
    MetadataVocab,
    bradley_terry_loss,
    corrupt,
    format_documents,
    gumbel_top_k,
    judge_pairs,
    markov_sites,
    membership_scores,
    min_k_split,
    oracle_losses,
    pairwise_accuracy,
    run_membership,
    run_metadata,
    run_quality_selection,
    sample_markov,
    selection_summary,
    site_log_likelihoods,
    token_log_probs,
    train_rater,
    trigram_features,
)
from pretrain_nb.models import GPT, TransformerConfig, masked_lm_loss

SMOKE = load_profile("smoke")


def test_gumbel_top_k_at_zero_temperature_is_the_top_k():
    r = torch.randn(500, generator=torch.Generator().manual_seed(0))
    for tau in (0.0, 1e-5):
        chosen = gumbel_top_k(r, 50, tau, torch.Generator().manual_seed(1))
        assert set(chosen.tolist()) == set(r.topk(50).indices.tolist())


def test_gumbel_top_k_samples_without_replacement_and_repeats_with_its_seed():
    r = torch.randn(300, generator=torch.Generator().manual_seed(0))
    a = gumbel_top_k(r, 300, 1.0, torch.Generator().manual_seed(3))  # the whole pool: a permutation
    assert sorted(a.tolist()) == list(range(300))
    b, c = (gumbel_top_k(r, 40, 2.0, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(b, c)
    assert not torch.equal(b, gumbel_top_k(r, 40, 2.0, torch.Generator().manual_seed(4)))


def test_gumbel_top_k_follows_the_softmax_of_the_ratings():
    # first draw of Gumbel top-k = a sample from softmax(z / tau): check its frequencies
    r = torch.tensor([0.0, 1.0, 2.0, 3.0])
    z = (r - r.mean()) / r.std()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([gumbel_top_k(r, 1, 1.0, g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, F.softmax(z, 0), atol=0.03)


def test_gumbel_top_k_at_infinite_temperature_ignores_the_ratings():
    r = torch.arange(1000.0)
    chosen = gumbel_top_k(r, 500, math.inf, torch.Generator().manual_seed(0))
    assert abs(r[chosen].mean() - r.mean()) < 30  # a uniform half, not the top half (mean 749.5)


def test_gumbel_top_k_refuses_bad_arguments_in_one_sentence():
    with pytest.raises(PretrainNbError, match="k must lie"):
        gumbel_top_k(torch.zeros(3), 4, 1.0, torch.Generator())
    with pytest.raises(PretrainNbError, match="temperature"):
        gumbel_top_k(torch.zeros(3), 1, -1.0, torch.Generator())


def test_bradley_terry_rater_recovers_a_linear_quality():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 20, generator=g)
    w_true = torch.randn(20, generator=g)
    quality = (features @ w_true).numpy() / 10
    pairs, labels = judge_pairs(quality, 3000, 0.05, g)
    rater = train_rater(features, pairs[:2000], labels[:2000], l2=1e-4)
    assert pairwise_accuracy(rater(features), pairs[2000:], labels[2000:]) > 0.8
    cos = F.cosine_similarity(rater[0].weight.flatten(), w_true, dim=0)
    assert cos > 0.9


def test_bradley_terry_loss_is_symmetric_under_swapping_the_pair():
    s = torch.randn(6)
    p = torch.tensor([[0, 1], [2, 3], [4, 5]])
    y = torch.tensor([1.0, 0.0, 1.0])
    assert torch.isclose(bradley_terry_loss(s, p, y), bradley_terry_loss(s, p.flip(1), 1 - y))


def test_corruption_rate_and_trigram_features():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 50, (300, 400), generator=g)
    out = corrupt(codes, torch.full((300,), 0.2), g)
    assert abs((out != codes).float().mean() - 0.2 * (1 - 1 / 50)) < 0.01  # a draw can return the same token
    assert torch.equal(corrupt(codes, torch.zeros(300), g), codes)
    feats = trigram_features(codes[:5], 256)
    assert torch.allclose(feats.norm(dim=1), torch.ones(5))


def test_selection_summary_counts_topics():
    topics = np.array([0, 0, 1, 1, 2, 2])
    s = selection_summary(topics, np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), [0, 1, 2])
    assert s["topic_counts"] == [2, 1, 0] and math.isclose(s["coverage"], 2 / 3)
    assert math.isclose(s["mean_quality"], 0.2) and 1 < s["effective_topics"] < 2


def test_metadata_positions_get_no_loss_and_the_loss_is_the_plain_one():
    vocab = MetadataVocab(16, 4)
    docs = torch.randint(16, (3, 12))
    tagged = format_documents(docs, vocab, torch.tensor([0, 1, 3]))
    plain = format_documents(docs, vocab)
    torch.manual_seed(0)
    model = GPT(TransformerConfig(vocab_size=vocab.size, block_size=15, d_model=16, n_layers=1, n_heads=2))
    # a model that ignores everything but the previous token gives the same loss with and without metadata
    logits = torch.randn(3, 15, vocab.size, requires_grad=True)
    from pretrain_nb.models import causal_lm_loss

    causal_lm_loss(logits, tagged[0].masked_fill(~tagged[1], -100)).backward()
    assert (logits.grad[:, :2] == 0).all()  # the positions predicting <site> and <sep> give no gradient
    assert tagged[1].sum() == plain[1].sum() == docs.numel()  # the same targets: the document's symbols
    loss = masked_lm_loss(model, tagged)
    loss.backward()
    assert model.tok_emb.weight.grad[vocab.tag(torch.tensor([0]))].abs().sum() > 0  # tags are read as context


def test_markov_sampling_matches_the_chain():
    t = markov_sites(2, 8, np.random.default_rng(0))
    docs = sample_markov(t, torch.zeros(4000, dtype=torch.long), 30, torch.Generator().manual_seed(0))
    counts = torch.zeros(8, 8).index_put_((docs[:, :-1].flatten(), docs[:, 1:].flatten()),
                                          torch.ones(4000 * 29), accumulate=True)  # fmt: skip
    assert torch.allclose(counts / counts.sum(1, keepdim=True), t[0], atol=0.03)
    ll = site_log_likelihoods(t, docs[:100])
    assert (ll.argmax(1) == 0).all()


def test_oracle_mixture_converges_to_the_known_site():
    t = markov_sites(4, 16, np.random.default_rng(1))
    sites = torch.arange(4).repeat(100)
    docs = sample_markov(t, sites, 200, torch.Generator().manual_seed(0))
    known, mixture = oracle_losses(t, docs, sites)
    assert mixture[:, 0].mean() > known[:, 0].mean() + 0.05
    assert abs(mixture[:, -20:].mean() - known[:, -20:].mean()) < 0.01


def test_token_log_probs_give_the_masked_loss():
    torch.manual_seed(0)
    model = GPT(TransformerConfig(vocab_size=20, block_size=10, d_model=16, n_layers=1, n_heads=2))
    idx = torch.randint(20, (4, 10))
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[:, :3] = False
    lp = token_log_probs(model, idx, mask)
    assert lp[:, :3].isnan().all() and torch.isclose(
        -lp.nanmean(), masked_lm_loss(model, (idx, mask)), atol=1e-5
    )


def test_min_k_picks_the_lowest_token_log_probabilities():
    lp = torch.tensor([[-0.1, -5.0, -0.2, -0.3, -4.0, -0.4, -0.5, -0.6, -0.7, -0.8]])
    low, rest = min_k_split(lp, 0.2)  # the 2 lowest of 10
    assert low.item() == -4.5 and math.isclose(rest.item(), -3.6 / 8, rel_tol=1e-6)
    shuffled = lp[:, torch.randperm(10)]
    assert torch.equal(min_k_split(shuffled, 0.2)[0], low)  # order does not matter
    with pytest.raises(PretrainNbError, match="share"):
        min_k_split(lp, 0.0)


def test_membership_tokenizer_never_sees_the_members():
    from pretrain_nb.data_quality import MembershipRun, membership_documents

    texts = membership_documents(MembershipRun(n_members=20, n_nonmembers=20), 0)
    assert not set(texts["tokenizer"]) & set(texts["members"] + texts["nonmembers"] + texts["shifted"])


def test_membership_scores_are_higher_for_more_likely_texts():
    member = torch.tensor([[-0.5, -0.5, -1.0]])
    other = torch.tensor([[-0.5, -0.5, -4.0]])
    lp = torch.cat([member, other])
    s = membership_scores(
        lp, ["a b c", "a b c"], [0.34], lowercase=lp - 1, reference=lp.new_full(lp.shape, -2.0)
    )
    for name, v in s.items():
        assert v[0] > v[1], name  # the first text is more likely under the target on every score


def test_run_quality_selection_is_deterministic_and_matches_its_budget():
    tiny = dict(per_topic=8, held_out_per_topic=2, chunk_chars=64, n_pairs=100, n_held_pairs=50, d_model=16,
                n_layers=1, n_heads=2, batch_size=8, epochs=2)  # fmt: skip
    a, b = (run_quality_selection(0, SMOKE, "sample tau=2", **tiny) for _ in range(2))
    assert a.bits_per_char == b.bits_per_char and a.summary == b.summary
    assert sum(a.summary["topic_counts"]) == 32 and a.tokens == 2 * 32 * 64  # two epochs of 32 documents
    with pytest.raises(PretrainNbError, match="selection"):
        run_quality_selection(0, SMOKE, "best", **tiny)


def test_meco_cooldown_resumes_the_same_run():
    tiny = dict(n_sites=2, n_symbols=8, doc_len=16, steps=20, batch_size=4, d_model=16, n_layers=1, n_heads=2,
                n_eval_docs=8, generations_per_site=2, gen_len=8, n_evals=20)  # fmt: skip
    meco = run_metadata(0, SMOKE, "meco", **tiny)
    steps = meco.history["step"]
    assert steps == list(range(1, 21))  # one history through both phases: the cooldown continued the run
    assert meco.metadata_tokens == 2 * 18 * 4 and meco.tokens == 20 * 4 * 16
    again = run_metadata(0, SMOKE, "meco", **tiny)
    assert again.loss_plain == meco.loss_plain
    # the cooldown continues the schedule: MeCo's learning rates are a standard run's, step by step
    standard = run_metadata(0, SMOKE, "standard", **tiny)
    assert meco.history["lr"] == pytest.approx(standard.history["lr"], rel=1e-9)
    with pytest.raises(PretrainNbError, match="metadata arm"):
        run_metadata(0, SMOKE, "urls", **tiny)


def test_run_membership_reads_each_epoch_and_refuses_bad_readings():
    tiny = dict(n_members=32, n_nonmembers=32, sentences=2, max_tokens=32, epochs=2, readings=(1, 2),
                batch_size=16, d_model=16, n_layers=1, n_heads=2, reference_d_model=16, reference_n_layers=1,
                ks=(0.2,))  # fmt: skip
    r = run_membership(0, SMOKE, **tiny)
    assert set(r.scores) == {0, 1, 2}  # 0: before training
    assert "smaller reference" in r.scores[2] and "smaller reference" not in r.scores[1]
    assert len(r.labels) == 64 == len(r.scores[2]["min-20%"]) and r.log_probs.shape[0] == 64
    with pytest.raises(PretrainNbError, match="readings"):
        run_membership(0, SMOKE, **(tiny | {"readings": (1,)}))
