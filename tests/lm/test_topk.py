"""exact_top_k: the pruned title-trie search returns exactly what scoring every title and sorting does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recalign.lm.loading import build_tiny_llama
from recalign.lm.prompts import build_open_prompt, display_titles, encode_answer, encode_prompt
from recalign.lm.scoring import answer_logprobs
from recalign.lm.topk import exact_top_k
from recalign.methods.knowledge.grounding import TitleTrie


def _exhaustive(model, p_ids, answers, exclude):
    with torch.no_grad():
        s = answer_logprobs(model, [p_ids], [answers]).sum[0].double().numpy()
    order = [j for j in sorted(range(len(answers)), key=lambda j: (-s[j], j)) if j not in exclude]
    return order, s


def _peaky(tok, seed):
    """A tiny Llama with widened embeddings: peaked next-token distributions, so the search prunes."""
    model = build_tiny_llama(tok, hidden_size=48, num_layers=2, num_heads=4, seed=seed).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_top_k_equals_exhaustive(tiny_dataset, tiny_tokenizer, seed):
    ds, tok = tiny_dataset(), tiny_tokenizer
    titles = display_titles(ds)
    answers = [encode_answer(tok, t) for t in titles]
    trie = TitleTrie(answers)
    for model in (
        build_tiny_llama(tok, hidden_size=48, num_layers=2, num_heads=4, seed=seed).eval(),
        _peaky(tok, seed),
    ):
        hist = [seed, 3, 7]
        p_ids = encode_prompt(tok, build_open_prompt(ds, hist, seed=seed, position=len(hist)))
        order, s = _exhaustive(model, p_ids, answers, set(hist))
        for k, per_pass in ((1, 128), (5, 3), (10, 1), (len(titles), 16)):
            res = exact_top_k(model, p_ids, trie, k, exclude=set(hist), nodes_per_pass=per_pass)
            assert res.items == order[:k]
            np.testing.assert_allclose(res.scores, s[order[:k]], atol=1e-5)
        # seeding with a trie beam search and skipping the re-scoring change nothing but the numbers' path
        seeded = exact_top_k(model, p_ids, trie, 5, exclude=set(hist), seed_beams=4)
        assert seeded.items == order[:5]
        raw = exact_top_k(model, p_ids, trie, 5, exclude=set(hist), rescore=False)
        assert raw.items == order[:5]
        np.testing.assert_allclose(raw.scores, s[order[:5]], atol=1e-4)


def test_search_prunes_and_handles_duplicates(tiny_tokenizer, titles):
    """A peaked model needs a fraction of the trie for k=1; duplicated titles are separate items."""
    tok = tiny_tokenizer
    cat = titles + [titles[3]]  # the same title twice: the same token path, two items
    answers = [encode_answer(tok, t) for t in cat]
    trie = TitleTrie(answers)
    n_nodes = len({tuple(a[:d]) for a in answers for d in range(1, len(a))})
    model = _peaky(tok, 3)
    p_ids = encode_prompt(tok, "Recommend a movie. Answer:")
    order, s = _exhaustive(model, p_ids, answers, set())
    res = exact_top_k(model, p_ids, trie, 1)
    assert res.items == order[:1] and res.nodes < n_nodes
    every = exact_top_k(model, p_ids, trie, len(cat))
    assert every.items == order and every.nodes == n_nodes  # k = catalogue: every node, once
    assert {3, len(cat) - 1} <= set(every.items)
    # excluding one copy keeps the other
    res = exact_top_k(model, p_ids, trie, len(cat) - 1, exclude={3})
    assert 3 not in res.items and len(cat) - 1 in res.items
    # asking for more than there is returns what there is
    assert len(exact_top_k(model, p_ids, trie, 99, exclude={0, 1}).items) == len(cat) - 2
    assert exact_top_k(model, p_ids, trie, 3, exclude=set(range(len(cat)))).items == []


def test_training_mode_is_restored(tiny_tokenizer, titles):
    tok = tiny_tokenizer
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    model.train()
    trie = TitleTrie([encode_answer(tok, t) for t in titles])
    exact_top_k(model, encode_prompt(tok, "Answer:"), trie, 2)
    assert model.training
