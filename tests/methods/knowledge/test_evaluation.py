"""Evaluation logic: metrics from known scores (a stub scorer), and the pruned catalogue search == exhaustive."""

import math

import numpy as np
import pytest

from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
from recalign.lm.seq2seq import build_tiny_t5
from recalign.methods.knowledge.evaluation import (
    TaskScorer,
    catalogue_rank,
    evaluate_ranking,
    evaluate_rating,
    evaluate_retrieval,
)
from recalign.methods.knowledge.grounding import TitleTrie
from recalign.methods.knowledge.tasks import KnowledgeTasks


class StubScorer:
    """Scores answers by a fixed table (title or digit -> log-prob); unknown answers get -50."""

    def __init__(self, table):
        self.table = table

    def encode_answer(self, text):
        return text.split()

    def score(self, prompts, answers):
        out = np.full((len(prompts), max(len(a) for a in answers)), -np.inf)
        for i, ans in enumerate(answers):
            out[i, : len(ans)] = [self.table.get(a, -50.0) for a in ans]
        return out


def test_rating_expected_value_and_argmax(tiny):
    ds, split = tiny
    kt = KnowledgeTasks(ds, split)
    # p(1..5) = (0, 0, 0.5, 0.5, 0): expected 3.5, argmax 3 (first of the tie)
    stub = StubScorer({"3": math.log(0.5), "4": math.log(0.5), "1": -1e9, "2": -1e9, "5": -1e9})
    test = split.stage("test")  # true ratings: u1 Fargo 1, u2 Heat 2, u3 Fargo 4
    r = evaluate_rating(stub, kt, test)
    assert r.n_examples == 3
    assert r.metrics["MAE"] == pytest.approx((2.5 + 1.5 + 0.5) / 3)
    assert r.metrics["RMSE"] == pytest.approx(math.sqrt((2.5**2 + 1.5**2 + 0.5**2) / 3))
    assert r.metrics["MAE_argmax"] == pytest.approx((2 + 1 + 1) / 3)
    assert r.metrics["Accuracy"] == 0.0


def test_ranking_and_retrieval_ranks_from_known_scores(tiny):
    ds, split = tiny
    kt = KnowledgeTasks(ds, split)
    # Fargo best, then Heat, then everything else; history items must not count in retrieval
    stub = StubScorer({"Fargo (1996)": -1.0, "Heat (1995)": -2.0, "Alien (1979)": -0.5})
    test = split.stage("test")  # targets: u1 Fargo (Alien in history), u2 Heat (Alien in history), u3 Fargo
    ret = evaluate_retrieval(stub, kt, test, ks=(1, 2, 5))
    # Alien outscores everything but is in u1's and u2's history; u3 never saw it, so it beats Fargo there
    assert [d["rank"] for d in ret.details] == [1, 2, 2]
    assert ret.metrics["HR@1"] == pytest.approx(1 / 3)
    assert ret.metrics["NDCG@2"] == pytest.approx((1 + 2 / math.log2(3)) / 3)
    rank = evaluate_ranking(stub, kt, test, ks=(1, 3))
    cands = [list(c) for c in test["candidates"]]
    assert all(len(c) == 3 for c in cands)
    # candidate ranks recomputed from the table (Alien counts here: candidates are never the history)
    expected = []
    titles = kt.titles
    for c, t in zip(cands, test["target"]):
        s = np.array(
            [
                {"Fargo (1996)": -1.0, "Heat (1995)": -2.0, "Alien (1979)": -0.5}.get(titles[i], -50.0)
                for i in c
            ]
        )
        expected.append(int((s >= s[c.index(t)]).sum()))
    assert [d["rank"] for d in rank.details] == expected
    assert rank.metrics["AUC"] == pytest.approx(np.mean([(3 - r) / 2 for r in expected]))


