"""Hybrid item tokens in the SFT recipe (LLaRA): settings, the frozen item table, the curriculum.

The LM-side machinery (soft tokens in prompts, the projector, saving and loading) is
:mod:`recalign.lm.hybrid`; this module is what ``recalign sft`` with ``hybrid.enabled=true`` adds:

1. **The item table** (:func:`item_table`): the item embeddings of a trained sequential recommender from
   :mod:`recalign.baselines`, frozen. ``hybrid.recommender`` names a baseline to fit on the split's
   training stage with its defaults (``sasrec``, the paper's choice; ``train`` means the same;
   ``gru4rec``), optionally with dotted ``hybrid.recommender_overrides``, or points at saved weights:
   a hybrid run / adapter directory or ``hybrid_projector.safetensors`` (its table is reused), or a
   SASRec/GRU4Rec state dict (``model.safetensors``, e.g. a DPO4Rec run's ``sasrec/`` directory).
   Only the training stage is fitted on, so the table never saw a validation or test target.
2. **The projector** (:func:`attach_for_sft`): fresh (:func:`recalign.lm.hybrid.new_item_tokens`,
   seeded with ``training.seed``), attached to the LoRA model and trained with it. On resume the item
   table comes from the checkpoint (no refit; the Trainer restores the projector's weights).
3. **The curriculum** (:class:`CurriculumObjective`): LLaRA starts from text-only prompts and moves to
   hybrid ones. With ``hybrid.curriculum=true`` each training example keeps both encodings and, at
   optimiser step ``s`` of ``T``, is shown hybrid with probability :func:`hybrid_fraction` ``= min(1,
   s / (curriculum_span * T))`` (drawn from ``(seed, example, step)``: the same on resume and in every
   process); without it every training prompt is hybrid. Evaluation prompts are always hybrid.
4. **Both SFT formats.** ``format: candidates`` (:func:`hybrid_examples`): every item of the candidate
   prompt, history and candidates, as ``Title [emb]``. ``format: sequence``
   (:func:`hybrid_sequence_examples`, :mod:`recalign.lm.sequence`): the plain-list documents with a soft
   token after every item's line, the loss on the title lines only (~20 next-item targets per document,
   each seeing the soft tokens of the items before it); evaluation prompts the history-only list with
   the same soft tokens and scores the candidates' plain lines. The curriculum works for both (the
   text-only encoding of an example is kept under ``text_<key>``, see :class:`CurriculumObjective`).
5. **The item head** (``hybrid.item_head``, sequence format only): the same frozen table also scores
   items at the LM's output, ``h . Q(E_j) + b_j`` over the catalogue (E4SRec / CLLM4Rec style, see
   :mod:`recalign.lm.hybrid`), trained by ``item_head_weight`` x the next-item cross-entropy next to the
   title NLL (:class:`recalign.lm.sequence.SequenceObjective`), because the title-only hybrid run got
   nothing out of the soft tokens: the head lets SASRec's collaborative space be used directly instead
   of being decoded into title tokens. Evaluation then ranks by title + item log-prob
   (``eval.item_score``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from transformers import TrainerCallback

from recalign.config import Ge, cfg_field, check_constraints
from recalign.errors import RecalignInputError

FIT_RECOMMENDERS = ("sasrec", "gru4rec")


@dataclass
class HybridConfig:
    """LLaRA's hybrid item tokens: ``Title [emb]`` with a projected recommender embedding per item."""

    enabled: bool = cfg_field(
        False,
        "write every item as its title followed by one soft token: a frozen sequential recommender's item "
        "embedding through a trainable projector (format=candidates: history and candidates of the prompt; "
        "format=sequence: after every item's line of the documents and of the history-only prompt)",
    )
    recommender: str = cfg_field(
        "sasrec",
        "where the item embeddings come from: sasrec or gru4rec (fit on the split's training stage with "
        "the baseline's defaults; 'train' = sasrec), or a path: a hybrid run/adapter dir or "
        "hybrid_projector.safetensors (its item table is reused), or a SASRec/GRU4Rec model.safetensors "
        "(or its directory, e.g. a DPO4Rec run's sasrec/)",
    )
    recommender_overrides: list[str] = cfg_field(
        [], "dotted overrides of the fitted baseline's config, e.g. ['epochs=20', 'threads=2']"
    )
    projector_hidden: Annotated[int, Ge(0)] = cfg_field(
        0, "hidden width of the projector MLP (d_rec -> hidden -> d_lm); 0: the LM's width, as LLaRA"
    )
    curriculum: bool = cfg_field(
        False,
        "curriculum from text-only to hybrid prompts: the share of hybrid training prompts rises "
        "linearly from 0 to 1 over the first curriculum_span of the training steps",
    )
    curriculum_span: float = cfg_field(
        1.0, "fraction of the training steps over which the hybrid share rises to 1 (curriculum only)"
    )
    item_head: bool = cfg_field(
        False,
        "format=sequence: an item output head on the LM's final hidden state, logits h . Q(E_j) + b_j over "
        "the catalogue (E the frozen item table, Q and b trainable), trained by the next-item cross-entropy "
        "next to the title NLL and used in scoring (eval.item_score)",
    )
    item_head_weight: Annotated[float, Ge(0)] = cfg_field(
        1.0, "weight of the item head's cross-entropy in the loss (item_head only)"
    )

    def validate(self) -> None:
        if not self.recommender.strip():
            raise RecalignInputError(
                "must name a baseline (sasrec, gru4rec) or a path", field="hybrid.recommender"
            )
        check_constraints(self, "hybrid.")  # projector_hidden >= 0, item_head_weight >= 0
        if self.item_head and not self.enabled:
            raise RecalignInputError(
                "needs hybrid.enabled=true (the head scores items against the hybrid item table)",
                field="hybrid.item_head",
            )
        if not 0.0 < self.curriculum_span <= 1.0:
            raise RecalignInputError(
                f"must be in (0, 1], got {self.curriculum_span}", field="hybrid.curriculum_span"
            )
        name = self._fit_name()
        if name is not None:
            from recalign.baselines import load_baseline_config

            try:
                load_baseline_config(name, None, list(self.recommender_overrides))
            except RecalignInputError as e:
                raise RecalignInputError(e.problem, field=f"hybrid.recommender_overrides ({name})") from None

    def _fit_name(self) -> str | None:
        """The baseline to fit, or None when ``recommender`` is a path."""
        name = self.recommender.strip().lower()
        name = "sasrec" if name == "train" else name
        return name if name in FIT_RECOMMENDERS else None


