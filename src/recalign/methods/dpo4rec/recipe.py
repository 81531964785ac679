"""A full DPO4Rec run: stages, their files, and the evaluation of SASRec with and without summaries.

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
``rewards/iter{t}.jsonl``              reward (NDCG@K) and rank of every summary of iteration t
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
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.baselines.common import torch_threads
from recalign.baselines.sasrec import SASRec
from recalign.config import config_from_dict, config_to_dict, save_config
from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.errors import RecalignInputError
from recalign.evaluation.metrics import single_target_metrics
from recalign.evaluation.protocols import candidate_ranks
from recalign.evaluation.records import ResultRecord, current_command
from recalign.io import atomic_write_bytes, atomic_write_json
from recalign.methods.dpo4rec.config import DPO4RecConfig
from recalign.methods.dpo4rec.encoder import make_encoder
from recalign.methods.dpo4rec.fusion import AugmentedRecommender
from recalign.methods.dpo4rec.pairs import ScoredSummary, SummaryPair, select_pairs
from recalign.methods.dpo4rec.reward import logprob_rewards, ndcg_rewards, target_columns
from recalign.methods.dpo4rec.summaries import (
    SummaryRecord,
    build_requests,
    generate_summaries,
    history_lines,
    read_jsonl,
    write_jsonl,
)

#: Fields that do not change what a run computes; a rerun may change them freely.
_VOLATILE = ("progress", "threads")
METRIC_KS = (1, 5, 10, 20)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[dpo4rec] {msg}", flush=True)


# ---------------------------------------------------------------------- config and users
def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    for k in _VOLATILE:
        d.pop(k, None)
    d.get("dpo", {}).get("training", {}).pop("progress", None)
    d.get("dpo", {}).get("training", {}).pop("resume", None)
    d.get("sasrec", {}).pop("threads", None)
    return d


def check_or_save_config(cfg: DPO4RecConfig, out: Path, *, save: bool = True) -> None:
    """Save the resolved config (if ``save``); refuse to resume a directory written with a different one."""
    import yaml

    path = out / "config.yaml"
    if path.is_file():
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        # resolve the saved config through today's defaults, so a field added since is not a difference
        old = config_to_dict(config_from_dict(type(cfg), raw, source=str(path)))
        new = config_to_dict(cfg)
        if _comparable(old) != _comparable(new):
            diff = sorted(
                k for k in set(old) | set(new) if _comparable(old).get(k) != _comparable(new).get(k)
            )
            raise RecalignInputError(
                f"holds a run with a different config (differs in: {', '.join(diff)}); "
                "use another output directory",
                source=out,
            )
    if save:
        save_config(cfg, path)


def select_users(split: Split, n_users: int, seed: int, n_folds: int) -> dict[int, int]:
    """``{user: fold}`` for ``n_users`` users drawn with ``seed`` among those with valid *and* test examples."""
    valid_users = set(split.stage("valid")["user"].tolist())
    test_users = set(split.stage("test")["user"].tolist())
    eligible = np.array(sorted(valid_users & test_users), dtype=np.int64)
    if not len(eligible):
        raise RecalignInputError("no user has both a valid and a test example", field="data.split")
    rng = np.random.default_rng([seed, 4_404])
    chosen = (
        eligible if n_users == 0 or n_users >= len(eligible) else rng.choice(eligible, n_users, replace=False)
    )
    chosen = np.sort(chosen)
    folds = rng.permutation(len(chosen)) % max(1, n_folds)
    return {int(u): int(f) for u, f in zip(chosen, folds)}


def _one_per_user(examples: pd.DataFrame, users: dict[int, int]) -> pd.DataFrame:
    """One example per selected user (the loo split has exactly one valid and one test per user)."""
    df = examples[examples["user"].isin(list(users))]
    df = df.sort_values(["user", "position"]).drop_duplicates("user", keep="last")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------- SASRec backbone
def fit_or_load_sasrec(
    cfg: DPO4RecConfig, dataset: RecDataset, split: Split, out: Path, progress: bool
) -> tuple[SASRec, dict]:
    from safetensors.torch import load_file, save

    sas_cfg = dataclasses.replace(cfg.sasrec, threads=cfg.threads or cfg.sasrec.threads)
    model_path, info_path = out / "sasrec" / "model.safetensors", out / "sasrec" / "info.json"
    rec = SASRec(sas_cfg, progress=progress)
    if model_path.is_file() and info_path.is_file():
        rec.n_items = dataset.n_items
        rec.module = rec.build_module(dataset.n_items)
        rec.module.load_state_dict(load_file(str(model_path)))
        rec.module.eval()
        return rec, json.loads(info_path.read_text(encoding="utf-8"))
    _log("training the SASRec backbone", progress)
    rec.fit(dataset, split)
    state = {k: v.detach().contiguous() for k, v in rec.module.state_dict().items()}
    atomic_write_bytes(model_path, save(state))
    info = {k: v for k, v in rec.fit_info.items() if k != "history"}
    atomic_write_json(info_path, info)
    return rec, info


# ---------------------------------------------------------------------- LM
def _load_lm(cfg: DPO4RecConfig, adapter: Path | None, *, trainable: bool = False):
    """The base LM, with ``adapter`` applied (merged for generation, trainable for DPO)."""
    from recalign.lm.loading import load_model
    from recalign.lm.lora import attach_lora, load_adapter, merge_adapter

    model, tok = load_model(cfg.model)
    if trainable:
        if adapter:
            return load_adapter(model, adapter, trainable=True), tok
        import torch

        torch.manual_seed(cfg.dpo.training.seed)  # the same initial adapter in every process and run
        return attach_lora(model, cfg.dpo.lora), tok
    if adapter is not None:
        model = merge_adapter(load_adapter(model, adapter))
    model.eval()
    return model, tok


def _summaries_stage(
    cfg: DPO4RecConfig,
    path: Path,
    adapter: Path | None,
    requests,
    *,
    n_samples: int,
    sample: bool,
    tag: str,
    progress: bool,
) -> list[SummaryRecord]:
    if path.is_file():
        return [SummaryRecord(**r) for r in read_jsonl(path)]
    _log(f"generating {len(requests) * n_samples} summaries ({tag})", progress)
    model, tok = _load_lm(cfg, adapter)
    s = cfg.summary
    recs = generate_summaries(
        model,
        tok,
        requests,
        n_samples=n_samples,
        sample=sample,
        temperature=s.temperature,
        top_p=s.top_p,
        max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size,
        seed=cfg.seed,
        tag=tag,
        shard_dir=path.with_suffix(".shards"),
        progress=progress,
    )
    write_jsonl(path, [r.to_dict() for r in recs])
    del model
    gc.collect()  # the next stage loads its own copy; never hold two LMs at once
    return recs


# ---------------------------------------------------------------------- fusion / rewards
def _fusion_inputs(records: list[SummaryRecord], examples: pd.DataFrame, encoder):
    by_user = {int(u): i for i, u in enumerate(examples["user"])}
    rows = [by_user[r.user] for r in records]
    histories = [np.asarray(examples["history"].iloc[i], dtype=np.int64) for i in rows]
    targets = examples["target"].to_numpy()[rows]
    candidates = np.stack([np.asarray(examples["candidates"].iloc[i], dtype=np.int64) for i in rows])
    embeddings = encoder.encode([r.text for r in records])
    return histories, embeddings, targets, candidates


def item_text_embeddings(dataset: RecDataset, encoder) -> np.ndarray:
    """``[n_items, E]`` embeddings of every item's own text, written like the summary prompt's lines."""
    return encoder.encode(history_lines(dataset, np.arange(dataset.n_items), dataset.n_items, True))


def _make_fusion(
    cfg: DPO4RecConfig, sasrec: SASRec, text_dim: int, item_text: np.ndarray | None, progress: bool
) -> AugmentedRecommender:
    return AugmentedRecommender(
        sasrec.module,
        cfg.sasrec.max_len,
        text_dim,
        cfg.fusion,
        item_text=item_text if cfg.fusion.item_text else None,
        threads=cfg.threads,
        progress=progress,
    )


def fusion_stage(
    cfg: DPO4RecConfig,
    sasrec: SASRec,
    records: list[SummaryRecord],
    valid: pd.DataFrame,
    users: dict[int, int],
    encoder,
    item_text: np.ndarray | None,
    out: Path,
    progress: bool,
) -> tuple[dict[int, AugmentedRecommender], AugmentedRecommender, dict]:
    """Cross-fitted fold models (``{fold: model}``) and the model trained on every selected user."""
    fdir = out / "fusion"
    n_folds = cfg.fusion.n_folds
    hist, emb, tgt, _ = _fusion_inputs(records, valid, encoder)
    groups = np.array([r.user for r in records])
    rec_folds = np.array([users[r.user] for r in records])
    names = ["full"] + ([f"fold{k}" for k in range(n_folds)] if n_folds > 1 else [])
    models: dict[str, AugmentedRecommender] = {}
    info: dict[str, dict] = {}
    for n in names:
        path, info_path = fdir / f"{n}.safetensors", fdir / f"{n}.json"
        m = _make_fusion(cfg, sasrec, encoder.dim, item_text, progress)
        if path.is_file() and info_path.is_file():
            models[n] = m.load(path)
            info[n] = json.loads(info_path.read_text(encoding="utf-8"))
            continue
        keep = np.ones(len(records), bool) if n == "full" else rec_folds != int(n[4:])
        idx = np.flatnonzero(keep)
        _log(f"training fusion model '{n}' on {len(idx)} (history, summary) examples", progress)
        m.fit([hist[i] for i in idx], emb[idx], tgt[idx], groups[idx])
        m.save(path)
        info[n] = {k: v for k, v in m.fit_info.items() if k != "history"}
        atomic_write_json(info_path, info[n])
        models[n] = m
    full = models["full"]
    folds = {k: models[f"fold{k}"] for k in range(n_folds)} if n_folds > 1 else {0: full}
    return folds, full, info


def compute_rewards(
    cfg: DPO4RecConfig, scores: np.ndarray, target_col: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The configured reward of each row (and the target's rank, for the record)."""
    rewards, ranks = ndcg_rewards(scores, target_col, cfg.reward_k)
    if cfg.reward == "logprob":
        rewards = logprob_rewards(scores, target_col)
    return rewards, ranks


