"""Explanations: a short generated rationale for why an item fits a typed history.

The DMPO paper's explanation case study, behind :meth:`recalign.lm.recommend.RecommendSession.explain`
(:mod:`recalign.lm.recommend` re-exports these names): the model is asked, in its chat format, what the
item has in common with the history (:func:`explain_prompt`), and answers greedily in a sentence or two
(:func:`explain_texts`, at most :data:`EXPLAIN_TOKENS` tokens, tidied to one line ending at its last
full sentence by :func:`tidy_explanation`).
"""

from __future__ import annotations

from collections.abc import Sequence

#: tokens of an explanation at most
EXPLAIN_TOKENS = 60

EXPLAIN_PROMPT = (
    "A user has enjoyed these {nouns}, in this order:\n{history}\n"
    'In one or two sentences, explain why this user would also enjoy the {noun} "{item}": '
    "say what it has in common with the {nouns} above."
)


def explain_prompt(dataset, titles: Sequence[str], hist: Sequence[int], item: int, max_history: int) -> str:
    """The explanation request for ``item`` after ``hist`` (catalogue indices; ``titles`` as displayed)."""
    from recalign.lm.prompts import item_noun, recent_history

    noun, nouns = item_noun(dataset)
    shown = "\n".join(f"- {titles[int(h)]}" for h in recent_history(hist, max_history))
    return EXPLAIN_PROMPT.format(nouns=nouns, noun=noun, history=shown, item=titles[item])


def explain_texts(model, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy explanations of ``prompts``, one tidied line each."""
    from recalign.lm.generation import generate_answers

    texts = generate_answers(
        model, tokenizer, prompts, batch_size=8, max_new_tokens=EXPLAIN_TOKENS, progress=False
    )
    return [tidy_explanation(t) for t in texts]


def tidy_explanation(text: str) -> str:
    """One line; a rationale cut off by the token limit ends at its last full sentence (if any)."""
    text = " ".join(str(text).split())
    if text and text[-1] not in ".!?":
        cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
        if cut > 0:
            text = text[: cut + 1]
    return text


__all__ = ["EXPLAIN_PROMPT", "EXPLAIN_TOKENS", "explain_prompt", "explain_texts", "tidy_explanation"]
