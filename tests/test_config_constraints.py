"""Range constraints in the annotations (``Annotated[int, Ge(1)]``), enforced by the config loader with the
same one-line errors the hand-written checks gave, and by ``validate()`` for configs built in Python."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import pytest

from recalign.baselines import BPRMFConfig, SASRecConfig
from recalign.config import Ge, Gt, cfg_field, check_constraints, describe_config, load_config
from recalign.errors import RecalignInputError
from recalign.methods.dpo4rec.config import DPO4RecConfig


@dataclass
class Leaf:
    steps: Annotated[int, Ge(1)] = cfg_field(3, "steps")
    lr: Annotated[float, Gt(0)] = cfg_field(0.1, "learning rate")
    cap: Annotated[float | None, Ge(0)] = cfg_field(None, "optional cap")


@dataclass
class Tree:
    leaf: Leaf = field(default_factory=Leaf, metadata={"help": "nested"})
    users: Annotated[int, Ge(0)] = cfg_field(0, "users")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["leaf.steps=0"], "field 'leaf.steps': must be >= 1"),
        (["leaf.lr=0"], "field 'leaf.lr': must be > 0"),
        (["leaf.cap=-1"], "field 'leaf.cap': must be >= 0"),
        (["users=-2"], "field 'users': must be >= 0"),
    ],
)
def test_loader_enforces_annotated_constraints_with_the_dotted_key(overrides, message):
    with pytest.raises(RecalignInputError) as e:
        load_config(Tree, None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bounds_pass_and_none_is_not_a_violation():
    cfg = load_config(Tree, None, ["leaf.steps=1", "leaf.lr=1e-9", "leaf.cap=0", "users=0"])
    assert (cfg.leaf.steps, cfg.leaf.cap) == (1, 0.0)
    check_constraints(Tree())  # defaults are valid; cap=None passes Ge(0)


def test_python_built_configs_are_checked_by_validate_too():
    with pytest.raises(RecalignInputError, match="field 'lr': must be > 0"):
        BPRMFConfig(lr=0.0).validate()
    with pytest.raises(RecalignInputError, match="field 'n_heads': must be >= 1"):
        SASRecConfig(n_heads=0).validate()  # a subclass field, through the base class's validate
    with pytest.raises(RecalignInputError, match="field 'fusion.lr': must be > 0"):
        cfg = DPO4RecConfig()
        cfg.fusion.lr = 0.0
        cfg.validate()


@pytest.mark.parametrize(
    "cls, overrides, message",
    [
        (BPRMFConfig, ["dim=0"], "field 'dim': must be >= 1"),
        (BPRMFConfig, ["reg=-1"], "field 'reg': must be >= 0"),
        (SASRecConfig, ["max_len=0"], "field 'max_len': must be >= 1"),
        (DPO4RecConfig, ["summary.temperature=0"], "field 'summary.temperature': must be > 0"),
        (DPO4RecConfig, ["summary.samples=1"], "field 'summary.samples': must be >= 2 (a pair needs two"),
        (DPO4RecConfig, ["encoder.hashing_dim=0"], "field 'encoder.hashing_dim': must be >= 1"),
        (DPO4RecConfig, ["dpo.beta=0"], "field 'dpo.beta': must be > 0"),
        (DPO4RecConfig, ["reward_k=0"], "field 'reward_k': must be >= 1"),
        (DPO4RecConfig, ["sasrec.n_layers=0"], "field 'sasrec.n_layers': must be >= 1"),
    ],
)
def test_converted_configs_keep_their_one_line_errors(cls, overrides, message):
    with pytest.raises(RecalignInputError) as e:
        load_config(cls, None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_help_config_shows_the_plain_type():
    assert any(line.startswith("dim (int, default 64): ") for line in describe_config(BPRMFConfig))
    assert any(line.startswith("leaf.lr (float, default 0.1): ") for line in describe_config(Tree))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pretrain.batch_size=0"], "field 'pretrain.batch_size': must be >= 1, got 0"),
        (["finetune.max_items=1"], "field 'finetune.max_items': must be >= 2, got 1"),
        (["finetune.lr=0"], "field 'finetune.lr': must be > 0, got 0.0"),
        (["pretrain.mutual_lambda=-1"], "field 'pretrain.mutual_lambda': must be >= 0, got -1.0"),
        (["model.num_layers=0"], "field 'model.num_layers': must be >= 1, got 0"),
        (["eval.max_users=-1"], "field 'eval.max_users': must be >= 0, got -1"),
    ],
)
def test_cllm4rec_keeps_its_errors_with_the_value(overrides, message):
    from recalign.methods.cllm4rec.config import CLLM4RecConfig

    with pytest.raises(RecalignInputError) as e:
        load_config(CLLM4RecConfig, None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    load_config(CLLM4RecConfig, None, ["model.num_layers=null"])  # None passes


@pytest.mark.parametrize(
    "cls_path, overrides, message",
    [
        ("recalign.methods.sft:SFTConfig", ["training.batch_size=0"], "field 'training.batch_size': must be >= 1, got 0"),
        ("recalign.methods.sft:SFTConfig", ["training.learning_rate=0"], "field 'training.learning_rate': must be > 0, got 0.0"),
        ("recalign.methods.sft:SFTConfig", ["training.warmup_steps=-1"], "field 'training.warmup_steps': must be >= 0"),
        ("recalign.methods.sft:SFTConfig", ["training.max_grad_norm=-1"], "field 'training.max_grad_norm': must be >= 0"),
        ("recalign.methods.sft:SFTConfig", ["lora.alpha=0"], "field 'lora.alpha': must be >= 1, got 0"),
        ("recalign.methods.sft:SFTConfig", ["max_history=0"], "field 'max_history': must be >= 1"),
        ("recalign.methods.sft:SFTConfig", ["threads=-1"], "field 'threads': must be >= 0"),
        ("recalign.methods.sft:SFTConfig", ["eval.max_new_tokens=0"], "field 'eval.max_new_tokens': must be >= 1"),
        ("recalign.methods.sft:SFTConfig", ["eval.max_pairs=-1"], "field 'eval.max_pairs': must be >= 0, got -1"),
        ("recalign.methods.sft:SFTConfig", ["data.candidates=1"], "field 'data.candidates': must be >= 2, got 1"),
        ("recalign.methods.sft:SFTConfig", ["data.preprocess.item_core=-1"], "field 'data.preprocess.item_core': must be >= 0, got -1"),
        ("recalign.methods.align:AlignConfig", ["beta=0"], "field 'beta': must be > 0, got 0.0"),
        ("recalign.methods.align:AlignConfig", ["n_train=0"], "field 'n_train': must be >= 1, got 0"),
        ("recalign.methods.quickstart:QuickstartConfig", ["sdpo.n_train=0"], "field 'sdpo.n_train': must be >= 1, got 0"),
        ("recalign.methods.quickstart:QuickstartConfig", ["sdpo.training.save_steps=0"], "field 'sdpo.training.save_steps': must be >= 1, got 0"),
        ("recalign.methods.quickstart:QuickstartConfig", ["n_train=0"], "field 'n_train': must be >= 1"),
        ("recalign.methods.quickstart:QuickstartConfig", ["threads=-1"], "field 'threads': must be >= 0"),
        ("recalign.methods.sft:SFTConfig", ["hybrid.projector_hidden=-1"], "field 'hybrid.projector_hidden': must be >= 0"),
        ("recalign.methods.knowledge.recipe:KnowledgeConfig", ["n_examples=-1"], "field 'n_examples': must be >= 0"),
        ("recalign.methods.knowledge.recipe:KnowledgeConfig", ["history_len=0"], "field 'history_len': must be >= 1"),
        ("recalign.methods.knowledge.recipe:KnowledgeConfig", ["threads=-1"], "field 'threads': must be >= 0"),
        ("recalign.methods.knowledge.recipe:KnowledgeConfig", ["eval.retrieval_beams=-1"], "field 'eval.retrieval_beams': must be >= 0"),
        ("recalign.methods.knowledge.recipe:KnowledgeConfig", ["eval.chunk_size=0"], "field 'eval.chunk_size': must be >= 1"),
        ("recalign.methods.dmpo_fewshot:DMPOFewShotConfig", ["negatives=0"], "field 'negatives': must be >= 1, got 0"),
        ("recalign.methods.dmpo_fewshot:DMPOFewShotConfig", ["n_pref=0"], "field 'n_pref': must be >= 1, got 0"),
        ("recalign.methods.dmpo_fewshot:DMPOFewShotConfig", ["beta=0"], "field 'beta': must be > 0, got 0.0"),
    ],
)  # fmt: skip
def test_lm_recipes_keep_their_one_line_errors(cls_path, overrides, message):
    import importlib

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(RecalignInputError) as e:
        load_config(cls, None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sections_built_in_python_keep_their_section_names():
    from recalign.data.preprocess import PreprocessConfig
    from recalign.lm.lora import LoRAConfig
    from recalign.methods.quickstart import QuickstartSDPOConfig
    from recalign.methods.zeroshot import EvalConfig
    from recalign.training.config import TrainingConfig

    cases = [
        (TrainingConfig(grad_accum=0), "field 'training.grad_accum': must be >= 1, got 0"),
        (TrainingConfig(num_workers=-1), "field 'training.num_workers': must be >= 0"),
        (LoRAConfig(r=0), "field 'lora.r': must be >= 1, got 0"),
        (PreprocessConfig(kcore=-2), "field 'preprocess.kcore': must be >= 0, got -2"),
        (EvalConfig(batch_size=0), "field 'eval.batch_size': must be >= 1"),
        (QuickstartSDPOConfig(beta=0.0), "field 'sdpo.beta': must be > 0, got 0.0"),
    ]
    for cfg, message in cases:
        with pytest.raises(RecalignInputError) as e:
            cfg.validate()
        assert message in str(e.value), (cfg, str(e.value))
