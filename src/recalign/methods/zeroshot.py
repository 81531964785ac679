"""Evaluating a language model as a recommender, and the zero-shot baseline (an untrained model).

:func:`evaluate_lm` is the one evaluation routine of every LM recipe (zero-shot, SFT, S-DPO, DMPO, ...)
and of ``recalign evaluate``: given a model, the dataset and a frame of test examples it runs the
requested protocols and returns :class:`~recalign.evaluation.records.ResultRecord` s, so LM results land
in the same shape as the classical baselines' and render in the same report.

- ``candidates``: every candidate title scored by its answer log-prob given the candidate prompt
  (:class:`recalign.lm.recommender.LMRecommender`, shared-prefix scoring), ranked; HR/NDCG/MRR@K, AUC.
- ``generation``: greedy answer, matched to exactly one candidate title
  (:func:`recalign.lm.generation.evaluate_generation`); HR@1 over all examples (S-DPO's convention)
  and over valid answers (LLaRA's), and ValidRatio.
- ``full``: every catalogue title scored against a candidate-free prompt (expensive: ~n_items answers
  per example); full-ranking metrics with seen items excluded.
- ``pairwise``: DMPO's pairwise-ranking prompt ("rank the likelihood of the user watching A and B"),
  one prompt per (target, negative candidate) pair, ``max_pairs`` negatives per example, both orderings
  of each pair scored (:func:`recalign.methods.dmpo.pairwise_accuracy`); ``PairAcc`` (the positive-first
  ordering strictly more likely; ties and NaN are wrong) with its standard error, its per-example mean,
  a position-bias-proof ``AUC``, the ``A-first rate`` and ``n_pairs``.

When both ``candidates`` and ``generation`` are requested for a decoder-only model, they share one pass
over each prompt (:meth:`recalign.lm.recommender.LMRecommender.score_and_generate`, ``EvalConfig.joint``):
the prompt (~440 tokens for SmolLM2's chat template) was otherwise run twice per example -- packed with
the candidate titles for scoring, then again as the prefill of ``generate`` -- which is ~40% of the
evaluation's cost on a CPU. The records are the same (same scores, same answers, same metrics; in
bfloat16 the answers can differ where batched ``generate``'s left padding changes the rounding, see
:mod:`recalign.lm.joint` -- the joint answer is the unpadded one); the
shared forward is counted in the ``candidates`` record's ``seconds``, the ``generation`` record counts
only the greedy decode from its cache and the matching, and both carry the split in ``extra["joint"]``.
Encoder-decoders, models :func:`recalign.lm.joint.joint_unsupported` refuses, and single-protocol runs
use the separate protocols.

Zero-shot is simply :func:`evaluate_lm` on the base model with ``method="zeroshot"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pandas as pd

from recalign.config import Ge, cfg_field, check_constraints
from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord, write_records
from recalign.io import atomic_write_json
from recalign.methods import PreparedData, load_data, sample_examples

LM_PROTOCOLS = ("candidates", "generation", "full", "pairwise")


@dataclass
class EvalConfig:
    """How a trained (or untrained) LM is evaluated after a run."""

    n_test: int = cfg_field(
        200, "test examples, sampled with the run's seed (0 or less: the whole test stage)"
    )
    protocols: list[str] = cfg_field(
        ["candidates", "generation"],
        "protocols to run: candidates, generation, full (slow), pairwise (DMPO's A-or-B prompt)",
    )
    batch_size: Annotated[int, Ge(1)] = cfg_field(8, "examples per forward pass when scoring / generating")
    max_new_tokens: Annotated[int, Ge(1)] = cfg_field(
        32, "generation length limit (titles are ~10-20 tokens)"
    )
    length_normalize: bool = cfg_field(
        False, "rank candidates by mean instead of summed answer-token log-prob"
    )
    stage: str = cfg_field("test", "which split stage to evaluate on: test or valid")
    max_pairs: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        1,
        "pairwise protocol: negative candidates paired with the target per example, drawn with the seed "
        "(0: all candidates - 1; DMPO's setting is one pair)",
    )
    joint: bool = cfg_field(
        True,
        "candidates + generation together: run each prompt once for both (decoder-only models; same "
        "results, ~40% less prompt compute); false runs the two protocols separately",
    )
    item_score: str = cfg_field(
        "auto",
        "sequence-format models: rank by the candidate's title log-prob ('title'), the item head's "
        "log-softmax over the catalogue ('item'), or both added ('sum'); 'auto': sum for a model with an "
        "item head (hybrid.item_head), title otherwise",
    )

    def validate(self) -> None:
        bad = [p for p in self.protocols if p not in LM_PROTOCOLS]
        if bad:
            raise RecalignInputError(
                f"unknown protocol '{bad[0]}' (choose from {', '.join(LM_PROTOCOLS)})", field="eval.protocols"
            )
        check_constraints(self, "eval.")  # the Ge annotations, named as the section ``eval``
        if self.stage not in ("test", "valid"):
            raise RecalignInputError(f"must be test or valid, got {self.stage!r}", field="eval.stage")
        from recalign.lm.sequence import ITEM_SCORES

        if self.item_score not in ITEM_SCORES:
            raise RecalignInputError(
                f"must be one of {', '.join(ITEM_SCORES)}, got {self.item_score!r}", field="eval.item_score"
            )


def metric_keys_flat(records: list[ResultRecord]) -> dict[str, float]:
    """``{"candidates/HR@1": ..., "generation/ValidRatio": ...}`` from a run's records."""
    return {f"{r.protocol}/{k}": v for r in records for k, v in r.metrics.items()}