def reward_name(cfg: DPO4RecConfig) -> str:
    return f"NDCG@{cfg.reward_k}" if cfg.reward == "ndcg" else "candidate log-probability"


def reward_stage(
    cfg: DPO4RecConfig,
    records: list[SummaryRecord],
    valid: pd.DataFrame,
    users: dict[int, int],
    folds: dict[int, AugmentedRecommender],
    encoder,
    path: Path,
) -> list[ScoredSummary]:
    """Reward of every summary, each scored by the fold model that never trained on its user."""
    if path.is_file():
        return [ScoredSummary(**r) for r in read_jsonl(path)]
    hist, emb, tgt, cands = _fusion_inputs(records, valid, encoder)
    cols = target_columns(cands, tgt)
    rewards = np.zeros(len(records))
    ranks = np.zeros(len(records), dtype=np.int64)
    fold_of = np.array([users[r.user] if len(folds) > 1 else 0 for r in records])
    for k, model in folds.items():
        idx = np.flatnonzero(fold_of == k)
        if not len(idx):
            continue
        scores = model.score_candidates([hist[i] for i in idx], emb[idx], cands[idx])
        rewards[idx], ranks[idx] = compute_rewards(cfg, scores, cols[idx])
    scored = [
        ScoredSummary(
            user=r.user,
            sample=r.sample,
            text=r.text,
            reward=float(rw),
            prompt=r.prompt,
            position=r.position,
            rank=int(rk),
        )
        for r, rw, rk in zip(records, rewards, ranks)
    ]
    write_jsonl(path, [dataclasses.asdict(s) for s in scored])
    return scored


