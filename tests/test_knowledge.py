"""Synthetic biographies, questions, exposures, scoring and one arm's run (pretrain_nb.knowledge), and the
masked next-token loss they train with (pretrain_nb.models)."""

import random

import numpy as np
import pytest
import torch

from pretrain_nb.core import PretrainNbError
from pretrain_nb.knowledge import (
    ARMS,
    ATTRIBUTES,
    BIO_TEMPLATES,
    QA_TEMPLATES,
    KnowledgeRun,
    attribute_recall,
    biographies,
    biography,
    count_slope,
    diff_in_diff,
    encode,
    exact_match,
    groups,
    make_world,
    pretraining_corpus,
    majority_guess,
    hidden_states,
    probe_accuracy,
    question_frame,
    question_roles,
    questions,
    removed_people,
    run_knowledge,
    summarize,
    vocabulary,
)
from pretrain_nb.models import GPT, TransformerConfig, lm_loss, masked_lm_loss

TINY = KnowledgeRun(n_people=40, n_layers=2, d_model=32, epochs=2, qa_steps=10, qa_eval_every=5)


@pytest.fixture(scope="module")
def world():
    return make_world(80, seed=3)


def test_every_biography_states_exactly_its_persons_attributes(world):
    rng = random.Random(0)
    for i in range(len(world.people)):
        for augmented in (False, True):
            words, tags = biography(world, i, rng, augmented)
            assert len(words) == len(tags)
            for a, attribute in enumerate(ATTRIBUTES):
                assert " ".join(w for w, t in zip(words, tags) if t == a) == world.people[i][attribute]
            text = " ".join(words)
            assert text.count(world.full_name(i)) == (6 if augmented else 1)


def test_augmented_biographies_are_shuffled_and_distinct(world):
    rows, owner = biographies(world, "augmented", seed=0)
    orders = set()
    for k in np.flatnonzero(owner == 3):  # a c = 8 person: eight distinct biographies
        tags = [t for t in rows[k][1] if t >= 0]
        orders.add(tuple(dict.fromkeys(tags)))
    assert len({" ".join(rows[k][0]) for k in np.flatnonzero(owner == 3)}) == 8
    assert len(orders) > 1  # the sentence order changes between biographies
    single, _ = biographies(world, "single", seed=0)
    assert all(tuple(dict.fromkeys(t for t in tags if t >= 0)) == tuple(range(6)) for _, tags in single)


def test_question_wording_never_appears_in_a_biography(world):
    def ngrams(words, n=3):
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    rng = random.Random(0)
    bio_grams = set()
    for i in range(len(world.people)):
        for augmented in (False, True):
            bio_grams |= ngrams(biography(world, i, rng, augmented)[0])
    for template in QA_TEMPLATES.values():
        for part in template.split("{who}"):
            assert not ngrams(part.split()) & bio_grams, part
    assert all(t.startswith("{who}") for ts in BIO_TEMPLATES.values() for t in ts)


def test_exposure_counts_are_as_designed(world):
    n = len(world.people)
    c = groups(n)
    assert (np.bincount(biographies(world, "single", 0)[1], minlength=n) == 1).all()
    assert (np.bincount(biographies(world, "augmented", 0)[1], minlength=n) == c).all()
    treated = removed_people(n, seed=0)
    removed = np.bincount(biographies(world, "removed", 0)[1], minlength=n)
    assert (removed[treated] == 1).all() and (removed[~treated] == c[~treated]).all()
    assert treated.sum() == (c == 8).sum() // 2 and (c[treated] == 8).all()
    test = question_roles(n) == "test"
    assert (treated & test).sum() == ((c == 8) & test).sum() // 2  # half of the c = 8 test people
    with pytest.raises(PretrainNbError, match="the arms are"):
        biographies(world, "paraphrased", 0)


def test_roles_are_stratified_by_group():
    roles = question_roles(400)
    c = groups(400)
    for g in (1, 2, 4, 8):
        counts = {r: int(((roles == r) & (c == g)).sum()) for r in ("train", "val", "test")}
        assert counts == {"train": 40, "val": 10, "test": 50}


