"""The two CLLM4Rec training stages: mutually-regularised pretraining and recommendation fine-tuning.

Why a custom loop (and not the shared SFT trainer): there are two *sides* with their own parameters
and optimisers, updated in alternation. A step updates exactly one side; its loss is that side's LM
loss plus ``λ‖z_side − sg(z_other)‖²`` over the IDs in the batch, so the other side acts as a fixed
prior for this step and becomes the updated one on the next. Two Adam optimisers (one per side) are
needed: a single Adam over both would keep moving the "fixed" side through its momentum even when
its gradient is zero.

Schedules are cycles: in pretraining every collaborative step is followed by ``content_ratio`` content
steps; in fine-tuning every recommendation step by ``finetune.content_ratio`` content steps. Each step
kind reads its own document stream; stream batch ``k`` lives in epoch ``k // batches_per_epoch``, whose
documents are a pure function of ``(seed, stream, epoch)`` (see :mod:`.documents`). A run resumed from
step ``s`` therefore sees exactly the batches of an uninterrupted run and needs no RNG state beyond
the step counter. The backbone has no dropout (eval mode), so the computation is deterministic.

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
    """Batches of one document kind, epoch after epoch, addressable by batch number."""

    def __init__(self, make_docs: Callable[[int], list[Document]], batch_size: int) -> None:
        self.make_docs = make_docs
        self.batch_size = batch_size
        self._epoch = -1
        self._docs: list[Document] = []
        first = make_docs(0)
        if not first:
            raise ValueError("no training documents")
        self.batches_per_epoch = max(1, (len(first) + batch_size - 1) // batch_size)
        self._epoch, self._docs = 0, first

    def batch(self, k: int) -> list[Document]:
        epoch, b = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._docs = epoch, self.make_docs(epoch)
        return self._docs[b * self.batch_size : (b + 1) * self.batch_size]


@dataclass
class StageResult:
    stage: str
    steps: int
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    completed: bool = True

    def mean_loss(self, kind: str, first: bool, n: int = 5) -> float:
        xs = [r["loss"] for r in self.log if r["kind"] == kind]
        xs = xs[:n] if first else xs[-n:]
        return float(np.mean(xs)) if xs else float("nan")


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


def run_stage(
    model: CLLM4RecModel,
    data: TrainingData,
    cfg: CLLM4RecConfig,
    stage: Stage,
    checkpoint_dir: str | Path | None = None,
    stop_after: int | None = None,
    log_fn: Callable[[dict], None] | None = None,
) -> StageResult:
    """Train one stage, resuming from ``checkpoint_dir`` if it holds a checkpoint of this stage.

    Args:
        stop_after: stop (after checkpointing) once this global step count is reached, as if the
            process were killed there; used by tests of resumption and for budgeted runs.
        log_fn: called with every step's record (e.g. to append to a progress log file).
    """
    from recalign.training import distributed

    distributed.init()
    world, rank = distributed.world_size(), distributed.rank()
    main_process = rank == 0
    tok, seed = data.tokenizer, cfg.seed
    if stage == "pretrain":
        sc = cfg.pretrain
        main_steps, ratio, lam = sc.collab_steps, sc.content_ratio, sc.mutual_lambda
        main = _Stream(
            lambda e: collab_documents(tok, data.sequences, sc.max_items, seed, e, sc.docs_per_user),
            sc.batch_size * world,
        )
        main_loss, content_bs, lr, every = (
            model.collab_lm_loss,
            sc.content_batch_size,
            sc.lr,
            sc.checkpoint_every,
        )
        max_text, collate_main = sc.max_text_tokens, collate_lm
    else:
        fc = cfg.finetune
        main_steps, ratio, lam = fc.steps, fc.content_ratio, fc.mutual_lambda
        main = _Stream(
            lambda e: rec_documents(tok, data.sequences, fc.max_items, fc.mask_ratio, seed, e),
            fc.batch_size * world,
        )
        main_loss, content_bs, lr, every = (
            model.rec_loss,
            cfg.pretrain.content_batch_size,
            fc.lr,
            fc.checkpoint_every,
        )
        max_text, collate_main = cfg.pretrain.max_text_tokens, collate_rec
    total = main_steps * (1 + ratio)
    cache: dict = {}
    content = (
        _Stream(lambda e: content_documents(tok, data.corpus, max_text, seed, e, cache), content_bs * world)
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
        "collab": torch.optim.Adam(model.side_parameters("collab"), lr=lr),
        "content": torch.optim.Adam(model.side_parameters("content"), lr=lr),
    }
    reg_users = data.content_has_users

    start, log, seconds_before = 0, [], 0.0
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

    t0 = time.time()

    def checkpoint(step: int) -> None:
        if ckpt is not None and main_process:
            info = {"stage": stage, "total": total, "seconds": seconds_before + time.time() - t0, "log": log,
                    "global_batch": global_batch, "world_size": world}  # fmt: skip
            save_checkpoint(ckpt, model, optimizers, step, info)

    model.train()
    end = total if stop_after is None else min(total, stop_after)
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
            collate, loss_fn, per_doc = collate_lm, model.content_lm_loss, False
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
        if every and (step + 1) % every == 0 and step + 1 < end:
            checkpoint(step + 1)
    bar.close()
    checkpoint(end)
    model.eval()
    # seconds are cumulative over resumptions: the cost of the stage, not of this process
    return StageResult(stage, end, log, seconds_before + time.time() - t0, completed=end == total)