def reward_summary(scored: list[ScoredSummary]) -> dict:
    """Mean reward of the samples, mean of each user's best and worst, and how many distinct texts."""
    by_user: dict[int, list[float]] = {}
    for s in scored:
        by_user.setdefault(s.user, []).append(s.reward)
    best = [max(v) for v in by_user.values()]
    worst = [min(v) for v in by_user.values()]
    return {
        "mean": float(np.mean([s.reward for s in scored])) if scored else float("nan"),
        "best_of_n": float(np.mean(best)) if best else float("nan"),
        "worst_of_n": float(np.mean(worst)) if worst else float("nan"),
        "samples": len(scored),
        "users": len(by_user),
        "distinct_texts": len({s.text for s in scored}),
    }


def pairs_stage(scored: list[ScoredSummary], path: Path) -> tuple[list[SummaryPair], dict]:
    stats_path = path.with_suffix(".stats.json")
    if path.is_file() and stats_path.is_file():
        pairs = [SummaryPair(**r) for r in read_jsonl(path)]
        return pairs, json.loads(stats_path.read_text(encoding="utf-8"))
    pairs, stats = select_pairs(scored)
    write_jsonl(path, [p.to_dict() for p in pairs])
    atomic_write_json(stats_path, stats.to_dict())
    return pairs, stats.to_dict()


