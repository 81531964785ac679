"""Best and worst of N scored summaries per user, as DPO pairs.

For each user the N sampled summaries (all written for the same prompt) have rewards. The pair is
(chosen = highest reward, rejected = lowest reward). Rules, all deterministic:

- **Ties at the top or bottom** go to the lowest sample index, so a rerun picks the same texts.
- **No preference** (every sample earns the same reward, e.g. all rank the true item outside the top K,
  or all summaries are identical): the user yields no pair. Such users are *counted* (``ties``) and
  reported, never silently dropped: with a coarse reward like NDCG@5 this is common and tells the reader
  how much of the sampling budget produced a learning signal.
- A user with fewer than two samples cannot form a pair and is counted in ``too_few``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class ScoredSummary:
    """One sampled summary with its reward."""

    user: int
    sample: int
    text: str
    reward: float
    prompt: str = ""
    position: int = 0
    rank: int = 0


@dataclass
class SummaryPair:
    """A DPO pair for one user: the prompt, the best (chosen) and worst (rejected) summary."""

    user: int
    position: int
    prompt: str
    chosen: str
    rejected: str
    chosen_reward: float
    rejected_reward: float
    chosen_sample: int
    rejected_sample: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairStats:
    """How many users produced a pair and why the others did not."""

    users: int = 0
    pairs: int = 0
    ties: int = 0
    too_few: int = 0
    identical_texts: int = 0
    mean_gap: float = 0.0
    tied_users: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def select_pairs(scored: Sequence[ScoredSummary]) -> tuple[list[SummaryPair], PairStats]:
    """Group by user, keep best and worst; skip (and count) users whose rewards are all equal.

    ``identical_texts`` counts tied users whose samples were all the same text (the LM wrote one
    summary N times), a subset of ``ties``.
    """
    by_user: dict[int, list[ScoredSummary]] = {}
    for s in scored:
        by_user.setdefault(int(s.user), []).append(s)
    pairs: list[SummaryPair] = []
    stats = PairStats(users=len(by_user))
    gaps = []
    for user in sorted(by_user):
        group = sorted(by_user[user], key=lambda s: s.sample)
        if len(group) < 2:
            stats.too_few += 1
            continue
        rewards = np.array([s.reward for s in group], dtype=np.float64)
        best = group[int(np.argmax(rewards))]  # argmax / argmin return the first (lowest sample) on ties
        worst = group[int(np.argmin(rewards))]
        if rewards.max() == rewards.min():
            stats.ties += 1
            stats.tied_users.append(user)
            if len({s.text for s in group}) == 1:
                stats.identical_texts += 1
            continue
        gaps.append(best.reward - worst.reward)
        pairs.append(
            SummaryPair(
                user=user,
                position=int(best.position),
                prompt=best.prompt,
                chosen=best.text,
                rejected=worst.text,
                chosen_reward=float(best.reward),
                rejected_reward=float(worst.reward),
                chosen_sample=int(best.sample),
                rejected_sample=int(worst.sample),
            )
        )
    stats.pairs = len(pairs)
    stats.mean_gap = float(np.mean(gaps)) if gaps else 0.0
    return pairs, stats
