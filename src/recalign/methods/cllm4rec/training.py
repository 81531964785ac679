"""The two CLLM4Rec training stages: mutually-regularised pretraining and recommendation fine-tuning.

Why a custom loop (and not the shared SFT trainer): there are two *sides* with their own parameters
and optimisers, updated in alternation. A step updates exactly one side; its loss is that side's LM
loss plus ``λ‖z_side − sg(z_other)‖²`` over the IDs in the batch, so the other side acts as a fixed
prior for this step and becomes the updated one on the next. Two Adam optimisers (one per side) are
needed: a single Adam over both would keep moving the "fixed" side through its momentum even when
its gradient is zero.

Schedules are cycles: in pretraining every collaborative step is followed by ``content_ratio`` content
steps; in fine-tuning every recommendation step by ``finetune.content_ratio`` content steps (the paper
and its released code keep the content LM in fine-tuning). Each step kind reads its own document
stream; stream batch ``k`` lives in epoch ``k // batches_per_epoch``, whose batches are a pure function
of ``(seed, stream, epoch)`` (see :mod:`.documents`). A run resumed from step ``s`` therefore sees
exactly the batches of an uninterrupted run and needs no RNG state beyond the step counter. The
backbone has no dropout (eval mode), so the computation is deterministic.

**Epochs, validation, early stopping.** A stage lasts ``epochs`` passes over its main stream (or exactly
``collab_steps`` / ``steps`` main steps when those are > 0). After every ``validate_every``-th epoch
(and at the end) a ``validate`` callback (the pipeline passes validation Recall@20 of the split's
``valid`` stage) is called; the values, with the epoch's mean losses, form the stage's *curve*. With
``patience`` > 0 the stage stops after that many validations without a better value and the best
epoch's tables are its result. A checkpoint is written at every validation, holding the curve, the
best value and (``best-<step>.safetensors``) the best tables, so a resumed run stops where an
uninterrupted one would, with the same best tables.

When the content side has no user documents (no reviews: item descriptions only), the content user
table is never trained, and regularising collaborative users towards its random rows would only add
noise; the regulariser then covers items only.

**Several processes** (``accelerate launch``, see :mod:`recalign.training.distributed`): data
parallelism as DDP does it, written out because the loop alternates two sides with an optimiser each
(DDP and the Trainer assume one optimiser over one set of trainable parameters, synchronised on every
backward). ``batch_size`` is per process, as everywhere in recalign: a step's *global* batch holds
``batch_size x processes`` documents, the same documents a single process with that batch size would
take, and each process runs the backbone on its contiguous slice of it. Every process computes its
slice's share of the global mean (``local mean x local items / global items``: target tokens for the
LM losses, users for the recommendation loss), the regulariser is added once (by the main process,
over the IDs of the whole global batch), and the side's gradients are summed over processes before
every process takes the same Adam step. So N processes x batch B give the update of 1 process x batch
N·B, up to float rounding (tested). Only the main process writes checkpoints, tables and logs.
Every process runs the validation itself (the tables are the same everywhere, so the values and the
early-stopping decision are too), which keeps the processes in step without a broadcast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError
from recalign.io import atomic_write_bytes
from recalign.methods.cllm4rec.checkpoint import load_checkpoint, save_checkpoint
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.documents import (
    Document,
    collab_documents,
    collate_lm,
    collate_rec,
    content_corpus,
    content_documents,
    ids_in,
    length_buckets,
    rec_documents,
)
from recalign.methods.cllm4rec.model import CLLM4RecModel
from recalign.methods.cllm4rec.vocab import IDTokenizer

Stage = Literal["pretrain", "finetune"]


@dataclass
class TrainingData:
    """What both stages read: the ID tokenizer, the training sequences and the content corpus."""

    tokenizer: IDTokenizer
    sequences: list[np.ndarray]
    corpus: list[tuple[int | None, int, str]]

    @classmethod
    def build(cls, tokenizer: IDTokenizer, dataset: RecDataset, sequences: list[np.ndarray]) -> TrainingData:
        return cls(tokenizer, sequences, content_corpus(dataset, sequences))

    @property
    def content_has_users(self) -> bool:
        return any(u is not None for u, _, _ in self.corpus)


class _Stream:
    """Batches of one document kind, epoch after epoch, addressable by batch number.

    ``make_batches(epoch)`` returns that epoch's batches (a pure function of the epoch); the number of
    batches must not depend on the epoch (true of every document kind: one set of documents per epoch).
    """

    def __init__(self, make_batches: Callable[[int], list[list[Document]]], batch_size: int) -> None:
        self.make_batches = make_batches
        self.batch_size = batch_size
        first = make_batches(0)
        if not first:
            raise ValueError("no training documents")
        self.batches_per_epoch = len(first)
        self._epoch, self._batches = 0, first

    def batch(self, k: int) -> list[Document]:
        epoch, b = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.make_batches(epoch)
        return self._batches[b]


def _bucketed(make_docs: Callable[[int], list[Document]], batch_size: int, seed: int, stream: int):
    return lambda e: length_buckets(make_docs(e), batch_size, seed + 7919 * stream, e)


@dataclass
class StageResult:
    stage: str
    steps: int
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    completed: bool = True
    #: one row per validation: epoch, step, the validation value, the epoch's mean losses
    curve: list[dict] = field(default_factory=list)
    best: dict | None = None
    stopped_early: bool = False
    batches_per_epoch: int = 0

    def mean_loss(self, kind: str, first: bool, n: int = 5) -> float:
        xs = [r["loss"] for r in self.log if r["kind"] == kind]
        xs = xs[:n] if first else xs[-n:]
        return float(np.mean(xs)) if xs else float("nan")

    def summary(self) -> dict:
        return {
            "stage": self.stage,
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "batches_per_epoch": self.batches_per_epoch,
            "curve": self.curve,
            "best": self.best,
            "stopped_early": self.stopped_early,
        }


def _schedule(step: int, ratio: int) -> tuple[int, int]:
    """(kind, stream batch number) of global ``step`` in a cycle of 1 main step + ``ratio`` content
    steps. kind 0 = main (collaborative / recommendation), 1 = content."""
    cycle = 1 + ratio
    n_main_before = (step + cycle - 1) // cycle  # main steps at 0, cycle, 2·cycle, ...
    if step % cycle == 0:
        return 0, step // cycle
    return 1, step - n_main_before


def _shard(docs: list[Document], rank: int, world: int) -> list[Document]:
    """This process's contiguous slice of a global batch (the first processes take one more when the
    batch does not divide evenly; a process may get none at the end of an epoch)."""
    if world == 1:
        return docs
    size = -(-len(docs) // world)
    return docs[rank * size : (rank + 1) * size]


def _loss_items(docs: list[Document], per_document: bool) -> int:
    """What a loss averages over: documents (recommendation loss: users) or target tokens (LM losses)."""
    return len(docs) if per_document else sum(len(d.targets) for d in docs)


def stage_plan(cfg: CLLM4RecConfig, stage: Stage) -> dict:
    """The knobs of one stage under common names."""
    if stage == "pretrain":
        sc = cfg.pretrain
        return {"epochs": sc.epochs, "steps": sc.collab_steps, "ratio": sc.content_ratio,
                "lam": sc.mutual_lambda, "lr": sc.lr, "user_lr_scale": sc.user_lr_scale,
                "every": sc.checkpoint_every,
                "validate_every": sc.validate_every, "patience": sc.patience}  # fmt: skip
    fc = cfg.finetune
    return {"epochs": fc.epochs, "steps": fc.steps, "ratio": fc.content_ratio, "lam": fc.mutual_lambda,
            "lr": fc.lr, "user_lr_scale": fc.user_lr_scale, "every": fc.checkpoint_every,
            "validate_every": fc.validate_every,
            "patience": fc.patience}  # fmt: skip


def _adam(params: list[torch.nn.Parameter], lr: float, user_lr_scale: float) -> torch.optim.Adam:
    """Adam over one side's ``[user table, item table]``; the user table at ``lr x user_lr_scale``.

    At scale 1 it is one parameter group, as before the option existed, so that checkpoints written
    then still load their optimiser state.
    """
    if user_lr_scale == 1.0:
        return torch.optim.Adam(params, lr=lr)
    users, items = params
    return torch.optim.Adam([{"params": [users], "lr": lr * user_lr_scale}, {"params": [items]}], lr=lr)


def run_stage(
    model: CLLM4RecModel,
    data: TrainingData,
    cfg: CLLM4RecConfig,
    stage: Stage,
    checkpoint_dir: str | Path | None = None,
    stop_after: int | None = None,
    log_fn: Callable[[dict], None] | None = None,
    validate: Callable[[CLLM4RecModel], float] | None = None,
) -> StageResult:
    """Train one stage, resuming from ``checkpoint_dir`` if it holds a checkpoint of this stage.

    Args:
        stop_after: stop (after checkpointing) once this global step count is reached, as if the
            process were killed there; used by tests of resumption and for budgeted runs.
        log_fn: called with every step's record (e.g. to append to a progress log file).
        validate: ``model -> value`` (higher is better, e.g. validation Recall@20), called at the
            validation points (see the module doc); None = no validation, no early stopping.
    """
    from recalign.training import distributed

    distributed.init()
    world, rank = distributed.world_size(), distributed.rank()
    main_process = rank == 0
    tok, seed = data.tokenizer, cfg.seed
    plan = stage_plan(cfg, stage)
    ratio, lam, lr, every = plan["ratio"], plan["lam"], plan["lr"], plan["every"]
    pack = cfg.pretrain.pack_tokens
    if stage == "pretrain":
        sc = cfg.pretrain
        make_main = lambda e: collab_documents(tok, data.sequences, sc.max_items, seed, e)  # noqa: E731
        main_bs = sc.batch_size * world
        main_loss, collate_main = model.collab_lm_loss, lambda d, pad: collate_lm(d, pad, pack)
    else:
        fc = cfg.finetune
        make_main = lambda e: rec_documents(  # noqa: E731
            tok, data.sequences, fc.max_items, fc.mask_ratio, seed, e
        )
        main_bs = fc.batch_size * world
        main_loss, collate_main = model.rec_loss, collate_rec
    content_bs, max_text = cfg.pretrain.content_batch_size, cfg.pretrain.max_text_tokens
    stream_id = 1 if stage == "pretrain" else 3
    main = _Stream(_bucketed(make_main, main_bs, seed, stream_id), main_bs)
    bpe = main.batches_per_epoch
    main_steps = plan["steps"] if plan["steps"] > 0 else plan["epochs"] * bpe
    total = main_steps * (1 + ratio)
    cache: dict = {}
    content = (
        _Stream(
            _bucketed(
                lambda e: content_documents(tok, data.corpus, max_text, seed, e, cache),
                content_bs * world,
                seed,
                2,
            ),
            content_bs * world,
        )
        if ratio
        else None
    )
    if world > 1:  # every process must walk the same document streams
        distributed.check_same(
            distributed.digest([s.tolist() for s in data.sequences], data.corpus, main.batch(0)),
            "the CLLM4Rec training data",
        )
    global_batch = [main.batch_size, content.batch_size if content is not None else 0]
    optimizers = {
        side: _adam(model.side_parameters(side), lr, plan["user_lr_scale"]) for side in ("collab", "content")
    }
    reg_users = data.content_has_users
    validate_every, patience = plan["validate_every"], plan["patience"]
    if validate is None:
        validate_every = 0

    start, log, seconds_before = 0, [], 0.0
    curve: list[dict] = []
    best: dict | None = None  # {"value", "epoch", "step", "file"}
    finished = False
    best_tables: dict | None = None  # in memory when there is no checkpoint directory
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model, optimizers)
        if meta is not None:
            if meta.get("stage") != stage:
                raise ValueError(f"{ckpt} holds a '{meta.get('stage')}' checkpoint, not '{stage}'")
            saved = meta.get("global_batch", global_batch)
            if saved != global_batch:
                raise RecalignInputError(
                    f"checkpoint was written with global batches {saved} (batch size x processes), this "
                    f"run has {global_batch}; resume with the same global batch",
                    source=ckpt,
                )
            start, log = int(meta["step"]), list(meta.get("log", []))
            seconds_before = float(meta.get("seconds", 0.0))
            curve, best = list(meta.get("curve", [])), meta.get("best")
            finished = bool(meta.get("finished", False))

    t0 = time.time()

    def checkpoint(step: int, done: bool = False) -> None:
        if ckpt is not None and main_process:
            info = {"stage": stage, "total": total, "seconds": seconds_before + time.time() - t0, "log": log,
                    "global_batch": global_batch, "world_size": world, "curve": curve, "best": best,
                    "finished": done, "batches_per_epoch": bpe}  # fmt: skip
            save_checkpoint(ckpt, model, optimizers, step, info)
            for old in ckpt.glob("best-*.safetensors"):  # only the committed best file is kept
                if best is None or old.name != best.get("file"):
                    old.unlink(missing_ok=True)

    def run_validation(step: int, main_done: int) -> bool:
        """Validate, extend the curve, track the best; True = stop here (patience exhausted)."""
        nonlocal best, best_tables
        value = float(validate(model))
        model.train()
        since = [r for r in log if r["step"] > (curve[-1]["step"] if curve else 0)]
        losses = {}
        for r in since:
            losses.setdefault(r["kind"], []).append(r["loss"])
        row = {"epoch": round(main_done / bpe, 3), "step": step, "valid_recall@20": round(value, 5),
               "loss": {k: round(float(np.mean(v)), 5) for k, v in losses.items()},
               "reg": round(float(np.mean([r["reg"] for r in since])), 5) if since else 0.0}  # fmt: skip
        curve.append(row)
        if best is None or value > best["value"]:
            best = {
                "value": value,
                "epoch": row["epoch"],
                "step": step,
                "file": f"best-{step:07d}.safetensors",
            }
            best_tables = model.id_state()
            if ckpt is not None and main_process:  # committed by the next state.json (resume)
                from safetensors.torch import save as save_bytes

                ckpt.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(ckpt / best["file"], save_bytes(best_tables))
        bad = sum(1 for _ in _since_best(curve, best))
        if main_process and cfg.progress:
            tqdm.write(f"cllm4rec {stage} epoch {row['epoch']}: valid Recall@20 {value:.4f} "
                       f"(best {best['value']:.4f} at epoch {best['epoch']})")  # fmt: skip
        return patience > 0 and bad >= patience

    model.train()
    end = total if stop_after is None else min(total, stop_after)
    if finished:
        end = start
    stopped_early = finished and start < total
    bar = tqdm(
        range(start, end),
        desc=f"cllm4rec {stage}",
        unit="step",
        disable=not (cfg.progress and main_process),
        initial=start,
        total=total,
    )
    for step in bar:
        kind, k = _schedule(step, ratio)
        if kind == 0:
            docs, side, name = main.batch(k), "collab", ("collab" if stage == "pretrain" else "rec")
            collate, loss_fn, per_doc = collate_main, main_loss, stage == "finetune"
        else:
            docs, side, name = content.batch(k), "content", "content"
            collate, loss_fn, per_doc = (
                (lambda d, pad: collate_lm(d, pad, pack)),
                model.content_lm_loss,
                False,
            )
        local = _shard(docs, rank, world)
        n_local = _loss_items(local, per_doc)
        if n_local:
            lm = loss_fn(collate(local, tok.pad_id))
            if world > 1:  # this slice's share of the global batch's mean
                lm = lm * (n_local / _loss_items(docs, per_doc))
        else:  # nothing of this global batch is left for this process
            lm = model.collab_item.weight.new_zeros(())
        ids = ids_in(docs)  # the regulariser covers the IDs of the whole global batch
        users = ids["users"] if reg_users else ids["users"][:0]
        reg = model.mutual_regulariser(side, users, ids["items"], lam)
        loss = lm + reg if main_process else lm  # the regulariser's gradient is added once
        opt = optimizers[side]
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        lm_value = lm.detach().reshape(1).clone()
        if world > 1:
            params = model.side_parameters(side)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_reduce_sum_([*(p.grad for p in params), lm_value])
        opt.step()
        rec = {"step": step + 1, "kind": name, "loss": lm_value.item(), "reg": reg.item()}
        log.append(rec)
        if log_fn is not None and main_process:
            log_fn(rec)
        bar.set_postfix({name: f"{rec['loss']:.3f}", "reg": f"{rec['reg']:.3f}"})
        g = step + 1
        main_done = -(-g // (1 + ratio))
        cycle_done = g % (1 + ratio) == 0
        at_epoch = cycle_done and main_done % bpe == 0 and (main_done // bpe) % max(validate_every, 1) == 0
        if validate_every and ((at_epoch and g < total) or g == total):
            if run_validation(g, main_done):
                stopped_early = g < total
                end = g
                break
            checkpoint(g)
        elif every and g % every == 0 and g < end:
            checkpoint(g)
    bar.close()
    done = end == total or stopped_early
    checkpoint(end, done=done)
    if done and patience > 0 and best is not None:  # the stage's result is its best validation point
        if best_tables is not None:
            model.load_id_state(best_tables)
        elif ckpt is not None and (ckpt / best["file"]).is_file():  # found by an earlier process
            from safetensors.torch import load_file

            model.load_id_state(load_file(ckpt / best["file"]))
    model.eval()
    # seconds are cumulative over resumptions: the cost of the stage, not of this process
    return StageResult(stage, end, log, seconds_before + time.time() - t0, completed=done, curve=curve,
                       best=best, stopped_early=stopped_early, batches_per_epoch=bpe)  # fmt: skip


def _since_best(curve: list[dict], best: dict | None):
    """The validations after the best one (the patience counter)."""
    if best is None:
        return iter(())
    return (r for r in curve if r["step"] > best["step"])