def dpo_stage(
    cfg: DPO4RecConfig,
    pairs: list[SummaryPair],
    previous: Path | None,
    adapter_dir: Path,
    checkpoint_dir: Path,
    reference_cache: Path,
    progress: bool,
) -> dict:
    """One DPO round; returns its summary (also written as ``adapter_dir/dpo_info.json``).

    In a multi-process run every process calls it with the same arguments (see :func:`_follow`); the
    main process alone decides whether the round is already done, and alone writes the adapter.
    """
    from recalign.methods.dpo4rec.align import dpo_on_pairs, save_adapter_atomically
    from recalign.training import distributed

    main_process = distributed.is_main()
    progress = progress and main_process
    info_path = adapter_dir / "dpo_info.json"
    if main_process and info_path.is_file():
        return json.loads(info_path.read_text(encoding="utf-8"))
    _log(f"DPO on {len(pairs)} pairs -> {adapter_dir}", progress)
    model, tok = _load_lm(cfg, previous, trainable=True)
    outcome = dpo_on_pairs(
        model,
        tok,
        pairs,
        cfg.dpo,
        checkpoint_dir,
        reference_cache_dir=reference_cache,
        resume=True,
        progress=progress,
    )
    logs = [row for row in outcome.log_history if "loss" in row]
    info = {
        "pairs": len(pairs),
        "global_step": outcome.global_step,
        "train_loss": outcome.train_loss,
        "seconds": outcome.seconds,
        "resumed_from": str(outcome.resumed_from) if outcome.resumed_from else None,
        "first_log": logs[0] if logs else None,
        "last_log": logs[-1] if logs else None,
        "continued_from": str(previous) if previous else None,
        "processes": distributed.world_size(),
    }
    if main_process:
        save_adapter_atomically(model, adapter_dir, base_model=cfg.model, extra={"dpo4rec": info})
        atomic_write_json(info_path, info)
    # The trainer holds the model, its gradients and the optimizer state in reference cycles; free them
    # before the next stage loads a fresh LM (on a shared machine this is gigabytes).
    del model, outcome
    gc.collect()
    return info


