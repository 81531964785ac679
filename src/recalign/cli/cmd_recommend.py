"""``recalign recommend``: ranked recommendations from a saved model for a history you type.

    recalign recommend --model DIR --history "Toy Story (1995)" "Fargo (1996)" [-k 10] [--explain]
    recalign recommend --model DIR --history ... --candidates T1 T2 ...   # rank only these
    recalign recommend --model DIR --history ... --method two-stage --retriever sasrec
    recalign recommend --model DIR --input users.jsonl --output recs.jsonl  # one history per line

What is ranked (the library is :class:`recalign.lm.recommend.RecommendSession`):

- by default the **whole catalogue minus the history**, against the next-item prompt without a list.
  ``--method exact`` (default) returns the exact top-k with a pruned search over the title trie (a few
  seconds for SmolLM2 on ML-100K; the same items, order and scores as scoring every title, which
  ``--method exhaustive`` does, in minutes). ``--method two-stage``: a classical model
  (``--retriever pop|sasrec|gru4rec``, trained when the command starts) retrieves ``--retrieve N``
  unseen items and the LM ranks them with the candidate prompt it was trained on;
- ``--candidates``: exactly those titles, listed in the candidate prompt as in evaluation;
  ``--sample N``: N random unseen items (``--seed``), ranked the same way.

CLLM4Rec run directories score every item in one pass (``--user ID`` uses a known user's token).
``--explain`` adds a one- or two-sentence rationale per item (see ``recalign explain``).

Titles are matched exactly, then case-insensitively (with or without the year); an unknown or
ambiguous title is a one-line error (exit 2) with the closest catalogue titles as suggestions.

Batch mode: ``--input`` holds one JSON value per line -- a list of titles (the history), or an object
``{"history": [...], "k": 5, "candidates": [...], "user": "...", "id": ...}`` (only ``history``
required; ``id`` is copied to the output). Blank lines are ignored. Every line is checked before the
model loads; any bad line is reported as ``error: FILE:LINE: problem`` (all of them) and nothing is
written (exit 2). ``--output`` gets one JSON object per input line, in order, written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from recalign.cli.cmd_data import add_source_args, parse_opts
from recalign.errors import RecalignInputError
from recalign.lm.recommend import METHODS, RETRIEVERS, Recommendation, match_titles

__all__ = ["Recommendation", "match_titles", "recommend", "register"]

#: bad input lines listed before "... and N more"
MAX_REPORTED = 20
_LINE_KEYS = {"history", "k", "candidates", "user", "id", "sample"}


def recommend(
    model,
    tokenizer,
    dataset,
    history: list[str],
    *,
    candidates: list[str] | None = None,
    sample: int | None = None,
    k: int = 10,
    seed: int = 0,
    max_history: int = 10,
    method: str = "exact",
    progress: bool = True,
) -> list[Recommendation]:
    """Top-``k`` items for a typed history (titles), best first (see the module docstring for modes).

    A one-call wrapper around :class:`~recalign.lm.recommend.RecommendSession` (which keeps the title
    trie between calls: use it directly for more than one history).
    """
    from recalign.lm.recommend import RecommendSession

    session = RecommendSession(model, tokenizer, dataset, seed=seed, max_history=max_history)
    return session.recommend(
        history, k=k, candidates=candidates, sample=sample, method=method, progress=progress
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--threads`` and the catalogue source (shared with explain / serve)."""
    p.add_argument(
        "--model",
        required=True,
        help="run directory, adapter directory, base model name/path, or a CLLM4Rec run directory",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16"],
        help="model weights (default float32: scores exactly as evaluation computes them; bfloat16 is "
        "~2x faster on CPUs with native bf16 and rounds scores to ~3 digits)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    add_source_args(p, default=None)


def add_retriever_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--retriever",
        default=None,
        choices=list(RETRIEVERS),
        help="classical model for --method two-stage (trained on the catalogue's interactions at start)",
    )
    p.add_argument(
        "--retrieve", type=int, default=20, metavar="N", help="items the retriever hands the LM (default 20)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recommend",
        help="rank items for a typed history (or a JSONL file of histories) with a saved model",
        description=__doc__.split("\n\n")[0],
    )
    add_model_args(p)
    p.add_argument("--history", nargs="+", default=None, metavar="TITLE", help="watched titles, oldest first")
    p.add_argument("--candidates", nargs="+", default=None, metavar="TITLE", help="rank only these titles")
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="rank N random unseen items (seeded) instead of all",
    )
    p.add_argument("-k", type=int, default=10, help="how many recommendations (default 10)")
    p.add_argument(
        "--method",
        default="exact",
        choices=list(METHODS),
        help="whole-catalogue ranking: exact (pruned search, default), exhaustive (score every title), "
        "two-stage (--retriever retrieves, the LM re-ranks)",
    )
    add_retriever_args(p)
    p.add_argument("--user", default=None, help="CLLM4Rec: a known user id whose user token to use")
    p.add_argument("--explain", action="store_true", help="add a short rationale per recommended item")
    p.add_argument(
        "--seed", type=int, default=None, help="prompt phrasing / sample seed (default: the model's)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--input", default=None, metavar="FILE.jsonl", help="batch mode: one history per line")
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="batch mode: where to write results")
    p.set_defaults(func=cmd_recommend)


