"""How much does CLLM4Rec's collaborative LM use the *user* token? -> ``results/cllm4rec_user_signal.json``.

Pretraining's collaborative loss on ML-100K sits near a popularity unigram's (6.58 vs 6.59 nats after ten
epochs, README). A next-item model can beat the unigram from two sources: the user token (who this is)
and the items already listed in the document (what they watched). This probe separates them on trained
tables: the same collaborative documents are scored

- **own**: as trained, ``"<user_u> has interacted with <items…>"``;
- **swapped**: the same items after another user's token (a fixed derangement of the scored users), so
  the user's information is replaced by someone else's while the item context is kept;

and both are compared with the popularity unigram of the training interactions. Reported per target
(every item of every document) and separately for the **first** item of each document, which is predicted
from the prompt alone (no item context): there, ``own`` vs ``swapped`` vs unigram is the user token's
whole contribution. Differences are paired per document, with their standard error over documents.

Forward passes only (no training): ~1 s per batch of 16 documents on SmolLM2 (2 CPU threads, float32).

Usage: ``python benchmarks/cllm4rec_user_signal.py --run-dir runs/cllm4rec/cllm4rec-s0-holdout
[--tables best|pretrain|init|PATH] [--users 200]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from recalign.evaluation.records import script_command
from recalign.logs import parse_args

STAT_KEYS = ("own", "swapped", "unigram")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)`` with no fixed point (``n >= 2``): every user gets someone else's token."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 users")
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def unigram_log_probs(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """log p(item) of the popularity unigram over the training interactions (distinct items per user,
    as the collaborative documents list them); items never seen get log 0 = -inf."""
    counts = np.zeros(n_items, dtype=np.float64)
    for s in sequences:
        counts[np.unique(np.asarray(s, dtype=np.int64))] += 1
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


@torch.no_grad()
def doc_nlls(model, docs, pad_id: int, batch_size: int) -> list[np.ndarray]:
    """Per document, the collaborative NLL of each of its targets (same order as ``doc.targets``)."""
    from recalign.methods.cllm4rec.documents import collate_lm

    model.eval()
    out: list[np.ndarray] = []
    for b in range(0, len(docs), batch_size):
        part = docs[b : b + batch_size]
        nll = model.collab_target_nlls(collate_lm(part, pad_id)).numpy()
        start = 0
        for d in part:  # collate_lm lists targets document by document
            out.append(nll[start : start + len(d.targets)].astype(np.float64))
            start += len(d.targets)
    return out


def with_user(tok, doc, user: int):
    """``doc`` with its prompt rebuilt for ``user`` (same items, same targets)."""
    from dataclasses import replace

    from recalign.methods.cllm4rec.documents import collab_prompt

    return replace(doc, user=user, prompt=collab_prompt(tok, user))


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return {"mean": round(float(d.mean()), 4), "se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4)}


def user_signal(model, tok, sequences, *, users, max_items: int, seed: int, batch_size: int = 16) -> dict:
    """Own / swapped-user / unigram NLL of the collaborative documents of ``users`` (epoch-0 documents of
    the pretraining sampler with ``seed``), over all targets and over each document's first target."""
    from recalign.methods.cllm4rec.documents import collab_documents

    chosen = sorted(int(u) for u in users)
    wanted = set(chosen)
    docs = [d for d in collab_documents(tok, sequences, max_items, seed, 0) if d.user in wanted]
    perm = derangement(len(chosen), np.random.default_rng([seed, 31337]))
    other = {u: chosen[j] for u, j in zip(chosen, perm)}
    swapped = [with_user(tok, d, other[d.user]) for d in docs]
    logp = unigram_log_probs(sequences, model.n_items)
    own_n = doc_nlls(model, docs, tok.pad_id, batch_size)
    swap_n = doc_nlls(model, swapped, tok.pad_id, batch_size)
    uni_n = [-logp[np.asarray(d.targets)] for d in docs]
    per = {"own": own_n, "swapped": swap_n, "unigram": uni_n}
    doc_mean = {k: np.array([x.mean() for x in v]) for k, v in per.items()}
    first = {k: np.array([x[0] for x in v]) for k, v in per.items()}
    n_targets = int(sum(len(d.targets) for d in docs))
    return {
        "users": len(chosen),
        "documents": len(docs),
        "targets": n_targets,
        "mean_nll_per_target": {
            k: round(float(np.concatenate(v).sum() / n_targets), 4) for k, v in per.items()
        },
        "first_target_nll": {k: round(float(v.mean()), 4) for k, v in first.items()},
        "paired_per_document": {
            "swapped_minus_own": paired(doc_mean["swapped"], doc_mean["own"]),
            "unigram_minus_own": paired(doc_mean["unigram"], doc_mean["own"]),
            "first_swapped_minus_own": paired(first["swapped"], first["own"]),
            "first_unigram_minus_own": paired(first["unigram"], first["own"]),
        },
    }


def resolve_tables(run_dir: Path, which: str) -> Path | None:
    """``best``: the best-validation tables of pretraining so far (running or finished); ``pretrain``:
    the finished stage's tables; ``init``: none (the seeded initialisation); otherwise a path."""
    if which == "init":
        return None
    if which == "pretrain":
        return run_dir / "pretrain.safetensors"
    if which == "best":
        state = json.loads((run_dir / "checkpoints" / "pretrain" / "state.json").read_text())
        best = state.get("best")  # the checkpoint's state.json carries the stage's best-so-far
        if not best:
            raise SystemExit(f"{run_dir}: pretraining has no validated epoch yet")
        return run_dir / "checkpoints" / "pretrain" / best["file"]
    return Path(which)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a CLLM4Rec run directory (its config.yaml is used)")
    ap.add_argument("--tables", default="best", help="best | pretrain | init | a safetensors path")
    ap.add_argument("--users", type=int, default=200, help="users scored (a seeded sample)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="results/cllm4rec_user_signal.json")
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise

    from recalign.config import load_config
    from recalign.methods.cllm4rec import pipeline
    from recalign.methods.cllm4rec.config import CLLM4RecConfig
    from recalign.methods.cllm4rec.recommender import build_model

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    cfg = load_config(CLLM4RecConfig, run_dir / "config.yaml")
    dataset, split = pipeline.load_data(cfg)
    model, tok = build_model(cfg, dataset.n_users, dataset.n_items)
    tables = resolve_tables(run_dir, args.tables)
    if tables is not None:
        model.load_tables(tables)
    sequences = split.train_sequences(dataset)
    active = [u for u, s in enumerate(sequences) if len(s)]
    users = np.random.default_rng([cfg.seed, 4242]).choice(
        active, size=min(args.users, len(active)), replace=False
    )
    t0 = time.time()
    row = user_signal(model, tok, sequences, users=users, max_items=cfg.pretrain.max_items, seed=cfg.seed)
    row = {
        "run_dir": str(run_dir),
        "tables": args.tables if tables is None else str(tables),
        "dtype": str(model.compute_dtype).removeprefix("torch."),
        "backbone_layers": model.depth,
        **row,
        "seconds": round(time.time() - t0, 1),
        "command": script_command("benchmarks/cllm4rec_user_signal.py", argv),
    }
    print(json.dumps(row, indent=2), flush=True)
    path = Path(args.output)
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    old = [r for r in old if (r["run_dir"], r["tables"]) != (row["run_dir"], row["tables"])] + [row]
    out = {
        "what": "collaborative NLL with the user's own token vs another user's vs the popularity unigram",
        "runs": old,
    }
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
