"""Conformance checks every :class:`~recalign.recommender.Recommender` must pass (needs pytest).

Usage: a test class inherits :class:`RecommenderConformance` and implements
``make_recommender(seed)`` (a fresh, unfitted recommender with that seed, configured to train in about
a second on the synthetic data below). Class attributes tune the expectations for model families that
legitimately differ (a popularity model is not personalised; an LM recommender may not need ``fit``; an
untrained tiny model is checked for the interface, not for quality). A new recommender of your own
passes the same suite::

    from recalign.testing import RecommenderConformance

    class TestMine(RecommenderConformance):
        def make_recommender(self, seed):
            return MyRecommender(seed=seed)

The data has planted structure so that "learned something" is testable, not just "ran":

- items form ``n_chains`` cycles; a user walks one cycle from a random start, so the next item is a
  deterministic function of the last one (a sequential model should nail it);
- cycles are chosen with skewed probabilities, so some items are far more popular than others (a
  popularity model beats random, but cannot follow the chains).

Random guessing on 20 candidates gives HR@1 = 0.05.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split, build_split
from recalign.evaluation.protocols import evaluate_candidates, evaluate_full, full_ranks
from recalign.recommender import Recommender

CHAIN_SKEW = (0.55, 0.25, 0.12, 0.08)


def chain_log(
    n_users: int = 160,
    chain_len: int = 15,
    skew: tuple[float, ...] = CHAIN_SKEW,
    length: tuple[int, int] = (8, 13),
    seed: int = 0,
) -> pd.DataFrame:
    """Interactions ``user, item, timestamp`` of users walking item cycles (see module docstring).

    Item ``c * chain_len + k`` is step ``k`` of cycle ``c``; a walk never exceeds the cycle length, so
    no user meets an item twice (keeps "seen" and "target" disjoint).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        c = int(rng.choice(len(skew), p=np.asarray(skew) / np.sum(skew)))
        start = int(rng.integers(chain_len))
        n = int(rng.integers(length[0], length[1] + 1))
        for t in range(min(n, chain_len)):
            rows.append((f"u{u}", f"i{c * chain_len + (start + t) % chain_len}", 1_000 * u + t))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def dataset_from_log(log: pd.DataFrame, n_items: int) -> RecDataset:
    items = pd.DataFrame(
        {"item": [f"i{k}" for k in range(n_items)], "title": [f"Item {k}" for k in range(n_items)]}
    )
    return RecDataset.from_frames("chains", log, items)


def chain_data(split: str = "loo", seed: int = 0, n_users: int = 160) -> tuple[RecDataset, Split]:
    log = chain_log(n_users=n_users, seed=seed)
    ds = dataset_from_log(log, 15 * len(CHAIN_SKEW))
    return ds, build_split(ds, split, seed=seed)


def with_swapped_test_targets(log: pd.DataFrame, chain_len: int = 15) -> pd.DataFrame:
    """The same log with every user's *last* item moved to the same step of the next cycle.

    Under ``loo`` only test targets change; histories, training and validation data are identical. A
    recommender that trains only on training data must therefore produce identical test scores.
    """
    log = log.copy()
    last = log.groupby("user")["timestamp"].transform("max") == log["timestamp"]
    n_chains = len(CHAIN_SKEW)
    k = log.loc[last, "item"].str[1:].astype(int)
    log.loc[last, "item"] = [f"i{((v // chain_len + 1) % n_chains) * chain_len + v % chain_len}" for v in k]
    return log


