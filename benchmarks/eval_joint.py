"""Evaluation with both LM protocols: separate passes vs the joint path (each prompt run once).

Why: ``evaluate_lm`` with ``candidates`` + ``generation`` used to run every prompt through the model twice
-- packed with its 20 candidate titles for scoring, then again as the prefill of ``model.generate`` --
and on a CPU that prompt pass is a large share of the evaluation's cost. The joint path
(:mod:`recalign.lm.joint`, :meth:`recalign.lm.recommender.LMRecommender.score_and_generate`) runs the
packed prompt + answers once with a KV cache and decodes greedily from the prompt part of that cache.
This script measures what that saves and checks that nothing else changes.

What is measured, on the same ``--n-prompts`` test examples (evenly spaced over the ``llara`` test stage
of ML-100K, 20 candidates each, prompts built exactly as ``evaluate_lm`` builds them):

``separate``
    ``LMRecommender.score_candidates`` (packed shared-prefix scoring, ``--batch`` prompts per pass)
    followed by ``generate_answers`` (left-padded ``model.generate``, greedy, ``--max-new-tokens``,
    ``--batch`` prompts per call): what ``evaluate_lm`` did before, and still does with
    ``EvalConfig.joint=false``.
``joint``
    ``LMRecommender.score_and_generate`` on the same examples and batches; its own split of the time
    (prompt preparation, shared forward, answer scoring, greedy decoding) is reported too.

Fairness on a shared CPU: both variants run in one process on the same examples, group by group
(``--group`` prompts), in alternating order (separate first in even groups, joint first in odd ones),
after an untimed warm-up, so that load changes hit both alike. ``speedup`` is the ratio of their summed
times. Exactness: the joint scores against the separate ones (``max_abs_diff``), the candidate rankings
(``argsort``, stable) and the generated answers, per prompt. Differences can only come from float
rounding. In float32 (the default ``--dtype``) there are none on the tiny test models. In bfloat16 the
*separate* path is the unstable one: ``generate`` left-pads each batch, and on a bf16 CPU (AMX) the
padding changes the rounding, so its answer for a prompt depends on which prompts share its batch
(tiny Llama, 48 prompts: batch 8 vs batch 1 differ on 14), while the joint path gives the unpadded
(batch-1) ``generate`` answer whatever the batch. So every prompt whose answers differ is generated
again alone (``generate_answers`` with batch 1, no padding) and the difference is classified:
``joint_equals_unpadded`` (the separate path's padding noise) or not (a joint-path error). The script
writes the JSON first and then exits with status 1 if any ranking differs or any joint answer differs
from both the batched and the unpadded ``generate`` answer (listing the prompts), so a run that passes
is a check as well as a measurement. ``answers_identical`` reports the plain comparison with the
batched separate path. That strict check applies in float32 only: in bfloat16 the joint path's prompt
keys/values come from a longer (packed) sequence, so the matmuls are blocked differently and round
differently, and a greedy decode that meets a near-tie can take another branch than either ``generate``
call (SmolLM2, 32 prompts: 3 such answers). Those are listed, not treated as errors; rankings must still
be identical.

Run (as committed, on the 2-core CPU beside another job):
    python benchmarks/eval_joint.py --model smollm2 --n-prompts 32 --threads 1 --dtype auto \\
        --output results/eval_joint.json           # the quickstart's dtype: timing
    python benchmarks/eval_joint.py --model smollm2 --n-prompts 32 --threads 1 \\
        --output results/eval_joint_fp32.json      # float32: the strict exactness check
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
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
from recalign.evaluation.metrics import single_target_metrics  # noqa: E402
from recalign.evaluation.protocols import candidate_ranks  # noqa: E402
from recalign.evaluation.records import script_command  # noqa: E402
from recalign.io import atomic_write_json  # noqa: E402
from recalign.lm.generation import generate_answers  # noqa: E402
from recalign.lm.joint import joint_unsupported  # noqa: E402
from recalign.lm.lora import load_lm, resolve_dtype  # noqa: E402
from recalign.lm.prompts import encode_prompt, examples_to_prompts  # noqa: E402
from recalign.lm.recommender import LMRecommender  # noqa: E402
from recalign.logs import parse_args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="any --model argument of recalign evaluate")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="llara")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=16, help="prompts per interleaving group")
    ap.add_argument("--batch", type=int, default=8, help="prompts per forward pass (EvalConfig.batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-history", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 is much faster when other processes load the CPU: no spin-waiting)",
    )
    ap.add_argument("--output", default="results/eval_joint.json")
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise
    command = script_command("benchmarks/eval_joint.py", argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_setup = time.perf_counter()
    ds = load_dataset(args.dataset)
    split = build_split(ds, args.split, seed=args.seed, stages_with_candidates=("test",))
    test = split.stage("test")
    rows = np.unique(np.linspace(0, len(test) - 1, args.n_prompts).round().astype(int))
    examples = test.iloc[rows].reset_index(drop=True)
    model, tok, src = load_lm(args.model, dtype=args.dtype)
    model.eval()
    reason = joint_unsupported(model, max_new_tokens=args.max_new_tokens)
    if reason:
        print(f"error: the joint path does not serve this model: {reason}", file=sys.stderr)
        return 2
    rec = LMRecommender(
        model, tok, ds, seed=args.seed, max_history=args.max_history, batch_size=args.batch, progress=False
    )
    prompts = examples_to_prompts(ds, examples, seed=args.seed, max_history=args.max_history)
    prompt_lens = [len(encode_prompt(tok, p.prompt)) for p in prompts]
    setup_seconds = time.perf_counter() - t_setup
    n = len(examples)
    print(
        f"{n} prompts, mean {np.mean(prompt_lens):.0f} prompt tokens, batch {args.batch}, "
        f"max_new_tokens {args.max_new_tokens}; setup {setup_seconds:.1f}s",
        flush=True,
    )

    def separate(lo: int, hi: int):
        t0 = time.perf_counter()
        scores = rec.score_candidates(examples.iloc[lo:hi])
        t1 = time.perf_counter()
        answers = generate_answers(
            model,
            tok,
            prompts[lo:hi],
            batch_size=args.batch,
            max_new_tokens=args.max_new_tokens,
            progress=False,
        )
        return scores, answers, {"scoring": t1 - t0, "generation": time.perf_counter() - t1}

    def joint(lo: int, hi: int):
        res = rec.score_and_generate(examples.iloc[lo:hi], max_new_tokens=args.max_new_tokens)
        return res.scores, res.answers, res.seconds

    # warm-up (first-call allocations, kernel selection), not timed
    separate(0, 1)
    joint(0, 1)

    sec = {"separate": {}, "joint": {}}
    out = {"separate": ([], []), "joint": ([], [])}
    for g, lo in enumerate(range(0, n, args.group)):
        hi = min(n, lo + args.group)
        order = ("separate", "joint") if g % 2 == 0 else ("joint", "separate")
        for name in order:
            t0 = time.perf_counter()
            scores, answers, parts = (separate if name == "separate" else joint)(lo, hi)
            wall = time.perf_counter() - t0
            out[name][0].append(scores)
            out[name][1].extend(answers)
            for k, v in {"wall": wall, **parts}.items():
                sec[name][k] = sec[name].get(k, 0.0) + v
        print(
            f"{hi}/{n}: separate {sec['separate']['wall']:.1f}s, joint {sec['joint']['wall']:.1f}s",
            flush=True,
        )

    s_sep, s_joint = np.concatenate(out["separate"][0]), np.concatenate(out["joint"][0])
    a_sep, a_joint = out["separate"][1], out["joint"][1]
    rank_sep = np.argsort(-s_sep, axis=1, kind="stable")
    rank_joint = np.argsort(-s_joint, axis=1, kind="stable")
    rank_diff = [int(i) for i in np.flatnonzero((rank_sep != rank_joint).any(axis=1))]
    answer_diff = [i for i, (a, b) in enumerate(zip(a_sep, a_joint)) if a != b]
    # a differing answer is checked against generate without padding (batch 1): see the module docstring
    unpadded = (
        generate_answers(
            model,
            tok,
            [prompts[i] for i in answer_diff],
            batch_size=1,
            max_new_tokens=args.max_new_tokens,
            progress=False,
        )
        if answer_diff
        else []
    )
    joint_errors = [i for i, u in zip(answer_diff, unpadded) if a_joint[i] != u]

    def cand_metrics(scores: np.ndarray) -> dict:
        m = single_target_metrics(candidate_ranks(scores, examples), (1, 5, 10), n_candidates=scores.shape[1])
        return {k: round(v, 4) for k, v in m.items()}

    def gen_metrics(answers: list[str]) -> dict:
        matches = [match_answer(a, p.candidates) for a, p in zip(answers, prompts)]
        targets = [p.candidates.index(p.target) for p in prompts]
        return {k: round(v, 4) for k, v in generation_metrics(matches, targets).items()}

    def rounded(d: dict) -> dict:
        return {k: round(v, 2) for k, v in d.items()}

    payload = {
        "command": command,
        "model": src.label,
        "dtype": str(resolve_dtype(args.dtype)).replace("torch.", ""),
        "dataset": args.dataset,
        "split": args.split,
        "stage": "test",
        "n_prompts": n,
        "n_candidates": int(s_sep.shape[1]),
        "mean_prompt_tokens": round(float(np.mean(prompt_lens)), 1),
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "group": args.group,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "seconds": {"separate": rounded(sec["separate"]), "joint": rounded(sec["joint"])},
        "seconds_per_prompt": {
            "separate": round(sec["separate"]["wall"] / n, 3),
            "joint": round(sec["joint"]["wall"] / n, 3),
        },
        "speedup": round(sec["separate"]["wall"] / sec["joint"]["wall"], 3),
        "exactness": {
            "max_abs_score_diff": float(np.abs(s_sep - s_joint).max()),
            "rankings_identical": not rank_diff,
            "prompts_with_different_ranking": rank_diff,
            "answers_identical": not answer_diff,
            "prompts_with_different_answer": answer_diff,
            "different_answers_where_joint_equals_unpadded_generate": len(answer_diff) - len(joint_errors),
            "different_answers_where_joint_differs_from_unpadded_generate": joint_errors,
            "answer_differences": [
                {"prompt": i, "separate": a_sep[i], "joint": a_joint[i], "unpadded_generate": u}
                for i, u in zip(answer_diff, unpadded)
            ],
        },
        "candidate_metrics": {"separate": cand_metrics(s_sep), "joint": cand_metrics(s_joint)},
        "generation_metrics": {"separate": gen_metrics(a_sep), "joint": gen_metrics(a_joint)},
        "answer_examples": a_joint[:5],
        "notes": (
            "one process, same examples and batches; groups alternate which variant runs first; "
            "seconds.separate: scoring = score_candidates, generation = generate_answers; seconds.joint: "
            "prepare (prompts + tokenisation), shared_forward (packed prompt + answers, with cache), "
            "scoring (LM head on answer tokens), decoding (greedy loop from the prompt cache), total"
        ),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, payload)
    shown = {k: v for k, v in payload["exactness"].items() if k != "answer_differences"}
    print({**{k: payload[k] for k in ("seconds", "seconds_per_prompt", "speedup")}, "exactness": shown})
    print(f"wrote {args.output}")
    if answer_diff:
        print(
            f"note: {len(answer_diff)} answers differ from the batched separate path; "
            f"{len(answer_diff) - len(joint_errors)} of them are the unpadded generate answer",
            file=sys.stderr,
        )
    strict = payload["dtype"] == "float32"
    if joint_errors and not strict:
        print(
            f"note: {len(joint_errors)} joint answers differ from both generate answers: {payload['dtype']} "
            "rounding (the strict answer check is float32-only)",
            file=sys.stderr,
        )
    if rank_diff or (strict and joint_errors):
        for i in joint_errors[:10]:
            print(f"prompt {i}: separate {a_sep[i]!r} != joint {a_joint[i]!r}", file=sys.stderr)
        print(
            f"error: {len(rank_diff)} rankings differ and {len(joint_errors)} joint answers differ from "
            "both the batched and the unpadded generate answer",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
