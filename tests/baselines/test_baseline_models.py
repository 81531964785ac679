"""Every classical baseline passes the shared conformance suite, plus model-specific behaviour.

Configs here are the defaults with fewer epochs (the chain data is tiny and very regular), one thread
(the suite runs two workers on two cores) and, for the sequence models, a smaller max_len so that
truncation is exercised.
"""

from __future__ import annotations

from recalign.baselines import (
    BPRMFConfig,
    BPRMFRecommender,
    GRU4Rec,
    GRU4RecConfig,
    PopConfig,
    PopRecommender,
    SASRec,
    SASRecConfig,
)
from recalign.testing import RecommenderConformance


class TestPopConformance(RecommenderConformance):
    # On skewed data popularity beats random (0.05) but cannot follow the chains.
    min_candidate_hr1 = 0.10
    min_full_hr10 = 0.12
    seed_changes_scores = False

    def make_recommender(self, seed):
        return PopRecommender(PopConfig(seed=seed))


class TestBPRMFConformance(RecommenderConformance):
    # MF learns which cycle a user walks (not the order), so it beats popularity but not the chain.
    min_candidate_hr1 = 0.15
    min_full_hr10 = 0.4

    def make_recommender(self, seed):
        return BPRMFRecommender(BPRMFConfig(seed=seed, epochs=30, dim=16, lr=0.02, batch_size=256, threads=1))


SEQ_TRAIN = dict(epochs=12, batch_size=32, lr=5e-3, patience=3, threads=1, max_len=8)


class TestSASRecConformance(RecommenderConformance):
    min_candidate_hr1 = 0.6
    min_full_hr10 = 0.8

    def make_recommender(self, seed):
        return SASRec(SASRecConfig(seed=seed, hidden_dropout_prob=0.2, attn_dropout_prob=0.2, **SEQ_TRAIN))


class TestGRU4RecConformance(RecommenderConformance):
    min_candidate_hr1 = 0.6
    min_full_hr10 = 0.8

    def make_recommender(self, seed):
        return GRU4Rec(GRU4RecConfig(seed=seed, dropout_prob=0.1, **SEQ_TRAIN))
