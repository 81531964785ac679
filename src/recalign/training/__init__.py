"""Training machinery shared by every method: a transformers ``Trainer`` with pluggable objectives.

- :class:`TrainingConfig`: typed optimisation / checkpoint / logging settings.
- :class:`TokenizedExamples`, :class:`PromptAnswerCollator`: in-memory tokenised examples and batching.
- :class:`ObjectiveTrainer`, :func:`train`: the trainer and a one-call driver with the resume policy.
"""

from recalign.training.config import TrainingConfig
from recalign.training.data import PromptAnswerCollator, TokenizedExamples
from recalign.training.trainer import (
    Objective,
    ObjectiveTrainer,
    TrainOutcome,
    find_resume_checkpoint,
    is_complete_checkpoint,
    list_checkpoints,
    train,
)

__all__ = [
    "Objective",
    "ObjectiveTrainer",
    "PromptAnswerCollator",
    "TokenizedExamples",
    "TrainOutcome",
    "TrainingConfig",
    "find_resume_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "train",
]
