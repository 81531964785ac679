"""One S-DPO training step, reference layout vs recalign's shared-prefix layout.

What is measured: a full optimisation step (policy forward + reference log-probs + S-DPO loss + backward
+ AdamW step) of SmolLM2-135M-Instruct with a LoRA adapter (r=8 on q_proj/v_proj), on a batch of 4 real
ML-100K ``llara`` training prompts, for K = 1, 3, 7, 15 negatives:

``naive``
    The S-DPO reference layout: every prompt concatenated with each of its 1+K answers, full logits over
    all positions of all sequences (``recalign.lm.scoring.naive_answer_logprobs``), for the policy (with
    grad) and again for the reference (a no-grad pass with the adapter disabled).
``shared``
    recalign: shared-prefix scoring (``answer_logprobs(impl="packed")``: prompt run once per example,
    LM head on answer positions only) for the policy, and for the reference a no-grad shared pass with
    the adapter disabled (``recalign.lm.reference.reference_answer_logprobs``).
``shared-precomputed``
    As ``shared``, with reference log-probs precomputed once before training
    (``cached_reference_logprobs``), so a step has no reference pass at all. The one-off precomputation
    is reported as ``precompute_seconds`` and not counted in the step.

Fairness: every variant runs in its own fresh subprocess (so ``peak_mb``, the child's own
``ru_maxrss``, is not polluted by another variant), from the same token ids, the same initial weights
(the LoRA B matrices are set to seeded non-zero values, so the policy differs from the reference and
the loss is not the trivial log(1+K)), and the same step structure: gradients are accumulated over
micro-batches of ``--micro-batch`` prompts (default 1: the naive layout cannot hold the activations of
4 x 16 full sequences in RAM at K = 15, and the reference scripts accumulate gradients too), then one
optimizer step. The first step's loss (from the shared initial weights) must agree between variants to
1e-4. A tiny warm-up call precedes timing in each process. ``seconds`` is the wall-clock median over
the timed steps (``--naive-steps`` for ``naive``, which dominates the run time, ``--steps`` otherwise);
``cpu_seconds`` is the process CPU time of the same steps. The 2-core CPU is shared with other work, so
wall-clock times carry the machine's load (recorded as ``load_average_1min`` per step). Workers run
single-threaded by default (``--threads 1``): with several OpenMP threads on an oversubscribed machine,
threads spin-wait for descheduled siblings and CPU time balloons (several-fold here), whereas a single
thread's CPU time is a stable measure of the work done. The summary gives speed-ups on both clocks.

Prompts: the real llara candidate prompts (``recalign.lm.prompts``: chat template, 20 candidates), with the
history length chosen so the mean prompt length is closest to ``--prompt-tokens`` (~300 by default).

Run:  python benchmarks/alignment_step.py --output results/alignment_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recalign.evaluation.records import script_command
from recalign.logs import parse_args

VARIANTS = ("naive", "shared", "shared-precomputed")


# ---------------------------------------------------------------------- inputs (parent process)
def build_inputs(args) -> dict:
    import numpy as np

    from recalign.data.loaders.embedded import load_ml100k_embedded
    from recalign.data.splits import build_split
    from recalign.lm.loading import load_tokenizer
    from recalign.lm.prompts import encode_prompt, examples_to_prompts
    from recalign.lm.reference import tokenize_preference_data
    from recalign.methods.preference_data import build_preference_data

    ds = load_ml100k_embedded()
    split = build_split(ds, "llara", seed=0, stages_with_candidates=("train",))
    train = split.stage("train")
    pool = np.flatnonzero(train["history"].map(len).to_numpy() >= 10)
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(pool, size=args.batch, replace=False))
    ex = train.iloc[rows].reset_index(drop=True)
    tok = load_tokenizer(args.model)

    best = None
    for h in range(1, 21):
        texts = [p.prompt for p in examples_to_prompts(ds, ex, seed=args.seed, max_history=h)]
        mean_len = float(np.mean([len(encode_prompt(tok, t)) for t in texts]))
        if best is None or abs(mean_len - args.prompt_tokens) < abs(best[1] - args.prompt_tokens):
            best = (h, mean_len, texts)
    max_history, _, texts = best

    per_k = {}
    for k in args.ks:
        data = build_preference_data(ds, ex, k=k, strategy="random", seed=args.seed, prompts=texts)
        prompts, answers = tokenize_preference_data(tok, data)
        per_k[str(k)] = {"prompts": prompts, "answers": answers}
    p_lens = [len(p) for p in per_k[str(args.ks[0])]["prompts"]]
    a_lens = [len(a) for v in per_k.values() for ans in v["answers"] for a in ans]
    return {
        "max_history": max_history,
        "prompt_tokens": p_lens,
        "answer_tokens_mean": float(np.mean(a_lens)),
        "examples": [[int(u), int(p)] for u, p in zip(ex["user"], ex["position"])],
        "per_k": per_k,
    }


# ---------------------------------------------------------------------- one variant (child process)
def run_worker(args) -> dict:
    import torch

    from recalign.lm.lora import LoRAConfig, attach_lora
    from recalign.lm.reference import adapter_disabled, cached_reference_logprobs, reference_answer_logprobs
    from recalign.lm.scoring import answer_logprobs, naive_answer_logprobs
    from recalign.objectives import sdpo_loss

    torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())["per_k"][str(args.k)]
    prompts, answers = inputs["prompts"], inputs["answers"]
    b_n = len(prompts)

    from recalign.lm.loading import load_model

    model, _ = load_model(args.model)
    model.config._attn_implementation = args.attn
    torch.manual_seed(0)
    policy = attach_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * args.lora_b_std)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def score_policy(ps, ans):
        if args.variant == "naive":
            n_seq = sum(len(a) for a in ans)
            return naive_answer_logprobs(policy, ps, ans, batch_size=n_seq).sum
        return answer_logprobs(policy, ps, ans, impl="packed").sum

    def score_reference(ps, ans, idx):
        if args.variant == "naive":
            n_seq = sum(len(a) for a in ans)
            with torch.no_grad(), adapter_disabled(policy):
                return naive_answer_logprobs(policy, ps, ans, batch_size=n_seq).sum
        if args.variant == "shared":
            return reference_answer_logprobs(policy, ps, ans, impl="packed").sum
        return precomputed.rows(idx)

    # warm-up: one tiny forward/backward (one-time kernel and allocator setup), no optimizer step
    wp, wa = [prompts[0][:32]], [answers[0][:2]]
    score_policy(wp, wa).sum().backward()
    opt.zero_grad(set_to_none=True)

    precompute_seconds = None
    precomputed = None
    if args.variant == "shared-precomputed":
        t0 = time.perf_counter()
        with adapter_disabled(policy):
            precomputed = cached_reference_logprobs(
                policy, prompts, answers, None, batch_size=args.micro_batch, fingerprint="benchmark"
            )
        precompute_seconds = time.perf_counter() - t0

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, cpu_times, losses, loads = [], [], [], []
    for _ in range(args.steps):
        loads.append(os.getloadavg()[0])
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for s in range(0, b_n, args.micro_batch):
            idx = list(range(s, min(b_n, s + args.micro_batch)))
            ps, ans = [prompts[i] for i in idx], [answers[i] for i in idx]
            pol = score_policy(ps, ans)
            ref = score_reference(ps, ans, idx)
            out = sdpo_loss(pol, ref, beta=1.0)
            loss = out.loss * (len(idx) / b_n)  # mean over the full batch of 4
            loss.backward()
            total += float(loss.detach())
        opt.step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(total)
    return {
        "variant": args.variant,
        "K": args.k,
        "seconds": statistics.median(times),
        "step_seconds": [round(t, 3) for t in times],
        "cpu_seconds": statistics.median(cpu_times),
        "load_average_1min": loads,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_mb_before_step": rss_before,
        "loss": losses[0],
        "losses": losses,
        "precompute_seconds": precompute_seconds,
    }


# ---------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ks", default="1,3,7,15", help="comma-separated numbers of negatives")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=4, help="prompts per optimisation step")
    ap.add_argument("--micro-batch", type=int, default=1, help="prompts per forward/backward")
    ap.add_argument("--prompt-tokens", type=int, default=300, help="target mean prompt length")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--naive-steps", type=int, default=1, help="timed steps for the slow naive variant")
    ap.add_argument("--lora-b-std", type=float, default=0.02)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (1: OpenMP threads spin-wait and inflate CPU time on a busy machine)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="results/alignment_step.json")
    # internal: run one variant
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise
    args.ks = [int(k) for k in str(args.ks).split(",") if k]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    command = script_command("benchmarks/alignment_step.py", argv)
    t_start = time.perf_counter()
    inputs = build_inputs(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.json"
        path.write_text(json.dumps(inputs))
        for k in args.ks:
            for variant in args.variants.split(","):
                steps = args.naive_steps if variant == "naive" else args.steps
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--variant",
                    variant,
                    "--k",
                    str(k),
                    "--inputs",
                    str(path),
                    "--model",
                    args.model,
                    "--micro-batch",
                    str(args.micro_batch),
                    "--steps",
                    str(steps),
                    "--lora-b-std",
                    str(args.lora_b_std),
                    "--attn",
                    args.attn,
                    "--threads",
                    str(args.threads),
                ]
                env = {
                    **os.environ,
                    "OMP_NUM_THREADS": str(args.threads),
                    "MKL_NUM_THREADS": str(args.threads),
                }
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-3000:])
                    raise SystemExit(f"worker {variant} K={k} failed")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"K={k:>2} {variant:<19} {row['seconds']:8.2f} s (cpu {row['cpu_seconds']:8.2f} s)  "
                    f"peak {row['peak_mb']:7.0f} MB  "
                    f"loss {row['loss']:.6f}",
                    flush=True,
                )

    summary = {}
    ok = True
    for k in args.ks:
        by = {r["variant"]: r for r in rows if r["K"] == k}
        if "naive" not in by:
            continue
        entry = {}
        for v, r in by.items():
            if v == "naive":
                continue
            entry[f"speedup_{v}"] = round(by["naive"]["seconds"] / r["seconds"], 2)
            entry[f"speedup_cpu_{v}"] = round(by["naive"]["cpu_seconds"] / r["cpu_seconds"], 2)
            diff = abs(by["naive"]["loss"] - r["loss"])
            entry[f"loss_abs_diff_{v}"] = diff
            ok &= diff <= 1e-4
        summary[str(k)] = entry
    result = {
        "command": command,
        "rows": rows,
        "summary": summary,
        "losses_agree_1e-4": ok,
        "setup": {
            "model": "SmolLM2-135M-Instruct (embedded, float32)",
            "lora": f"r=8, alpha=16, dropout=0, q_proj+v_proj; B initialised N(0, {args.lora_b_std:g}) (seeded)",
            "loss": "S-DPO, beta=1",
            "optimizer": "AdamW lr=1e-4",
            "batch_prompts": args.batch,
            "micro_batch_prompts": args.micro_batch,
            "prompt_tokens": inputs["prompt_tokens"],
            "prompt_history_items": inputs["max_history"],
            "answer_tokens_mean": round(inputs["answer_tokens_mean"], 2),
            "examples_user_position": inputs["examples"],
            "attn_implementation": args.attn,
            "torch_threads_per_worker": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "load_average_at_end": list(os.getloadavg()),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        },
    }
    from recalign.io import atomic_write_json

    atomic_write_json(args.output, result)
    print(json.dumps(summary, indent=1))
    if not ok:
        print("LOSSES DISAGREE beyond 1e-4", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
