"""The stages of a DPO4Rec run (see :mod:`recalign.methods.dpo4rec.recipe` for the order, the data each
stage sees and the files it writes): config check and user selection, the SASRec backbone, summary
generation, the cross-fitted fusion reward models, rewards, pairs and one DPO round. Each stage reads its
output back when the file exists, so a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.baselines.sasrec import SASRec
from recalign.config import config_from_dict, config_to_dict, save_config
from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.errors import RecalignInputError
from recalign.io import atomic_write_bytes, atomic_write_json
from recalign.methods.dpo4rec.config import DPO4RecConfig
from recalign.methods.dpo4rec.fusion import AugmentedRecommender
from recalign.methods.dpo4rec.pairs import ScoredSummary, SummaryPair, select_pairs
from recalign.methods.dpo4rec.reward import logprob_rewards, ndcg_rewards, target_columns
from recalign.methods.dpo4rec.summaries import (
    SummaryRecord,
    generate_summaries,
    history_lines,
    read_jsonl,
    write_jsonl,
)

#: Fields that do not change what a run computes; a rerun may change them freely.
_VOLATILE = ("progress", "threads")


def log(msg: str, progress: bool) -> None:
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


def one_per_user(examples: pd.DataFrame, users: dict[int, int]) -> pd.DataFrame:
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
    log("training the SASRec backbone", progress)
    rec.fit(dataset, split)
    state = {k: v.detach().contiguous() for k, v in rec.module.state_dict().items()}
    atomic_write_bytes(model_path, save(state))
    info = {k: v for k, v in rec.fit_info.items() if k != "history"}
    atomic_write_json(info_path, info)
    return rec, info


# ---------------------------------------------------------------------- LM
def load_lm(cfg: DPO4RecConfig, adapter: Path | None, *, trainable: bool = False):
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


def summaries_stage(
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
    log(f"generating {len(requests) * n_samples} summaries ({tag})", progress)
    model, tok = load_lm(cfg, adapter)
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
def fusion_inputs(records: list[SummaryRecord], examples: pd.DataFrame, encoder):
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


def make_fusion(
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
    hist, emb, tgt, _ = fusion_inputs(records, valid, encoder)
    groups = np.array([r.user for r in records])
    rec_folds = np.array([users[r.user] for r in records])
    names = ["full"] + ([f"fold{k}" for k in range(n_folds)] if n_folds > 1 else [])
    models: dict[str, AugmentedRecommender] = {}
    info: dict[str, dict] = {}
    for n in names:
        path, info_path = fdir / f"{n}.safetensors", fdir / f"{n}.json"
        m = make_fusion(cfg, sasrec, encoder.dim, item_text, progress)
        if path.is_file() and info_path.is_file():
            models[n] = m.load(path)
            info[n] = json.loads(info_path.read_text(encoding="utf-8"))
            continue
        keep = np.ones(len(records), bool) if n == "full" else rec_folds != int(n[4:])
        idx = np.flatnonzero(keep)
        log(f"training fusion model '{n}' on {len(idx)} (history, summary) examples", progress)
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
    elif cfg.reward == "rr":
        rewards = 1.0 / ranks.astype(np.float64)
    return rewards, ranks


def reward_name(cfg: DPO4RecConfig) -> str:
    return {"ndcg": f"NDCG@{cfg.reward_k}", "rr": "reciprocal rank", "logprob": "candidate log-probability"}[
        cfg.reward
    ]


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
    hist, emb, tgt, cands = fusion_inputs(records, valid, encoder)
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
    by_user = _rewards_by_user(scored)
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


def user_mean_rewards(scored: list[ScoredSummary]) -> dict[int, float]:
    """Each user's mean reward over their sampled summaries."""
    return {u: float(np.mean(v)) for u, v in _rewards_by_user(scored).items()}


def _rewards_by_user(scored: list[ScoredSummary]) -> dict[int, list[float]]:
    by_user: dict[int, list[float]] = {}
    for s in scored:
        by_user.setdefault(s.user, []).append(s.reward)
    return by_user


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

    In a multi-process run every process calls it with the same arguments (see :func:`follow_dpo_rounds`); the
    main process alone decides whether the round is already done, and alone writes the adapter.
    """
    from recalign.methods.dpo4rec.align import dpo_on_pairs, save_adapter_atomically
    from recalign.training import distributed

    main_process = distributed.is_main()
    progress = progress and main_process
    info_path = adapter_dir / "dpo_info.json"
    if main_process and info_path.is_file():
        return json.loads(info_path.read_text(encoding="utf-8"))
    log(f"DPO on {len(pairs)} pairs -> {adapter_dir}", progress)
    model, tok = load_lm(cfg, previous, trainable=True)
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


def follow_dpo_rounds(cfg: DPO4RecConfig, out: Path) -> None:
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
