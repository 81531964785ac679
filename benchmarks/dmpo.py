"""DMPO's few-shot and cross-domain settings on ML-100K: few-shot SFT, then DMPO (K=3), of SmolLM2.

ML-100K is the only dataset available offline, so the two "domains" are genre-disjoint halves of
ML-100K (``PreprocessConfig.item_genres_include`` / ``item_genres_exclude`` with one genre list, see
``configs/dmpo_fewshot_ml100k.yaml``): domain A = items carrying any action/thriller-like genre, domain
B = all other items. Both stages train on domain A only; each model is evaluated on domain A's test
stage (in-domain) and on domain B's test stage (cross-domain), by candidate scoring (HR@k/NDCG@k over
the split's 20 candidates) and by DMPO's pairwise protocol (``PairAcc``: target vs sampled negative
candidates under the pairwise prompt, :mod:`recalign.methods.dmpo`). Records are written after every
evaluation, so an interrupted run still leaves what it finished.

    python benchmarks/dmpo.py --output results/dmpo_ml100k.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from recalign.config import load_config
from recalign.evaluation.records import ResultRecord, write_records
from recalign.methods import load_data, sample_examples, set_threads
from recalign.methods.align import AlignConfig, run_align
from recalign.methods.dmpo import evaluate_pairwise
from recalign.methods.sft import SFTConfig, run_sft
from recalign.methods.zeroshot import EvalConfig, evaluate_lm


def _domain_data(base_cfg, genres: list[str], half: str):
    """The data config of one half: ``A`` keeps items with any of ``genres``, ``B`` the rest."""
    import copy

    data_cfg = copy.deepcopy(base_cfg)
    data_cfg.preprocess.item_genres_include = list(genres) if half == "A" else []
    data_cfg.preprocess.item_genres_exclude = [] if half == "A" else list(genres)
    return load_data(data_cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft-config", default="configs/dmpo_fewshot_sft_ml100k.yaml")
    ap.add_argument("--align-config", default="configs/dmpo_fewshot_ml100k.yaml")
    ap.add_argument("--runs", default="runs/dmpo_bench", help="where the run directories go")
    ap.add_argument("--output", default="results/dmpo_ml100k.json")
    ap.add_argument("--n-test", type=int, default=100, help="test examples per domain")
    ap.add_argument("--max-pairs", type=int, default=1, help="pairwise protocol: negatives per test example")
    ap.add_argument("--sft-steps", type=int, default=12)
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--dmpo-steps", type=int, default=16)
    ap.add_argument("--dmpo-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-pairwise", action="store_true")
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    set_threads(args.threads)
    runs = Path(args.runs)
    common = [f"dtype={args.dtype}", f"threads={args.threads}", "eval.n_test=0"]

    sft_cfg = load_config(
        SFTConfig,
        args.sft_config,
        [*common, f"training.max_steps={args.sft_steps}", f"training.batch_size={args.sft_batch}",
         f"training.save_steps={max(1, args.sft_steps // 3)}"],
    )  # fmt: skip
    sft_cfg.training.resume = True  # a killed run continues from its last checkpoint; a fresh dir starts
    genres = list(sft_cfg.data.preprocess.item_genres_include)
    domains = {h: _domain_data(sft_cfg.data, genres, h) for h in ("A", "B")}
    tests = {
        h: sample_examples(d.split.stage("test"), args.n_test, sft_cfg.seed, stage="test")
        for h, d in domains.items()
    }
    for h, d in domains.items():
        print(f"domain {h}: {d.dataset.notes[-2]}; test {len(d.split.stage('test'))} rows", flush=True)

    records: list[ResultRecord] = []

    def evaluate(run_dir: Path, method: str, info: dict) -> None:
        from recalign.lm.lora import load_lm, resolve_dtype

        model, tok, _ = load_lm(run_dir, merge=True, dtype=resolve_dtype(args.dtype))
        for h in ("A", "B"):
            extra = {**info, "train_domain": "A", "eval_domain": h, "genres_A": genres,
                     "domains": "genre-disjoint halves of ML-100K (A: items with any genre of genres_A; B: the rest)"}  # fmt: skip
            recs = evaluate_lm(
                model, tok, domains[h].dataset, tests[h], method=method, split_name="llara",
                cfg=EvalConfig(n_test=args.n_test, protocols=["candidates"]), seed=sft_cfg.seed,
                max_history=sft_cfg.max_history, command=command, progress=True, extra=dict(extra),
            )  # fmt: skip
            for r in recs:
                r.protocol = f"candidates/domain-{h}"
            records.extend(recs)
            write_records(args.output, records)
        if not args.skip_pairwise:
            for h in ("A", "B"):
                extra = {**info, "train_domain": "A", "eval_domain": h, "genres_A": genres}
                r = evaluate_pairwise(
                    model, tok, domains[h].dataset, tests[h], method=method, split_name="llara",
                    seed=sft_cfg.seed, max_history=sft_cfg.max_history, max_pairs=args.max_pairs,
                    command=command, extra=extra,
                )  # fmt: skip
                r.protocol = f"pairwise/domain-{h}"
                print(f"{method} [{r.protocol}] {r.metrics}", flush=True)
                records.append(r)
                write_records(args.output, records)

    # stage 1: few-shot SFT on domain A
    t0 = time.perf_counter()
    sft_dir = runs / "sft"
    sft = run_sft(sft_cfg, sft_dir, data=domains["A"], command=command)
    evaluate(sft_dir, "sft-fewshot",
             {"n_train": sft_cfg.n_train, "train_steps": sft.train_steps, "batch_size": sft_cfg.training.batch_size,
              "train_seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip

    # stage 2: DMPO K=3 on domain A, from the SFT run
    t0 = time.perf_counter()
    al_cfg = load_config(
        AlignConfig,
        args.align_config,
        [*common, f"model={sft_dir}", f"training.max_steps={args.dmpo_steps}",
         f"training.batch_size={args.dmpo_batch}", f"training.save_steps={max(1, args.dmpo_steps // 2)}"],
    )  # fmt: skip
    al_cfg.training.resume = True
    dmpo_dir = runs / "dmpo"
    al = run_align(al_cfg, dmpo_dir, data=domains["A"], command=command)
    evaluate(dmpo_dir, al_cfg.method_name() + "-fewshot",
             {"n_train": al_cfg.n_train, "negatives": al_cfg.negatives, "train_steps": al.train_steps,
              "batch_size": al_cfg.training.batch_size, "prompt": al_cfg.prompt,
              "train_seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    print(f"wrote {len(records)} records to {args.output}", flush=True)


if __name__ == "__main__":
    main()
