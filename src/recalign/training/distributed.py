"""Process coordination for code that runs under ``accelerate launch`` but outside the Trainer.

The transformers ``Trainer`` (:mod:`recalign.training.trainer`) handles its own data parallelism. Some
recalign stages do not go through it: CLLM4Rec's alternating two-optimiser loop, DPO4Rec's summary
generation and reward model, the knowledge recipe's task mixture and evaluation, the classical
baselines. This module gives them the few primitives they need:

- :func:`world_size`, :func:`rank`, :func:`is_main`: read from the launcher's environment
  (``WORLD_SIZE`` / ``RANK``, set by ``torchrun`` and ``accelerate launch``), so they work before any
  process group exists and cost nothing in a plain one-process run;
- :func:`init`: join the launched process group (the same gloo group on CPU, NCCL on GPUs, that the
  Trainer would create; it reuses an existing one);
- :func:`barrier`, :func:`broadcast`, :func:`all_gather`, :func:`main_first`: coordination on a
  separate gloo group with a long timeout. Stages that run on the main process only (summary
  generation, evaluation) can take hours while the other processes wait; the default group's 30-minute
  timeout would kill those runs. A process that fails makes ``torchrun`` stop all the others, so a long
  timeout never turns into a hang;
- :func:`check_same`: fail loudly when data that must be identical on every process (a task mixture,
  a document stream) is not.

Everything is a no-op (or the identity) when the run has one process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

#: How long a process may wait for another at :func:`barrier` / :func:`broadcast`.
WAIT_TIMEOUT = timedelta(days=7)
_wait_group: Any = None


def world_size() -> int:
    """Processes in this run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files, evaluates and prints (rank 0)."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def init() -> None:
    """Join the launched process group and create the coordination group (no-op for one process).

    Every process must call it at the same point (it is a collective the first time).
    """
    global _wait_group
    if not is_distributed():
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        from recalign.training.config import accelerator_available

        # the same call the Trainer makes (TrainingConfig passes use_cpu when there is no GPU): gloo on CPU
        PartialState(cpu=not accelerator_available())
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def barrier() -> None:
    """Wait until every process gets here."""
    if not is_distributed():
        return
    import torch.distributed as dist

    init()
    dist.barrier(group=_wait_group)


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on the main process first, then on the others (e.g. main computes and caches a
    file, the others then read the cache instead of recomputing and rewriting it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(obj: Any = None) -> Any:
    """The main process's ``obj`` (picklable), on every process."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    init()
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_wait_group)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    init()
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_wait_group)
    return out


def digest(*parts: Any) -> str:
    """A short hash of ``repr`` of the parts (for :func:`check_same`)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
    return h.hexdigest()[:16]


def check_same(value: str, what: str) -> None:
    """Raise on every process if ``value`` (e.g. a :func:`digest`) differs between processes."""
    if not is_distributed():
        return
    values = all_gather(value)
    if len(set(values)) > 1:
        raise RuntimeError(
            f"{what} differs between the {len(values)} processes ({', '.join(values)}); every process must "
            "build it identically"
        )


def all_reduce_sum_(tensors: list) -> None:
    """Sum ``tensors`` over the processes, in place (one flat buffer, one call). CPU tensors go through
    the gloo coordination group, so this also works when the default group is NCCL (GPU machines)."""
    if not is_distributed() or not tensors:
        return
    import torch
    import torch.distributed as dist

    init()
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=_wait_group if flat.device.type == "cpu" else None)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
