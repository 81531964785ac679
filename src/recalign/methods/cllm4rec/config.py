"""Typed configuration of a CLLM4Rec run (``configs/cllm4rec_ml100k.yaml``).

One config drives all three stages (``pretrain``, ``finetune``, ``evaluate``) so that a run directory
is described by a single resolved file. The defaults are the paper's setting: the whole backbone, the
content LM alternating with the collaborative LM in pretraining *and* fine-tuning, the whole history
in the recommendation prompt, every interaction in every pretraining epoch, and fine-tuning until the
validation Recall@20 stops improving. Every field is documented by ``--help-config``; result records
list the fields that differ from these defaults (:func:`non_default_settings`).
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
    valid_ratio: float = cfg_field(
        0.1,
        "split=holdout: fraction of each user's interactions just before the test part held out as the "
        "validation target set (early stopping); 0 = no validation stage. loo / llara have their own",
    )
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
        "keep only the first N decoder layers of the frozen backbone (null = all, the paper). Not part of "
        "the paper: accepted only if the truncated backbone's untrained content-LM loss is below the "
        "uniform bound ln(vocab), checked before training (else a one-line error)",
    )
    attn_implementation: Literal["auto", "eager", "sdpa"] = cfg_field(
        "auto",
        "attention kernel of the frozen backbone; auto = eager (plain matmuls) for training, which trains "
        "~1.5x faster than sdpa's CPU flash-attention backward on these short rows "
        "(results/cllm4rec_profile.json), and sdpa for forward-only scoring (validation, evaluation, "
        "recommend), faster on long whole-history prompts",
    )
    dtype: Literal["float32", "bfloat16", "auto"] = cfg_field(
        "float32",
        "compute dtype of the frozen backbone (ID tables, gradients and Adam stay float32); auto = "
        "bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX), else float32",
    )


# one meaning in both stages: early stopping needs the split's validation stage
_PATIENCE_HELP = (
    "stop after N validations without a better Recall@20 and keep the best tables (0, or a split "
    "without a validation stage, e.g. data.valid_ratio=0: all epochs)"
)


@dataclass
class PretrainConfig:
    epochs: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        40,
        "at most this many passes over the collaborative documents (each covers every training interaction "
        "once); early stopping (patience) ends pretraining sooner once validation stops improving",
    )
    collab_steps: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        0, "if > 0: exactly this many collaborative steps instead of 'epochs' (smoke runs, budgets)"
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
    max_items: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        30,
        "items per collaborative document: a longer history is cut into consecutive chunks of its "
        "per-epoch shuffle (every interaction once per epoch); 0 = one document per user",
    )
    max_text_tokens: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        40, "word tokens kept of each review / description"
    )
    docs_per_user: int | None = cfg_field(
        None,
        "ignored, kept so that run directories written before #16 still load: every pretraining epoch "
        "now covers all of a user's interactions (max_items chunks)",
    )
    pack_tokens: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        0,
        "pack collaborative / content documents into rows of up to N tokens (block-diagonal mask, exact); "
        "0 = one padded row per document. Batches already hold documents of similar length, so on "
        "ML-100K packing adds tokens (results/cllm4rec_profile.json); it pays for mixed lengths (reviews)",
    )
    lr: Annotated[float, Gt(0, show_value=True)] = cfg_field(1e-2, "Adam learning rate of the ID tables")
    user_lr_scale: Annotated[float, Gt(0, show_value=True)] = cfg_field(
        1.0,
        "the user table's learning rate is lr x this. A user row gets a gradient only in the steps whose "
        "batch holds that user (ML-100K holdout: a median of 2 of 174 pretraining steps per epoch), an item "
        "row in every step (the item head is tied to the item table); a scale > 1 lets the sparse user rows "
        "move further per epoch. 1.0 = one rate for both (the paper)",
    )
    mutual_lambda: Annotated[float, Ge(0, show_value=True)] = cfg_field(
        1.0, "λ of the mutual regulariser λ·mean‖z_collab − sg(z_content)‖² (0 = the 'no-mutual' ablation)"
    )
    validate_every: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        1, "validation Recall@20 (the curve) every N epochs, through the recommendation prompt (0 = never)"
    )
    patience: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        4,
        _PATIENCE_HELP,
    )
    checkpoint_every: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        20, "save ID tables + optimiser state every N steps (0 = only at validations and the end)"
    )


@dataclass
class FinetuneConfig:
    epochs: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        50, "at most this many passes over the users (early stopping usually ends sooner)"
    )
    steps: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        0, "if > 0: exactly this many recommendation steps instead of 'epochs' (smoke runs, budgets)"
    )
    content_ratio: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        1,
        "content-LM steps after each recommendation step (the paper and its released code keep the "
        "content LM in fine-tuning; 0 = none)",
    )
    batch_size: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        16, "users per step and process (global batch: this x processes)"
    )
    max_items: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        0,
        "history items per prompt: 0 = the whole history (the paper); N > 0 caps it (a random "
        "sub-history in training, the N most recent at inference)",
    )
    mask_ratio: float = cfg_field(0.2, "fraction of the history held out as targets (at least one item)")
    lr: Annotated[float, Gt(0, show_value=True)] = cfg_field(1e-2, "Adam learning rate of the ID tables")
    user_lr_scale: Annotated[float, Gt(0, show_value=True)] = cfg_field(
        1.0, "the user table's learning rate is lr x this (see pretrain.user_lr_scale)"
    )
    mutual_lambda: Annotated[float, Ge(0, show_value=True)] = cfg_field(
        1.0, "λ of the mutual regulariser during fine-tuning (0 = off)"
    )
    validate_every: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        1, "validation Recall@20 every N epochs (0 = never: no early stopping)"
    )
    patience: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        3,
        _PATIENCE_HELP,
    )
    checkpoint_every: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        20, "save ID tables + optimiser state every N steps (0 = only at validations and the end)"
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
    valid_max_users: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        0, "validate (early stopping) on the first N validation examples only (0 = all)"
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
        if self.finetune.max_items == 1:  # masking needs one kept and one held-out item
            raise RecalignInputError(
                "must be >= 2, got 1 (or 0 = the whole history)", field="finetune.max_items"
            )
        if not 0 < self.finetune.mask_ratio < 1:
            raise RecalignInputError("must be in (0, 1)", field="finetune.mask_ratio")
        if not 0 < self.data.holdout_ratio < 1:
            raise RecalignInputError("must be in (0, 1)", field="data.holdout_ratio")
        if not 0 <= self.data.valid_ratio < 1 - self.data.holdout_ratio:
            raise RecalignInputError("must be in [0, 1 - data.holdout_ratio)", field="data.valid_ratio")


# Fields that say how a run is *executed*, not what it computes: left out of "settings that differ".
_EXECUTION_FIELDS = {"progress", "threads", "method"}


def non_default_settings(cfg: CLLM4RecConfig) -> dict:
    """``{dotted.key: value}`` of every setting of ``cfg`` that differs from the defaults (the paper's
    setting), execution-only fields (threads, progress bars, the method label) left out."""
    from recalign.config import config_to_dict

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    now, default = flat(config_to_dict(cfg)), flat(config_to_dict(CLLM4RecConfig()))
    return {k: v for k, v in now.items() if k not in _EXECUTION_FIELDS and default.get(k) != v}
