"""The LM recipe configs (SFT, alignment, knowledge) share LMRecipeConfig's fields."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from recalign.config import load_config
from recalign.errors import RecalignInputError
from recalign.methods.align import AlignConfig
from recalign.methods.knowledge.recipe import KnowledgeConfig, KnowledgeEvalConfig
from recalign.methods.lm_recipe import LMRecipeConfig
from recalign.methods.sft import SFTConfig

RECIPES = (SFTConfig, AlignConfig, KnowledgeConfig)
BASE_FIELDS = ("model", "data", "seed", "dtype", "threads", "lora", "training", "eval")

#: Base fields each recipe redeclares (its own default); the others it inherits as they are.
REDECLARED = {
    SFTConfig: {"training"},
    AlignConfig: {"training"},
    KnowledgeConfig: {"data", "training", "eval"},
}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def test_base_holds_the_fields_every_lm_recipe_has():
    assert tuple(f.name for f in dataclasses.fields(LMRecipeConfig)) == BASE_FIELDS


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_recipe_inherits_every_base_field(cls):
    assert issubclass(cls, LMRecipeConfig)
    base = {f.name: f for f in dataclasses.fields(LMRecipeConfig)}
    own = {f.name: f for f in dataclasses.fields(cls)}
    base_hints = typing.get_type_hints(LMRecipeConfig, include_extras=True)
    hints = typing.get_type_hints(cls, include_extras=True)
    assert set(base) <= set(own)
    for name, bf in base.items():
        f = own[name]
        if name in REDECLARED[cls]:
            continue
        assert f.metadata["help"] == bf.metadata["help"], name
        assert _default(f) == _default(bf), name  # nested configs compare field by field
        assert hints[name] == base_hints[name], name
    # a redeclared field keeps the base's name and (but for knowledge's eval section) its type
    for name in REDECLARED[cls]:
        if (cls, name) != (KnowledgeConfig, "eval"):
            assert hints[name] == base_hints[name], name
    # base fields come first, in the base's order
    assert tuple(own)[: len(BASE_FIELDS)] == BASE_FIELDS


def test_knowledge_eval_section_is_its_own():
    assert isinstance(KnowledgeConfig().eval, KnowledgeEvalConfig)


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_inherited_fields_take_yaml_keys_and_reject_unknown(cls):
    cfg = load_config(cls, overrides={"threads": 1, "seed": 3, "lora": {"r": 4}})
    assert (cfg.threads, cfg.seed, cfg.lora.r) == (1, 3, 4)
    with pytest.raises(RecalignInputError, match="unknown key 'lora.bogus'"):
        load_config(cls, overrides={"lora": {"bogus": 1}})
    with pytest.raises(RecalignInputError, match="unknown key 'bogus'"):
        load_config(cls, overrides={"bogus": 1})


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_inherited_threads_constraint(cls):
    cfg = cls(threads=-1)
    with pytest.raises(RecalignInputError, match="threads"):
        cfg.validate()


@pytest.mark.parametrize("cls", (SFTConfig, AlignConfig), ids=lambda c: c.__name__)
def test_max_history_must_be_positive(cls):
    with pytest.raises(RecalignInputError, match="field 'max_history': must be >= 1"):
        cls(max_history=0).validate()