#: Metric-name prefixes the progress line of an evaluated protocol shows.
SHOWN_METRICS = ("HR@1", "Valid", "NDCG@10", "PairAcc")


def protocol_record(
    protocol: str,
    metrics: dict,
    seconds: float,
    base: dict,
    command: str,
    extra: dict,
    progress: bool,
    *,
    shown: tuple[str, ...] | frozenset[str] = SHOWN_METRICS,
) -> ResultRecord:
    """One protocol's :class:`ResultRecord` (metrics as floats, seconds rounded to 0.01) and, with
    ``progress``, its one-line summary ``method [protocol] HR@1=..., NDCG@10=...``.

    ``base`` holds the record fields every protocol of a run shares (``dataset``, ``split``, ``method``,
    ``n_examples``, ``seed``). ``shown`` names the summarised metrics: a tuple of name prefixes (so
    ``HR@1`` also shows ``HR@10``), or a frozenset of exact names; either way in the metrics' order.
    """
    record = ResultRecord(
        protocol=protocol,
        metrics={k: float(v) for k, v in metrics.items()},
        seconds=round(seconds, 2),
        command=command,
        extra=extra,
        **base,
    )
    if progress:
        keep = (lambda k: k in shown) if isinstance(shown, frozenset) else (lambda k: k.startswith(shown))
        line = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if keep(k))
        print(f"{base['method']} [{protocol}] {line}", flush=True)
    return record