def _check_args(args: argparse.Namespace) -> None:
    if args.input is None and not args.history:
        raise RecalignInputError("give --history TITLE ... or --input FILE.jsonl", source="command line")
    if args.input is not None and args.history:
        raise RecalignInputError("give either --history or --input, not both", source="command line")
    if args.input is not None and not args.output:
        raise RecalignInputError("--input needs --output FILE.jsonl", source="command line")
    if args.output and args.input is None:
        raise RecalignInputError("--output is for batch mode (--input FILE.jsonl)", source="command line")
    if args.k < 1:
        raise RecalignInputError(f"-k must be >= 1, got {args.k}", source="command line")
    if args.sample is not None and args.sample < 1:
        raise RecalignInputError(f"--sample must be >= 1, got {args.sample}", source="command line")
    if args.method == "two-stage" and not args.retriever:
        raise RecalignInputError(
            "--method two-stage needs --retriever pop|sasrec|gru4rec", source="command line"
        )
    if args.retrieve < 1:
        raise RecalignInputError(f"--retrieve must be >= 1, got {args.retrieve}", source="command line")


def read_requests(path: str | Path, dataset, *, default_k: int) -> list[dict]:
    """The requests of a batch file, every line checked (titles included); all problems in one error
    list: raises :class:`RecalignInputError` for the first, with ``.all`` holding every message."""
    path = Path(path)
    if not path.is_file():
        raise RecalignInputError("no such file", source=path)
    requests, problems = [], []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                requests.append(_parse_line(raw, n, dataset, default_k))
            except RecalignInputError as e:
                problems.append(RecalignInputError(e.problem, source=path, line=n, field=e.field))
            except UnicodeDecodeError:  # pragma: no cover - raised by the file iterator instead
                problems.append(RecalignInputError("not UTF-8 text", source=path, line=n))
    if not requests and not problems:
        raise RecalignInputError("no histories in the file (every line is blank)", source=path)
    if problems:
        err = problems[0]
        err.all = problems  # type: ignore[attr-defined]
        raise err
    return requests


