"""Preference alignment of an LM recommender: DPO, S-DPO and DMPO on one trainer.

The recipe reads as setup → train → save → evaluate:

1. **Start model.** Usually an SFT run directory. Its adapter is merged into the base weights, and a
   *fresh* LoRA adapter is attached on top. The merged SFT model is then exactly the reference πref,
   so no second model copy is ever loaded.
2. **Preference data.** Each training example gives one positive (the target) and K negatives drawn by
   a named strategy from the prompt's own candidates (``random`` as in the S-DPO scripts,
   ``popularity``, or ``hard``: the start model's highest-scored wrong candidates), using the prompts
   and titles SFT trained on (:mod:`recalign.methods.preference_data`).
3. **Reference log-probs.** ``precomputed`` (default): every (prompt, answer) is scored once with the
   start model through shared-prefix scoring and cached as safetensors, keyed on model weights and
   token ids (:mod:`recalign.lm.reference`); training then runs no reference pass at all. Under
   ``accelerate launch`` the main process computes and writes the cache, the others then read it.
   ``adapter-disabled``: a no-grad pass per step with the LoRA adapter switched off.
4. **Training.** One shared-prefix pass per example scores all 1+K answers
   (:func:`recalign.lm.scoring.answer_logprobs`), the loss is one of the pure functions of
   :mod:`recalign.objectives.preference`, and the transformers ``Trainer`` (through
   :func:`recalign.training.train`) provides checkpoints, resume and progress.
5. **Outputs** as every recipe: ``adapter/`` (safetensors, recording the start model so it loads as
   a stacked adapter), ``config.yaml``, ``metrics.json``, ``records.json``, ``checkpoints/``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
import torch

from recalign.config import Ge, Gt, cfg_field, check_constraints
from recalign.errors import RecalignInputError
from recalign.lm.lora import resolve_dtype
from recalign.methods import PreparedData, sample_examples
from recalign.methods.lm_recipe import LMRecipeConfig, LMRunResult, training_field, validate_lm_recipe
from recalign.methods.lm_runner import LMRecipe, RecipeRun, TrainingPlan, new_adapter, run_lm_recipe
from recalign.rundir import releasing
from recalign.training.config import TrainingConfig

LossName = Literal["dpo", "sdpo", "dmpo"]


@dataclass
class AlignConfig(LMRecipeConfig):
    """``recalign align``: DPO / S-DPO / DMPO of an LM recommender, usually starting from an SFT run.

    ``model`` (the start model), ``data``, ``seed``, ``dtype``, ``threads``, ``lora`` and ``eval``:
    :class:`LMRecipeConfig`'s.
    """

    # alignment's own optimiser defaults (fewer, smaller steps than SFT)
    training: TrainingConfig = training_field(
        learning_rate=1e-4, max_steps=32, batch_size=4, warmup_steps=2, save_steps=8
    )
    loss: LossName = cfg_field("sdpo", "preference loss: dpo (K=1), sdpo (softmax over K), dmpo (mean of K)")
    negatives: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        3, "K, negatives per positive (dpo needs 1)"
    )
    strategy: Literal["random", "popularity", "hard"] = cfg_field(
        "random", "negatives: random distractors, popularity-weighted, or hard (start model's top wrong ones)"
    )
    beta: Annotated[float, Gt(0, show_value=True)] = cfg_field(
        1.0, "temperature β of the implicit reward (S-DPO's scripts use 1)"
    )
    nll_weight: float = cfg_field(1.0, "DMPO only: weight λ of the chosen answer's NLL term (0 disables)")
    reference: Literal["precomputed", "adapter-disabled"] = cfg_field(
        "precomputed", "reference log-probs: cached once per data+model, or a per-step adapter-off pass"
    )
    method: str = cfg_field("", "method name in result records (default: dpo, sdpo-k3, dmpo-k3, ...)")
    n_train: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        128, "training examples (each with 1+K answers) sampled from the train stage"
    )
    sample_seed: int | None = cfg_field(
        None,
        "seed for drawing the training examples (default: seed); another value draws examples SFT did not train on",
    )
    max_history: Annotated[int, Ge(1)] = cfg_field(10, "history items shown in the prompt (most recent)")
    prompt: Literal["candidates", "choice"] = cfg_field(
        "candidates",
        "training prompt: candidates (the SFT candidate list) or choice (the positive and its K negatives "
        "as options A, B, ..., answer a title; DMPO's own pair-ranking prompt is `recalign dmpo`)",
    )
    scoring_impl: Literal["packed", "kv"] = cfg_field("packed", "shared-prefix implementation")
    score: Literal["title", "item"] = cfg_field(
        "title",
        "what the preference loss compares: title (each answer's title log-prob) or item (the item head's "
        "log-softmax over the catalogue at the prompt's end, for a sequence model with hybrid.item_head; "
        "one forward per example, and evaluation then ranks by the head: eval.item_score=item)",
    )

    def validate(self) -> None:
        check_constraints(self, nested=False)  # the nested configs: validate_lm_recipe below
        if self.loss == "dpo" and self.negatives != 1:
            raise RecalignInputError(
                "DPO compares one pair: set negatives=1 (or use sdpo)", field="negatives"
            )
        if self.data.candidates - 1 < self.negatives:
            raise RecalignInputError(
                f"{self.negatives} negatives need at least {self.negatives + 1} candidates", field="negatives"
            )
        if self.score == "item" and self.prompt != "candidates":
            raise RecalignInputError(
                "score=item ranks the catalogue after the history prompt; prompt must be candidates",
                field="score",
            )
        validate_lm_recipe(self, "alignment trains an adapter; lora.enabled must be true")

    def method_name(self) -> str:
        if self.method:
            return self.method
        return "dpo" if self.loss == "dpo" else f"{self.loss}-k{self.negatives}"


class PreferenceObjective:
    """Policy log-probs of all 1+K answers from one shared-prefix pass, then a preference loss.

    ``batch`` holds ``prompt`` (token ids per example), ``answers`` (chosen first, then K negatives)
    and, with precomputed references, ``ref`` (``[B, 1+K]``).
    """

    def __init__(self, loss: str, beta: float, nll_weight: float = 0.0, impl: str = "packed") -> None:
        self.loss, self.beta, self.nll_weight, self.impl = loss, beta, nll_weight, impl

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        from recalign.lm.reference import reference_answer_logprobs
        from recalign.lm.scoring import answer_logprobs
        from recalign.objectives.preference import chosen_nll, preference_loss

        scores = answer_logprobs(model, batch["prompt"], batch["answers"], impl=self.impl)
        policy = scores.sum
        if "ref" in batch:
            reference = torch.as_tensor(batch["ref"]).to(policy.dtype)
        else:
            reference = reference_answer_logprobs(
                model, batch["prompt"], batch["answers"], impl=self.impl
            ).sum
        kwargs: dict = {"beta": self.beta}
        if self.loss == "dmpo" and self.nll_weight > 0:
            kwargs["chosen_nll"] = chosen_nll(policy[:, 0], scores.n_tokens[:, 0])
            kwargs["nll_weight"] = self.nll_weight
        out = preference_loss(self.loss, policy, reference.to(policy.device), **kwargs)
        return out.loss, out.metrics()


class ItemPreferenceObjective:
    """Item-level preference loss of an item-head model (``score=item``).

    The policy log-prob of an answer is the item head's log-softmax at the prompt's last token, gathered at
    the answer's item (:func:`recalign.lm.sequence.item_logprobs`): one decoder pass per prompt scores the
    chosen item and all K rejected ones, with no title tokens at all. ``batch`` holds ``prompt`` (token ids),
    ``items`` (chosen first, then the K negatives) and ``ref`` (``[B, 1+K]``, the start model's log-probs,
    computed once before training). DMPO's NLL term is the chosen item's ``-log p`` (one "token").
    """

    def __init__(self, loss: str, beta: float, nll_weight: float = 0.0) -> None:
        self.loss, self.beta, self.nll_weight = loss, beta, nll_weight

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        from recalign.lm.sequence import item_logprobs
        from recalign.objectives.preference import preference_loss

        policy = item_logprobs(model, batch["prompt"], batch["items"])
        reference = torch.as_tensor(batch["ref"]).to(device=policy.device, dtype=policy.dtype)
        kwargs: dict = {"beta": self.beta}
        if self.loss == "dmpo" and self.nll_weight > 0:
            kwargs["chosen_nll"] = -policy[:, 0]
            kwargs["nll_weight"] = self.nll_weight
        out = preference_loss(self.loss, policy, reference, **kwargs)
        return out.loss, out.metrics()


def reference_item_logprobs(model, prompts, items, batch_size: int, progress: bool = False) -> torch.Tensor:
    """``[N, 1+K]`` item-head log-probs of the start model (the reference), in batches, without gradients.

    Cheap (one forward per prompt), so it is recomputed on every run rather than cached on disk."""
    from tqdm.auto import tqdm

    from recalign.lm.sequence import item_logprobs

    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(prompts), batch_size), desc="reference", disable=not progress):
                sl = slice(start, start + batch_size)
                out.append(item_logprobs(model, prompts[sl], items[sl]).float().cpu())
    finally:
        if was_training:
            model.train()
    return torch.cat(out) if out else torch.zeros(0, 0)


@dataclass
class AlignResult(LMRunResult):
    """What :func:`run_align` returns."""


#: Settings a resumed alignment run must share with the run it continues.
RESUME_KEYS = (
    "model", "loss", "negatives", "strategy", "beta", "data", "n_train", "seed", "sample_seed", "prompt", "lora",
    "score",
)  # fmt: skip


def training_frame(cfg: AlignConfig, data: PreparedData) -> pd.DataFrame:
    """``n_train`` training rows drawn with ``sample_seed`` (default ``seed``), in split order."""
    seed = cfg.seed if cfg.sample_seed is None else cfg.sample_seed
    return sample_examples(data.split.stage("train"), cfg.n_train, seed, stage="train")


def build_examples(
    cfg: AlignConfig,
    model,
    tok,
    data: PreparedData,
    frame: pd.DataFrame,
    cache_dir: Path,
    progress: bool,
    prompt_format: str = "candidates",
):
    """Tokenised preference examples (+ cached reference log-probs) for the trainer.

    ``prompt_format`` is the start model's (``recalign_adapter.json``): a sequence-SFT model is aligned on
    the prompt it was trained and is evaluated with (:mod:`recalign.lm.sequence`: the history-only plain
    list, each answer an item line); negatives are still drawn from the example's candidates.
    """
    import numpy as np

    from recalign.lm.prompts import examples_to_prompts
    from recalign.lm.reference import cached_reference_logprobs, tokenize_preference_data
    from recalign.methods.preference_data import build_preference_data, training_popularity

    scores = None
    if cfg.strategy == "hard":
        from recalign.lm.recommender import LMRecommender

        if prompt_format == "sequence":
            from recalign.lm.sequence import SequenceLMRecommender

            rec = SequenceLMRecommender(model, tok, data.dataset, max_history=cfg.max_history,
                                        batch_size=cfg.eval.batch_size, progress=progress,
                                        item_score="item" if cfg.score == "item" else "auto")  # fmt: skip
        else:
            rec = LMRecommender(model, tok, data.dataset, seed=cfg.seed, max_history=cfg.max_history,
                                batch_size=cfg.eval.batch_size, progress=progress)  # fmt: skip
        scores = np.asarray(rec.score_candidates(frame))
    from recalign.lm.hybrid import uses_item_tokens

    item_tokens = uses_item_tokens(model, data.dataset)  # a hybrid SFT model: hybrid preference prompts
    prompts = [
        p.prompt
        for p in examples_to_prompts(
            data.dataset, frame, seed=cfg.seed, max_history=cfg.max_history, item_tokens=item_tokens
        )
    ]
    pref = build_preference_data(
        data.dataset,
        frame,
        k=cfg.negatives,
        strategy=cfg.strategy,
        seed=cfg.seed,
        popularity=training_popularity(data.split, data.dataset) if cfg.strategy == "popularity" else None,
        scores=scores,
        prompts=prompts,
    )
    if cfg.prompt == "choice":
        # the choice prompt: the options are exactly the positive and its K drawn negatives (seeded order)
        from recalign.methods.dmpo_prompts import preference_pairwise_prompts

        pref.prompts = preference_pairwise_prompts(
            data.dataset, frame, pref.rejected, seed=cfg.seed, max_history=cfg.max_history
        )
    if prompt_format == "sequence":
        from recalign.lm.prompts import recent_history
        from recalign.lm.sequence import SequenceCodec

        # a hybrid sequence SFT model: the same soft tokens after every history line as its evaluation
        codec = SequenceCodec(tok, data.dataset, item_tokens=item_tokens)
        prompt_ids = [codec.prompt(recent_history(h, cfg.max_history)) for h in frame["history"]]
        answer_ids = [
            [codec.lines[int(c)]] + [codec.lines[int(r)] for r in rej]
            for c, rej in zip(pref.chosen, pref.rejected)
        ]
        # soft tokens (negative ids) have no text: the readable prompt leaves them out
        pref.prompts = [tok.decode([t for t in p if t >= 0], skip_special_tokens=True) for p in prompt_ids]
    else:
        prompt_ids, answer_ids = tokenize_preference_data(tok, pref)
    if cfg.score == "item":
        items = [[int(c)] + [int(r) for r in rej] for c, rej in zip(pref.chosen, pref.rejected)]
        ref = reference_item_logprobs(model, prompt_ids, items, cfg.eval.batch_size, progress)
        examples = [
            {"prompt": p, "items": it, "ref": ref[i].clone()}
            for i, (p, it) in enumerate(zip(prompt_ids, items))
        ]
        return examples, pref
    examples = [{"prompt": p, "answers": a} for p, a in zip(prompt_ids, answer_ids)]
    if cfg.reference == "precomputed":
        from recalign.training import distributed

        # several processes: the main one computes and writes the cache, the others then read it
        with distributed.main_first():
            ref = cached_reference_logprobs(
                model, prompt_ids, answer_ids, cache_dir, batch_size=cfg.eval.batch_size,
                impl=cfg.scoring_impl, progress=progress,
            )  # fmt: skip
        if progress:
            print(
                f"align: reference log-probs {'loaded from' if ref.from_cache else 'cached in'} {ref.path}",
                flush=True,
            )
        for i, ex in enumerate(examples):
            ex["ref"] = ref.logprobs[i].clone()
    return examples, pref


class AlignRecipe(LMRecipe):
    """:func:`run_align`'s own steps (:func:`~recalign.methods.lm_recipe.run_lm_recipe` runs the rest)."""

    resume_keys = RESUME_KEYS
    absent_run_keys = ("threads",)
    result_type = AlignResult

    def prepare(self, run: RecipeRun) -> TrainingPlan:
        from recalign.lm.lora import load_lm
        from recalign.lm.sequence import model_prompt_format
        from recalign.methods.zeroshot import check_sequence_protocols

        cfg = self.cfg
        frame = training_frame(cfg, run.data)
        dtype = resolve_dtype(cfg.dtype)
        # the start model with its adapter folded in: this is the reference
        model, tok, self.src = load_lm(cfg.model, merge=True, dtype=dtype)
        self.prompt_format = model_prompt_format(self.src)
        if self.prompt_format == "sequence":
            check_sequence_protocols(cfg.eval.protocols)
        if self.prompt_format == "sequence" and cfg.prompt == "choice":
            raise RecalignInputError(
                f"{cfg.model} is a sequence-format model; the choice prompt needs a candidate-prompt model",
                field="prompt",
            )
        if cfg.score == "item":
            from recalign.lm.sequence import _item_head

            if self.prompt_format != "sequence" or _item_head(model) is None:
                raise RecalignInputError(
                    f"{cfg.model} has no item head: score=item needs a sequence SFT run with hybrid.item_head",
                    field="score",
                )
        examples, _ = build_examples(
            cfg,
            model,
            tok,
            run.data,
            frame,
            run.out / "reference",
            run.progress,
            prompt_format=self.prompt_format,
        )
        model = new_adapter(model, cfg.lora, cfg.training.seed)
        if cfg.score == "item":
            objective = ItemPreferenceObjective(cfg.loss, cfg.beta, cfg.nll_weight)
        else:
            objective = PreferenceObjective(cfg.loss, cfg.beta, cfg.nll_weight, cfg.scoring_impl)
        # The adapter sits on the start model (itself possibly base + SFT adapter): record it as the base,
        # so `load_lm(out)` rebuilds base -> SFT merged -> this adapter.
        start = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
        return TrainingPlan(model, tok, examples, objective, base_model=start, dtype=dtype)

    def eval_config(self) -> AlignConfig:
        """With ``score=item`` and ``eval.item_score=auto``, evaluate by the head that was aligned."""
        cfg = self.cfg
        if cfg.score == "item" and cfg.eval.item_score == "auto":
            return replace(cfg, eval=replace(cfg.eval, item_score="item"))
        return cfg

    def describe(self, plan: TrainingPlan, trainable: int, total: int) -> str:
        return (
            f"align: {self.method} on {len(plan.examples)} examples x {1 + self.cfg.negatives} answers "
            f"({self.cfg.score} scores), "
            f"start {self.src.label} ({trainable:,} trainable of {total:,})"
        )

    def adapter_extra(self) -> dict:
        return {
            "max_history": self.cfg.max_history,
            "loss": self.cfg.loss,
            "prompt_format": self.prompt_format,
        }

    def record_extra(self, plan: TrainingPlan, run: RecipeRun, outcome) -> dict:
        cfg = self.cfg
        return {"start": cfg.model, "negatives": cfg.negatives, "strategy": cfg.strategy, "beta": cfg.beta,
                "score": cfg.score}  # fmt: skip

    def run_info(self, run: RecipeRun, outcome) -> dict:
        cfg = self.cfg
        last = next((h for h in reversed(outcome.log_history) if "rewards/accuracies" in h), {})
        return {
            "start_model": cfg.model,
            "loss": cfg.loss,
            "negatives": cfg.negatives,
            "strategy": cfg.strategy,
            "prompt": cfg.prompt,
            "prompt_format": self.prompt_format,
            "reference": cfg.reference if cfg.score == "title" else "item-head (computed before training)",
            "score": cfg.score,
            "final_diagnostics": {k: v for k, v in last.items() if k.startswith("rewards/")},
        }


@releasing  # the output directory's lock (recalign.rundir) is released on return
def run_align(
    cfg: AlignConfig,
    output_dir: str | Path,
    *,
    data: PreparedData | None = None,
    test_examples: pd.DataFrame | None = None,
    command: str | None = None,
    progress: bool = True,
) -> AlignResult:
    """Align the start model with the configured preference loss and evaluate it."""
    return run_lm_recipe(AlignRecipe(cfg), output_dir, data=data, test_examples=test_examples,
                         command=command, progress=progress)  # fmt: skip
