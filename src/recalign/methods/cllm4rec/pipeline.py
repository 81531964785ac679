"""The three CLI stages as plain functions over a run directory (the CLI is a thin shell around them).

Run directory layout::

    config.yaml             resolved config (checked on every later stage: a different run may not
                            silently continue in the same directory)
    checkpoints/<stage>/    state.json + state-<step>.safetensors while a stage is running
    pretrain.safetensors    ID tables after pretraining        (+ pretrain_log.json)
    model.safetensors       ID tables after fine-tuning (the best validation epoch) (+ finetune_log.json)
    backbone.json           the backbone's depth and its untrained content-LM loss vs ln(vocab)
    pretrain_source.json    only when the pretraining was copied from another run (reuse_pretrain)
    curve.json              {stage: [{epoch, step, valid_recall@20, loss: {kind: mean}, reg}, ...]}
    progress.jsonl          one line per optimiser step, appended as training goes (tail -f friendly)
    metrics.json            {protocol: metrics} of the last evaluation
    records.json            {"records": [...]} in the shared quality shape

Every stage resumes: a finished stage is skipped, an interrupted one continues from its checkpoint.
Every stage runs with ``cfg.threads`` torch CPU threads (0: the number of cores, at most 2), restoring
the caller's setting afterwards.

Under ``accelerate launch`` (several processes) ``pretrain`` and ``finetune`` train data-parallel (see
:mod:`.training`); only the main process writes into the run directory, and every stage ends with a
barrier so that the next one (possibly in another command) finds the files. ``evaluate`` runs on the
main process only (one forward pass per user: cheap next to training); the other processes return at once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from recalign.baselines.common import torch_threads
from recalign.config import config_to_dict, save_config
from recalign.data.dataset import RecDataset
from recalign.data.splits import Split, build_split
from recalign.errors import RecalignInputError
from recalign.evaluation.protocols import evaluate_candidates, evaluate_full
from recalign.evaluation.records import ResultRecord, current_command, write_records
from recalign.io import atomic_write_json
from recalign.methods.cllm4rec.config import CLLM4RecConfig, non_default_settings
from recalign.methods.cllm4rec.model import CLLM4RecModel
from recalign.methods.cllm4rec.protocol import (
    HOLDOUT_SPLIT,
    evaluate_multi_target,
    holdout_split,
    with_targets,
)
from recalign.methods.cllm4rec.recommender import (
    CLLM4RecRecommender,
    build_model,
    check_backbone_depth,
    make_validator,
    resolve_dtype,
)
from recalign.methods.cllm4rec.training import StageResult, TrainingData, run_stage
from recalign.methods.cllm4rec.vocab import IDTokenizer
from recalign.rundir import open_output_dir, releasing

# Sections of the config that define the trained tables; a stage refuses a directory whose saved
# config differs in one of them (evaluation options and the method label may change freely).
_STAGE_SECTIONS = {
    "pretrain": ("seed", "data", "model", "pretrain"),
    "finetune": ("seed", "data", "model", "pretrain", "finetune"),
    "evaluate": ("seed", "data", "model", "pretrain", "finetune"),
}


def load_data(cfg: CLLM4RecConfig) -> tuple[RecDataset, Split]:
    from recalign.data.loaders import load_dataset

    dataset = (
        load_dataset(cfg.data.dataset, cfg.data.path) if cfg.data.path else load_dataset(cfg.data.dataset)
    )
    if cfg.data.split == HOLDOUT_SPLIT:
        split = holdout_split(
            dataset, cfg.data.holdout_ratio, seed=cfg.data.split_seed, valid_ratio=cfg.data.valid_ratio
        )
    else:
        split = build_split(dataset, cfg.data.split, seed=cfg.data.split_seed)
    return dataset, split


_STAGE_TABLES = {"pretrain": "pretrain.safetensors", "finetune": "model.safetensors"}


def _differing_section(
    saved_path: Path, cfg: CLLM4RecConfig, stages: tuple[str, ...], missing_differs: bool
) -> str | None:
    """The first config section that the tables of ``stages`` depend on where the saved config differs
    from ``cfg`` (None if none); a section missing from the saved file differs only if ``missing_differs``."""
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = config_to_dict(cfg)
    for key in dict.fromkeys(k for st in stages for k in _STAGE_SECTIONS[st]):
        if (key in saved or missing_differs) and saved.get(key) != now[key]:
            return key
    return None


def prepare_dir(cfg: CLLM4RecConfig, output: str | Path, stage: str) -> Path:
    """Create ``output``, refuse it if it holds a run with different training settings, save the config
    (every process checks; the main process writes)."""
    from recalign.training import distributed

    out = open_output_dir(output)  # not a file, writable, not held by another live run
    saved_path = out / "config.yaml"
    # a stage that has begun here keeps its settings whichever stage runs now: rerunning a finished
    # pretraining with other fine-tuning settings must not overwrite the saved ones unchecked
    begun = [
        st for st, f in _STAGE_TABLES.items() if (out / f).is_file() or (out / "checkpoints" / st).is_dir()
    ]
    stages = (stage, *begun)
    key = _differing_section(saved_path, cfg, stages, missing_differs=False) if saved_path.is_file() else None
    if key:
        raise RecalignInputError(
            f"'{key}' differs from the run already in this directory; use a new --output "
            "(or the same settings to resume)",
            source=saved_path,
        )
    if distributed.is_main():
        save_config(cfg, saved_path)
    return out


@releasing
def reuse_pretrain(cfg: CLLM4RecConfig, source: str | Path, output: str | Path) -> Path:
    """Start ``output`` from the finished pretraining in ``source`` instead of pretraining again.

    Why: an ablation over fine-tuning settings (patience, epochs, content ratio in fine-tuning) needs the
    same pretrained tables, and pretraining is most of the cost (~70 min of SmolLM2 on a 2-core CPU).
    Pretraining depends only on the ``seed``/``data``/``model``/``pretrain`` sections, so ``source``'s
    saved config must equal ``cfg`` on those (else a one-line error names the section). Copied: the
    tables, ``pretrain_log.json``, ``backbone.json`` and the pretraining curve; ``pretrain_source.json``
    says where they came from, and evaluation puts that into the records. A directory that already has
    ``pretrain.safetensors`` is left as it is (a resumed run).
    """
    src = Path(source)
    tables, saved_path = src / "pretrain.safetensors", src / "config.yaml"
    if not tables.is_file() or not saved_path.is_file():
        raise RecalignInputError(
            "no finished pretraining (pretrain.safetensors, config.yaml) here", source=src
        )
    key = _differing_section(saved_path, cfg, ("pretrain",), missing_differs=True)
    if key:
        raise RecalignInputError(
            f"'{key}' differs from this run's: its pretraining cannot be reused", source=saved_path
        )
    _check_same_dtype(cfg, src)
    from recalign.training import distributed

    out = prepare_dir(cfg, output, "pretrain")
    if not (out / "pretrain.safetensors").is_file() and distributed.is_main():
        _copy_pretrain(src, out)
    distributed.barrier()  # every process finds the tables before pretrain() looks for them
    return out


def _check_same_dtype(cfg: CLLM4RecConfig, src: Path) -> None:
    """Refuse tables pretrained in another compute dtype than this machine resolves ``model.dtype`` to.

    Why: ``model.dtype: auto`` is bfloat16 on a CPU with native bf16 units and float32 elsewhere, so two
    machines with equal configs can pretrain differently; a fine-tuning ablation must not mix them. A
    source from before the dtype was recorded in ``backbone.json`` cannot be checked and is accepted.
    Resuming a run's own stage on another machine is not refused (it would strand a multi-hour run);
    records name pretraining's dtype (``extra.pretrain_dtype``) next to evaluation's (``extra.dtype``).
    """
    info_path = src / "backbone.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    ours = _dtype_name(resolve_dtype(cfg.model.dtype))
    if "dtype" in info and info["dtype"] != ours:
        raise RecalignInputError(
            f"pretrained in {info['dtype']}, but this run computes in {ours} (model.dtype="
            f"{cfg.model.dtype}): its pretraining cannot be reused",
            source=info_path,
        )


def _dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how run files and records name a compute dtype."""
    return str(dtype).removeprefix("torch.")


