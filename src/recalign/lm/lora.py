"""LoRA adapters through peft: typed settings, attach, save/load (safetensors only), merge.

Why adapters: a 135M-parameter model trained in full on a 2-core CPU is slow and its checkpoints are
half a gigabyte; a rank-8 adapter on the attention projections trains ~0.5M parameters and saves a
~2 MB file. Everything trained in recalign (SFT, S-DPO, DMPO, ...) is therefore an adapter on a frozen
base model, and a *saved model* is a directory holding

- ``adapter_model.safetensors`` + ``adapter_config.json`` (written by peft, never pickles), and
- ``recalign_adapter.json``: the base model as the user named it (``"smollm2"`` rather than the
  machine-specific cache path peft records), so the directory can be loaded on another machine.

A *run directory* (``recalign sft --output DIR``) holds such an adapter under ``DIR/adapter``;
:func:`resolve_model` accepts a base model name/path, an adapter directory or a run directory, which is
what lets ``recalign evaluate --model`` and ``recalign recommend --model`` take any of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from recalign.config import Ge, cfg_field, check_constraints
from recalign.errors import RecalignInputError
from recalign.io import atomic_write_json

ADAPTER_META = "recalign_adapter.json"
RUN_ADAPTER_SUBDIR = "adapter"


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters (peft ``LoraConfig`` under a typed, documented, validated face)."""

    enabled: bool = cfg_field(True, "train a LoRA adapter; false trains nothing (zero-shot)")
    r: Annotated[int, Ge(1, show_value=True)] = cfg_field(8, "adapter rank")
    alpha: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        16, "scaling numerator: the update is scaled by alpha / r"
    )
    dropout: float = cfg_field(0.05, "dropout on the adapter input during training")
    target_modules: list[str] = cfg_field(
        ["q_proj", "v_proj"],
        "module names to adapt (suffix match), or ['all-linear'] for every linear layer but the LM head",
    )
    bias: str = cfg_field("none", "which biases to train: none, all or lora_only")

    def validate(self) -> None:
        check_constraints(self, "lora.")  # the Ge annotations, named as the section ``lora``
        if not 0.0 <= self.dropout < 1.0:
            raise RecalignInputError(f"must be in [0, 1), got {self.dropout}", field="lora.dropout")
        if not self.target_modules:
            raise RecalignInputError("must name at least one module", field="lora.target_modules")
        if self.bias not in ("none", "all", "lora_only"):
            raise RecalignInputError(
                f"must be one of none, all, lora_only, got {self.bias!r}", field="lora.bias"
            )

    def to_peft(self):
        from peft import LoraConfig, TaskType

        targets: list[str] | str = list(self.target_modules)
        if targets == ["all-linear"]:
            targets = "all-linear"
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias=self.bias,
        )


def attach_lora(model: PreTrainedModel, cfg: LoRAConfig):
    """Wrap ``model`` in a peft model with a fresh, trainable LoRA adapter (the base is frozen).

    Unknown ``target_modules`` are a one-line input error rather than peft's multi-line ValueError.
    """
    from peft import get_peft_model

    cfg.validate()
    try:
        peft_cfg = cfg.to_peft()
        if getattr(model.config, "is_encoder_decoder", False):  # T5 family: peft's seq2seq wrapper
            from peft import TaskType

            peft_cfg.task_type = TaskType.SEQ_2_SEQ_LM
        from recalign.lm.hybrid import item_tokens_detached

        with item_tokens_detached(model):  # no LoRA layers in a hybrid model's projector
            return get_peft_model(model, peft_cfg)
    except ValueError as e:
        if "target modules" in str(e).lower() or "target_modules" in str(e):
            raise RecalignInputError(
                f"none of {cfg.target_modules} found in the model", field="lora.target_modules"
            ) from None
        raise


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_adapter(model, directory: str | Path, base_model: str, extra: dict | None = None) -> Path:
    """Write the adapter as safetensors plus ``recalign_adapter.json`` naming the base model, and a hybrid
    model's item-token projector beside it (:func:`recalign.lm.hybrid.save_item_tokens`)."""
    from recalign.lm.hybrid import save_item_tokens

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    if not (directory / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"peft did not write adapter_model.safetensors in {directory}")
    save_item_tokens(model, directory)
    atomic_write_json(directory / ADAPTER_META, {"base_model": str(base_model), **(extra or {})})
    return directory


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


@dataclass
class ModelSource:
    """What ``--model`` pointed at: a base model and, optionally, an adapter on top of it."""

    base: str
    adapter: Path | None = None

    @property
    def label(self) -> str:
        return str(self.adapter) if self.adapter else self.base


