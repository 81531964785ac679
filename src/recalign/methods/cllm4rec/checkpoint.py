"""Checkpoints of a CLLM4Rec stage: ID tables + optimiser state as safetensors, progress as JSON.

Only the four ID tables and the Adam moments are saved — the backbone is frozen and reloaded from its
own files. Optimiser state dicts are flattened into named tensors (``opt.<name>.<param>.<key>``); the
non-tensor parts (hyper-parameters, param-group layout) go into the JSON next to the step counter and
the loss log. No pickle anywhere.

Commit protocol: the tensors go to ``state-<step>.safetensors`` first, then ``state.json`` (which names
that file) is written with write-then-rename. ``state.json`` is the commit point: a crash before it
leaves the previous checkpoint intact and valid; older tensor files are removed only afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from recalign.io import atomic_write_bytes, atomic_write_json
from recalign.methods.cllm4rec.model import CLLM4RecModel

STATE_JSON = "state.json"


def _flatten_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{name}.{pid}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    prefix = f"opt.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, sub = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[sub] = value
    for key, value in meta.get("scalars", {}).items():
        pid, sub = key.split(".", 1)
        state.setdefault(int(pid), {})[sub] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    directory: str | Path,
    model: CLLM4RecModel,
    optimizers: dict[str, torch.optim.Optimizer],
    step: int,
    info: dict,
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"table.{k}": v for k, v in model.id_state().items()}
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = _flatten_optimizer(name, opt)
        tensors.update(t)
        opt_meta[name] = meta
    fname = f"state-{step:07d}.safetensors"
    atomic_write_bytes(directory / fname, save_bytes(tensors))
    atomic_write_json(
        directory / STATE_JSON, {"step": step, "tensors": fname, "optimizers": opt_meta, **info}
    )
    for old in directory.glob("state-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)


def load_checkpoint(
    directory: str | Path, model: CLLM4RecModel, optimizers: dict[str, torch.optim.Optimizer]
) -> dict | None:
    """Restore the last committed checkpoint into ``model`` and ``optimizers``; its JSON, or None."""
    directory = Path(directory)
    meta_path = directory / STATE_JSON
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    with open(directory / meta["tensors"], "rb") as f:
        tensors = load_bytes(f.read())
    model.load_id_state({k[len("table.") :]: v for k, v in tensors.items() if k.startswith("table.")})
    for name, opt in optimizers.items():
        _restore_optimizer(name, opt, tensors, meta["optimizers"][name])
    return meta
