"""DMPO's few-shot setting (Bai et al.): few-shot SFT, then DMPO or S-DPO at equal budget, in-genre and
cross-genre, on the prompt the model is evaluated with.

One config (:class:`DMPOFewShotConfig`, ``configs/dmpo_fewshot_ml100k.yaml``) holds the whole budget,
so the benchmark and the CLI-free API cannot disagree about it:

1. **SFT**: ``n_sft`` training rows (default 100), one prompt each, a fresh LoRA adapter on the base
   model, ``sft_training`` (epochs, batch). ``prompt: pairwise`` (the paper's): each row is a
   pair-ranking prompt naming the target and one seeded negative candidate, the answer the ordering
   "target, negative" (:mod:`recalign.methods.dmpo`); ``prompt: candidates``: the SFT candidate prompt,
   the answer the target's title.
2. **Preference stage**, once per loss in ``losses`` (``dmpo``, ``sdpo``), each from the merged SFT model
   (the reference) with a fresh adapter, on ``n_pref`` further rows (``pref_seed``, apart from the SFT
   rows) with K = ``negatives`` random negatives from each row's candidates: ``n_pref * K`` preference
   pairs. ``pairwise``: K pair-ranking prompts per row, chosen = "target, negative_i", rejected = the
   reversal; the row's loss combines its K prompts as DMPO does its K negatives,
   ``-log σ(β·mean_i r(chosen_i) - β·mean_i r(rejected_i)) + λ·NLL`` (S-DPO: the softmax over the K
   rejected rewards against the mean chosen one). K = 1 is DPO. ``candidates``: one candidate prompt
   per row with the target and its K negatives as answers (``recalign align``'s objective).
3. **Evaluation** of every model (SFT and each aligned one) on the **in-genre** test stage (the genres
   trained on) and the **cross-genre** one (the complementary genres of ML-100K, *the same users*: not a
   second data set), by the pairwise protocol (``max_pairs`` negatives per test row, both orderings
   scored, :func:`recalign.methods.dmpo.pairwise_accuracy`) and by candidate ranking (HR@k over the
   split's 20 candidates). Each record carries the true counts of what was trained on
   (``n_sft_rows``, ``n_pref_rows``, ``n_pref_pairs``, epochs, steps, rows seen), the prompt trained on
   and the prompt evaluated with; aligned models' pairwise records add the paired difference to SFT on
   the same pairs (``vs_sft``: mean and standard error).

Where it lives (every public name is re-exported here): the config and the genre domains in
:mod:`recalign.methods.dmpo_fewshot_config`; the training rows and the SFT / preference stages in
:mod:`recalign.methods.dmpo_fewshot_stages`; the pair-ranking objective in
:mod:`recalign.methods.dmpo_objective`; here, the evaluation of each stage's model
(:func:`evaluate_stage`) and the run that drives it all (:func:`run_dmpo_fewshot`).

Outputs: ``<out>/config.yaml``, ``<out>/<stage>/adapter``, ``<out>/<stage>/pairs_<domain>.json`` (every
pair's two scores), ``<out>/records.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.evaluation.records import ResultRecord, current_command, write_records
from recalign.methods import PreparedData, sample_examples, set_threads
from recalign.methods.dmpo_fewshot_config import (
    DEFAULT_GENRES,
    DOMAINS,
    DMPOEvalConfig,
    DMPOFewShotConfig,
    PromptName,
    domain_data,
)
from recalign.methods.dmpo_fewshot_stages import (
    StageResult,
    preference_rows,
    run_preference_stage,
    run_sft_stage,
    sft_negatives,
    sft_rows,
)
from recalign.methods.dmpo_objective import PairRankingObjective


# ---------------------------------------------------------------------- evaluation
def evaluate_stage(
    cfg: DMPOFewShotConfig,
    stage: StageResult,
    domains: dict[str, PreparedData],
    tests: dict[str, pd.DataFrame],
    *,
    extra: dict,
    command: str,
    sft_pairs: dict[str, np.ndarray] | None = None,
    progress: bool = True,
) -> tuple[list[ResultRecord], dict[str, np.ndarray]]:
    """Every protocol x domain of one stage's model; returns its records and per-pair correctness."""
    from recalign.lm.lora import load_lm, resolve_dtype
    from recalign.methods.dmpo import evaluate_pairwise
    from recalign.methods.dmpo_metrics import paired_difference
    from recalign.methods.zeroshot import EvalConfig, evaluate_lm

    model, tok, _ = load_lm(stage.directory / "adapter", merge=True, dtype=resolve_dtype(cfg.dtype))
    method = cfg.method(stage.name)
    records: list[ResultRecord] = []
    correct: dict[str, np.ndarray] = {}
    for dom in cfg.eval.domains:
        data, test = domains[dom], tests[dom]
        info = {**extra, "trained_prompt": cfg.prompt, "train_domain": "in-genre", "eval_domain": dom}
        if "pairwise" in cfg.eval.protocols:
            rec, res = evaluate_pairwise(
                model, tok, data.dataset, test, method=method, split_name=data.split.name, seed=cfg.seed,
                max_history=cfg.max_history, max_pairs=cfg.eval.max_pairs, batch_size=cfg.eval.batch_size,
                command=command, extra={**info, "eval_prompt": "pairwise"},
            )  # fmt: skip
            rec.protocol = f"pairwise/{dom}"
            correct[dom] = res.correct
            if sft_pairs is not None and dom in sft_pairs:
                rec.extra["vs_sft"] = paired_difference(res.correct, sft_pairs[dom])
            _pairs_file(stage, dom).write_text(json.dumps(res.to_rows()))
            records.append(rec)
            if progress:
                print(f"{method} [{rec.protocol}] {rec.metrics}", flush=True)
        if "candidates" in cfg.eval.protocols:
            recs = evaluate_lm(
                model, tok, data.dataset, test, method=method, split_name=data.split.name,
                cfg=EvalConfig(n_test=len(test), protocols=["candidates"], batch_size=cfg.eval.batch_size),
                seed=cfg.seed, max_history=cfg.max_history, command=command, progress=progress,
                extra={**info, "eval_prompt": "candidates"},
            )  # fmt: skip
            for r in recs:
                r.protocol = f"candidates/{dom}"
            records.extend(recs)
    return records, correct