class RecommenderConformance:
    """Mixin of conformance tests; subclasses implement :meth:`make_recommender`."""

    #: minimum test HR@1 over the 20 candidates on the chain data (random: 0.05)
    min_candidate_hr1: float = 0.5
    #: minimum test HR@10 under full ranking (seen items excluded) on the chain data
    min_full_hr10: float = 0.5
    #: whether two fits with different seeds must give different scores
    seed_changes_scores: bool = True
    #: whether ``score_candidates`` must equal ``score_all`` gathered at the candidates
    candidates_match_full: bool = True
    #: whether scoring before ``fit`` must raise
    requires_fit: bool = True
    #: users of the chain data (an expensive recommender, e.g. an LM scoring every title, may use fewer)
    n_users: int = 160
    #: whether the quality checks on the planted structure apply (False: interface checks only)
    checks_quality: bool = True

    def make_recommender(self, seed: int) -> Recommender:
        raise NotImplementedError

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture(scope="class")
    def data(self) -> tuple[RecDataset, Split]:
        return chain_data("loo", n_users=self.n_users)

    @pytest.fixture(scope="class")
    def fitted(self, data) -> Recommender:
        ds, split = data
        return self.make_recommender(0).fit(ds, split)

    @pytest.fixture(scope="class")
    def held_out(self, data) -> pd.DataFrame:
        return data[1].stage("test")

    # ------------------------------------------------------------------ interface
    def test_implements_the_protocol(self, fitted):
        assert isinstance(fitted, Recommender)
        assert isinstance(fitted.name, str) and fitted.name == fitted.name.lower() and fitted.name

    def test_scoring_before_fit_raises(self, held_out):
        if not self.requires_fit:
            pytest.skip("this recommender can score without fitting")
        with pytest.raises(RuntimeError, match="not fitted"):
            self.make_recommender(0).score_all(held_out)

    def test_candidate_scores_have_one_finite_score_per_candidate(self, fitted, held_out):
        scores = np.asarray(fitted.score_candidates(held_out))
        assert scores.shape == (len(held_out), 20)
        assert np.isfinite(scores).all()

    def test_full_scores_cover_the_catalogue(self, fitted, data, held_out):
        scores = np.asarray(fitted.score_all(held_out))
        assert scores.shape == (len(held_out), data[0].n_items)
        assert np.isfinite(scores).all()

    def test_candidate_scores_agree_with_full_scores(self, fitted, held_out):
        if not self.candidates_match_full:
            pytest.skip("candidate and catalogue scores come from different procedures")
        full = np.asarray(fitted.score_all(held_out))
        cands = np.stack(held_out["candidates"].to_numpy())
        expected = np.take_along_axis(full, cands, axis=1)
        np.testing.assert_allclose(fitted.score_candidates(held_out), expected, rtol=1e-5, atol=1e-5)

    def test_scores_do_not_depend_on_the_batch(self, fitted, held_out):
        """Scoring rows one at a time gives the batch's scores (padding and batching leak nothing)."""
        some = held_out.iloc[:12]
        batch = np.asarray(fitted.score_candidates(some))
        single = np.concatenate(
            [np.asarray(fitted.score_candidates(some.iloc[[i]])) for i in range(len(some))]
        )
        np.testing.assert_allclose(single, batch, rtol=1e-5, atol=1e-5)

    # ------------------------------------------------------------------ quality on planted structure
    def test_candidate_ranking_beats_random(self, fitted, held_out):
        if not self.checks_quality:
            pytest.skip("interface checks only")
        m = evaluate_candidates(fitted, held_out)
        assert m["HR@1"] >= self.min_candidate_hr1, m
        assert m["AUC"] > 0.5, m

    def test_full_ranking_excludes_seen_items_and_beats_random(self, fitted, data, held_out):
        ranks = full_ranks(fitted.score_all(held_out), held_out)
        n_items = data[0].n_items
        unseen = np.array(
            [n_items - len(set(h.tolist()) - {t}) for h, t in zip(held_out["history"], held_out["target"])]
        )
        assert (ranks >= 1).all() and (ranks <= unseen).all()
        if not self.checks_quality:
            return
        m = evaluate_full(fitted, held_out)
        assert m["HR@10"] >= self.min_full_hr10, m

    # ------------------------------------------------------------------ reproducibility and leakage
    def test_same_seed_gives_identical_scores(self, data, fitted, held_out):
        ds, split = data
        again = self.make_recommender(0)
        assert again.fit(ds, split) is again  # fit returns the recommender, so calls chain
        np.testing.assert_array_equal(again.score_all(held_out), fitted.score_all(held_out))
        if self.seed_changes_scores:
            other = self.make_recommender(1).fit(ds, split)
            assert not np.array_equal(other.score_all(held_out), fitted.score_all(held_out))

    def test_test_targets_do_not_influence_training(self, data, fitted, held_out):
        """Refit on a log whose test targets differ: identical test scores prove they were never used."""
        ds, _ = data
        swapped = dataset_from_log(with_swapped_test_targets(chain_log(n_users=self.n_users)), ds.n_items)
        assert swapped.items["item_id"].tolist() == ds.items["item_id"].tolist()  # same item indices
        split2 = build_split(swapped, "loo", seed=0)
        test2 = split2.stage("test")
        assert (test2["target"].to_numpy() != held_out["target"].to_numpy()).all()
        model2 = self.make_recommender(0).fit(swapped, split2)
        np.testing.assert_array_equal(model2.score_all(test2), fitted.score_all(held_out))


__all__ = [
    "CHAIN_SKEW",
    "RecommenderConformance",
    "chain_data",
    "chain_log",
    "dataset_from_log",
    "with_swapped_test_targets",
]