def _parse_line(raw: str, n: int, dataset, default_k: int) -> dict:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RecalignInputError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, list):
        value = {"history": value}
    if not isinstance(value, dict):
        raise RecalignInputError(f"expected a list of titles or an object, got {type(value).__name__}")
    unknown = sorted(set(value) - _LINE_KEYS)
    if unknown:
        raise RecalignInputError(f"unknown key '{unknown[0]}' (known: {', '.join(sorted(_LINE_KEYS))})")
    hist = value.get("history")
    if not isinstance(hist, list) or not hist:
        raise RecalignInputError("needs a non-empty list of titles", field="history")
    match_titles(dataset, hist, "history")
    k = value.get("k", default_k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= dataset.n_items:
        raise RecalignInputError(f"must be an integer between 1 and {dataset.n_items}, got {k!r}", field="k")
    cands = value.get("candidates")
    if cands is not None:
        if not isinstance(cands, list) or not cands:
            raise RecalignInputError("must be a non-empty list of titles", field="candidates")
        match_titles(dataset, cands, "candidate")
    sample = value.get("sample")
    if sample is not None and (not isinstance(sample, int) or isinstance(sample, bool) or sample < 1):
        raise RecalignInputError(f"must be a positive integer, got {sample!r}", field="sample")
    user = value.get("user")
    if user is not None and not isinstance(user, str | int):
        raise RecalignInputError("must be a user id (string)", field="user")
    return {"line": n, **value, "k": k}


def _prepare_output(path: str | Path) -> Path:
    out = Path(path)
    if out.is_dir():
        raise RecalignInputError("is a directory; give a file name, e.g. recs.jsonl", source=out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        from recalign.rundir import open_output_dir
    except ImportError:  # pragma: no cover - older trees without the output-directory guard
        parent.mkdir(parents=True, exist_ok=True)
    else:
        open_output_dir(parent, option="--output", lock=False)
    if not os.access(parent, os.W_OK):
        raise RecalignInputError("cannot write here", source=parent)
    return out


def _print_table(recs: list[Recommendation]) -> None:
    width = max(len(r.title) for r in recs)
    for r in recs:
        print(f"{r.rank:>3}. {r.title:<{width}}  {r.score:9.3f}")
        if r.explanation is not None:
            print(f"     {r.explanation}")


def cmd_recommend(args: argparse.Namespace) -> int:
    from recalign.lm.recommend import RecommendSession, load_catalogue

    _check_args(args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    dataset = load_catalogue(args.model, args.dataset, args.path, parse_opts(args.opt))
    # Check every title before the (slower) model load, so that a typo fails fast.
    requests = None
    out_path = None
    if args.input is not None:
        out_path = _prepare_output(args.output)
        try:
            requests = read_requests(args.input, dataset, default_k=args.k)
        except RecalignInputError as e:
            problems = getattr(e, "all", [e])
            for p in problems[:MAX_REPORTED]:
                print(f"error: {p}", file=sys.stderr)
            if len(problems) > MAX_REPORTED:
                print(f"error: ... and {len(problems) - MAX_REPORTED} more bad lines", file=sys.stderr)
            return 2
    else:
        try:
            match_titles(dataset, args.history, "history")
            if args.candidates:
                match_titles(dataset, args.candidates, "candidate")
        except RecalignInputError as e:
            raise RecalignInputError(e.problem, source="command line") from None
    session = RecommendSession.load(
        args.model, catalogue=dataset, dtype=args.dtype, retriever=args.retriever, retrieve=args.retrieve,
        progress=True,
    )  # fmt: skip
    if args.seed is not None:
        session.seed = args.seed
    if requests is not None:
        return _run_batch(session, requests, args, out_path)
    try:
        recs = session.recommend(
            args.history, k=args.k, candidates=args.candidates, sample=args.sample, method=args.method,
            user=args.user, explain=args.explain, progress=True,
        )  # fmt: skip
    except RecalignInputError as e:
        raise RecalignInputError(e.problem, source="command line", field=e.field) from None
    if args.json:
        print(json.dumps([r.to_dict() for r in recs], indent=2))
    else:
        _print_table(recs)
    st = session.last_stats
    print(f"({st.get('method')}: top {len(recs)} in {st.get('seconds', 0):.1f} s)", file=sys.stderr)
    return 0


def _run_batch(session, requests: list[dict], args: argparse.Namespace, out_path: Path) -> int:
    from tqdm.auto import tqdm

    from recalign.io import atomic_write_bytes

    lines = []
    for req in tqdm(requests, desc="recommending", unit="user"):
        try:
            recs = session.recommend(
                req["history"], k=req["k"], candidates=req.get("candidates"), sample=req.get("sample"),
                method=args.method, user=req.get("user", args.user), explain=args.explain,
            )  # fmt: skip
        except RecalignInputError as e:  # e.g. two-stage k above --retrieve: this line, nothing written
            raise RecalignInputError(e.problem, source=args.input, line=req["line"], field=e.field) from None
        row = {"line": req["line"]}
        if "id" in req:
            row["id"] = req["id"]
        row["history"] = req["history"]
        row["recommendations"] = [r.to_dict() for r in recs]
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_bytes(out_path, ("\n".join(lines) + "\n").encode("utf-8"))
    print(f"wrote {len(lines)} lines to {out_path}", file=sys.stderr)
    return 0
