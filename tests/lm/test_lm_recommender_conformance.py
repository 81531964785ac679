"""The LM recommender (:class:`recalign.lm.recommender.LMRecommender`) passes the shared recommender
conformance suite (:mod:`recalign.testing`) on the tiny Llama: the interface, batch independence, seen
items excluded from full ranking, reproducibility, no use of test targets. An untrained 2-layer model is
not asked to learn the chains, and it needs no ``fit``.

Candidate scores come from the candidate prompt and catalogue scores from the history-only one, so the
two are not expected to agree. The seed picks the prompt phrasing, so another seed gives other scores.
"""

from __future__ import annotations

import pytest

from recalign.lm.recommender import LMRecommender
from recalign.testing import RecommenderConformance


class TestLMRecommenderConformance(RecommenderConformance):
    n_users = 24
    checks_quality = False
    requires_fit = False
    candidates_match_full = False

    @pytest.fixture(scope="class", autouse=True)
    def _tiny_lm(self, request, tiny_model, tiny_tokenizer):
        request.cls.lm = (tiny_model, tiny_tokenizer)

    def make_recommender(self, seed):
        model, tok = self.lm
        return LMRecommender(model, tok, None, seed=seed, name="zeroshot", batch_size=8, progress=False)
