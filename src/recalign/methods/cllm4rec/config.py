"""Typed configuration of a CLLM4Rec run (``configs/cllm4rec_ml100k.yaml``).

One config drives all three stages (``pretrain``, ``finetune``, ``evaluate``) so that a run directory
is described by a single resolved file. Defaults are sized for the embedded SmolLM2-135M on a shared
2-core CPU (see the YAML for the ML-100K budget); every field is documented by ``--help-config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from recalign.config import Ge, Gt, cfg_field, check_constraints
from recalign.errors import RecalignInputError


@dataclass
class DataConfig:
    dataset: str = cfg_field("ml-100k", "dataset name (ml-100k = embedded default) or a path")
    path: str | None = cfg_field(None, "file or directory for non-embedded datasets")
    split: Literal["holdout", "loo", "llara"] = cfg_field(
        "holdout",
        "holdout = last holdout_ratio of every user's interactions (by time) held out as a target set "
        "(multi-target full ranking, CLLM4Rec's Recall@K protocol); loo / llara = the shared next-item splits",
    )
    holdout_ratio: float = cfg_field(0.2, "fraction of each user's interactions held out (split=holdout)")
    split_seed: int = cfg_field(0, "seed of the split's candidate sets (shared with every other method)")


@dataclass
class ModelConfig:
    backbone: str = cfg_field("smollm2", "frozen decoder-only LM: 'smollm2' (embedded) or a local path")
    init_std: float | None = cfg_field(
        None, "std of the ID-embedding init; null = std of the word embeddings"
    )
    add_bos: bool = cfg_field(True, "start every document with the backbone's BOS token")
    num_layers: Annotated[int | None, Ge(1, show_value=True)] = cfg_field(
        None,
        "keep only the first N decoder layers of the frozen backbone (null = all). A compute knob for "
        "CPU budgets, not part of the paper: step cost is linear in the layers kept",
    )


@dataclass
class PretrainConfig:
    collab_steps: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        60, "optimiser steps of the collaborative LM"
    )
    content_ratio: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        1, "content-LM steps after each collaborative step (0 = no content LM, the 'no-content' ablation)"
    )
    batch_size: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        16, "collaborative documents per step and process (global batch: this x processes)"
    )
    content_batch_size: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        16, "content documents per step and process"
    )
    max_items: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        30, "items per collaborative document (a random sub-list per epoch)"
    )
    docs_per_user: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        1, "collaborative documents per user and epoch (disjoint sub-lists)"
    )
    max_text_tokens: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        40, "word tokens kept of each review / description"
    )
    lr: Annotated[float, Gt(0, show_value=True)] = cfg_field(1e-2, "Adam learning rate of the ID tables")
    mutual_lambda: Annotated[float, Ge(0, show_value=True)] = cfg_field(
        1.0, "λ of the mutual regulariser λ·mean‖z_collab − sg(z_content)‖² (0 = the 'no-mutual' ablation)"
    )
    checkpoint_every: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        20, "save ID tables + optimiser state every N steps (0 = only at the end)"
    )


@dataclass
class FinetuneConfig:
    steps: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        60, "optimiser steps of the recommendation (masked-history) objective"
    )
    content_ratio: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        0, "content-LM steps after each recommendation step (0 = none)"
    )
    batch_size: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        16, "users per step and process (global batch: this x processes)"
    )
    max_items: Annotated[int, Ge(2, show_value=True)] = cfg_field(
        50, "history items per prompt (random sub-history in training, most recent at inference)"
    )
    mask_ratio: float = cfg_field(
        0.2, "fraction of the (sub-)history held out as targets (at least one item)"
    )
    lr: Annotated[float, Gt(0, show_value=True)] = cfg_field(1e-2, "Adam learning rate of the ID tables")
    mutual_lambda: Annotated[float, Ge(0, show_value=True)] = cfg_field(
        1.0, "λ of the mutual regulariser during fine-tuning (0 = off)"
    )
    checkpoint_every: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        20, "save ID tables + optimiser state every N steps (0 = only at the end)"
    )


@dataclass
class EvalConfig:
    batch_size: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        32, "prompts per forward pass when scoring"
    )
    stage: Literal["test", "valid"] = cfg_field("test", "which stage of the split to evaluate")
    max_users: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        0, "evaluate only the first N examples (0 = all; for smoke runs)"
    )


@dataclass
class CLLM4RecConfig:
    method: str = cfg_field("cllm4rec", "method name written into result records (e.g. cllm4rec-no-content)")
    seed: int = cfg_field(0, "seed of initialisation, document sampling and masking")
    threads: int = cfg_field(0, "torch CPU threads; 0 = number of cores, at most 2")
    progress: bool = cfg_field(True, "show progress bars")
    data: DataConfig = cfg_field(DataConfig(), "dataset and split")
    model: ModelConfig = cfg_field(ModelConfig(), "backbone and ID tables")
    pretrain: PretrainConfig = cfg_field(PretrainConfig(), "collaborative + content LM pretraining")
    finetune: FinetuneConfig = cfg_field(FinetuneConfig(), "recommendation fine-tuning")
    eval: EvalConfig = cfg_field(EvalConfig(), "evaluation")

    def validate(self) -> None:
        check_constraints(self)  # the Ge / Gt annotations of every section, with dotted names
        if not 0 < self.finetune.mask_ratio < 1:
            raise RecalignInputError("must be in (0, 1)", field="finetune.mask_ratio")
        if not 0 < self.data.holdout_ratio < 1:
            raise RecalignInputError("must be in (0, 1)", field="data.holdout_ratio")
