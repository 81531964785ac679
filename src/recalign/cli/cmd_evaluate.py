"""``recalign evaluate``: score any saved language model on any dataset split.

    recalign evaluate --model DIR_OR_NAME --dataset ml-100k --split llara [--n-test 200]
                      [--protocols candidates,generation,pairwise] [--max-pairs 1] [--no-joint] --output DIR

``--model`` is a base model (``smollm2``, a local HF directory), an adapter directory, or a run
directory of ``recalign sft`` / ``align`` (its adapter is applied to the base it names). The test
examples are the ``--n-test`` rows drawn with ``--seed`` (the same rows every recipe evaluates on);
``--seed`` also seeds the split's candidate sets. Writes ``records.json`` (quality-results shape) and
``metrics.json`` into ``--output``. ``pairwise`` is DMPO's protocol (:mod:`recalign.methods.dmpo`): the
target against ``--max-pairs`` negative candidates per example, each pair in its own "A or B" prompt;
``PairAcc`` is the fraction of pairs where the target's answer scores higher. ``candidates`` and
``generation`` together share one pass over each prompt (:mod:`recalign.lm.joint`; ``--no-joint`` runs
them separately, e.g. to compare timings). A thin layer over
:func:`recalign.methods.zeroshot.evaluate_saved_model`.
"""

from __future__ import annotations

import argparse

from recalign.errors import RecalignInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from recalign.cli.cmd_data import add_source_args

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a saved LM (base, adapter or run dir) on a split",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="base model name/path, adapter directory or run directory")
    add_source_args(p)
    p.add_argument(
        "--split", default="llara", choices=["loo", "llara"], help="split protocol (default llara)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of candidates and of the test sample (default 0)"
    )
    p.add_argument("--candidates", type=int, default=20, help="candidates per example (default 20)")
    p.add_argument("--n-test", type=int, default=200, help="test examples (0 = the whole stage; default 200)")
    p.add_argument("--stage", default="test", choices=["test", "valid"], help="split stage (default test)")
    p.add_argument(
        "--protocols",
        default="candidates,generation",
        help="comma-separated: candidates, generation, full (slow), pairwise (DMPO's A-or-B prompt) "
        "(default candidates,generation)",
    )
    p.add_argument(
        "--max-pairs",
        type=int,
        default=1,
        help="pairwise: negative candidates paired with the target per example (0 = all; default 1)",
    )
    p.add_argument("--method", default=None, help="method name in the records (default: from the adapter)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length limit (default 32)")
    p.add_argument(
        "--no-joint",
        action="store_true",
        help="run candidates and generation as two separate passes over each prompt (default: one pass "
        "serves both, for decoder-only models; same results, less compute)",
    )
    p.add_argument(
        "--item-score",
        default="auto",
        choices=["auto", "title", "item", "sum"],
        help="sequence-format models: rank by title log-prob, item-head log-prob or their sum (default auto: "
        "sum for a model with an item head, title otherwise)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="model weights (default auto)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: one per core)")
    p.add_argument("--output", required=True, help="directory for records.json and metrics.json")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from recalign.cli.cmd_data import parse_opts
    from recalign.data.prepare import DataPrepareConfig
    from recalign.evaluation.records import current_command
    from recalign.methods import set_threads
    from recalign.methods.zeroshot import EvalConfig, evaluate_saved_model

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols:
        raise RecalignInputError("--protocols is empty", source="command line")
    cfg = EvalConfig(
        n_test=args.n_test,
        protocols=protocols,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        stage=args.stage,
        max_pairs=args.max_pairs,
        joint=not args.no_joint,
        item_score=args.item_score,
    )
    data_cfg = DataPrepareConfig(
        dataset=args.dataset,
        path=args.path,
        options=parse_opts(args.opt),
        split=args.split,
        seed=args.seed,
        candidates=args.candidates,
    )
    data_cfg.validate()
    from recalign.rundir import open_output_dir

    open_output_dir(args.output)  # before loading: not a file, writable, not held by another run
    set_threads(args.threads)
    records = evaluate_saved_model(
        args.model,
        data_cfg,
        dtype=args.dtype,
        cfg=cfg,
        seed=args.seed,
        method=args.method,
        output_dir=args.output,
        command=current_command(),
    )
    for r in records:
        shown = ", ".join(
            f"{k}={v:.4f}"
            for k, v in r.metrics.items()
            if k.startswith(("HR@1", "NDCG@10", "Valid", "PairAcc"))
        )
        print(f"{r.method} [{r.protocol}] n={r.n_examples}: {shown}")
    print(f"records: {args.output}/records.json")
    return 0
