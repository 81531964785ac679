"""DPO4Rec's summary sampling: N summaries per user through ``generate`` vs one prefill per user.

Both variants sample ``--samples`` summaries (SmolLM2-135M-Instruct, float32, temperature 1, top-p 0.9,
at most 40 new tokens: ``configs/dpo4rec_ml100k.yaml``'s settings) for the same users' summary prompts
(the loo split's valid examples, as the DPO4Rec run builds them), in the same process, back to back:

``naive``
    the earlier path: each user's prompt listed N times and passed to ``model.generate`` in batches
    of ``--naive-batch`` rows (the config's old ``summary.batch_size: 16``), so every prompt is prefilled
    N times;
``shared``
    :func:`recalign.methods.dpo4rec.summaries.generate_summaries` as the run calls it now: whole users,
    ``--shared-batch`` rows per batch (the config's 32: 4 users x 8), each prompt prefilled once and its
    KV cache copied to its N rows (:func:`recalign.lm.sampling.sample_continuations`).

Rows report wall seconds, seconds per summary, CPU seconds and the peak RSS (VmHWM reset before each
variant, model weights included), and the mean summary length in tokens (the two draw different
samples from the same distribution, and a summary's cost grows with its length). A greedy check
(``--check-users`` users, 2 samples) asserts that both paths give the same greedy summaries.

    python benchmarks/summary_sampling.py --users 8 --threads 2 --output results/summary_sampling.json
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scoring import _reset_peak, _status_kb  # noqa: E402  (benchmarks/scoring.py: the same peak-RSS meter)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/dpo4rec_ml100k.yaml")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--naive-batch", type=int, default=16)
    ap.add_argument("--shared-batch", type=int, default=32)
    ap.add_argument("--check-users", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="results/summary_sampling.json")
    from recalign.evaluation.records import script_command
    from recalign.logs import parse_args

    args = parse_args(ap, argv)
    command = script_command("benchmarks/summary_sampling.py", argv)

    import torch

    from recalign.config import load_config
    from recalign.data.prepare import prepare
    from recalign.io import atomic_write_json
    from recalign.lm.generation import generate_answers
    from recalign.lm.loading import load_model
    from recalign.methods.dpo4rec.config import DPO4RecConfig
    from recalign.methods.dpo4rec.summaries import build_requests, generate_summaries

    torch.set_num_threads(args.threads)
    cfg = load_config(DPO4RecConfig, args.config, [])
    s = cfg.summary
    split, ds, _ = prepare(cfg.data)
    examples = split.stage("valid").head(args.users)
    reqs = build_requests(
        ds, examples, seed=cfg.seed, max_history=s.max_history, include_genres=s.include_genres
    )
    model, tok = load_model(cfg.model)
    model.eval()

    # exactness: greedy summaries agree between the two paths
    check = reqs[: args.check_users]
    shared_greedy = generate_summaries(
        model,
        tok,
        check,
        n_samples=2,
        sample=False,
        max_new_tokens=s.max_new_tokens,
        batch_size=4,
        progress=False,
    )
    naive_greedy = generate_answers(
        model, tok, [r.prompt for r in check for _ in range(2)], batch_size=4, max_new_tokens=s.max_new_tokens,
        progress=False,
    )  # fmt: skip
    greedy_equal = [r.text for r in shared_greedy] == naive_greedy

    def n_tokens(texts: list[str]) -> float:
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / max(1, len(texts))

    rows = []
    for variant in ("naive", "shared"):
        _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        if variant == "naive":
            texts = generate_answers(
                model,
                tok,
                [r.prompt for r in reqs for _ in range(args.samples)],
                batch_size=args.naive_batch,
                max_new_tokens=s.max_new_tokens,
                progress=False,
                do_sample=True,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=cfg.seed,
            )
        else:
            texts = [
                r.text
                for r in generate_summaries(
                    model,
                    tok,
                    reqs,
                    n_samples=args.samples,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    max_new_tokens=s.max_new_tokens,
                    batch_size=args.shared_batch,
                    seed=cfg.seed,
                    progress=False,
                )
            ]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(
            {
                "variant": variant,
                "K": args.samples,
                "users": len(reqs),
                "summaries": len(texts),
                "batch_rows": args.naive_batch if variant == "naive" else args.shared_batch,
                "seconds": round(wall, 2),
                "seconds_per_summary": round(wall / len(texts), 4),
                "cpu_seconds": round(cpu, 2),
                "peak_mb": round((_status_kb("VmHWM") or 0) / 1024, 1),
                "mean_summary_tokens": round(n_tokens(texts), 2),
                "distinct_per_user": round(
                    sum(len(set(texts[u * args.samples : (u + 1) * args.samples])) for u in range(len(reqs)))
                    / len(reqs),
                    2,
                ),
            }
        )
        print(rows[-1], flush=True)
    payload = {
        "command": command,
        "rows": rows,
        "speedup": round(rows[0]["seconds_per_summary"] / rows[1]["seconds_per_summary"], 2),
        "greedy_equal": greedy_equal,
        "threads": args.threads,
        "note": "SmolLM2-135M-Instruct float32 on this CPU; both variants in one process, back to back",
    }
    atomic_write_json(args.output, payload)
    print(f"speed-up {payload['speedup']}x, greedy equal: {greedy_equal}; wrote {args.output}")


if __name__ == "__main__":
    main()
