import torch

from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
from recalign.lm.prompts import encode_answer, encode_prompt
from recalign.lm.seq2seq import build_tiny_t5, encode_source, encode_target
from recalign.methods.knowledge.grounding import (
    TitleMatcher,
    TitleTrie,
    constrained_generate,
    normalize_title,
)

TITLES = [
    "Toy Story (1995)",
    "Usual Suspects, The (1995)",
    "Heat (1995)",
    "Heat (1986)",
    "Babe (1995)",
    "Heat (1995)",
]


def test_normalize_title():
    assert normalize_title("  Usual Suspects, The (1995) ") == "the usual suspects 1995"
    assert normalize_title("Á köldum klaka (Cold Fever) (1994)") == "a koldum klaka cold fever 1994"
    assert normalize_title("Se7en!!") == "se7en"


def test_matcher_exact_contained_similar_and_none():
    m = TitleMatcher(TITLES)
    assert (m.match("the usual suspects (1995)").item, m.match("the usual suspects (1995)").how) == (
        1,
        "exact",
    )
    # duplicated title -> lowest index
    assert m.match("Heat (1995)").item == 2
    got = m.match("I would recommend Toy Story (1995) to this user.")
    assert (got.item, got.how) == (0, "contained")
    # the longest contained title wins: "Heat (1986)" is longer than nothing else, but "Heat" alone is not a title
    assert m.match("Heat (1986), definitely").item == 3
    typo = m.match("Toy Storry (1995)")
    assert (typo.item, typo.how) == (0, "similar") and 0.5 <= typo.score < 1
    assert m.match("Completely unrelated words").item is None
    assert m.match("!!!").how == "empty"


def test_trie_allows_only_title_continuations():
    trie = TitleTrie([[5, 6, 1], [5, 7, 1], [8, 1], [5, 6, 1]])
    assert sorted(trie.allowed([])) == [5, 8]
    assert sorted(trie.allowed([5])) == [6, 7]
    assert trie.allowed([5, 6]) == [1]
    assert trie.allowed([9]) == []
    assert trie.items([5, 6, 1]) == [0, 3]
    assert trie.items([5, 6]) == []
    assert len(trie) == 3


def _texts():
    return [f"Which movie next? Answer: {t}" for t in TITLES] * 3


def test_constrained_generation_yields_catalogue_titles_for_both_families():
    tok = train_bpe_tokenizer(_texts(), vocab_size=300)
    llama = build_tiny_llama(tok, seed=1).eval()
    t5 = build_tiny_t5(tok, seed=1).eval()
    for model, enc_p, enc_a, stop in (
        (llama, encode_prompt, encode_answer, [tok.eos_token_id]),
        (t5, encode_source, encode_target, [tok.eos_token_id]),
    ):
        trie = TitleTrie.from_titles(TITLES, lambda t, e=enc_a: e(tok, t))
        prompt = enc_p(tok, "Which movie next? Answer:")
        out = constrained_generate(model, prompt, trie, stop_ids=stop, num_beams=4, num_return=3)
        assert len(out) == 3
        for items in out:
            assert items and all(0 <= i < len(TITLES) for i in items)
        # the random model, unconstrained, would not produce a title: check it is the trie that did it
        with torch.no_grad():
            free = model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        text = tok.decode(free[0].tolist()[(1 if model is t5 else len(prompt)) :], skip_special_tokens=True)
        assert TitleMatcher(TITLES, min_similarity=0.9).match(text).item is None
