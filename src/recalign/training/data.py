"""In-memory training data: tokenised prompt/answer examples and the collator that batches them.

Why no padding here: the scoring layer (``recalign.lm.scoring.answer_logprobs``) packs a prompt with
all its answers into one sequence with a tree-shaped attention mask, so it wants ragged token lists,
not a padded tensor. The collator therefore only regroups examples into a dict of lists; whatever keys
the examples carry (``prompt``, ``answers``, ``chosen``, ``ref_logps``, ...) arrive in the batch, which
is what makes one trainer serve SFT and every preference objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset


class TokenizedExamples(Dataset):
    """A list of example dicts, typically ``{"prompt": [int], "answers": [[int], ...]}``.

    Examples must be JSON-like (ints, floats, lists, strings); tensors are allowed too.
    """

    def __init__(self, examples: Sequence[dict[str, Any]]) -> None:
        if not len(examples):
            raise ValueError("no training examples")
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    def n_tokens(self) -> int:
        """Prompt + answer tokens over all examples (for progress/cost estimates)."""
        total = 0
        for ex in self.examples:
            total += len(ex.get("prompt", ()))
            total += sum(len(a) for a in ex.get("answers", ()))
        return total


class PromptAnswerCollator:
    """Batch = ``{key: [value of example 0, value of example 1, ...]}`` for every key.

    Values that are tensors of equal shape are stacked (e.g. precomputed reference log-probs); all
    other values stay Python lists, in example order.
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            return {}
        keys = list(examples[0])
        for ex in examples[1:]:
            if list(ex) != keys:
                raise ValueError(f"examples in one batch have different keys: {keys} vs {list(ex)}")
        batch: dict[str, Any] = {}
        for k in keys:
            vals = [ex[k] for ex in examples]
            if all(isinstance(v, torch.Tensor) for v in vals) and len({v.shape for v in vals}) == 1:
                batch[k] = torch.stack(vals)
            else:
                batch[k] = vals
        return batch