def evaluate_lm(
    model,
    tokenizer,
    dataset: RecDataset,
    examples: pd.DataFrame,
    *,
    method: str,
    split_name: str,
    cfg: EvalConfig | None = None,
    seed: int = 0,
    max_history: int = 10,
    command: str = "",
    progress: bool = True,
    extra: dict | None = None,
    prompt_format: str = "candidates",
) -> list[ResultRecord]:
    """Run ``cfg.protocols`` on ``examples`` and return one record per protocol.

    Args:
        model: a causal LM, merged or peft-wrapped (evaluation switches it to eval mode and back).
        examples: rows of a split stage with materialised candidates (all methods must get the same).
        method: method name for the records (``zeroshot``, ``sft``, ``sdpo-k3``, ...).
        seed: chooses each example's prompt phrasing, exactly as in training.
        prompt_format: ``"candidates"`` (the candidate-listing chat prompt) or ``"sequence"`` (a
            sequence-SFT model: history-only plain list, :mod:`recalign.lm.sequence`; candidates and
            full protocols only). Either way a model carrying a hybrid projector gets its soft item
            tokens in the prompt (checked against ``dataset``'s catalogue).
    """
    from recalign.evaluation.protocols import evaluate_candidates, evaluate_full
    from recalign.lm.generation import evaluate_generation
    from recalign.lm.recommender import LMRecommender

    cfg = cfg or EvalConfig()
    cfg.validate()
    if len(examples) == 0:
        raise RecalignInputError("no examples to evaluate")
    records: list[ResultRecord] = []
    base = dict(dataset=dataset.name, split=split_name, method=method, n_examples=len(examples), seed=seed)
    if prompt_format == "sequence":
        return _evaluate_sequence(
            model, tokenizer, dataset, examples, cfg=cfg, base=base, max_history=max_history,
            command=command, progress=progress, extra=extra,
        )  # fmt: skip
    if prompt_format != "candidates":
        raise RecalignInputError(f"unknown prompt format {prompt_format!r} (candidates or sequence)")
    if cfg.item_score != "auto":
        raise RecalignInputError(
            f"applies to sequence-format models only, got {cfg.item_score!r} for the candidate prompt",
            field="eval.item_score",
        )
    rec = LMRecommender(
        model,
        tokenizer,
        dataset,
        seed=seed,
        name=method,
        max_history=max_history,
        length_normalize=cfg.length_normalize,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    joint = _joint_results(rec, examples, cfg) if _use_joint(model, cfg) else None
    for protocol in cfg.protocols:
        t0 = time.perf_counter()
        info = dict(extra or {})
        seconds = None
        if joint is not None and protocol in joint:
            metrics, seconds, joint_info = joint[protocol]
            info.update(joint_info)
        elif protocol == "candidates":
            metrics = evaluate_candidates(rec, examples, batch_size=max(len(examples), 1))
        elif protocol == "full":
            metrics = evaluate_full(rec, examples, batch_size=max(len(examples), 1))
        elif protocol == "pairwise":
            from recalign.methods.dmpo import pairwise_accuracy

            pair = pairwise_accuracy(
                model, tokenizer, dataset, examples, seed=seed, max_history=max_history,
                max_pairs=cfg.max_pairs, batch_size=cfg.batch_size, length_normalize=cfg.length_normalize,
            )  # fmt: skip
            metrics = dict(pair.metrics)
            info["max_pairs"] = cfg.max_pairs
        else:
            gen = evaluate_generation(
                model,
                tokenizer,
                dataset,
                examples,
                seed=seed,
                max_history=max_history,
                batch_size=cfg.batch_size,
                max_new_tokens=cfg.max_new_tokens,
                progress=progress,
            )
            metrics = _generation_metrics(gen)
            info["answers_sample"] = gen.answers[:5]
        seconds = time.perf_counter() - t0 if seconds is None else seconds
        records.append(protocol_record(protocol, metrics, seconds, base, command, info, progress))
    return records


#: Protocols a sequence-format model supports (its prompt lists no candidates to generate from).
SEQUENCE_PROTOCOLS = ("candidates", "full")


def check_sequence_protocols(protocols) -> None:
    """A one-line error unless every protocol works with a sequence-format model."""
    bad = [p for p in protocols if p not in SEQUENCE_PROTOCOLS]
    if bad:
        raise RecalignInputError(
            f"'{bad[0]}' needs the candidate prompt; a sequence-format model supports "
            f"{', '.join(SEQUENCE_PROTOCOLS)}",
            field="eval.protocols",
        )


def _evaluate_sequence(
    model, tokenizer, dataset, examples, *, cfg, base, max_history, command, progress, extra
) -> list[ResultRecord]:
    """:func:`evaluate_lm` for a sequence-SFT model (:class:`recalign.lm.sequence.SequenceLMRecommender`)."""
    from recalign.evaluation.protocols import evaluate_candidates, evaluate_full
    from recalign.lm.sequence import SequenceLMRecommender, resolve_item_score

    check_sequence_protocols(cfg.protocols)
    item_score = resolve_item_score(model, cfg.item_score, field="eval.item_score")  # one-line error first
    rec = SequenceLMRecommender(
        model, tokenizer, dataset, name=base["method"], max_history=max_history,
        batch_size=cfg.batch_size, progress=progress, item_score=item_score,
    )  # fmt: skip
    records = []
    for protocol in cfg.protocols:
        t0 = time.perf_counter()
        fn = evaluate_candidates if protocol == "candidates" else evaluate_full
        metrics = fn(rec, examples, batch_size=max(len(examples), 1))
        info = {**(extra or {}), "prompt_format": "sequence", "max_history": max_history}
        if rec.item_tokens:  # a hybrid sequence model: soft item tokens after the history lines
            info["item_tokens"] = True
        if rec.item_score != "title" or cfg.item_score != "auto":  # a model with an item head
            info["item_score"] = rec.item_score
        seconds = time.perf_counter() - t0
        records.append(
            protocol_record(
                protocol, metrics, seconds, base, command, info, progress, shown=("HR@1", "NDCG@10")
            )
        )
    return records


def _generation_metrics(gen) -> dict:
    metrics = dict(gen.metrics)
    # The HR@1 key of the generation protocol is S-DPO's convention; LLaRA's stays labelled.
    metrics["HR@1"] = metrics["HR@1 (all)"]
    return metrics


def _use_joint(model, cfg: EvalConfig) -> bool:
    """Whether ``candidates`` and ``generation`` can share each prompt's pass (see the module docstring)."""
    if not (cfg.joint and "candidates" in cfg.protocols and "generation" in cfg.protocols):
        return False
    from recalign.lm.joint import joint_unsupported

    return joint_unsupported(model, max_new_tokens=cfg.max_new_tokens) is None


class _FixedScores:
    """A recommender whose candidate scores were computed already (by the joint pass)."""

    def __init__(self, scores) -> None:
        self.scores = scores

    def score_candidates(self, examples: pd.DataFrame):
        if len(examples) != len(self.scores):  # evaluate_candidates is called with one chunk of all rows
            raise ValueError(f"{len(examples)} examples but {len(self.scores)} rows of scores")
        return self.scores


def _joint_results(rec, examples: pd.DataFrame, cfg: EvalConfig) -> dict[str, tuple[dict, float, dict]]:
    """``{"candidates": (metrics, seconds, extra), "generation": (...)}`` from one joint pass.

    Metrics go through the same functions as the separate protocols (``evaluate_candidates`` on the
    scores, ``generation_result`` on the answers). Seconds: the candidates record gets prompt
    preparation, the shared forward, the answer scoring and the ranking metrics; the generation record
    gets the greedy decode from the shared cache and the matching.
    """
    from recalign.evaluation.protocols import evaluate_candidates
    from recalign.lm.generation import generation_result

    res = rec.score_and_generate(examples, max_new_tokens=cfg.max_new_tokens)
    t0 = time.perf_counter()
    cand_metrics = evaluate_candidates(_FixedScores(res.scores), examples, batch_size=max(len(examples), 1))
    t1 = time.perf_counter()
    gen = generation_result(res.answers, res.prompts, t1)
    t2 = time.perf_counter()
    sec = res.seconds
    cand_seconds = sec["prepare"] + sec["shared_forward"] + sec["scoring"] + (t1 - t0)
    gen_seconds = sec["decoding"] + (t2 - t1)
    shared = {
        "joint": {
            "note": (
                "candidates and generation from one pass per prompt; the shared prompt+answers forward "
                "is counted in the candidates record, the generation record counts the greedy decode "
                "from its cache and the matching"
            ),
            "shared_forward_seconds": round(sec["shared_forward"], 2),
            "total_seconds": round(sec["total"] + (t2 - t0), 2),
        }
    }
    return {
        "candidates": (cand_metrics, cand_seconds, shared),
        "generation": (_generation_metrics(gen), gen_seconds, {**shared, "answers_sample": gen.answers[:5]}),
    }


def run_zeroshot(
    model_name: str,
    dataset: RecDataset,
    split_name: str,
    examples: pd.DataFrame,
    *,
    cfg: EvalConfig | None = None,
    seed: int = 0,
    max_history: int = 10,
    command: str = "",
    progress: bool = True,
    dtype: str = "auto",
) -> list[ResultRecord]:
    """The zero-shot baseline: the base model, no adapter, evaluated like any trained model."""
    from recalign.lm.lora import load_lm, resolve_dtype

    model, tok, src = load_lm(model_name, dtype=dtype)
    return evaluate_lm(
        model,
        tok,
        dataset,
        examples,
        method="zeroshot",
        split_name=split_name,
        cfg=cfg,
        seed=seed,
        max_history=max_history,
        command=command,
        progress=progress,
        extra={"model": src.label, "dtype": str(resolve_dtype(dtype)).replace("torch.", "")},
    )


def evaluate_saved_model(
    model: str,
    data_cfg,
    *,
    cfg: EvalConfig | None = None,
    seed: int = 0,
    method: str | None = None,
    output_dir: str | Path | None = None,
    data: PreparedData | None = None,
    command: str = "",
    progress: bool = True,
    dtype: str = "auto",
) -> list[ResultRecord]:
    """Evaluate any ``--model`` (base name/path, adapter dir or run dir) on a split; the API of
    ``recalign evaluate``.

    The method name, prompt seed and history length default to what the adapter was trained with
    (``recalign_adapter.json``), else ``zeroshot`` / ``seed`` / 10. With ``output_dir``, writes
    ``records.json`` and ``metrics.json`` there.
    """
    import json

    from recalign.lm.lora import ADAPTER_META, load_lm, resolve_dtype

    cfg = cfg or EvalConfig()
    cfg.validate()
    model_obj, tok, src = load_lm(model, dtype=dtype)
    meta = {}
    if src.adapter is not None and (src.adapter / ADAPTER_META).is_file():
        meta = json.loads((src.adapter / ADAPTER_META).read_text(encoding="utf-8"))
    method = method or meta.get("method") or ("zeroshot" if src.adapter is None else "lm")
    prompt_seed = int(meta.get("seed", seed))
    max_history = int(meta.get("max_history", 10))
    prompt_format = str(meta.get("prompt_format", "candidates"))
    data = data or load_data(data_cfg)
    examples = sample_examples(data.split.stage(cfg.stage), cfg.n_test, seed, stage=cfg.stage)
    records = evaluate_lm(
        model_obj,
        tok,
        data.dataset,
        examples,
        method=method,
        split_name=data.split.name,
        cfg=cfg,
        seed=prompt_seed,
        max_history=max_history,
        command=command,
        progress=progress,
        prompt_format=prompt_format,
        extra={
            "model": src.label,
            "stage": cfg.stage,
            "dtype": str(resolve_dtype(dtype)).replace("torch.", ""),
        },
    )
    if output_dir is not None:
        out = Path(output_dir)
        write_records(out / "records.json", records)
        atomic_write_json(
            out / "metrics.json",
            {
                "metrics": metric_keys_flat(records),
                "run": {
                    "method": method,
                    "model": str(model),
                    "dataset": data.dataset.name,
                    "split": data.split.name,
                    "stage": cfg.stage,
                    "n_test": len(examples),
                    "seed": seed,
                    "command": command,
                },
            },
        )
    return records
