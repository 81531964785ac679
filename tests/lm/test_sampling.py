"""Shared-prompt sampling (one prefill per prompt, N continuations) against the obvious paths."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from recalign.lm.generation import pad_id
from recalign.lm.prompts import encode_prompt, stop_token_ids
from recalign.lm.sampling import nucleus_filter, sample_continuations
from recalign.lm.scoring import answer_logprobs

PROMPTS = [
    "Heat (1995)\nAnswer:",
    "Star Wars (1977), Toy Story (1995), Fargo (1996), Alien (1979), Babe (1995)\nAnswer:",
    "Alien",
]


def _sharp(model, scale: float = 2.0):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m.eval()


def test_nucleus_filter_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled order)
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    # top_p 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it -> keep tokens 1 and 3
    kept = torch.isfinite(nucleus_filter(logits, 0.7))
    assert kept.tolist() == [[False, True, False, True]]
    # top_p 0.8 is reached exactly by 0.5 + 0.3 -> the same two
    assert torch.isfinite(nucleus_filter(logits, 0.8)).tolist() == [[False, True, False, True]]
    # top_p 0.81 needs the third token
    assert torch.isfinite(nucleus_filter(logits, 0.81)).tolist() == [[True, True, False, True]]
    # a tiny top_p keeps the most likely token only; 1.0 keeps all
    assert torch.isfinite(nucleus_filter(logits, 0.01)).tolist() == [[False, True, False, False]]
    assert torch.equal(nucleus_filter(logits, 1.0), logits)


def test_greedy_equals_generate(tiny_model, tiny_tokenizer):
    model, tok = _sharp(tiny_model, 4.0), tiny_tokenizer
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    out = sample_continuations(
        model,
        enc,
        n_samples=2,
        stop_ids=stop_token_ids(tok),
        max_new_tokens=8,
        do_sample=False,
        pad_id=pad_id(tok),
    )
    for u, e in enumerate(enc):
        ids = torch.tensor([e])
        with torch.inference_mode():
            ref = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=8,
                eos_token_id=stop_token_ids(tok),
                pad_token_id=pad_id(tok),
            )[0, len(e) :].tolist()
        stops = set(stop_token_ids(tok))
        ref = ref[: next((k for k, t in enumerate(ref) if t in stops), len(ref))]
        assert out.generated[u][0] == ref
        assert out.generated[u][1] == ref  # greedy: every sample the same


def test_sample_logprobs_equal_scoring_path(tiny_model, tiny_tokenizer):
    """The sampled tokens' log-probs from the cached loop equal the packed scoring of the same tokens."""
    model, tok = _sharp(tiny_model), tiny_tokenizer
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    stop = stop_token_ids(tok)[0]  # one stop id: a sample shorter than the limit ended on it
    gen = torch.Generator().manual_seed(0)
    out = sample_continuations(
        model, enc, n_samples=4, stop_ids=[stop], max_new_tokens=6, temperature=1.3, top_p=0.95, generator=gen
    )
    assert len(out.generated) == 3 and all(len(g) == 4 for g in out.generated)
    # sampling gives different continuations of the same prompt
    assert any(len({tuple(s) for s in g}) > 1 for g in out.generated)
    for u, e in enumerate(enc):
        answers = [s + [stop] if len(s) < 6 else s for s in out.generated[u]]
        want = answer_logprobs(model, [e], [answers]).sum[0]
        for s in range(4):
            assert math.isclose(float(out.logprobs[u, s]), float(want[s].detach()), abs_tol=1e-4), (u, s)


def test_seeded_and_independent_of_global_rng(tiny_model, tiny_tokenizer):
    model, tok = _sharp(tiny_model), tiny_tokenizer
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    kw = dict(n_samples=3, stop_ids=stop_token_ids(tok), max_new_tokens=5)
    a = sample_continuations(model, enc, generator=torch.Generator().manual_seed(7), **kw)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    b = sample_continuations(model, enc, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(state, torch.get_rng_state())
    assert a.generated == b.generated


def test_nucleus_of_one_is_greedy(tiny_model, tiny_tokenizer):
    model, tok = _sharp(tiny_model, 4.0), tiny_tokenizer
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    kw = dict(n_samples=2, stop_ids=stop_token_ids(tok), max_new_tokens=6)
    greedy = sample_continuations(model, enc, do_sample=False, **kw)
    tiny_p = sample_continuations(model, enc, top_p=1e-6, generator=torch.Generator().manual_seed(1), **kw)
    assert greedy.generated == tiny_p.generated


def test_rejects_bad_input(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="at least one token"):
        sample_continuations(tiny_model, [[]], n_samples=1, stop_ids=[0])
    with pytest.raises(ValueError, match=">= 1"):
        sample_continuations(tiny_model, [[1, 2]], n_samples=0, stop_ids=[0])


def test_nucleus_probs_equal_full_sort():
    """The top-k shortcut gives the distribution of the full sort, for peaked rows (nucleus inside the
    top 256) and flat rows (nucleus wider than 256 tokens: the full-sort fallback)."""
    from recalign.lm.sampling import NUCLEUS_TOPK, nucleus_probs

    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(4, 5000, generator=g) * 6
    flat = torch.randn(3, 5000, generator=g) * 0.1
    logits = torch.cat([peaked, flat])
    for top_p in (0.5, 0.9, 0.99):
        fast = nucleus_probs(logits, top_p)
        slow = nucleus_filter(logits, top_p).softmax(-1)
        assert torch.allclose(fast, slow, atol=1e-6)
        assert torch.equal(fast > 0, slow > 0)
    # the flat rows really need more than NUCLEUS_TOPK tokens at 0.9
    assert int((nucleus_filter(flat, 0.9) > float("-inf")).sum(-1).min()) > NUCLEUS_TOPK


def test_draws_follow_the_nucleus_distribution():
    """Empirical frequencies of next_tokens match nucleus_probs (a peaked and a flat row)."""
    from recalign.lm.sampling import next_tokens, nucleus_probs

    g = torch.Generator().manual_seed(3)
    logits = torch.stack([torch.tensor([3.0, 2.0, 1.0, 0.0] + [-9.0] * 400), torch.zeros(404)])
    want = nucleus_probs(logits, 0.9)
    n = 20000
    counts = torch.zeros_like(want)
    for _ in range(n // 500):
        tok = next_tokens(
            logits.repeat_interleave(500, 0), do_sample=True, temperature=1.0, top_p=0.9, generator=g
        ).view(2, 500)
        for r in range(2):
            counts[r] += torch.bincount(tok[r], minlength=404).float()
    freq = counts / n
    assert want[0, 3] == 0 and freq[0, 3] == 0  # outside the nucleus: never drawn
    assert torch.allclose(freq[0, :3], want[0, :3], atol=0.015)
    # the flat row keeps ceil(0.9 * 404) tokens: the full-sort fallback, never a token outside it
    assert int((want[1] > 0).sum()) == 364 and bool((freq[1][want[1] == 0] == 0).all())