# ---------------------------------------------------------------------- evaluation
def _metrics_from_scores(scores: np.ndarray, examples: pd.DataFrame) -> dict[str, float]:
    ranks = candidate_ranks(scores, examples)
    n_c = scores.shape[1]
    return single_target_metrics(ranks, [k for k in METRIC_KS if k <= n_c], n_candidates=n_c)


def evaluate_augmented(
    model: AugmentedRecommender, records: list[SummaryRecord], test: pd.DataFrame, encoder
) -> dict[str, float]:
    by_user = {r.user: r for r in records}
    missing = [int(u) for u in test["user"] if int(u) not in by_user]
    if missing:
        raise RuntimeError(f"no test summary for user {missing[0]}")
    ordered = [by_user[int(u)] for u in test["user"]]
    emb = encoder.encode([r.text for r in ordered])
    hist = [np.asarray(h, dtype=np.int64) for h in test["history"]]
    cands = np.stack([np.asarray(c, dtype=np.int64) for c in test["candidates"]])
    return _metrics_from_scores(model.score_candidates(hist, emb, cands), test)


# ---------------------------------------------------------------------- the run
def _previous_seconds(out: Path) -> dict[str, float]:
    """Stage timings of earlier invocations: ``timings.json``, else a finished run's ``metrics.json``."""
    timings, metrics = out / "timings.json", out / "metrics.json"
    if timings.is_file():
        return {k: float(v) for k, v in json.loads(timings.read_text(encoding="utf-8")).items()}
    if metrics.is_file():
        old = json.loads(metrics.read_text(encoding="utf-8")).get("seconds", {})
        return {k: float(v) for k, v in old.items() if k != "total"}
    return {}


def _follow(cfg: DPO4RecConfig, out: Path) -> None:
    """A non-main process of a distributed run: take part in every DPO round the main process announces
    (``None`` means there is no round left)."""
    from recalign.training import distributed

    while (job := distributed.broadcast(None)) is not None:
        pairs = [SummaryPair(**p) for p in job["pairs"]]
        previous = Path(job["previous"]) if job["previous"] else None
        dpo_stage(
            cfg,
            pairs,
            previous,
            out / job["adapter_dir"],
            out / job["checkpoint_dir"],
            out / "reference_cache",
            progress=False,
        )


@dataclasses.dataclass
class DPO4RecResult:
    metrics: dict
    records: list[ResultRecord]
    output: Path


