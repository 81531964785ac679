"""``recalign explain``: a short rationale for why an item fits a typed history.

    recalign explain --model DIR --history "Toy Story (1995)" "Babe (1995)" --item "Aladdin (1992)"

The model is asked, in its chat format, what the item has in common with the history, and answers
greedily in a sentence or two (the explanation case study of the DMPO paper); ``recalign recommend
--explain`` does the same for every recommended item. Titles are matched as by ``recommend``.
"""

from __future__ import annotations

import argparse
import json
import sys

from recalign.errors import RecalignInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from recalign.cli.cmd_recommend import add_model_args

    p = subparsers.add_parser(
        "explain",
        help="generate a short rationale for why an item fits a typed history",
        description=__doc__.split("\n\n")[0],
    )
    add_model_args(p)
    p.add_argument(
        "--history", nargs="+", required=True, metavar="TITLE", help="watched titles, oldest first"
    )
    p.add_argument("--item", required=True, metavar="TITLE", help="the item to explain")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from recalign.cli.cmd_recommend import parse_opts
    from recalign.lm.recommend import RecommendSession, load_catalogue, match_titles

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    dataset = load_catalogue(args.model, args.dataset, args.path, parse_opts(args.opt))
    try:  # titles first: a typo fails before the model loads
        match_titles(dataset, args.history, "history")
        j = match_titles(dataset, [args.item], "item")[0]
    except RecalignInputError as e:
        raise RecalignInputError(e.problem, source="command line") from None
    session = RecommendSession.load(args.model, catalogue=dataset, dtype=args.dtype)
    text = session.explain(args.history, args.item)
    if args.json:
        out = {"item_id": session.item_ids[j], "title": session.titles[j], "explanation": text}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(f"{session.titles[j]}: {text}" if text else f"{session.titles[j]}: (no explanation generated)")
    if not text:
        print("note: the model generated no text for this prompt", file=sys.stderr)
    return 0
