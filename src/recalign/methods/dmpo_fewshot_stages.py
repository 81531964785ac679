"""The training stages of DMPO's few-shot recipe: the rows each stage trains on, and the stages themselves.

Part of :mod:`recalign.methods.dmpo_fewshot` (which re-exports the public names and describes the
recipe): :func:`sft_rows` and :func:`preference_rows` (the tokenised training rows and their counts),
:func:`run_sft_stage` and :func:`run_preference_stage` (train one adapter, save it with a ``stage.json``
that a resumed run reuses) and their :class:`StageResult`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.methods import PreparedData, sample_examples
from recalign.methods.dmpo_fewshot_config import DMPOFewShotConfig
from recalign.methods.dmpo_objective import PairRankingObjective
from recalign.training.config import TrainingConfig

_SFT_NEG_SALT = 0xD3_0003


# ---------------------------------------------------------------------- training rows
def sft_negatives(frame: pd.DataFrame, seed: int) -> list[list[int]]:
    """One seeded negative candidate per SFT row (the pair-ranking prompt's second item)."""
    out = []
    for user, position, target, cands in zip(
        frame["user"], frame["position"], frame["target"], frame["candidates"]
    ):
        negs = [int(c) for c in cands if int(c) != int(target)]
        rng = np.random.default_rng([int(seed), int(user), int(position), _SFT_NEG_SALT])
        out.append([negs[int(rng.integers(len(negs)))]])
    return out


def sft_rows(cfg: DMPOFewShotConfig, tok, data: PreparedData) -> tuple[list[dict], dict]:
    """Tokenised SFT examples (``{"prompt", "answers": [chosen]}``) and their counts."""
    from recalign.lm.prompts import encode_answer, encode_prompt

    frame = sample_examples(data.split.stage("train"), cfg.n_sft, cfg.seed, stage="train")
    if cfg.prompt == "candidates":
        from recalign.methods.sft import sft_examples

        examples = sft_examples(tok, data.dataset, frame, cfg.seed, cfg.max_history)
    else:
        from recalign.methods.dmpo_prompts import pair_ranking_rows

        groups = pair_ranking_rows(data.dataset, frame, sft_negatives(frame, cfg.seed), seed=cfg.seed,
                                   max_history=cfg.max_history)  # fmt: skip
        examples = [
            {"prompt": encode_prompt(tok, g[0].prompt), "answers": [encode_answer(tok, g[0].chosen)]}
            for g in groups
        ]
    return examples, {"n_sft_rows": len(examples), "sft_users": int(frame["user"].nunique())}


def preference_rows(cfg: DMPOFewShotConfig, tok, data: PreparedData) -> tuple[list[dict], dict]:
    """Tokenised preference examples (no reference yet) and their counts.

    ``pairwise``: ``{"prompt": [K prompt ids], "answers": [K x [chosen ids, rejected ids]]}`` per row;
    ``candidates``: ``{"prompt": ids, "answers": [target, K negatives]}``.
    """
    from recalign.lm.prompts import encode_answer, encode_prompt
    from recalign.methods.preference_data import sample_negatives

    frame = sample_examples(data.split.stage("train"), cfg.n_pref, cfg.pref_seed, stage="train")
    negatives = sample_negatives(frame, cfg.negatives, "random", seed=cfg.seed)
    if cfg.prompt == "candidates":
        from recalign.lm.prompts import examples_to_prompts
        from recalign.lm.reference import tokenize_preference_data
        from recalign.methods.preference_data import build_preference_data

        prompts = [p.prompt for p in examples_to_prompts(data.dataset, frame, seed=cfg.seed,
                                                          max_history=cfg.max_history)]  # fmt: skip
        # the same random draw as ``negatives`` above (same seed, strategy and rows)
        pref = build_preference_data(data.dataset, frame, k=cfg.negatives, seed=cfg.seed, prompts=prompts)
        p_ids, a_ids = tokenize_preference_data(tok, pref)
        examples = [{"prompt": p, "answers": a} for p, a in zip(p_ids, a_ids)]
        n_prompts = len(examples)
    else:
        from recalign.methods.dmpo_prompts import pair_ranking_rows

        groups = pair_ranking_rows(data.dataset, frame, negatives, seed=cfg.seed, max_history=cfg.max_history)
        examples = [
            {"prompt": [encode_prompt(tok, r.prompt) for r in g],
             "answers": [[encode_answer(tok, r.chosen), encode_answer(tok, r.rejected)] for r in g]}
            for g in groups
        ]  # fmt: skip
        n_prompts = sum(len(g) for g in groups)
    counts = {
        "n_pref_rows": len(examples),
        "n_pref_prompts": n_prompts,
        "n_pref_pairs": len(examples) * cfg.negatives,
        "pref_users": int(frame["user"].nunique()),
    }
    return examples, counts


def _flat(examples: list[dict]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Pairwise preference examples as flat (prompt, [chosen, rejected]) lists, row-major."""
    prompts = [p for ex in examples for p in ex["prompt"]]
    answers = [a for ex in examples for a in ex["answers"]]
    return prompts, answers


# ---------------------------------------------------------------------- stages
def _steps(n_rows: int, training: TrainingConfig) -> int:
    per_epoch = math.ceil(n_rows / (training.batch_size * max(1, training.grad_accum)))
    return training.max_steps if training.max_steps > 0 else math.ceil(per_epoch * training.epochs)


def _rows_seen(n_rows: int, steps: int, training: TrainingConfig) -> int:
    """Rows fed to the optimiser: whole epochs of ``n_rows`` plus the part of the last one."""
    per_step = training.batch_size * max(1, training.grad_accum)
    per_epoch = math.ceil(n_rows / per_step)
    full, rest = divmod(steps, per_epoch)
    return int(full * n_rows + min(rest * per_step, n_rows))


@dataclass
class StageResult:
    name: str
    directory: Path
    counts: dict
    train_steps: int
    train_loss: float
    train_seconds: float
    from_cache: bool = False
    log_history: list = field(default_factory=list)


def _done(path: Path) -> dict | None:
    f = path / "stage.json"
    return json.loads(f.read_text()) if f.is_file() else None


def run_sft_stage(cfg: DMPOFewShotConfig, data: PreparedData, out: Path, progress: bool) -> StageResult:
    from recalign.lm.lora import attach_lora, load_lm, resolve_dtype, save_adapter
    from recalign.methods.sft import SFTObjective
    from recalign.training import train

    stage_dir = out / "sft"
    done = _done(stage_dir)
    if cfg.resume and done is not None:
        return StageResult(name="sft", directory=stage_dir, from_cache=True, **done)
    import torch

    model, tok, src = load_lm(cfg.model, merge=False, trainable=True, dtype=resolve_dtype(cfg.dtype))
    torch.manual_seed(cfg.sft_training.seed)
    model = attach_lora(model, cfg.lora)
    examples, counts = sft_rows(cfg, tok, data)
    training = copy.deepcopy(cfg.sft_training)
    training.resume = cfg.resume
    training.progress = training.progress and progress
    if progress:
        print(
            f"dmpo few-shot: SFT on {len(examples)} {cfg.prompt} rows, {training.epochs} epochs", flush=True
        )
    outcome = train(model, examples, SFTObjective(), training, stage_dir / "checkpoints")
    save_adapter(model, stage_dir / "adapter", base_model=src.base,
                 extra={"method": cfg.method("sft"), "seed": cfg.seed, "max_history": cfg.max_history,
                        "prompt_format": "candidates", "trained_prompt": cfg.prompt})  # fmt: skip
    counts.update(sft_epochs=training.epochs, sft_batch_size=training.batch_size,
                  sft_rows_seen=_rows_seen(len(examples), outcome.global_step, training))  # fmt: skip
    info = {"counts": counts, "train_steps": outcome.global_step, "train_loss": outcome.train_loss,
            "train_seconds": round(outcome.seconds, 1)}  # fmt: skip
    (stage_dir / "stage.json").write_text(json.dumps(info, indent=1))
    return StageResult(name="sft", directory=stage_dir, log_history=outcome.log_history, **info)


def run_preference_stage(
    cfg: DMPOFewShotConfig, loss: str, data: PreparedData, sft_dir: Path, out: Path, progress: bool
) -> StageResult:
    from recalign.lm.lora import attach_lora, load_lm, resolve_dtype, save_adapter
    from recalign.lm.reference import cached_reference_logprobs
    from recalign.training import train

    stage_dir = out / loss
    done = _done(stage_dir)
    if cfg.resume and done is not None:
        return StageResult(name=loss, directory=stage_dir, from_cache=True, **done)
    import torch

    model, tok, _ = load_lm(sft_dir, merge=True, dtype=resolve_dtype(cfg.dtype))  # the reference
    examples, counts = preference_rows(cfg, tok, data)
    if cfg.prompt == "pairwise":
        prompts, answers = _flat(examples)
    else:
        prompts, answers = [ex["prompt"] for ex in examples], [ex["answers"] for ex in examples]
    ref = cached_reference_logprobs(model, prompts, answers, stage_dir / "reference", batch_size=8)
    if cfg.prompt == "pairwise":
        k = cfg.negatives
        for i, ex in enumerate(examples):
            ex["ref"] = ref.logprobs[i * k : (i + 1) * k, :2].clone()
        objective = PairRankingObjective(loss, cfg.beta, cfg.nll_weight)
    else:
        from recalign.methods.align import PreferenceObjective

        for i, ex in enumerate(examples):
            ex["ref"] = ref.logprobs[i].clone()
        objective = PreferenceObjective(loss, cfg.beta, cfg.nll_weight)
    torch.manual_seed(cfg.pref_training.seed)
    model = attach_lora(model, cfg.lora)
    training = copy.deepcopy(cfg.pref_training)
    training.resume = cfg.resume
    training.progress = training.progress and progress
    if progress:
        print(f"dmpo few-shot: {loss} on {counts['n_pref_rows']} rows x K={cfg.negatives} "
              f"({counts['n_pref_prompts']} prompts), {training.epochs} epochs", flush=True)  # fmt: skip
    outcome = train(model, examples, objective, training, stage_dir / "checkpoints")
    save_adapter(model, stage_dir / "adapter", base_model=str(Path(sft_dir).resolve()),
                 extra={"method": cfg.method(loss), "seed": cfg.seed, "max_history": cfg.max_history,
                        "loss": loss, "prompt_format": "candidates", "trained_prompt": cfg.prompt})  # fmt: skip
    counts.update(pref_epochs=training.epochs, pref_batch_size=training.batch_size,
                  pref_rows_seen=_rows_seen(len(examples), outcome.global_step, training))  # fmt: skip
    info = {"counts": counts, "train_steps": outcome.global_step, "train_loss": outcome.train_loss,
            "train_seconds": round(outcome.seconds, 1)}  # fmt: skip
    (stage_dir / "stage.json").write_text(json.dumps(info, indent=1))
    return StageResult(name=loss, directory=stage_dir, log_history=outcome.log_history, **info)


__all__ = [
    "StageResult",
    "preference_rows",
    "run_preference_stage",
    "run_sft_stage",
    "sft_negatives",
    "sft_rows",
]