def resolve_model(name_or_dir: str | Path) -> ModelSource:
    """Interpret a model argument: base name/path, adapter directory, or run directory."""
    path = Path(name_or_dir)
    adapter = None
    if path.is_dir():
        if is_adapter_dir(path):
            adapter = path
        elif is_adapter_dir(path / RUN_ADAPTER_SUBDIR):
            adapter = path / RUN_ADAPTER_SUBDIR
    if adapter is None:
        return ModelSource(base=str(name_or_dir))
    meta = adapter / ADAPTER_META
    record = meta if meta.is_file() else adapter / "adapter_config.json"  # plain peft: its own record
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RecalignInputError(f"not valid JSON ({e})", source=record) from None
    key = "base_model" if record == meta else "base_model_name_or_path"
    base = saved.get(key) if isinstance(saved, dict) else None
    if not base:
        raise RecalignInputError("adapter does not say which base model it belongs to", source=adapter)
    from recalign.lm.loading import unknown_model_problem

    problem = unknown_model_problem(str(base))
    if problem:  # e.g. a run directory trained on top of another that was deleted or moved since
        raise RecalignInputError(
            f"the adapter's base model {str(base)!r} is missing: {problem}", source=record
        )
    if not (adapter / "adapter_model.safetensors").is_file():
        raise RecalignInputError(
            "adapter weights missing (expected adapter_model.safetensors)", source=adapter
        )
    return ModelSource(base=str(base), adapter=adapter)


def load_adapter(model: PreTrainedModel, directory: str | Path, *, trainable: bool = False):
    """Put a saved adapter on ``model`` (safetensors only; peft refuses nothing else here)."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_model.safetensors").is_file():
        raise RecalignInputError("no adapter_model.safetensors here", source=directory)
    return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)


def merge_adapter(model) -> PreTrainedModel:
    """Fold the adapter into the base weights: plain model, no LoRA overhead at inference."""
    return model.merge_and_unload()


DTYPES = ("auto", "float32", "bfloat16")


def bf16_is_fast() -> bool:
    """Whether bfloat16 matmuls run natively here (CUDA with bf16, or a CPU with AVX512-BF16 / AMX).

    On such CPUs (e.g. Sapphire Rapids) bf16 linear layers run ~6x faster than fp32, and SmolLM2
    scoring, generation and LoRA training ~2-2.5x faster end to end; elsewhere bf16 is emulated and slow.
    """
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"auto"`` -> bfloat16 where it is fast (:func:`bf16_is_fast`), else float32; names -> dtypes.

    The base model's weights use this dtype; LoRA adapter weights stay float32 (peft casts them up),
    so optimiser updates keep full precision on a bf16 base.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise RecalignInputError(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast() else torch.float32
    return getattr(torch, dtype)


def load_lm(
    name_or_dir: str | Path,
    *,
    merge: bool = True,
    trainable: bool = False,
    dtype: str | torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, ModelSource]:
    """Load any ``--model`` argument: the base model, with its adapter applied if there is one.

    ``merge`` (default for inference) folds the adapter in, which makes scoring as fast as the base
    model; pass ``merge=False`` (or ``trainable=True``) to keep a peft model, e.g. to continue training
    or to disable the adapter for reference log-probs. ``dtype``: a torch dtype or ``"auto"`` /
    ``"float32"`` / ``"bfloat16"`` (:func:`resolve_dtype`).

    An adapter directory holding ``hybrid_projector.safetensors`` (a hybrid-token run) gets its
    projector attached (:mod:`recalign.lm.hybrid`), trainable with ``trainable=True``; a stacked adapter
    without one keeps the projector of the run it was trained on.
    """
    dtype = resolve_dtype(dtype)
    from recalign.lm.loading import load_model

    src = resolve_model(name_or_dir)
    from recalign.lm.hybrid import PROJECTOR_FILE, attach_item_tokens, load_item_tokens

    # a hybrid run's projector is read (and a damaged file refused) before any weights load
    item_tokens = None
    if src.adapter is not None and (src.adapter / PROJECTOR_FILE).is_file():
        item_tokens = load_item_tokens(src.adapter)
    if src.adapter is not None and resolve_model(src.base).adapter is not None:
        # Stacked adapters (e.g. an S-DPO adapter trained on top of a merged SFT run): rebuild the
        # start model first, with its own adapter folded in, then apply this one.
        model, tok, _ = load_lm(src.base, merge=True, dtype=dtype)
    else:
        model, tok = load_model(src.base, dtype=dtype)
    if src.adapter is not None:
        model = load_adapter(model, src.adapter, trainable=trainable)
        if merge and not trainable:
            model = merge_adapter(model)
        if item_tokens is not None:
            attach_item_tokens(model, item_tokens, trainable=trainable)
    model.eval()
    return model, tok, src