_NOT_EVALUATION = ("threads", "resume")  # settings that change neither a model nor its scores


def finished_records(cfg: DMPOFewShotConfig, out: Path) -> list[ResultRecord]:
    """The records an earlier run in ``out`` finished, if it ran with this config (else none).

    Evaluating one stage costs ~25 CPU-minutes on SmolLM2 (500 candidate rows and 500 pairs per domain),
    so a resumed run reuses finished evaluations as it reuses finished training. Only when the earlier
    ``config.yaml`` equals this one apart from ``threads`` / ``resume``: any other change could change a
    model or its scores.
    """
    from recalign.config import config_to_dict, read_yaml
    from recalign.evaluation.records import read_records

    if not (out / "config.yaml").is_file() or not (out / "records.json").is_file():
        return []
    before, now = read_yaml(out / "config.yaml"), config_to_dict(cfg)
    for key in _NOT_EVALUATION:
        before.pop(key, None)
        now.pop(key, None)
    return read_records(out / "records.json") if before == now else []


def reuse_evaluation(
    cfg: DMPOFewShotConfig, stage: StageResult, earlier: list[ResultRecord]
) -> tuple[list[ResultRecord], dict[str, np.ndarray]] | None:
    """A reused stage's finished records and per-pair correctness, or None to evaluate it afresh.

    Only for a stage whose training was reused too (``from_cache``), with a record for every protocol x
    domain and, for the pairwise protocol, the per-pair scores (``pairs_<domain>.json``) that the aligned
    stages' paired comparison with SFT needs.
    """
    if not stage.from_cache:
        return None
    method = cfg.method(stage.name)
    mine = {r.protocol: r for r in earlier if r.method == method}
    wanted = [f"{p}/{d}" for d in cfg.eval.domains for p in cfg.eval.protocols]
    if any(w not in mine for w in wanted):
        return None
    from recalign.methods.dmpo import decided_for_positive

    correct: dict[str, np.ndarray] = {}
    if "pairwise" in cfg.eval.protocols:
        for dom in cfg.eval.domains:
            f = _pairs_file(stage, dom)
            if not f.is_file():
                return None
            rows = json.loads(f.read_text())
            correct[dom] = decided_for_positive([r["positive_first"] for r in rows],
                                                [r["negative_first"] for r in rows])  # fmt: skip
    return [mine[w] for w in wanted], correct


