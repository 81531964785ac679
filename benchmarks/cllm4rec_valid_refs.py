"""Validation Recall@20 of popularity and BPR-MF on CLLM4Rec's holdout validation stage.

CLLM4Rec's early stopping reads Recall@20 on the holdout split's validation stage (the 10% of each user's
interactions just before the test 20%); its curve (``curve.json`` of a run) means little without the
classical recommenders' numbers on the same targets. This fits popularity and BPR-MF on the same training
part (the first 70%) and scores them with the validator's own function (``evaluate_multi_target``, every
user of the validation stage). Seconds on one thread.

Usage::

    python benchmarks/cllm4rec_valid_refs.py [--config configs/cllm4rec_ml100k.yaml]
        [--output results/cllm4rec_valid_refs.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recalign.baselines import make_baseline
from recalign.config import load_config
from recalign.evaluation.records import script_command
from recalign.logs import parse_args as quiet_parse_args
from recalign.methods.cllm4rec import pipeline
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.protocol import evaluate_multi_target, holdout_split
from recalign.methods.cllm4rec.recommender import validation_examples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cllm4rec_ml100k.yaml")
    ap.add_argument("--output", default="results/cllm4rec_valid_refs.json")
    args = quiet_parse_args(ap, argv)
    cfg = load_config(CLLM4RecConfig, args.config, [])
    dataset, _ = pipeline.load_data(cfg)
    d = cfg.data
    split = holdout_split(dataset, d.holdout_ratio, seed=d.split_seed, valid_ratio=d.valid_ratio)
    examples = validation_examples(split, 0)
    if examples is None:
        raise SystemExit(
            f"error: {args.config}: data.valid_ratio is 0, the holdout split has no validation stage"
        )
    rows = []
    for name in ("pop", "bprmf"):
        rec = make_baseline(name, progress=False, **({} if name == "pop" else {"threads": 1}))
        rec.fit(dataset, split)
        recall = evaluate_multi_target(rec, examples, ks=(20,))["Recall@20"]
        rows.append({"method": name, "valid_recall@20": round(float(recall), 5), "n_users": len(examples)})
        print(f"{name}: validation Recall@20 {recall:.4f} over {len(examples)} users", flush=True)
    # the cross-entropy of a popularity unigram over the training part: the bar a collaborative LM's
    # next-item loss (pretraining's "collab" in curve.json) must go under before it models more than counts
    counts = np.bincount(np.concatenate([np.asarray(x) for x in split.train_sequences(dataset)]))
    freq = counts[counts > 0] / counts.sum()
    command = script_command("benchmarks/cllm4rec_valid_refs.py", argv)
    out = {
        "command": command,
        "config": args.config,
        "split": {"holdout_ratio": d.holdout_ratio, "valid_ratio": d.valid_ratio, "split_seed": d.split_seed},
        "records": rows,
        "collab_loss_bars": {
            "popularity_unigram_nats": round(float(-(freq * np.log(freq)).sum()), 4),
            "uniform_nats": round(float(np.log(dataset.n_items)), 4),
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