def test_world_is_seeded_and_names_are_unique():
    a, b = make_world(120, 5), make_world(120, 5)
    assert a == b and a != make_world(120, 6)
    assert len({a.full_name(i) for i in range(120)}) == 120
    with pytest.raises(PretrainNbError):
        make_world(0, 0)


def test_masked_loss_scores_only_the_marked_targets():
    torch.manual_seed(0)
    model = GPT(TransformerConfig(vocab_size=30, block_size=12, d_model=16, n_layers=1, n_heads=2))
    idx = torch.randint(1, 30, (3, 12))
    full = torch.ones_like(idx, dtype=torch.bool)
    assert torch.allclose(masked_lm_loss(model, (idx, full)), lm_loss(model, idx))
    mask = torch.zeros_like(full)
    mask[:, 8:] = True
    logits = model(idx)
    by_hand = torch.nn.functional.cross_entropy(logits[:, 7:11].reshape(-1, 30), idx[:, 8:].reshape(-1))
    assert torch.allclose(masked_lm_loss(model, (idx, mask)), by_hand)
    # the last token is no prediction's input (causal attention); once it is not a target, it cannot matter
    other = idx.clone()
    other[:, 11] = (other[:, 11] % 29) + 1
    mask_no_last = mask.clone()
    mask_no_last[:, 11] = False
    assert torch.allclose(
        masked_lm_loss(model, (idx, mask_no_last)), masked_lm_loss(model, (other, mask_no_last))
    )
    with pytest.raises(PretrainNbError, match="marks no target"):
        masked_lm_loss(model, (idx, torch.zeros_like(full)))


class Oracle(torch.nn.Module):
    "Argmax is the true next token everywhere, except at the (row, position) pairs given."

    def __init__(self, ids, vocab_size, wrong_at=()):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.roll(ids, -1, 1), vocab_size).float()
        for r, t in wrong_at:
            self.logits[r, t] = self.logits[r, t].roll(1)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits


def test_exact_match_and_recall_need_every_answer_token(world):
    vocab = vocabulary(world)
    rows, _, _ = questions(world)
    ids, marks = encode(rows[:4], vocab, 20)
    assert exact_match(Oracle(ids, len(vocab)), ids, marks).all()
    date_row = 0  # birth date: four answer tokens; a wrong third token fails the whole answer
    third = int((marks[date_row] == 1).nonzero()[2])
    assert exact_match(Oracle(ids, len(vocab), [(date_row, third - 1)]), ids, marks).tolist() == [
        False,
        True,
        True,
        True,
    ]
    bios = [biography(world, i, random.Random(i), True) for i in range(3)]
    b_ids, b_tags = encode(bios, vocab, 64)
    major = int((b_tags[1] == 3).nonzero()[0])
    recall = attribute_recall(Oracle(b_ids, len(vocab), [(1, major - 1)]), b_ids, b_tags)
    assert recall.sum() == 17 and not recall[1, 3]


def test_encode_refuses_rows_that_do_not_fit(world):
    with pytest.raises(PretrainNbError, match="does not fit"):
        encode([biography(world, 0, random.Random(0), True)], vocabulary(world), 16)


def test_hidden_states_end_at_the_last_blocks_output():
    torch.manual_seed(0)
    model = GPT(TransformerConfig(vocab_size=20, block_size=8, d_model=16, n_layers=3, n_heads=2))
    names = torch.randint(1, 20, (5, 3))
    states = hidden_states(model, names)
    assert states.shape == (4, 5, 16)
    assert torch.allclose(model.head(model.trunk.ln_f(states[-1])), model(names)[:, -1], atol=1e-5)


def test_probe_reads_only_what_is_written():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = rng.normal(size=(300, 6))
    x[:, 0] += 5 * y
    assert probe_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.9
    noise = rng.normal(size=(300, 6))
    assert probe_accuracy(noise[:150], y[:150], noise[150:], y[150:]) < 0.65


