"""The multi-task mixer: a fixed budget of examples split across tasks by ratio, exactly and reproducibly.

Ratios are turned into integer counts with the largest-remainder method, so the counts always sum to the
budget and each task gets ``floor(budget * r / sum(r))`` plus at most one (ties broken by task order).
Comparing "recommendation tasks only" with "recommendation + auxiliary" at the *same* budget is the
point of the paper's ablation, so the counts must be exact, not sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recalign.errors import RecalignInputError
from recalign.methods.knowledge.tasks import KnowledgeTasks, TaskExample
from recalign.methods.knowledge.templates import ALL_TASKS


def allocate(budget: int, tasks: Sequence[str], ratios: Sequence[float]) -> dict[str, int]:
    """Integer example counts per task, proportional to ``ratios`` and summing to ``budget``."""
    tasks, ratios = list(tasks), [float(r) for r in ratios]
    if len(tasks) != len(ratios):
        raise RecalignInputError(
            f"{len(tasks)} tasks but {len(ratios)} ratios (give one ratio per task)", field="ratios"
        )
    if not tasks:
        raise RecalignInputError("no tasks given", field="tasks")
    if len(set(tasks)) != len(tasks):
        raise RecalignInputError("a task is listed twice", field="tasks")
    for t in tasks:
        if t not in ALL_TASKS:
            raise RecalignInputError(
                f"unknown task '{t}' (choose from {', '.join(ALL_TASKS)})", field="tasks"
            )
    if any(not np.isfinite(r) or r < 0 for r in ratios) or sum(ratios) <= 0:
        raise RecalignInputError("ratios must be non-negative and not all zero", field="ratios")
    if budget < 0:
        raise RecalignInputError("the example budget must be >= 0", field="n_examples")
    total = sum(ratios)
    quota = [budget * r / total for r in ratios]
    counts = [int(np.floor(q)) for q in quota]
    rest = budget - sum(counts)
    order = sorted(range(len(tasks)), key=lambda i: (-(quota[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return dict(zip(tasks, counts))


def mix(
    builder: KnowledgeTasks,
    tasks: Sequence[str],
    ratios: Sequence[float],
    budget: int,
    *,
    seed: int = 0,
    stage: str = "train",
) -> list[TaskExample]:
    """``budget`` training examples drawn across ``tasks`` by ``ratios``, shuffled together (seeded)."""
    counts = allocate(budget, tasks, ratios)
    out: list[TaskExample] = []
    for task, n in counts.items():
        out.extend(builder.generate(task, n, stage, seed=seed))
    order = np.random.default_rng([seed, 1234]).permutation(len(out))
    return [out[int(i)] for i in order]
