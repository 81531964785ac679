"""Training objectives: preference losses (DPO, S-DPO, DMPO) over per-answer log-probs."""

from recalign.objectives.preference import (
    LOSSES,
    PreferenceOutput,
    chosen_nll,
    dmpo_loss,
    dpo_loss,
    preference_loss,
    sdpo_loss,
)

__all__ = [
    "LOSSES",
    "PreferenceOutput",
    "chosen_nll",
    "dmpo_loss",
    "dpo_loss",
    "preference_loss",
    "sdpo_loss",
]