# titles sharing prefixes ("Star 1" / "Starman 1" / "Star 2"), as real catalogues do
CATALOGUE = [f"{w} {n} ({1950 + 7 * n})" for w in ("Star", "Starman", "Heat", "Toy") for n in range(5)]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_pruned_catalogue_search_matches_exhaustive_ranks(family):
    tok = train_bpe_tokenizer(CATALOGUE + ["History: Answer:"], vocab_size=330)
    model = (build_tiny_llama(tok, seed=2) if family == "llama" else build_tiny_t5(tok, seed=2)).eval()
    scorer = TaskScorer(model, tok, chunk_size=64)
    trie = TitleTrie.from_titles(CATALOGUE, scorer.encode_answer)
    prompt = scorer.encode_prompt("History: Star 1 (1957). Answer:")
    full = scorer.score(["History: Star 1 (1957). Answer:"], [CATALOGUE])[0]
    exclude = {1, 7}
    masked = full.copy()
    masked[list(exclude)] = -np.inf
    seen_ranks = set()
    for target in range(0, len(CATALOGUE), 4):
        m = masked.copy()
        m[target] = full[target]
        exact = int((m >= m[target]).sum())
        for k_max in (3, 8):
            got, cost = catalogue_rank(
                scorer,
                prompt,
                trie,
                target,
                scorer.encode_answer(CATALOGUE[target]),
                exclude - {target},
                k_max,
                nodes_per_pass=64,
            )
            assert got == (exact if exact <= k_max else k_max + 1), (target, k_max, exact, got)
            assert cost > 0
        seen_ranks.add(exact)
    # both outcomes are exercised: ranks found exactly, and ranks known only to be beyond k_max
    assert min(seen_ranks) <= 3 and max(seen_ranks) > 8, seen_ranks


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_beam_seeded_search_gives_the_exhaustive_ranks(family):
    """Seeds from a constrained beam search only save work: every rank equals the exhaustive one, and a
    beam at least as wide as the catalogue proves every low-ranked target without any search."""
    from recalign.lm.seq2seq import answer_stop_ids
    from recalign.methods.knowledge.evaluation import beam_seeds

    tok = train_bpe_tokenizer(CATALOGUE + ["History: Answer:"], vocab_size=330)
    model = (build_tiny_llama(tok, seed=2) if family == "llama" else build_tiny_t5(tok, seed=2)).eval()
    scorer = TaskScorer(model, tok, chunk_size=64)
    trie = TitleTrie.from_titles(CATALOGUE, scorer.encode_answer)
    text = "History: Star 1 (1957). Answer:"
    prompt = scorer.encode_prompt(text)
    full = scorer.score([text], [CATALOGUE])[0]
    stop = answer_stop_ids(model, tok)
    seeds = beam_seeds(scorer, prompt, trie, stop, 4)
    assert len(seeds) >= 1 and all(list(trie.sequences[j]) == a for j, a in seeds.items())
    # the beam's titles are high scorers: each is in the exhaustive top half
    assert all((full > full[j]).sum() < len(CATALOGUE) // 2 for j in seeds)
    everything = beam_seeds(scorer, prompt, trie, stop, len(CATALOGUE))
    exclude = {1}
    for target in range(len(CATALOGUE)):
        m = full.copy()
        m[list(exclude - {target})] = -np.inf
        exact = int((m >= m[target]).sum())
        for k_max, s in ((3, seeds), (3, everything), (8, seeds)):
            got, cost = catalogue_rank(
                scorer, prompt, trie, target, scorer.encode_answer(CATALOGUE[target]),
                exclude - {target}, k_max, nodes_per_pass=64, seeds=s,
            )  # fmt: skip
            assert got == (exact if exact <= k_max else k_max + 1), (target, k_max, exact, got)
            if s is everything and exact > k_max + 1:  # proven by the seeds alone: no trie node scored
                assert cost <= sum(len(a) for a in everything.values())


def test_trie_beam_search_scores_match_the_scorer_and_a_full_width_beam_finds_every_title():
    """The shared-cache beam search: its summed log-probs are the scorer's, a beam as wide as the
    catalogue returns every title, and a narrow beam returns the best titles it kept (at least its width)."""
    from recalign.methods.knowledge.grounding import trie_beam_search

    tok = train_bpe_tokenizer(CATALOGUE + ["History: Answer:"], vocab_size=330)
    model = build_tiny_llama(tok, seed=3).eval()
    scorer = TaskScorer(model, tok, chunk_size=64)
    trie = TitleTrie.from_titles(CATALOGUE, scorer.encode_answer)
    text = "History: Heat 2 (1964). Answer:"
    prompt = scorer.encode_prompt(text)
    full = scorer.score([text], [CATALOGUE])[0]
    every = trie_beam_search(model, prompt, trie, beams=len(CATALOGUE))
    assert sorted(every) == list(range(len(CATALOGUE)))
    assert np.allclose([every[j] for j in range(len(CATALOGUE))], full, atol=1e-4)
    narrow = trie_beam_search(model, prompt, trie, beams=3)
    assert len(narrow) >= 3
    assert all(abs(narrow[j] - full[j]) < 1e-4 for j in narrow)
    # beam search does not promise the arg-max in general; on this seeded model a beam of 3 keeps it
    assert int(np.argmax(full)) in narrow


# ---------------------------------------------------------------------- NaN rules of the catalogue search
class _IdScorer:
    """score_ids by a table keyed on the answer's token tuple; partial titles score their best completion."""

    def __init__(self, table):
        self.table = table

    def score_ids(self, prompts, answers):
        out = []
        for a in answers[0]:
            a = tuple(a)
            vals = [v for k, v in self.table.items() if k[: len(a)] == a]
            out.append(max(vals, key=lambda v: (not math.isnan(v), v)) if vals else -1e9)
        return np.asarray([out], dtype=float)


def _toy_trie():
    titles = ["a x", "a y", "b"]
    vocab = {"a": 1, "x": 2, "y": 3, "b": 4}
    enc = {t: [vocab[w] for w in t.split()] + [0] for t in titles}  # 0 ends an answer
    return TitleTrie.from_titles(titles, lambda t: enc[t]), enc


def test_catalogue_rank_nan_target_ranks_last_and_nan_competitors_count_against_it():
    trie, enc = _toy_trie()
    ids = {i: tuple(enc[t]) for i, t in enumerate(["a x", "a y", "b"])}
    # a NaN target must rank last (k_max + 1 = "below k_max"), never first
    scorer = _IdScorer({ids[0]: float("nan"), ids[1]: -2.0, ids[2]: -3.0})
    rank, _ = catalogue_rank(scorer, [0], trie, 0, list(ids[0]), set(), k_max=3)
    assert rank == 4
    scorer = _IdScorer({ids[0]: float("inf"), ids[1]: -2.0, ids[2]: -3.0})
    assert catalogue_rank(scorer, [0], trie, 0, list(ids[0]), set(), k_max=3)[0] == 4
    # finite target -1: "b" scores NaN -> counted above it (like a tie), "a y" below -> rank 2
    scorer = _IdScorer({ids[0]: -1.0, ids[1]: -2.0, ids[2]: float("nan")})
    assert catalogue_rank(scorer, [0], trie, 0, list(ids[0]), set(), k_max=3)[0] == 2
    # and the ordinary case still ranks by score
    scorer = _IdScorer({ids[0]: -2.5, ids[1]: -2.0, ids[2]: -3.0})
    assert catalogue_rank(scorer, [0], trie, 0, list(ids[0]), set(), k_max=3)[0] == 2


# ---------------------------------------------------------------------- rating references
def test_bias_baseline_hand_worked():
    from recalign.methods.knowledge.evaluation import BiasBaseline

    # ratings: u0: i0 5, i1 3; u1: i0 3. mu = 11/3; with no damping (reg 0):
    # b_i0 = ((5 - mu) + (3 - mu)) / 2 = 4 - mu, b_i1 = 3 - mu
    # b_u0 = ((5 - mu - b_i0) + (3 - mu - b_i1)) / 2 = (1 + 0) / 2 = 0.5, b_u1 = 3 - mu - b_i0 = -1
    b = BiasBaseline.fit([0, 0, 1], [0, 1, 0], [5.0, 3.0, 3.0], reg_user=0.0, reg_item=0.0)
    mu = 11 / 3
    assert b.mu == pytest.approx(mu)
    assert b.item_bias == pytest.approx({0: 4 - mu, 1: 3 - mu})
    assert b.user_bias == pytest.approx({0: 0.5, 1: -1.0})
    # u0 i0: mu + 0.5 + 4 - mu = 4.5; u1 i1: 3 - 1 = 2; unknown user/item: mu; clipped to [1, 5]
    assert b.predict([0, 1, 7], [0, 1, 9]) == pytest.approx([4.5, 2.0, mu])
    assert BiasBaseline(mu=4.8, user_bias={0: 1.0}, item_bias={}).predict([0], [0])[0] == 5.0


def test_rating_references_use_only_ratings_known_before_the_evaluated_rows(tiny):
    from recalign.methods.knowledge.evaluation import evaluate_rating_references, known_ratings

    ds, split = tiny
    kt = KnowledgeTasks(ds, split)
    users, items, ratings = known_ratings(kt, "test")
    # test targets (u1 Fargo 1, u2 Heat 2, u3 Fargo 4) are excluded; everything before them is known
    assert sorted(ratings.tolist()) == sorted([5, 3, 4, 2, 4, 5, 3, 4, 4])
    refs = evaluate_rating_references(kt, split.stage("test"))
    mu = 34 / 9
    m = refs["rating-global-mean"].metrics
    assert m["MAE"] == pytest.approx((abs(1 - mu) + abs(2 - mu) + abs(4 - mu)) / 3)
    assert m["RMSE"] == pytest.approx(math.sqrt(((1 - mu) ** 2 + (2 - mu) ** 2 + (4 - mu) ** 2) / 3))
    assert refs["rating-bias"].n_examples == refs["rating-global-mean"].n_examples == 3
    assert set(refs["rating-bias"].metrics) == {"RMSE", "MAE"}


def test_catalogue_rank_shared_scores_score_target_and_seeds_once_with_the_same_ranks():
    """evaluate_retrieval's narrow beam, wide beam, then search: one ``scored`` dict across the calls
    scores the target and every seed once per prompt, and every rank is the one found without it."""
    from recalign.lm.seq2seq import answer_stop_ids
    from recalign.methods.knowledge.evaluation import beam_seeds

    tok = train_bpe_tokenizer(CATALOGUE + ["History: Answer:"], vocab_size=330)
    model = build_tiny_llama(tok, seed=2).eval()
    scorer = TaskScorer(model, tok, chunk_size=64)
    trie = TitleTrie.from_titles(CATALOGUE, scorer.encode_answer)
    prompt = scorer.encode_prompt("History: Star 1 (1957). Answer:")
    stop = answer_stop_ids(model, tok)
    narrow, wide = beam_seeds(scorer, prompt, trie, stop, 2), beam_seeds(scorer, prompt, trie, stop, 8)
    assert set(narrow) & set(wide)  # the wide beam re-finds titles of the narrow one

    calls = []
    real = scorer.score_ids

    def counting(prompts, answers):
        calls.append([tuple(a) for a in answers[0]])
        return real(prompts, answers)

    scorer.score_ids = counting
    both = set(narrow) | set(wide)
    for target in range(0, len(CATALOGUE), 3):
        t_ids = scorer.encode_answer(CATALOGUE[target])
        plain = [
            catalogue_rank(scorer, prompt, trie, target, t_ids, set(), 3, seeds=s, search=False)[0]
            for s in (narrow, wide)
        ] + [catalogue_rank(scorer, prompt, trie, target, t_ids, set(), 3, seeds=wide)[0]]
        calls.clear()
        scored = {}
        shared = [
            catalogue_rank(
                scorer, prompt, trie, target, t_ids, set(), 3, seeds=s, search=False, scored=scored
            )[0]
            for s in (narrow, wide)
        ]
        # the two seed passes together score the target and each seed exactly once
        firsts = [a for c in calls for a in c]
        assert sorted(firsts) == sorted(
            {tuple(t_ids)} | {tuple(trie.sequences[j]) for j in both if j != target}
        )
        assert set(scored) == {target} | both
        shared.append(
            catalogue_rank(scorer, prompt, trie, target, t_ids, set(), 3, seeds=wide, scored=scored)[0]
        )
        assert shared == plain, target
