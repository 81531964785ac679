"""DPO4Rec on MovieLens-100K: SASRec alone vs SASRec + unaligned summaries vs SASRec + aligned summaries.

What is measured (all on the same selected users' ``loo`` test examples and the split's 20 shared
candidates, candidate-ranking protocol):

``sasrec``
    The SASRec backbone of the run (RecBole defaults), without any summary.
``sasrec+summaries-unaligned``
    The summary-augmented SASRec (gated fusion of the all-MiniLM-L6-v2 embedding of a summary into
    SASRec's user vector), given one greedy summary per user from SmolLM2-135M-Instruct as shipped.
``sasrec+summaries-aligned``
    The same recommender, given one greedy summary per user from SmolLM2 after T DPO rounds on best/worst
    pairs of its own N sampled summaries (reward = the log-probability of the true valid item under the
    augmented recommender's softmax over the candidates, cross-fitted; ``reward: rr`` / ``ndcg`` for the
    reciprocal rank / NDCG@5). ``sasrec+summaries-iter{t}`` (protocol ``candidates``): the LM after t < T
    rounds on the test users.
``sasrec+summaries-iter{t}`` (protocol ``candidates/valid-samples``)
    The augmented recommender on the *valid* examples over all N sampled summaries of the LM after t
    rounds (the samples the rewards and pairs of round t + 1 come from), for t = 0..T: before and after
    each round; ``extra.usable_pairs`` / ``tied_users`` count the pairs they gave.

Each record's ``extra`` carries the mean reward of the N sampled summaries per user before and after
alignment (on the users' *valid* examples, the quantity DPO optimises); the file's top-level
``extra.runs[<variant>]`` holds each run's reward details, pair counts (including users skipped because
all N summaries tied), DPO diagnostics, stage timings and resolved config, copied from its
``metrics.json``. ``--method-suffix`` / ``--merge`` add a variant run (e.g. another reward) to the same
file without touching the other records.

``--text-signal-check`` adds a diagnostic (``extra.runs[...].text_signal_check``): the fusion model
trained with each example's own summary vs the same summaries shuffled across examples, compared by
held-out cross-entropy, for the LM's summaries and for rule-written genre summaries of every user.

The run itself is ``recalign.methods.dpo4rec.recipe.run_dpo4rec`` (the same code as ``recalign dpo4rec``);
it is resumable, so rerunning the same command after an interruption continues where it stopped.

Run:  python benchmarks/dpo4rec.py --config configs/dpo4rec_ml100k.yaml --run-dir runs/dpo4rec_ml100k \
          --output results/dpo4rec_ml100k.json [--samples N] [--iterations T] [--users U] \
          [--text-signal-check] [key=value ...]
(N, T, U and everything else default to the config: N = 8, T = 2, U = 150.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def _template_summary(history, genres, years) -> str:
    """A summary written by a rule instead of an LM: the 3 most frequent genres and the median decade."""
    from collections import Counter

    import numpy as np

    recent = list(history[-10:])
    counts = Counter(g for i in recent for g in str(genres[i]).split("|") if g)
    top = [g for g, _ in counts.most_common(3)] or ["various"]
    ys = [int(years[i]) for i in recent if str(years[i]).isdigit()]
    era = f"the {(int(np.median(ys)) // 10) * 10}s" if ys else "various eras"
    names = ", ".join(top[:-1]) + f" and {top[-1]}" if len(top) > 1 else top[0]
    return f"This user mostly watches {names} movies from {era}."


def text_signal_check(cfg, run_dir: Path) -> dict:
    """Does summary text help the augmented SASRec at all, on users it was not trained on?

    Trains the fusion model (the run's settings; 20 % of users held out for the epoch choice) twice on
    the same examples -- once with each example's own summary, once with the summaries shuffled across
    examples -- and reports the held-out cross-entropy. Done for the LM's sampled summaries (the run's
    iteration-0 summaries of its users) and for rule-written genre summaries of *every* user (an easy,
    informative text the LM could at best match). If real and shuffled text give the same held-out loss,
    the recommender cannot tell a useful summary from a useless one, and its rewards cannot either.
    """
    import dataclasses

    import numpy as np

    from recalign.data.prepare import prepare
    from recalign.methods.dpo4rec import stages as S
    from recalign.methods.dpo4rec.encoder import make_encoder
    from recalign.methods.dpo4rec.summaries import SummaryRecord, read_jsonl

    split, ds, _ = prepare(cfg.data)
    sasrec, _ = S.fit_or_load_sasrec(cfg, ds, split, run_dir, False)
    enc = make_encoder(cfg.encoder.kind)
    item_text = S.item_text_embeddings(ds, enc) if cfg.fusion.item_text else None
    fcfg = dataclasses.replace(cfg.fusion, holdout_fraction=0.2)
    cfg2 = dataclasses.replace(cfg, fusion=fcfg, progress=False)
    users = {d["user"]: d["fold"] for d in json.loads((run_dir / "users.json").read_text())["users"]}
    lm = [SummaryRecord(**r) for r in read_jsonl(run_dir / "summaries" / "iter0.jsonl")]
    valid_all = split.stage("valid").reset_index(drop=True)
    genres, years = ds.items["genres"].tolist(), ds.items["year"].tolist()
    rule = [
        SummaryRecord(
            user=int(u), position=int(p), sample=0, prompt="", text=_template_summary(h, genres, years)
        )
        for u, p, h in zip(valid_all["user"], valid_all["position"], valid_all["history"])
    ]
    out = {}
    for name, recs, valid in (
        ("lm_summaries", lm, S.one_per_user(valid_all, users)),
        ("rule_summaries_all_users", rule, valid_all),
    ):
        hist, emb, tgt, _ = S.fusion_inputs(recs, valid, enc)
        groups = np.array([r.user for r in recs])
        row = {"examples": len(recs), "users": len(set(groups.tolist())), "example_text": recs[0].text}
        for variant, e in (("own", emb), ("shuffled", emb[np.random.default_rng(0).permutation(len(emb))])):
            m = S.make_fusion(cfg2, sasrec, enc.dim, item_text, False)
            m.fit(hist, e, tgt, groups)
            h = m.fit_info["history"]
            row[variant] = {
                "holdout_loss_epoch1": h[0]["holdout_loss"],
                "best_holdout_loss": m.fit_info["best_holdout_loss"],
                "best_epoch": m.fit_info["best_epoch"],
                "text_match": m.fit_info["text_match"],
            }
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/dpo4rec_ml100k.yaml")
    p.add_argument("--run-dir", default="runs/dpo4rec_ml100k", help="the run's output directory (resumable)")
    p.add_argument("--output", default="results/dpo4rec_ml100k.json")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--users", type=int, default=None)
    p.add_argument(
        "--method-suffix",
        default="",
        help="appended to the method names of this run's LM records (a variant, e.g. '-logprob')",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge into an existing --output: replace records with the same method, keep the others",
    )
    p.add_argument("--skip-methods", default="", help="comma-separated methods not to write (e.g. sasrec)")
    p.add_argument(
        "--text-signal-check",
        action="store_true",
        help="also train the fusion with own vs shuffled summaries (LM and rule-written) and report "
        "held-out cross-entropy: does the summary text carry any signal the recommender can use?",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    from recalign.logs import parse_args as quiet_parse_args

    args = quiet_parse_args(p, argv)

    from recalign.config import config_to_dict
    from recalign.evaluation.records import script_command
    from recalign.io import atomic_write_json
    from recalign.methods.dpo4rec.config import load_dpo4rec_config
    from recalign.methods.dpo4rec.recipe import run_dpo4rec

    command = script_command("benchmarks/dpo4rec.py", argv)
    cfg = load_dpo4rec_config(
        args.config, args.overrides, samples=args.samples, iterations=args.iterations, users=args.users
    )
    result = run_dpo4rec(cfg, args.run_dir, command=command)
    m = result.metrics
    skip = {x for x in args.skip_methods.split(",") if x}
    records = []
    for r in result.records:
        d = r.to_dict()
        if d["method"] in skip:
            continue
        if d["method"] != "sasrec":
            d["method"] += args.method_suffix
        records.append(d)
    run_extra = {
        "command": command,
        "reward": m["reward"],
        "pairs": m["pairs"],
        "per_iteration": m.get("per_iteration", {}),
        "dpo": m["dpo"],
        "fusion": m["fusion"],
        "sasrec": m["sasrec"],
        "users": m["users"],
        "samples_per_user": m["samples_per_user"],
        "iterations": m["iterations"],
        "seconds": m["seconds"],
        "config": config_to_dict(cfg),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": cfg.threads},
    }
    out = Path(args.output)
    payload = {"records": [], "extra": {"runs": {}}}
    if args.merge and out.is_file():
        payload = json.loads(out.read_text(encoding="utf-8"))
        payload.setdefault("extra", {}).setdefault("runs", {})
    methods = {d["method"] for d in records}
    payload["records"] = [d for d in payload["records"] if d["method"] not in methods] + records
    if args.text_signal_check:
        run_extra["text_signal_check"] = text_signal_check(cfg, Path(args.run_dir))
    payload["extra"]["runs"][args.method_suffix or "default"] = run_extra
    atomic_write_json(out, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
