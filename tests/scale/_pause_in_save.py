"""``python tests/scale/_pause_in_save.py ARGS``: ``recalign ARGS`` whose checkpoint save stops halfway.

``RECALIGN_TEST_PAUSE="<point>:<step>:<flag file>"`` chooses where the save of ``checkpoint-<step>``
stops; the process then writes its pid to the flag file and waits, inside the save, to be killed:

- ``optimizer``: in the middle of writing ``optimizer.pt`` (the new adapter weights are already on
  disk, half of the optimizer state is, the RNG states and ``trainer_state.json`` are not);
- ``marker``: after every file of the checkpoint, before its completeness marker
  (``recalign_checkpoint.json``).

A test-side launcher rather than a hook in the library: recalign itself carries no test switches.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path


def _pause(flag: str) -> None:
    Path(flag).write_text(str(os.getpid()))
    while True:  # until SIGKILL
        time.sleep(60)


def install(spec: str) -> None:
    point, step, flag = spec.split(":", 2)
    ckpt = f"checkpoint-{int(step)}"
    if point == "optimizer":
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            p = Path(f) if isinstance(f, (str, os.PathLike)) else None
            if p is not None and p.name == "optimizer.pt" and p.parent.name == ckpt:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                with open(p, "wb") as fh:  # half the file, as a write cut short leaves it
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _pause(flag)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif point == "marker":
        import recalign.training.trainer as trainer_mod

        real_write = trainer_mod.atomic_write_json

        def write(path, obj):
            p = Path(path)
            if p.name == trainer_mod.COMPLETE_MARKER and p.parent.name == ckpt:
                _pause(flag)
            return real_write(path, obj)

        trainer_mod.atomic_write_json = write
    else:
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    install(os.environ["RECALIGN_TEST_PAUSE"])
    from recalign.cli.main import main

    sys.exit(main(sys.argv[1:]))