def run_dpo4rec(
    cfg: DPO4RecConfig,
    output: str | Path,
    *,
    command: str | None = None,
    load_data: Callable[[DPO4RecConfig], tuple[RecDataset, Split]] | None = None,
) -> DPO4RecResult:
    """Run (or resume) DPO4Rec into ``output``; see the module docstring for stages and files.

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
    out.mkdir(parents=True, exist_ok=True)
    progress = cfg.progress
    check_or_save_config(cfg, out, save=distributed.is_main())
    if not distributed.is_main():
        with torch_threads(cfg.threads):
            _follow(cfg, out)
        return DPO4RecResult(metrics={}, records=[], output=out)
    # Stage timings accumulate across invocations (a resumed run reports the time its stages really
    # took, not just the time of the last, mostly-skipping invocation).
    seconds = _previous_seconds(out)

    def mark(stage: str, t0: float) -> None:
        seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - t0, 3)
        atomic_write_json(out / "timings.json", seconds)

    with torch_threads(cfg.threads):
        # ---- data
        t0 = time.perf_counter()
        if load_data is not None:
            dataset, split = load_data(cfg)
        else:
            from recalign.data.prepare import prepare

            split, dataset, _ = prepare(cfg.data)
        users = select_users(split, cfg.users, cfg.seed, cfg.fusion.n_folds)
        atomic_write_json(out / "users.json", {"users": [{"user": u, "fold": f} for u, f in users.items()]})
        valid = _one_per_user(split.stage("valid"), users)
        test = _one_per_user(split.stage("test"), users)
        _log(f"{dataset.name}: {len(users)} users, {len(valid)} valid / {len(test)} test examples", progress)
        mark("data", t0)

        # ---- SASRec backbone and its test metrics (the `sasrec` record)
        t0 = time.perf_counter()
        sasrec, sasrec_info = fit_or_load_sasrec(cfg, dataset, split, out, progress)
        sasrec_test = _metrics_from_scores(sasrec.score_candidates(test), test)
        # what the reward would be without any summary: plain SASRec's NDCG@K on the same valid examples
        sasrec_valid_reward = float(
            compute_rewards(
                cfg,
                sasrec.score_candidates(valid),
                target_columns(np.stack(valid["candidates"].to_numpy()), valid["target"].to_numpy()),
            )[0].mean()
        )
        mark("sasrec", t0)

        # ---- summaries of the unaligned LM on the valid examples
        s = cfg.summary
        valid_requests = build_requests(
            dataset,
            valid,
            seed=cfg.seed,
            template=s.template,
            max_history=s.max_history,
            include_genres=s.include_genres,
        )
        t0 = time.perf_counter()
        summaries = {
            0: _summaries_stage(
                cfg,
                out / "summaries" / "iter0.jsonl",
                None,
                valid_requests,
                n_samples=s.samples,
                sample=True,
                tag="iter0",
                progress=progress,
            )
        }
        mark("summaries", t0)

        # ---- reward models
        t0 = time.perf_counter()
        encoder = make_encoder(
            cfg.encoder.kind,
            batch_size=cfg.encoder.batch_size,
            max_length=cfg.encoder.max_length,
            hashing_dim=cfg.encoder.hashing_dim,
        )
        item_text = item_text_embeddings(dataset, encoder) if cfg.fusion.item_text else None
        folds, full, fusion_info = fusion_stage(
            cfg, sasrec, summaries[0], valid, users, encoder, item_text, out, progress
        )
        mark("fusion", t0)

        # ---- iterations: reward -> pairs -> DPO -> new samples
        rewards: dict[int, dict] = {}
        pair_stats: dict[int, dict] = {}
        dpo_info: dict[int, dict] = {}
        adapter: Path | None = None
        for t in range(cfg.iterations + 1):
            t0 = time.perf_counter()
            scored = reward_stage(
                cfg, summaries[t], valid, users, folds, encoder, out / "rewards" / f"iter{t}.jsonl"
            )
            rewards[t] = reward_summary(scored)
            pairs, pair_stats[t] = pairs_stage(scored, out / "pairs" / f"iter{t}.jsonl")
            mark("rewards", t0)
            _log(
                f"iteration {t}: mean reward {rewards[t]['mean']:.4f} (best-of-N {rewards[t]['best_of_n']:.4f}); "
                f"{pair_stats[t]['pairs']} pairs, {pair_stats[t]['ties']} tied users skipped",
                progress,
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
                            "previous": str(adapter) if adapter else None,
                            "adapter_dir": str(next_adapter.relative_to(out)),
                            "checkpoint_dir": f"dpo/iter{t + 1}",
                        }
                    )
                dpo_info[t + 1] = dpo_stage(
                    cfg,
                    pairs,
                    adapter,
                    next_adapter,
                    out / "dpo" / f"iter{t + 1}",
                    out / "reference_cache",
                    progress,
                )
                adapter = next_adapter
            else:
                dpo_info[t + 1] = {"pairs": 0, "skipped": "no pair: every user's summaries tied"}
                _log(f"iteration {t + 1}: no pairs, DPO skipped (the LM is unchanged)", progress)
            mark("dpo", t0)
            t0 = time.perf_counter()
            summaries[t + 1] = _summaries_stage(
                cfg,
                out / "summaries" / f"iter{t + 1}.jsonl",
                adapter,
                valid_requests,
                n_samples=s.samples,
                sample=True,
                tag=f"iter{t + 1}",
                progress=progress,
            )
            mark("summaries", t0)

        distributed.broadcast(None)  # no DPO round left: the other processes are done
        # ---- test: one summary per user from the unaligned and the aligned LM
        test_requests = build_requests(
            dataset,
            test,
            seed=cfg.seed,
            template=s.template,
            max_history=s.max_history,
            include_genres=s.include_genres,
        )
        greedy = s.eval_decoding == "greedy"
        variants = {"unaligned": None}
        if cfg.iterations > 0:
            variants["aligned"] = adapter
        test_metrics: dict[str, dict] = {}
        test_seconds: dict[str, float] = {}
        for name, adp in variants.items():
            t0 = time.perf_counter()
            if name == "aligned" and adp is None:
                # no DPO round had a pair: the "aligned" LM is the unaligned one
                recs = _summaries_stage(
                    cfg,
                    out / "summaries" / "test_unaligned.jsonl",
                    None,
                    test_requests,
                    n_samples=1,
                    sample=not greedy,
                    tag="test_unaligned",
                    progress=progress,
                )
            else:
                recs = _summaries_stage(
                    cfg,
                    out / "summaries" / f"test_{name}.jsonl",
                    adp,
                    test_requests,
                    n_samples=1,
                    sample=not greedy,
                    tag=f"test_{name}",
                    progress=progress,
                )
            test_metrics[name] = evaluate_augmented(full, recs, test, encoder)
            test_seconds[name] = time.perf_counter() - t0
            mark("test", t0)

    total = sum(seconds.values())
    reward_info = {
        "metric": reward_name(cfg),
        "before": rewards[0],
        "after": rewards[cfg.iterations],
        "per_iteration": {str(k): v for k, v in rewards.items()},
        "without_summary": sasrec_valid_reward,
    }
    metrics = {
        "dataset": dataset.name,
        "split": split.name,
        "users": len(users),
        "test_examples": len(test),
        "samples_per_user": s.samples,
        "iterations": cfg.iterations,
        "test": {"sasrec": sasrec_test, **{f"sasrec+summaries-{k}": v for k, v in test_metrics.items()}},
        "reward": reward_info,
        "pairs": {str(k): v for k, v in pair_stats.items()},
        "dpo": {str(k): v for k, v in dpo_info.items()},
        "fusion": fusion_info,
        "sasrec": sasrec_info,
        "encoder": {"kind": cfg.encoder.kind, "dim": encoder.dim, "cache_hits": encoder.hits},
        "seconds": {**seconds, "total": round(total, 3)},
    }
    cmd = command if command is not None else current_command()
    common = dict(
        dataset=dataset.name, split=split.name, protocol="candidates", n_examples=len(test), seed=cfg.seed
    )
    records = [
        ResultRecord(
            method="sasrec",
            metrics=sasrec_test,
            seconds=round(float(sasrec_info.get("seconds", seconds.get("sasrec", 0.0))), 3),
            command=cmd,
            extra={"note": "the SASRec backbone of this run, on the same test users"},
            **common,
        )
    ]
    for name in test_metrics:
        extra = {"reward_metric": reward_info["metric"]}
        if name == "unaligned":
            extra["mean_sampled_reward"] = rewards[0]["mean"]
        else:
            extra["mean_sampled_reward"] = rewards[cfg.iterations]["mean"]
            extra["mean_sampled_reward_before"] = rewards[0]["mean"]
            extra["iterations"] = cfg.iterations
        records.append(
            ResultRecord(
                method=f"sasrec+summaries-{name}",
                metrics=test_metrics[name],
                seconds=round(total, 3),
                command=cmd,
                extra=extra,
                **common,
            )
        )
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "records.json", {"records": [r.to_dict() for r in records]})
    _log(f"done in {total:.0f}s; wrote {out / 'metrics.json'} and {out / 'records.json'}", progress)
    return DPO4RecResult(metrics=metrics, records=records, output=out)
