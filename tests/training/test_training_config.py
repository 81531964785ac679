"""``training.max_steps``: -1 (train for ``epochs``) or a positive step count, nothing else.

Why: Trainer treats any ``max_steps <= 0`` as "use epochs", so ``max_steps: -3`` (a typo, or a
negated value) used to train silently by epochs. The rule is in the field's help, so
``--help-config`` states it.
"""

from __future__ import annotations

import pytest

from recalign.config import describe_config, load_config
from recalign.errors import RecalignInputError
from recalign.training import TrainingConfig


@pytest.mark.parametrize("bad", [-3, -2, 0])
def test_max_steps_other_than_minus_one_or_positive_is_refused(bad):
    with pytest.raises(RecalignInputError, match=rf"field 'training.max_steps': must be -1 .* got {bad}$"):
        TrainingConfig(max_steps=bad).validate()


@pytest.mark.parametrize("good", [-1, 1, 500])
def test_minus_one_and_positive_max_steps_are_accepted(good):
    TrainingConfig(max_steps=good).validate()


def test_the_rule_is_in_the_field_help():
    line = next(x for x in describe_config(TrainingConfig) if x.lstrip().startswith("max_steps"))
    assert "-1 trains for 'epochs'" in line and "> 0" in line


def test_max_steps_minus_one_with_no_epochs_is_refused():
    with pytest.raises(RecalignInputError, match="set epochs > 0 or max_steps > 0"):
        load_config(TrainingConfig, None, ["max_steps=-1", "epochs=0"]).validate()
