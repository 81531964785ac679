"""``recalign serve``: recommendations and explanations over HTTP, the model loaded once.

    recalign serve --model DIR [--host 127.0.0.1] [--port 8000] [--retriever sasrec]

Endpoints: ``POST /recommend``, ``POST /explain``, ``GET /health``; the OpenAPI description at
``/openapi.json`` and an interactive page at ``/docs``. Errors are one JSON line ``{"error": "..."}``
with a 4xx status (400 malformed JSON, 413 oversized body, 422 unknown titles, empty histories, ``k`` out
of range). ``--port 0`` picks a free port; the first line printed gives the address. Stop with Ctrl-C.

    curl -s localhost:8000/recommend -H 'content-type: application/json' \\
         -d '{"history": ["Toy Story (1995)", "Fargo (1996)"], "k": 5}'
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from recalign.cli.cmd_recommend import add_model_args, add_retriever_args

    p = subparsers.add_parser(
        "serve",
        help="serve recommend / explain over HTTP (FastAPI + uvicorn)",
        description=__doc__.split("\n\n")[0],
    )
    add_model_args(p)
    add_retriever_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="refuse larger request bodies with 413 (default 64 KiB)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from recalign.cli.cmd_recommend import parse_opts
    from recalign.errors import RecalignInputError
    from recalign.lm.recommend import RecommendSession
    from recalign.logs import verbose
    from recalign.serve.app import MAX_BODY_BYTES, create_app, serve

    if not 0 <= args.port <= 65535:
        raise RecalignInputError(f"--port must be in 0..65535, got {args.port}", source="command line")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise RecalignInputError("--max-body-bytes must be >= 1", source="command line")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    session = RecommendSession.load(
        args.model, dataset=args.dataset, path=args.path, options=parse_opts(args.opt), dtype=args.dtype,
        retriever=args.retriever, retrieve=args.retrieve, progress=True,
    )  # fmt: skip
    app = create_app(session, max_body_bytes=args.max_body_bytes or MAX_BODY_BYTES)
    try:
        serve(
            app, args.host, args.port, log_level="info" if verbose() else "warning",
            announce=lambda line: print(line, flush=True),
        )  # fmt: skip
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0
