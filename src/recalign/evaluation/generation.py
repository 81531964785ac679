"""The generation protocol's scoring: match a generated answer to a candidate, then HR@1 and ValidRatio.

Matching rule (:func:`match_answer`)
    Text is compared case-insensitively with runs of whitespace collapsed. A candidate *occurs* in the
    answer when its title is a substring of it. An answer is **valid when exactly one candidate title
    occurs** in it, after one refinement: a title whose every occurrence lies inside an occurrence of a
    *longer* occurring candidate title does not count (answering "Aliens" names "Aliens", not also
    "Alien"; answering "Alien, then Aliens" names both and is invalid). Candidates with identical titles
    are indistinguishable by text: the first of them is returned (evaluation code should compute the
    target column the same way, as :func:`recalign.lm.generation.evaluate_generation` does). Anything
    else -- no title, two different titles, an empty answer -- is invalid (``None``).

HR@1 conventions (:func:`generation_metrics`), both reported and labelled
    - ``"HR@1 (all)"``: hits / all examples -- S-DPO's convention (an invalid answer is a miss).
    - ``"HR@1 (valid)"``: hits / valid answers -- LLaRA's convention (invalid answers are left out, so a
      model that rarely answers validly can still look good; read it together with ValidRatio).
    - ``"ValidRatio"``: valid answers / all examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _norm(text: str) -> str:
    return " ".join(str(text).casefold().split())


def _occurrences(text: str, title: str) -> list[tuple[int, int]]:
    spans, start = [], text.find(title)
    while start != -1:
        spans.append((start, start + len(title)))
        start = text.find(title, start + 1)
    return spans


def match_answer(answer_text: str, candidate_titles: Sequence[str]) -> int | None:
    """Index of the one candidate named in ``answer_text``, or ``None`` if not exactly one (see module doc)."""
    text = _norm(answer_text)
    titles = [_norm(t) for t in candidate_titles]
    if not text:
        return None
    spans = {t: _occurrences(text, t) for t in set(titles) if t}
    found = {t: s for t, s in spans.items() if s}

    def explained_by_longer(title: str) -> bool:
        return all(
            any(
                len(other) > len(title) and s2 <= s and e <= e2
                for other, other_spans in found.items()
                for s2, e2 in other_spans
            )
            for s, e in found[title]
        )

    named = [t for t in found if not explained_by_longer(t)]
    if len(named) != 1:
        return None
    return titles.index(named[0])


def generation_metrics(
    matches: Sequence[int | None], target_cols: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """HR@1 over all examples (S-DPO), over valid answers (LLaRA), and ValidRatio.

    Args:
        matches: per example, :func:`match_answer`'s result.
        target_cols: per example, the target's column in the candidate list.
    """
    if len(matches) != len(target_cols):
        raise ValueError(f"{len(matches)} matches but {len(target_cols)} targets")
    n = len(matches)
    if n == 0:
        return {"HR@1 (all)": float("nan"), "HR@1 (valid)": float("nan"), "ValidRatio": float("nan")}
    valid = [m is not None for m in matches]
    hits = sum(1 for m, t in zip(matches, target_cols) if m is not None and int(m) == int(t))
    n_valid = sum(valid)
    return {
        "HR@1 (all)": hits / n,
        "HR@1 (valid)": hits / n_valid if n_valid else float("nan"),
        "ValidRatio": n_valid / n,
    }