# ---------------------------------------------------------------------- the item table
def _table_from_state_dict(file: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except Exception as e:  # damaged file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise RecalignInputError(f"cannot read recommender weights ({first})", source=file) from None
    weight = state.get("item_emb.weight")
    if weight is None or weight.ndim != 2:
        raise RecalignInputError("no item_emb.weight (a SASRec/GRU4Rec state dict) in this file", source=file)
    return weight[1:].float()  # row 0 is the padding item


def item_table(cfg: HybridConfig, dataset, split, *, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """``[n_items, d_rec]`` frozen item embeddings for ``dataset`` and where they came from (JSON-able)."""
    from recalign.lm.hybrid import PROJECTOR_FILE, load_item_tokens

    name = cfg._fit_name()
    if name is not None:
        from recalign.baselines import load_baseline_config, make_baseline

        rec_cfg = load_baseline_config(name, None, list(cfg.recommender_overrides))
        if progress:
            print(
                f"hybrid: fitting {name} on the {split.name} training stage for the item embeddings",
                flush=True,
            )
        rec = make_baseline(name, rec_cfg, progress=progress)
        rec.fit(dataset, split)
        fit = {k: v for k, v in rec.fit_info.items() if k != "history"}
        table = rec.item_embeddings().float()
        info = {"recommender": name, "overrides": list(cfg.recommender_overrides), "fit": fit}
    else:
        path = Path(cfg.recommender)
        candidates = [
            path,
            path / PROJECTOR_FILE,
            path / "adapter" / PROJECTOR_FILE,
            path / "model.safetensors",
        ]
        file = next((p for p in candidates if p.is_file()), None)
        if file is None:
            raise RecalignInputError(
                "neither a baseline name (sasrec, gru4rec) nor a projector / model.safetensors file",
                source=path,
                field="hybrid.recommender",
            )
        if file.name == PROJECTOR_FILE:
            table = load_item_tokens(file).item_table.clone()
        else:
            table = _table_from_state_dict(file)
        info = {"recommender": str(file)}
    if table.shape[0] != dataset.n_items:
        raise RecalignInputError(
            f"recommender has {table.shape[0]} item embeddings but dataset '{dataset.name}' has {dataset.n_items}",
            source=None if name else cfg.recommender,
            field="hybrid.recommender",
        )
    return table, info


def attach_for_sft(cfg: HybridConfig, model, data, resume_from: Path | None, *, seed: int, progress: bool):
    """Attach a trainable projector to the LoRA ``model`` of an SFT run; returns the module.

    A model that already carries one (``--model`` a hybrid run: continued training) keeps it. Resuming,
    the item table is the checkpoint's (the Trainer then restores the projector's weights into the
    module built here, whose initial values do not matter).
    """
    from recalign.lm.hybrid import (
        PROJECTOR_FILE,
        attach_item_tokens,
        catalogue_fingerprint,
        check_dataset,
        item_tokens_of,
        load_item_tokens,
        new_item_tokens,
    )

    module = item_tokens_of(model)
    if module is None and resume_from is not None and (resume_from / PROJECTOR_FILE).is_file():
        module = load_item_tokens(resume_from)
    if module is None:
        table, info = item_table(cfg, data.dataset, data.split, progress=progress)
        info["catalogue_sha256"] = catalogue_fingerprint(data.dataset)
        torch.manual_seed(seed)
        module = new_item_tokens(model, table, hidden=cfg.projector_hidden, info=info)
    if cfg.item_head and not module.has_item_head:  # after the projector's draws: it stays the same
        torch.manual_seed(seed + 1)
        module.add_item_head()
    check_dataset(module, data.dataset)
    attach_item_tokens(model, module, trainable=True)
    return module


# ---------------------------------------------------------------------- examples and curriculum
def hybrid_fraction(step: int, max_steps: int, span: float = 1.0) -> float:
    """Share of hybrid training prompts at optimiser step ``step`` (0-based) of ``max_steps``: rises
    linearly from 0 at step 0 to 1 at step ``span * max_steps``, then stays 1."""
    ramp = span * max(int(max_steps), 1)
    return float(min(1.0, max(0.0, step / ramp)))


def hybrid_examples(
    cfg: HybridConfig, tokenizer, dataset, frame, examples: list[dict], *, seed: int, max_history: int
) -> list[dict]:
    """SFT examples whose ``prompt`` is the hybrid candidate prompt of the same row of ``frame``.

    With the curriculum, the text-only prompt stays as ``text_prompt`` and ``example`` numbers the row
    (the :class:`CurriculumObjective` picks one of the two per step).
    """
    from recalign.lm.prompts import encode_prompt, examples_to_prompts

    prompts = examples_to_prompts(dataset, frame, seed=seed, max_history=max_history, item_tokens=True)
    if len(prompts) != len(examples):
        raise ValueError(f"{len(examples)} examples for {len(prompts)} rows")
    out = []
    for i, (ex, p) in enumerate(zip(examples, prompts)):
        row = {**ex, "prompt": encode_prompt(tokenizer, p.prompt)}
        if cfg.curriculum:
            row["text_prompt"] = ex["prompt"]
            row["example"] = i
        out.append(row)
    return out


def hybrid_sequence_examples(cfg: HybridConfig, tokenizer, dataset, windows) -> list[dict]:
    """Sequence-SFT documents (:func:`recalign.lm.sequence.sequence_examples`) with a soft item token
    after every item's line, one per window; the loss spans are the plain documents' line spans.

    With the curriculum, the text-only document stays as ``text_tokens`` / ``text_targets`` and
    ``example`` numbers the window (the :class:`CurriculumObjective` picks one of the two per step).
    """
    from recalign.lm.sequence import sequence_examples

    hybrid = sequence_examples(tokenizer, dataset, windows, item_tokens=True)
    if not cfg.curriculum:
        return hybrid
    text = sequence_examples(tokenizer, dataset, windows)
    return [
        {**h, "text_tokens": t["tokens"], "text_targets": t["targets"], "example": i}
        for i, (h, t) in enumerate(zip(hybrid, text))
    ]


#: Prefix of the batch keys that hold an example's text-only encoding (``text_prompt``, ``text_tokens``).
TEXT_PREFIX = "text_"


class CurriculumObjective:
    """Wraps an objective: each training example is its hybrid or its text-only encoding, hybrid with
    probability :func:`hybrid_fraction` at the current step (see the module docstring).

    Every batch key ``text_<key>`` holds the text-only value of ``<key>`` (``prompt`` for the candidate
    format; ``tokens`` and ``targets`` for sequence documents), swapped in together per example. The
    step comes from :class:`CurriculumCallback`; in evaluation mode every example is hybrid.
    """

    def __init__(self, inner: Any, *, span: float, seed: int) -> None:
        self.inner = inner
        self.span = span
        self.seed = int(seed)
        self.step = 0
        self.max_steps = 1
        count = getattr(inner, "loss_items", None)
        if count is not None:
            self.loss_items = count  # the trainer's token-count normalisation sees the inner objective's

    def fraction(self) -> float:
        return hybrid_fraction(self.step, self.max_steps, self.span)

    def choose(self, examples: list[int]) -> list[bool]:
        """Hybrid (True) or text-only per example index at the current step."""
        f = self.fraction()
        return [bool(np.random.default_rng([self.seed, int(i), self.step]).random() < f) for i in examples]

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        if model.training:
            pick = self.choose(batch["example"])
            keys = [k[len(TEXT_PREFIX) :] for k in batch if k.startswith(TEXT_PREFIX)]
            batch = dict(batch)
            for key in keys:
                batch[key] = [h if use else t
                              for use, h, t in zip(pick, batch[key], batch[TEXT_PREFIX + key])]  # fmt: skip
            share = sum(pick) / max(len(pick), 1)
        else:
            share = 1.0
        loss, logs = self.inner(model, batch)
        return loss, {**(logs or {}), "hybrid_share": share}


class CurriculumCallback(TrainerCallback):
    """Tells the :class:`CurriculumObjective` which optimiser step is starting (also after a resume)."""

    def __init__(self, objective: CurriculumObjective) -> None:
        self.objective = objective

    def on_step_begin(self, args, state, control, **kwargs):
        self.objective.step = int(state.global_step)
        self.objective.max_steps = int(state.max_steps or 1)
        return control


def training_setup(cfg: HybridConfig, objective: Any, examples: list[dict], *, seed: int):
    """``(objective, callbacks)`` for the trainer: the curriculum wrapper and its callback, or unchanged."""
    if not cfg.curriculum:
        return objective, []
    wrapped = CurriculumObjective(objective, span=cfg.curriculum_span, seed=seed)
    return wrapped, [CurriculumCallback(wrapped)]


def describe(module) -> str:
    """One line for the run's progress output."""
    n = sum(p.numel() for n_, p in module.named_parameters() if n_.startswith("projector."))
    src = json.dumps(module.info.get("recommender", "?"))
    line = (
        f"hybrid item tokens: {module.n_items} items x {module.d_rec} from {src}, projector {n:,} parameters"
    )
    if module.has_item_head:
        head = module.item_head.weight.numel() + module.item_bias.numel()
        line += f", item head {head:,} parameters"
    return line