def _copy_pretrain(src: Path, out: Path) -> None:
    for name in ("pretrain_log.json", "backbone.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    curves = json.loads((src / "curve.json").read_text()) if (src / "curve.json").is_file() else {}
    if "pretrain" in curves:
        atomic_write_json(out / "curve.json", {"pretrain": curves["pretrain"]})
    atomic_write_json(out / "pretrain_source.json", {"source": str(src)})
    tmp = out / "pretrain.safetensors.tmp"
    shutil.copyfile(src / "pretrain.safetensors", tmp)  # the tables last: they mark the stage done
    tmp.replace(out / "pretrain.safetensors")


def _progress_logger(out: Path):
    path = out / "progress.jsonl"

    def log(rec: dict) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    return log


def _model(cfg: CLLM4RecConfig, dataset: RecDataset, backbone=None, base_tokenizer=None):
    return build_model(cfg, dataset.n_users, dataset.n_items, backbone, base_tokenizer)


@releasing  # the output directory's lock (recalign.rundir) is released on return
def _train(
    cfg: CLLM4RecConfig,
    output: str | Path,
    stage: str,
    backbone=None,
    base_tokenizer=None,
    stop_after: int | None = None,
) -> StageResult | None:
    from recalign.training import distributed

    distributed.init()
    out = prepare_dir(cfg, output, stage)
    final = out / _STAGE_TABLES[stage]
    if final.is_file():  # the same answer on every process: only training writes it, and all take part
        if distributed.is_main():
            print(f"{stage}: already complete in {out} ({final.name}); nothing to do")
        return None
    dataset, split = load_data(cfg)
    model, tok = _model(cfg, dataset, backbone, base_tokenizer)
    if stage == "finetune":
        init = out / "pretrain.safetensors"
        if not init.is_file():
            raise RecalignInputError(
                "no pretrain.safetensors here: run 'recalign cllm4rec pretrain' first", source=out
            )
        model.load_tables(init)
    data = TrainingData.build(tok, dataset, split.train_sequences(dataset))
    if stage == "pretrain":  # fresh tables: the untrained content loss of this backbone (refused if useless)
        info = check_backbone_depth(model, data, cfg)
        if distributed.is_main():
            dtype = _dtype_name(model.compute_dtype)
            atomic_write_json(out / "backbone.json", {"backbone": cfg.model.backbone, "dtype": dtype, **info})
    result = run_stage(
        model,
        data,
        cfg,
        stage,
        out / "checkpoints" / stage,
        stop_after=stop_after,
        log_fn=_progress_logger(out),
        validate=make_validator(cfg, tok, split),
    )
    if distributed.is_main():
        curve_path = out / "curve.json"
        curves = json.loads(curve_path.read_text()) if curve_path.is_file() else {}
        curves[stage] = result.summary()
        atomic_write_json(curve_path, curves)
    if result.completed and distributed.is_main():
        model.save_tables(final)
        atomic_write_json(
            out / f"{stage}_log.json",
            {**result.summary(), "seconds": result.seconds, "log": result.log},
        )
    distributed.barrier()  # the tables are on disk before any process starts the next stage
    return result


def pretrain(cfg: CLLM4RecConfig, output: str | Path, **kw) -> StageResult | None:
    """Mutually-regularised collaborative + content LM pretraining of the ID tables."""
    with torch_threads(cfg.threads):
        return _train(cfg, output, "pretrain", **kw)


def finetune(cfg: CLLM4RecConfig, output: str | Path, **kw) -> StageResult | None:
    """Masked-history recommendation fine-tuning, starting from ``pretrain.safetensors``."""
    with torch_threads(cfg.threads):
        return _train(cfg, output, "finetune", **kw)


def load_recommender(
    cfg: CLLM4RecConfig, output: str | Path, dataset: RecDataset, backbone=None, base_tokenizer=None
) -> CLLM4RecRecommender:
    tables = Path(output) / "model.safetensors"
    if not tables.is_file():
        raise RecalignInputError("no model.safetensors here: run pretrain and finetune first", source=output)
    model, tok = _model(cfg, dataset, backbone, base_tokenizer)
    model.load_tables(tables)
    return CLLM4RecRecommender(cfg, model=model, tokenizer=tok)


def evaluate_recommender(
    rec,
    split: Split,
    stage: str = "test",
    max_examples: int = 0,
    method: str | None = None,
    command: str | None = None,
    seed: int = 0,
    extra: dict | None = None,
    fit_seconds: float = 0.0,
) -> list[ResultRecord]:
    """Records of any Recommender on ``split``: multi-target full ranking on the hold-out split,
    single-target full ranking (HR/NDCG@K) plus 20-candidate ranking on the shared next-item splits.

    ``seconds`` of a record is ``fit_seconds`` (training time, passed by the caller) plus the time of
    that record's own evaluation; both parts are also in ``extra``.
    """
    examples = split.stage(stage)
    if max_examples:
        examples = examples.iloc[:max_examples]
    method = method or rec.name
    command = command if command is not None else current_command()
    base = {"dataset": split.dataset, "split": split.name, "method": method, "seed": seed, "command": command}
    records = []
    extra = {"fit_seconds": round(fit_seconds, 1), **(extra or {})}

    def record(protocol: str, metrics: dict, n: int, t0: float, more: dict) -> ResultRecord:
        ev = time.time() - t0
        return ResultRecord(
            protocol=protocol,
            metrics=metrics,
            n_examples=n,
            seconds=round(fit_seconds + ev, 1),
            extra={**more, **extra, "eval_seconds": round(ev, 1)},
            **base,
        )

    t = time.time()
    if split.name == HOLDOUT_SPLIT:
        examples = with_targets(examples)
        m = evaluate_multi_target(rec, examples, ks=(10, 20, 40, 100))
        more = {
            "targets": f"held-out set: {split.notes[0]}; seen items excluded",
            "recall": "hits@K / min(K, |targets|)",
            "ndcg": "binary gain 1/log2(rank+1), IDCG over min(K, |targets|) positions",
        }
        records.append(record("full", m, len(examples), t, more))
        return records
    m = evaluate_full(rec, examples, ks=(1, 5, 10, 20))
    records.append(
        record("full", m, len(examples), t, {"targets": f"{split.name} {stage} item; history excluded"})
    )
    t = time.time()
    m = evaluate_candidates(rec, examples, ks=(1, 5, 10))
    more = {"candidates": f"target + {split.n_candidates - 1} seeded unseen items (shared)"}
    records.append(record("candidates", m, len(examples), t, more))
    return records


@releasing  # the output directory's lock (recalign.rundir) is released on return
def evaluate(
    cfg: CLLM4RecConfig, output: str | Path, backbone=None, base_tokenizer=None
) -> list[ResultRecord]:
    """Score the fine-tuned tables on the split's test (or valid) stage; write metrics.json + records.json.

    In a multi-process run only the main process evaluates; the others return no records.
    """
    from recalign.training import distributed

    out = prepare_dir(cfg, output, "evaluate")
    if not distributed.is_main():
        return []
    with torch_threads(cfg.threads):
        return _evaluate(cfg, out, backbone, base_tokenizer)


def _evaluate(cfg: CLLM4RecConfig, out: Path, backbone, base_tokenizer) -> list[ResultRecord]:
    dataset, split = load_data(cfg)
    rec = load_recommender(cfg, out, dataset, backbone, base_tokenizer)
    train_seconds = 0.0
    training: dict = {}
    for stage in ("pretrain", "finetune"):
        p = out / f"{stage}_log.json"
        if p.is_file():
            log = json.loads(p.read_text())
            train_seconds += float(log.get("seconds", 0.0))
            training[stage] = {k: v for k, v in log.items() if k != "log"}
    backbone_info = (
        json.loads((out / "backbone.json").read_text()) if (out / "backbone.json").is_file() else {}
    )
    reused = out / "pretrain_source.json"
    source = {"pretrain_from": json.loads(reused.read_text())["source"]} if reused.is_file() else {}
    records = evaluate_recommender(
        rec,
        split,
        cfg.eval.stage,
        cfg.eval.max_users,
        method=cfg.method,
        seed=cfg.seed,
        extra={
            "backbone": cfg.model.backbone,
            "backbone_layers": rec.model.depth,
            "backbone_full_layers": rec.model.full_depth,
            "dtype": _dtype_name(rec.model.compute_dtype),
            **{k: v for k, v in backbone_info.items() if k in ("untrained_content_loss", "uniform_bound")},
            # pretraining's own dtype: ``auto`` resolves per machine, and a stage resumed elsewhere may differ
            **({"pretrain_dtype": backbone_info["dtype"]} if "dtype" in backbone_info else {}),
            "settings_differing_from_default": non_default_settings(cfg),
            "training": training,  # per stage: steps, seconds, batches per epoch, curve, best epoch
            **source,  # the run whose pretraining this one started from (reuse_pretrain)
        },
        fit_seconds=train_seconds,
    )
    atomic_write_json(out / "metrics.json", {r.protocol: r.metrics for r in records})
    write_records(out / "records.json", records)
    return records


def describe(model: CLLM4RecModel, tok: IDTokenizer) -> dict:
    """Sizes for logs: trainable parameters are the four ID tables only."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.backbone.parameters())
    return {"trainable": trainable, "frozen": frozen, "id_tokens": tok.total_size - tok.vocab_size}


__all__ = [
    "describe",
    "evaluate",
    "evaluate_recommender",
    "finetune",
    "load_data",
    "load_recommender",
    "pretrain",
    "prepare_dir",
    "reuse_pretrain",
]