def _pairs_file(stage: StageResult, domain: str) -> Path:
    """Every scored pair of one stage's model on one domain (``PairwiseResult.to_rows``)."""
    return stage.directory / f"pairs_{domain}.json"


@dataclass
class DMPOFewShotResult:
    records: list[ResultRecord]
    stages: dict[str, StageResult]


def run_dmpo_fewshot(
    cfg: DMPOFewShotConfig,
    output_dir: str | Path,
    *,
    command: str | None = None,
    progress: bool = True,
    on_records: Callable[[list[ResultRecord]], None] | None = None,
) -> DMPOFewShotResult:
    """SFT, each preference loss, and the evaluation of every model (module docstring).

    Records go to ``<output_dir>/records.json`` (and to ``on_records``, if given) after every model, so
    an interrupted run keeps what it finished; rerun with ``resume: true`` to continue.
    """
    from recalign.config import save_config
    from recalign.rundir import open_output_dir

    cfg.validate()
    out = Path(output_dir)
    open_output_dir(out)
    earlier = finished_records(cfg, out) if cfg.resume else []
    save_config(cfg, out / "config.yaml")
    command = command if command is not None else current_command()
    set_threads(cfg.threads)
    t0 = time.perf_counter()
    domains = domain_data(cfg)
    tests = {d: sample_examples(domains[d].split.stage("test"), cfg.eval.n_test, cfg.seed, stage="test")
             for d in cfg.eval.domains}  # fmt: skip
    genres = list(cfg.data.preprocess.item_genres_include)
    common = {
        "genres_in": genres,
        "domains": "in-genre: ML-100K items carrying any of genres_in; cross-genre: every other item, the same "
        "users (a genre shift, not a second data set)",
        "negatives": cfg.negatives,
        "max_history": cfg.max_history,
        "data_seconds": round(time.perf_counter() - t0, 1),
    }
    records: list[ResultRecord] = []

    def flush() -> None:
        write_records(out / "records.json", records)
        if on_records is not None:
            on_records(list(records))

    stages: dict[str, StageResult] = {}
    sft = run_sft_stage(cfg, domains["in-genre"], out, progress)
    stages["sft"] = sft
    sft_info = {**common, **sft.counts, "n_train": sft.counts["n_sft_rows"], "train_steps": sft.train_steps,
                "train_seconds": sft.train_seconds}  # fmt: skip
    recs, sft_correct = reuse_evaluation(cfg, sft, earlier) or evaluate_stage(
        cfg, sft, domains, tests, extra=sft_info, command=command, progress=progress
    )
    records.extend(recs)
    flush()
    for loss in cfg.losses:
        st = run_preference_stage(cfg, loss, domains["in-genre"], sft.directory / "adapter", out, progress)
        stages[loss] = st
        info = {**common, **sft.counts, **st.counts, "loss": loss, "beta": cfg.beta,
                "nll_weight": cfg.nll_weight if loss == "dmpo" else 0.0,
                "n_train": sft.counts["n_sft_rows"] + st.counts["n_pref_rows"],
                "sft_train_steps": sft.train_steps, "train_steps": st.train_steps,
                "train_seconds": round(sft.train_seconds + st.train_seconds, 1)}  # fmt: skip
        recs, _ = reuse_evaluation(cfg, st, earlier) or evaluate_stage(
            cfg, st, domains, tests, extra=info, command=command, sft_pairs=sft_correct, progress=progress
        )
        records.extend(recs)
        flush()
    return DMPOFewShotResult(records=records, stages=stages)


__all__ = [
    "DEFAULT_GENRES",
    "DOMAINS",
    "DMPOEvalConfig",
    "DMPOFewShotConfig",
    "DMPOFewShotResult",
    "PairRankingObjective",
    "PromptName",
    "StageResult",
    "domain_data",
    "evaluate_stage",
    "preference_rows",
    "run_dmpo_fewshot",
    "run_preference_stage",
    "run_sft_stage",
    "sft_negatives",
    "sft_rows",
]