def test_a_run_records_its_probe_baseline():
    result = run_knowledge("single", 2, TINY)
    assert (
        result.probe_baseline.shape == (6,)
        and ((0 < result.probe_baseline) & (result.probe_baseline <= 1)).all()
    )
    assert result.answer_probes.shape == result.probes.shape


def test_count_slope_and_difference_in_differences():
    assert abs(count_slope({1: 0.2, 2: 0.3, 4: 0.4, 8: 0.5}) - 0.1) < 1e-9
    assert count_slope({1: 0.5, 2: 0.4, 4: 0.3, 8: 0.2}) < 0
    assert abs(diff_in_diff({"treated": 0.6, "control": 0.6}, {"treated": 0.2, "control": 0.5}) - 0.3) < 1e-12


def test_majority_guess_answers_what_everyone_shares():
    assert 0 <= majority_guess(TINY, seed=0) < 0.2
    # one city, university, major and employer for everyone: five of six attributes are guessed right, and
    # a birth date (month, day and year together) almost never
    shared = KnowledgeRun(n_people=40, value_counts=(1, 1, 1, 1))
    assert 5 / 6 <= majority_guess(shared, seed=0) < 5 / 6 + 0.03


def test_the_causal_arm_changes_only_the_treated_peoples_documents(world):
    n = len(world.people)
    treated = removed_people(n, seed=4)
    rows, owner = biographies(world, "augmented", 4)
    cut, cut_owner = biographies(world, "removed", 4)
    for i in range(n):
        before = [rows[k] for k in np.flatnonzero(owner == i)]
        after = [cut[k] for k in np.flatnonzero(cut_owner == i)]
        assert after == (before[:1] if treated[i] else before)


def test_only_the_train_peoples_questions_join_the_mixed_corpus(world):
    vocab = vocabulary(world)
    n = len(world.people)
    ids, targets, person, tags = pretraining_corpus(world, vocab, "mixed", 0, 64)
    bio_ids, bio_targets, bio_person, _ = pretraining_corpus(world, vocab, "augmented", 0, 64)
    k = len(bio_ids)
    assert torch.equal(ids[:k], bio_ids) and torch.equal(targets[:k], bio_targets)
    assert (question_roles(n)[person[k:]] == "train").all()
    assert len(person) - k == 6 * (question_roles(n) == "train").sum()
    assert (tags[k:] == -1).all() and (targets[k:].sum(1) <= 4).all()  # only answer tokens are targets


def test_fine_tuning_evaluations_fall_on_named_steps():
    with pytest.raises(PretrainNbError, match="multiple of qa_eval_every"):
        KnowledgeRun(qa_steps=30, qa_eval_every=25)


@pytest.mark.parametrize("arm", ARMS)
def test_one_arm_runs_and_repeats_exactly(arm):
    a, b = run_knowledge(arm, 1, TINY), run_knowledge(arm, 1, TINY)
    assert np.array_equal(a.correct, b.correct) and np.array_equal(a.recall, b.recall)
    row = summarize(a, TINY)
    epochs = TINY.epochs_of(arm)
    counts = np.bincount(biographies(make_world(40, 1), arm, 1)[1], minlength=40)
    assert (a.exposures == counts * epochs).all()
    if arm == "mixed":
        assert a.qa_curve == [] and np.array_equal(a.correct, a.correct_before)
    else:
        assert [s for s, *_ in a.qa_curve] == [0, 5, 10] and a.qa_step in (0, 5, 10)
    frame = question_frame(TINY, 1)
    assert row["test"] == pytest.approx(a.correct[(frame.role == "test").to_numpy()].mean())


def test_single_reads_as_often_as_the_matched_group():
    spec = KnowledgeRun()
    assert spec.epochs_of("single") == spec.matched_multiplicity * spec.epochs_of("augmented")
    with pytest.raises(PretrainNbError, match="the arms are"):
        run_knowledge("bogus", 0, TINY)
