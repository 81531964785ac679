"""Whole-catalogue top-10 for one user: the exact pruned trie search vs exhaustive scoring.

For a few seeded ML-100K test users (loo split; the prompt shows the last 10 items of the history, the
whole history is excluded from the ranking, as ``recalign recommend`` does for a typed history) the
SmolLM2 recommender's top-10 over all 1,682 titles is computed

- ``exhaustive``: every title scored with the shared-prefix scorer (``answer_logprobs``, ``impl="kv"``:
  the prompt runs once, ~20k answer tokens) and sorted -- the reference;
- ``fast``: :func:`recalign.lm.topk.exact_top_k` (best-first search over the title trie, tree-masked
  incremental passes, the titles it finds re-scored by the same scorer);
- ``fast-seeded``: the same with ``seed_beams=30`` (a trie beam search first, as knowledge retrieval does);
- ``fast-bf16``: the fast search with bfloat16 weights (timing only; bf16 rounding changes the scores);
- ``two-stage``: SASRec (trained once on the split's training sequences) retrieves 20 unseen items and the
  LM ranks them with the candidate prompt (the production shape; not the same question, so not compared).

Every variant runs with ``torch.set_num_threads(threads)`` (default 1) in one process, user by user,
so they see the same machine load; wall and CPU seconds are both recorded.

    python benchmarks/recommend.py --users 3 --threads 1 --output results/recommend_ml100k.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recalign.evaluation.records import script_command
from recalign.logs import parse_args as quiet_parse_args


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=None, help="model (default: a trained adapter under runs/, else smollm2)"
    )
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-two-stage", action="store_true")
    ap.add_argument("--output", default="results/recommend_ml100k.json")
    args = quiet_parse_args(ap, argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from recalign.data.loaders import load_dataset
    from recalign.data.splits import build_split
    from recalign.lm.lora import load_lm
    from recalign.lm.prompts import (
        build_candidate_prompt,
        build_open_prompt,
        display_titles,
        encode_answer,
        encode_prompt,
    )
    from recalign.lm.scoring import answer_logprobs
    from recalign.lm.topk import exact_top_k
    from recalign.logs import configure
    from recalign.methods.knowledge.grounding import TitleTrie

    configure(0)
    model_arg = args.model
    if model_arg is None:
        found = (
            sorted(Path("runs").glob("*/adapter/adapter_model.safetensors")) if Path("runs").is_dir() else []
        )
        model_arg = str(found[0].parent.parent) if found else "smollm2"
    ds = load_dataset("ml-100k")
    split = build_split(ds, "loo", seed=0)
    test = split.stage("test")
    rng = np.random.default_rng([args.seed, 18])
    rows = test.iloc[np.sort(rng.choice(len(test), size=args.users, replace=False))]
    titles = display_titles(ds)

    models = {
        "float32": load_lm(model_arg, dtype="float32")[:2],
        "bfloat16": load_lm(model_arg, dtype="bfloat16")[:2],
    }
    tok = models["float32"][1]
    answers = [encode_answer(tok, t) for t in titles]
    trie = TitleTrie(answers)

    retriever, fit_s = None, 0.0
    if not args.no_two_stage:
        from recalign.baselines import make_baseline

        retriever = make_baseline("sasrec")
        _, fit_s, _ = _timed(lambda: retriever.fit(ds, split))

    def one_user(row) -> dict:
        hist = [int(h) for h in row["history"]]
        exclude = set(hist)
        prompt = build_open_prompt(ds, hist, seed=0, user=0, position=len(hist), max_history=10)
        p_ids = encode_prompt(tok, prompt)
        entry: dict = {
            "user": str(ds.user_ids[int(row["user"])]),
            "history_len": len(hist),
            "prompt_tokens": len(p_ids),
        }
        m32 = models["float32"][0]
        with torch.inference_mode():
            fast, w, c = _timed(lambda: exact_top_k(m32, p_ids, trie, args.k, exclude=exclude))
        entry["fast"] = {
            "seconds": round(w, 2),
            "cpu_seconds": round(c, 2),
            "nodes": fast.nodes,
            "passes": fast.passes,
            "rescored": fast.candidates,
            "top": [titles[j] for j in fast.items],
            "scores": [round(s, 4) for s in fast.scores],
        }
        with torch.inference_mode():
            seeded, w, c = _timed(
                lambda: exact_top_k(m32, p_ids, trie, args.k, exclude=exclude, seed_beams=30)
            )
        entry["fast-seeded"] = {"seconds": round(w, 2), "cpu_seconds": round(c, 2), "nodes": seeded.nodes,
                                "same_top": seeded.items == fast.items}  # fmt: skip
        mbf = models["bfloat16"][0]
        with torch.inference_mode():
            fbf, w, c = _timed(lambda: exact_top_k(mbf, p_ids, trie, args.k, exclude=exclude))
        entry["fast-bf16"] = {"seconds": round(w, 2), "cpu_seconds": round(c, 2), "nodes": fbf.nodes,
                              "overlap_with_fp32_top": len(set(fbf.items) & set(fast.items))}  # fmt: skip

        def exhaustive():
            with torch.inference_mode():
                s = answer_logprobs(m32, [p_ids], [answers], impl="kv", chunk_size=256).sum[0].float().numpy()
            s = s.astype(np.float64)
            s[list(exclude)] = -np.inf
            return s

        ex, w, c = _timed(exhaustive)
        order = np.argsort(-ex, kind="stable")[: args.k]
        entry["exhaustive"] = {
            "seconds": round(w, 2),
            "cpu_seconds": round(c, 2),
            "answer_tokens": sum(len(a) for a in answers),
            "top": [titles[j] for j in order],
            "scores": [round(float(ex[j]), 4) for j in order],
        }
        entry["same_top"] = [int(j) for j in order] == fast.items
        entry["max_abs_score_diff"] = float(np.max(np.abs(ex[order] - np.asarray(fast.scores))))
        if retriever is not None:
            import pandas as pd

            def two_stage():
                frame = pd.DataFrame(
                    {"user": [int(row["user"])], "history": [np.asarray(hist, dtype=np.int64)]}
                )
                s = np.asarray(retriever.score_all(frame)[0], dtype=np.float64)
                s[list(exclude)] = -np.inf
                pool = [int(j) for j in np.argsort(-s, kind="stable")[:20]]
                cp = build_candidate_prompt(
                    ds, hist, pool, seed=0, user=0, position=len(hist), max_history=10
                )
                with torch.inference_mode():
                    sc = answer_logprobs(m32, [encode_prompt(tok, cp)], [[answers[j] for j in pool]]).sum[0]
                return [pool[j] for j in np.argsort(-sc.float().numpy(), kind="stable")[: args.k]]

            top2, w, c = _timed(two_stage)
            entry["two-stage"] = {"seconds": round(w, 2), "cpu_seconds": round(c, 2), "retrieved": 20,
                                  "top": [titles[j] for j in top2]}  # fmt: skip
        return entry

    per_user = []
    for _, row in rows.iterrows():
        entry = one_user(row)
        per_user.append(entry)
        print(json.dumps({k: entry[k] for k in ("user", "same_top", "max_abs_score_diff")})
              + f" fast {entry['fast']['seconds']} s, exhaustive {entry['exhaustive']['seconds']} s", flush=True)  # fmt: skip

    def mean(key, field="seconds"):
        vals = [u[key][field] for u in per_user if key in u]
        return round(float(np.mean(vals)), 2) if vals else None

    result = {
        "command": script_command("benchmarks/recommend.py", argv),
        "model": model_arg,
        "dataset": "ml-100k",
        "catalogue_items": ds.n_items,
        "k": args.k,
        "split": "loo",
        "stage": "test",
        "users": len(per_user),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "notes": "one process, variants back to back per user (same load); CPU shared with other jobs, so "
        "wall seconds are load-dependent, cpu_seconds less so. fast == exhaustive means the same 10 items in "
        "the same order; scores of fast are re-scored with the exhaustive scorer (max_abs_score_diff).",
        "summary": {
            "same_top_all_users": all(u["same_top"] for u in per_user),
            "fast_seconds_mean": mean("fast"),
            "fast_cpu_seconds_mean": mean("fast", "cpu_seconds"),
            "fast_seconds_max": max(u["fast"]["seconds"] for u in per_user),
            "fast_seeded_seconds_mean": mean("fast-seeded"),
            "fast_bf16_seconds_mean": mean("fast-bf16"),
            "exhaustive_seconds_mean": mean("exhaustive"),
            "exhaustive_cpu_seconds_mean": mean("exhaustive", "cpu_seconds"),
            "two_stage_seconds_mean": mean("two-stage"),
            "two_stage_retriever_fit_seconds": round(fit_s, 1) if retriever is not None else None,
            "fast_nodes_mean": round(float(np.mean([u["fast"]["nodes"] for u in per_user])), 1),
        },
        "rows": per_user,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
