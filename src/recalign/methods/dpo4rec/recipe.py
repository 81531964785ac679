"""A full DPO4Rec run: the named stages (:data:`STAGES`), their files, and what each stage sees.

The stage bodies live in :mod:`.stages`, the evaluation and the written report in :mod:`.report`.

Which example is used for what (``loo`` split, one selected set of users throughout):

- **Backbone.** SASRec is trained on every user's training sequence (the split's train stage), exactly
  like the ``sasrec`` baseline, and early-stopped on the valid stage.
- **Alignment data: the valid example.** For each selected user the LM summarises the history *before
  the valid target* (N samples). Those summaries train the fusion model (target = valid item) and are
  the ones rewarded and paired for DPO. The test target is never seen by the LM, the fusion model or DPO.
- **Cross-fitted rewards.** A recommender trained on a user's summaries would reward them with hindsight
  (it has fitted that user's valid target). Users are split into ``fusion.n_folds`` folds; a summary is
  rewarded by the fusion model trained on the *other* folds. A fusion model trained on all users is the
  one evaluated on the test examples.
- **The reward model is fixed.** Fusion models are trained once, on the summaries of the unaligned LM,
  and then judge the summaries of every iteration, like a reward model in RLHF.
- **Test.** Each selected user's test example (history before the last item): plain SASRec, and the
  augmented recommender given one summary from the unaligned LM and one from the aligned LM (greedy by
  default). Same users, same candidates, same reward model.

Stages and files (under ``--output DIR``; every file is written with write-then-rename, and a stage
whose output exists is skipped on rerun, so an interrupted run resumes where it stopped):

====================================  =========================================================
``config.yaml``                        the resolved config (a rerun with a different config is refused)
``users.json``                         the selected users and their fold
``sasrec/model.safetensors``           the SASRec backbone (+ ``sasrec/info.json``)
``summaries/iter{t}.jsonl``            N sampled summaries per user from the LM after t DPO rounds
                                       (``summaries/iter{t}.shards/``: per-batch shards while running)
``fusion/fold{k}.safetensors``         cross-fitted reward models; ``fusion/full.safetensors`` for test
``rewards/iter{t}.jsonl``              reward (``reward``: log-prob, rr or NDCG@K) and rank of every summary
``pairs/iter{t}.jsonl``                best/worst pairs (+ ``pairs/iter{t}.stats.json``, ties counted)
``adapters/iter{t}/``                  the LoRA adapter after t DPO rounds (``dpo/iter{t}/`` checkpoints)
``summaries/test_{unaligned,aligned}.jsonl``  one summary per user for the test examples
``timings.json``                       seconds per stage, accumulated over (resumed) invocations
``metrics.json``, ``records.json``     everything measured; quality-shaped result records
====================================  =========================================================

Several processes (``accelerate launch``): the DPO rounds train data-parallel through the shared
Trainer (``dpo.training.batch_size`` is per process, as in ``recalign align``; the global batch is it x
processes). Everything else -- data, SASRec, summary generation, the fusion reward models, rewards,
pairs, the test evaluation and every file of the run directory -- happens on the main process only:
these stages are cheap next to DPO on the recommenders' scale (SASRec, a fusion layer), or, for
generation, sampling that is seeded per batch and would need its own sharding to be split. The other
processes wait (no timeout that matters) and take part in each DPO round with the pairs the main process
sends them, then exit once the last round is done.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recalign.baselines.common import torch_threads
from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.evaluation.records import ResultRecord
from recalign.io import atomic_write_json
from recalign.methods.dpo4rec.config import DPO4RecConfig
from recalign.methods.dpo4rec.encoder import make_encoder
from recalign.methods.dpo4rec.report import (
    evaluate_augmented,
    metrics_and_ranks,
    previous_seconds,
    sampled_metrics,
    write_report,
)
from recalign.methods.dpo4rec.reward import target_columns
from recalign.methods.dpo4rec.stages import (
    check_or_save_config,
    compute_rewards,
    dpo_stage,
    fit_or_load_sasrec,
    follow_dpo_rounds,
    fusion_stage,
    item_text_embeddings,
    log,
    one_per_user,
    pairs_stage,
    reward_stage,
    reward_summary,
    select_users,
    summaries_stage,
    user_mean_rewards,
)
from recalign.methods.dpo4rec.summaries import build_requests
from recalign.rundir import open_output_dir, releasing


@dataclasses.dataclass
class DPO4RecResult:
    metrics: dict
    records: list[ResultRecord]
    output: Path


@dataclasses.dataclass
class RunState:
    """What the stages of one run hand to each other (filled in stage by stage)."""

    cfg: DPO4RecConfig
    out: Path
    command: str | None
    load_data: Callable[[DPO4RecConfig], tuple[RecDataset, Split]] | None
    #: stage timings, accumulated across invocations (a resumed run reports the time its stages really
    #: took, not just the time of the last, mostly-skipping invocation)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    dataset: RecDataset | None = None
    split: Split | None = None
    users: dict[int, int] = dataclasses.field(default_factory=dict)
    valid: pd.DataFrame | None = None
    test: pd.DataFrame | None = None
    sasrec: Any = None
    sasrec_info: dict = dataclasses.field(default_factory=dict)
    sasrec_test: dict[str, float] = dataclasses.field(default_factory=dict)
    sasrec_valid_reward: float = float("nan")
    summaries: dict[int, list] = dataclasses.field(default_factory=dict)
    encoder: Any = None
    folds: dict = dataclasses.field(default_factory=dict)
    full: Any = None
    fusion_info: dict = dataclasses.field(default_factory=dict)
    rewards: dict[int, dict] = dataclasses.field(default_factory=dict)
    pair_stats: dict[int, dict] = dataclasses.field(default_factory=dict)
    #: the augmented recommender's candidate metrics on the valid examples given iteration t's N sampled
    #: summaries (each scored by its cross-fitted fold model): before (t) and after (t + 1) each round
    valid_metrics: dict[int, dict] = dataclasses.field(default_factory=dict)
    dpo_info: dict[int, dict] = dataclasses.field(default_factory=dict)
    adapter: Path | None = None
    #: the LM's adapter after t DPO rounds (None: the unaligned LM; a skipped round keeps the previous)
    adapters: dict[int, Path | None] = dataclasses.field(default_factory=dict)
    test_metrics: dict[str, dict] = dataclasses.field(default_factory=dict)
    #: per-test-example ranks of each tested LM's summaries and of plain SASRec (paired comparisons)
    test_ranks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    sasrec_test_ranks: np.ndarray | None = None
    #: each user's mean sampled reward at iteration t (the paired reward change between rounds)
    user_rewards: dict[int, dict[int, float]] = dataclasses.field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return self.cfg.progress

    def mark(self, stage: str, t0: float) -> None:
        """Add the time since ``t0`` to ``stage`` and write ``timings.json``."""
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - t0, 3)
        atomic_write_json(self.out / "timings.json", self.seconds)

    def requests(self, examples: pd.DataFrame):
        """The summary prompts of ``examples`` (one per user)."""
        s = self.cfg.summary
        return build_requests(
            self.dataset,
            examples,
            seed=self.cfg.seed,
            template=s.template,
            max_history=s.max_history,
            include_genres=s.include_genres,
        )

    def summarise(self, requests, tag: str, adapter: Path | None, *, n_samples: int, sample: bool):
        """``summaries/{tag}.jsonl``: the LM (with ``adapter``) summarising every request."""
        return summaries_stage(
            self.cfg,
            self.out / "summaries" / f"{tag}.jsonl",
            adapter,
            requests,
            n_samples=n_samples,
            sample=sample,
            tag=tag,
            progress=self.progress,
        )


def stage_data(run: RunState) -> None:
    """Load and split the data (or ``load_data``), select the users and their folds (``users.json``)."""
    t0 = time.perf_counter()
    cfg = run.cfg
    if run.load_data is not None:
        run.dataset, run.split = run.load_data(cfg)
    else:
        from recalign.data.prepare import prepare

        run.split, run.dataset, _ = prepare(cfg.data)
    run.users = select_users(run.split, cfg.users, cfg.seed, cfg.fusion.n_folds)
    atomic_write_json(
        run.out / "users.json", {"users": [{"user": u, "fold": f} for u, f in run.users.items()]}
    )
    run.valid = one_per_user(run.split.stage("valid"), run.users)
    run.test = one_per_user(run.split.stage("test"), run.users)
    log(
        f"{run.dataset.name}: {len(run.users)} users, {len(run.valid)} valid / {len(run.test)} test examples",
        run.progress,
    )
    run.mark("data", t0)


def stage_sasrec(run: RunState) -> None:
    """The SASRec backbone, its test metrics (the ``sasrec`` record) and the reward it earns without any
    summary (plain SASRec's reward on the same valid examples)."""
    t0 = time.perf_counter()
    valid, test = run.valid, run.test
    run.sasrec, run.sasrec_info = fit_or_load_sasrec(run.cfg, run.dataset, run.split, run.out, run.progress)
    run.sasrec_test, run.sasrec_test_ranks = metrics_and_ranks(run.sasrec.score_candidates(test), test)
    run.sasrec_valid_reward = float(
        compute_rewards(
            run.cfg,
            run.sasrec.score_candidates(valid),
            target_columns(np.stack(valid["candidates"].to_numpy()), valid["target"].to_numpy()),
        )[0].mean()
    )
    run.mark("sasrec", t0)


def stage_summaries(run: RunState) -> None:
    """N sampled summaries per user from the unaligned LM, on the valid examples."""
    t0 = time.perf_counter()
    run.summaries[0] = run.summarise(
        run.requests(run.valid), "iter0", None, n_samples=run.cfg.summary.samples, sample=True
    )
    run.mark("summaries", t0)


def stage_fusion(run: RunState) -> None:
    """The cross-fitted fusion reward models and the one trained on every selected user."""
    t0 = time.perf_counter()
    cfg = run.cfg
    run.encoder = make_encoder(
        cfg.encoder.kind,
        batch_size=cfg.encoder.batch_size,
        max_length=cfg.encoder.max_length,
        hashing_dim=cfg.encoder.hashing_dim,
    )
    item_text = item_text_embeddings(run.dataset, run.encoder) if cfg.fusion.item_text else None
    run.folds, run.full, run.fusion_info = fusion_stage(
        cfg, run.sasrec, run.summaries[0], run.valid, run.users, run.encoder, item_text, run.out, run.progress
    )
    run.mark("fusion", t0)


def stage_iterations(run: RunState) -> None:
    """T rounds of reward -> pairs -> DPO -> new samples (the other processes train each DPO round)."""
    from recalign.training import distributed

    cfg, out = run.cfg, run.out
    valid_requests = run.requests(run.valid)
    for t in range(cfg.iterations + 1):
        t0 = time.perf_counter()
        scored = reward_stage(
            cfg,
            run.summaries[t],
            run.valid,
            run.users,
            run.folds,
            run.encoder,
            out / "rewards" / f"iter{t}.jsonl",
        )
        run.rewards[t] = reward_summary(scored)
        run.user_rewards[t] = user_mean_rewards(scored)
        run.valid_metrics[t] = sampled_metrics(scored, len(run.valid["candidates"].iloc[0]))
        run.adapters[t] = run.adapter
        pairs, run.pair_stats[t] = pairs_stage(scored, out / "pairs" / f"iter{t}.jsonl")
        run.mark("rewards", t0)
        r, p, v = run.rewards[t], run.pair_stats[t], run.valid_metrics[t]
        log(
            f"iteration {t}: mean reward {r['mean']:.4f} (best-of-N {r['best_of_n']:.4f}); "
            f"valid NDCG@5 {v.get('NDCG@5', float('nan')):.4f} over the samples; "
            f"{p['pairs']} usable pairs, {p['ties']} tied users skipped",
            run.progress,
        )
        if t == cfg.iterations:
            break
        t0 = time.perf_counter()
        next_adapter = out / "adapters" / f"iter{t + 1}"
        if pairs:
            if not (next_adapter / "dpo_info.json").is_file():  # the other processes train with us
                distributed.broadcast(
                    {
                        "pairs": [p.to_dict() for p in pairs],
                        "previous": str(run.adapter) if run.adapter else None,
                        "adapter_dir": str(next_adapter.relative_to(out)),
                        "checkpoint_dir": f"dpo/iter{t + 1}",
                    }
                )
            run.dpo_info[t + 1] = dpo_stage(
                cfg,
                pairs,
                run.adapter,
                next_adapter,
                out / "dpo" / f"iter{t + 1}",
                out / "reference_cache",
                run.progress,
            )
            run.adapter = next_adapter
        else:
            run.dpo_info[t + 1] = {"pairs": 0, "skipped": "no pair: every user's summaries tied"}
            log(f"iteration {t + 1}: no pairs, DPO skipped (the LM is unchanged)", run.progress)
        run.mark("dpo", t0)
        t0 = time.perf_counter()
        run.summaries[t + 1] = run.summarise(
            valid_requests, f"iter{t + 1}", run.adapter, n_samples=cfg.summary.samples, sample=True
        )
        run.mark("summaries", t0)
    distributed.broadcast(None)  # no DPO round left: the other processes are done


def stage_test(run: RunState) -> None:
    """One summary per test user from the unaligned and (after T > 0 rounds) the aligned LM, scored by
    the fusion model trained on every user."""
    test_requests = run.requests(run.test)
    sample = run.cfg.summary.eval_decoding != "greedy"
    cfg = run.cfg
    variants: dict[str, Path | None] = {"unaligned": None}
    if cfg.test_iterations == "all":  # the LM after each intermediate round (the last is "aligned")
        for t in range(1, cfg.iterations):
            variants[f"iter{t}"] = run.adapters.get(t, run.out / "adapters" / f"iter{t}")
    if cfg.iterations > 0:
        variants["aligned"] = run.adapter
    seen: dict[Path | None, str] = {}
    for name, adapter in variants.items():
        t0 = time.perf_counter()
        if adapter in seen:  # a round without pairs left the LM unchanged: the same summaries
            run.test_metrics[name] = run.test_metrics[seen[adapter]]
            run.test_ranks[name] = run.test_ranks[seen[adapter]]
            continue
        seen[adapter] = name
        # no DPO round had a pair: the "aligned" LM is the unaligned one, and so are its summaries
        tag = f"test_{name}" if adapter is not None else "test_unaligned"
        recs = run.summarise(test_requests, tag, adapter, n_samples=1, sample=sample)
        run.test_metrics[name], run.test_ranks[name] = evaluate_augmented(
            run.full, recs, run.test, run.encoder
        )
        run.mark("test", t0)


#: The stages of a run, in order; each reads its files back when they exist (a rerun skips it).
STAGES: tuple[tuple[str, Callable[[RunState], None]], ...] = (
    ("data", stage_data),
    ("sasrec", stage_sasrec),
    ("summaries", stage_summaries),
    ("fusion", stage_fusion),
    ("iterations", stage_iterations),
    ("test", stage_test),
)


@releasing  # the output directory's lock (recalign.rundir) is released on return
def run_dpo4rec(
    cfg: DPO4RecConfig,
    output: str | Path,
    *,
    command: str | None = None,
    load_data: Callable[[DPO4RecConfig], tuple[RecDataset, Split]] | None = None,
) -> DPO4RecResult:
    """Run (or resume) DPO4Rec into ``output``: the :data:`STAGES` in order, then the report; see the
    module docstring for what each stage sees and writes.

    Args:
        cfg: the validated config.
        output: run directory.
        command: the command recorded in the result records (default: this process's command line).
        load_data: optional ``cfg -> (dataset, split)`` (tests pass small in-memory data); by default the
            dataset is loaded, filtered and split as ``recalign data prepare`` would.
    """
    from recalign.training import distributed

    cfg.validate()
    out = Path(output)
    distributed.init()
    open_output_dir(out)  # not a file, writable, not held by another live run (main process locks)
    check_or_save_config(cfg, out, save=distributed.is_main())
    if not distributed.is_main():
        with torch_threads(cfg.threads):
            follow_dpo_rounds(cfg, out)
        return DPO4RecResult(metrics={}, records=[], output=out)
    run = RunState(cfg, out, command, load_data, seconds=previous_seconds(out))
    with torch_threads(cfg.threads):
        for _name, stage in STAGES:
            stage(run)
    metrics, records = write_report(run)
    return DPO4RecResult(metrics=metrics, records=records, output=out)
