"""Candidate scoring speed: naive full sequences vs recalign's shared-prefix scoring (and greedy generation).

What is measured: scoring the 20 candidates of ``--n-prompts`` (default 64) ML-100K ``llara`` test
examples with SmolLM2-135M-Instruct -- the work of candidate-ranking evaluation.

``naive``
    The obvious way (and the S-DPO reference layout): each candidate appended to its prompt as its own
    sequence, full logits over every position, ``log_softmax``
    (:func:`recalign.lm.scoring.naive_answer_logprobs`); the 20 sequences of one prompt form one batch.
    It is so slow on a 2-core CPU (20-100+ s per prompt, depending on load) that ``--naive-prompts N``
    restricts it to the first N prompts; exactness and speed-up are computed on those prompts, the
    throughput of the other variants on all prompts.
``shared`` (``impl`` = ``packed`` and ``kv``)
    :func:`recalign.lm.scoring.answer_logprobs`: each prompt run once, all 20 answers attending to it,
    the LM head only at answer positions; ``--shared-batch`` prompts per forward pass.
``generation``
    The generation protocol for the same prompts: greedy decoding (left-padded batches of
    ``--gen-batch``, at most 32 new tokens, stop at ``<|im_end|>``) and answer matching
    (:func:`recalign.lm.generation.generate_answers`).

Fairness on a shared, busy CPU (other jobs come and go, so the load changes by the minute): all
variants run in one process on the same token ids. The speed-up is measured *paired*: for each of the
first ``--naive-prompts`` prompts, the naive scoring and the shared-prefix scoring of that one prompt
(packed, batch 1 -- a conservative setting, batching only helps ``shared``) run back to back, so both
see the same load; ``speedup_vs_naive`` is the ratio of their summed times. Throughput rows (batched
shared scoring with ``packed`` and ``kv``, and generation, on all prompts) run group by group
(``--group`` prompts) after the paired measurements of that group; ``throughput_vs_naive`` compares
seconds per prompt measured at different times and is therefore load-sensitive. A small warm-up
precedes timing. Memory: before each segment the process's peak-RSS high-water mark is reset
(``echo 5 > /proc/self/clear_refs``, after ``malloc_trim``) and read back afterwards (``VmHWM``):
``peak_mb`` is the largest peak RSS during the variant's segments (model weights included) and
``peak_extra_mb`` the largest rise above the RSS at a segment's start. Exactness: ``max_abs_diff``
between naive and shared scores, and whether the candidate rankings (``argsort`` of the 20 scores)
are identical for every prompt the naive variant scored.

Run (as committed; ~45 min on 2 cores shared with other jobs, of which ~18 min for 8 naive prompts):
    python benchmarks/scoring.py --n-prompts 64 --naive-prompts 8 --group 8 --threads 1 \
        --output results/scoring_ml100k.json
``--threads 1``: on a CPU loaded by other processes, two OpenMP threads spin-wait on each other and
everything runs 5-10x slower; one thread is faster for every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recalign.data.loaders import load_dataset  # noqa: E402
from recalign.data.splits import build_split  # noqa: E402
from recalign.evaluation.generation import generation_metrics, match_answer  # noqa: E402
from recalign.evaluation.metrics import single_target_metrics, target_ranks  # noqa: E402
from recalign.evaluation.records import script_command  # noqa: E402
from recalign.io import atomic_write_json  # noqa: E402
from recalign.lm.generation import generate_answers  # noqa: E402
from recalign.lm.loading import load_model  # noqa: E402
from recalign.lm.prompts import display_titles, encode_answer, encode_prompt, examples_to_prompts  # noqa: E402
from recalign.lm.scoring import answer_logprobs, naive_answer_logprobs  # noqa: E402
from recalign.logs import parse_args


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Return freed heap pages to the OS, so the next segment starts from the live RSS only."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: skip
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Meter:
    """Accumulates time and peak memory of one variant over its interleaved segments."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.group_seconds: dict[int, float] = {}
        self.n_prompts = 0
        self.peak_kb = 0
        self.extra_kb = 0

    def run(self, group: int, n_prompts: int, fn):
        _release_free_memory()
        _reset_peak()
        start_rss = _status_kb("VmRSS") or 0
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.group_seconds[group] = self.group_seconds.get(group, 0.0) + dt
        self.n_prompts += n_prompts
        hwm = _status_kb("VmHWM") or 0
        self.peak_kb = max(self.peak_kb, hwm)
        self.extra_kb = max(self.extra_kb, hwm - start_rss)
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="llara")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8, help="prompts per interleaving group")
    ap.add_argument(
        "--naive-prompts",
        type=int,
        default=None,
        help="run the (slow) naive variant on the first N prompts only (default: all)",
    )
    ap.add_argument("--shared-batch", type=int, default=8, help="prompts per shared-prefix forward")
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--impls", default="packed,kv", help="shared-prefix implementations to measure")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 is much faster when other processes load the CPU: no spin-waiting)",
    )
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--output", default="results/scoring_ml100k.json")
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise
    command = script_command("benchmarks/scoring.py", argv)

    impls = [i for i in args.impls.split(",") if i]
    if args.threads:
        torch.set_num_threads(args.threads)
    t_setup = time.perf_counter()
    ds = load_dataset(args.dataset)
    split = build_split(ds, args.split, seed=args.seed, stages_with_candidates=("test",))
    test = split.stage("test")
    # evenly spaced over the test stage (many users, not one user's consecutive positions)
    rows = np.unique(np.linspace(0, len(test) - 1, args.n_prompts).round().astype(int))
    examples = test.iloc[rows].reset_index(drop=True)
    prompts = examples_to_prompts(ds, examples, seed=args.seed)
    model, tok = load_model(args.model)
    model.eval()
    titles = display_titles(ds)
    p_ids = [encode_prompt(tok, p.prompt) for p in prompts]
    a_ids = [[encode_answer(tok, titles[int(i)]) for i in c] for c in examples["candidates"]]
    target_cols = np.array(
        [
            int(np.flatnonzero(np.asarray(c) == t)[0])
            for c, t in zip(examples["candidates"], examples["target"])
        ]
    )
    setup_seconds = time.perf_counter() - t_setup
    print(
        f"{len(p_ids)} prompts, mean {np.mean([len(p) for p in p_ids]):.0f} prompt tokens, "
        f"mean {np.mean([len(a) for ans in a_ids for a in ans]):.1f} answer tokens; setup {setup_seconds:.1f}s",
        flush=True,
    )

    def naive(lo: int, hi: int) -> np.ndarray:
        with torch.inference_mode():
            return naive_answer_logprobs(model, p_ids[lo:hi], a_ids[lo:hi]).sum.numpy()

    def shared(lo: int, hi: int, impl: str, batch: int | None = None) -> np.ndarray:
        out = []
        batch = batch or args.shared_batch
        with torch.inference_mode():
            for s in range(lo, hi, batch):
                e = min(hi, s + batch)
                out.append(answer_logprobs(model, p_ids[s:e], a_ids[s:e], impl=impl).sum.numpy())
        return np.concatenate(out)

    def generate(lo: int, hi: int) -> list[str]:
        return generate_answers(
            model,
            tok,
            prompts[lo:hi],
            batch_size=args.gen_batch,
            max_new_tokens=args.max_new_tokens,
            progress=False,
        )

    # warm-up (first-call allocations, kernel selection), not timed
    naive(0, 1)
    for impl in impls:
        shared(0, 1, impl)
    if not args.no_generation:
        generate_answers(model, tok, prompts[:1], max_new_tokens=2, progress=False)

    meters = {"naive": Meter(), "paired": Meter(), **{i: Meter() for i in impls}, "generation": Meter()}
    scores = {"naive": [], "paired": [], **{i: [] for i in impls}}
    answers: list[str] = []
    n = len(p_ids)
    n_naive = n if args.naive_prompts is None else min(n, args.naive_prompts)
    for g, lo in enumerate(range(0, n, args.group)):
        hi = min(n, lo + args.group)
        # the speed-up measurement: prompt by prompt, naive then shared (packed, batch 1) back to back,
        # so that both see the same load from other processes
        for i in range(lo, min(hi, n_naive)):
            scores["naive"].append(meters["naive"].run(g, 1, lambda i=i: naive(i, i + 1)))
            scores["paired"].append(meters["paired"].run(g, 1, lambda i=i: shared(i, i + 1, "packed", 1)))
        # throughput: batched shared-prefix scoring and greedy generation on every prompt
        for impl in impls:
            scores[impl].append(
                meters[impl].run(g, hi - lo, lambda lo=lo, hi=hi, impl=impl: shared(lo, hi, impl))
            )
        if not args.no_generation:
            answers.extend(meters["generation"].run(g, hi - lo, lambda lo=lo, hi=hi: generate(lo, hi)))
        print(
            f"{hi}/{n}: " + ", ".join(f"{k} {m.seconds:.1f}s" for k, m in meters.items() if m.n_prompts),
            flush=True,
        )
    s = {k: np.concatenate(v) for k, v in scores.items()}
    ref_rank = np.argsort(-s["naive"], axis=1, kind="stable")

    def quality(sc: np.ndarray) -> dict:
        m = single_target_metrics(
            target_ranks(sc, target_cols[: len(sc)]), ks=(1, 5, 10), n_candidates=sc.shape[1]
        )
        return {k: round(v, 4) for k, v in m.items()}

    def mb(kb: int) -> float:
        return round(kb / 1024, 1)

    def exactness(sc: np.ndarray) -> dict:
        rank = np.argsort(-sc[:n_naive], axis=1, kind="stable")
        return {
            "max_abs_diff": float(np.abs(sc[:n_naive] - s["naive"]).max()),
            "rankings_identical": bool((rank == ref_rank).all()),
            "prompts_with_different_ranking": int((rank != ref_rank).any(axis=1).sum()),
            "top1_identical": bool((rank[:, 0] == ref_rank[:, 0]).all()),
        }

    def timing(m: Meter) -> dict:
        return {
            "n_prompts": m.n_prompts,
            "seconds": round(m.seconds, 2),
            "seconds_per_prompt": round(m.seconds / m.n_prompts, 3),
            "peak_mb": mb(m.peak_kb),
            "peak_extra_mb": mb(m.extra_kb),
        }

    naive_per_prompt = meters["naive"].seconds / meters["naive"].n_prompts
    rows_out = [
        {
            "variant": "naive",
            "impl": "full-sequences",
            "batch": "the 20 sequences of one prompt",
            **timing(meters["naive"]),
            "candidate_metrics": quality(s["naive"]),
        },
        {
            "variant": "shared",
            "impl": "packed",
            "batch": 1,
            "paired_with_naive": True,
            **timing(meters["paired"]),
            "speedup_vs_naive": round(meters["naive"].seconds / meters["paired"].seconds, 2),
            **exactness(s["paired"]),
        },
    ]
    for impl in impls:
        rows_out.append(
            {
                "variant": "shared",
                "impl": impl,
                "batch": args.shared_batch,
                "paired_with_naive": False,
                **timing(meters[impl]),
                "throughput_vs_naive": round(
                    naive_per_prompt / (meters[impl].seconds / meters[impl].n_prompts), 2
                ),
                **exactness(s[impl]),
                "candidate_metrics": quality(s[impl]),
            }
        )
    if not args.no_generation:
        matches = [match_answer(a, p.candidates) for a, p in zip(answers, prompts)]
        gen_targets = [p.candidates.index(p.target) for p in prompts]
        rows_out.append(
            {
                "variant": "generation",
                "impl": f"greedy, batch {args.gen_batch}, max_new_tokens {args.max_new_tokens}",
                "n_prompts": meters["generation"].n_prompts,
                "seconds": round(meters["generation"].seconds, 2),
                "seconds_per_prompt": round(meters["generation"].seconds / n, 3),
                "peak_mb": mb(meters["generation"].peak_kb),
                "peak_extra_mb": mb(meters["generation"].extra_kb),
                "generation_metrics": {
                    k: round(v, 4) for k, v in generation_metrics(matches, gen_targets).items()
                },
                "answer_examples": answers[:5],
            }
        )
    payload = {
        "command": command,
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "stage": "test",
        "n_prompts": n,
        "n_prompts_naive": n_naive,
        "n_candidates": int(s["naive"].shape[1]),
        "mean_prompt_tokens": round(float(np.mean([len(p) for p in p_ids])), 1),
        "mean_answer_tokens": round(float(np.mean([len(a) for ans in a_ids for a in ans])), 2),
        "shared_batch": args.shared_batch,
        "group": args.group,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "notes": (
            "one process on a CPU shared with other jobs; speedup_vs_naive: naive and shared (packed, "
            "batch 1) run back to back prompt by prompt on the naive prompts (same load); "
            "throughput_vs_naive: batched shared s/prompt over all prompts vs naive s/prompt (measured "
            "at different times, so load-sensitive); exactness (max_abs_diff, rankings) on the naive "
            "prompts; peak_mb = VmHWM after resetting it before each segment (model weights included)"
        ),
        "rows": rows_out,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, payload)
    for r in rows_out:
        print({k: v for k, v in r.items() if k not in ("answer_examples",)})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
