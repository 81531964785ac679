"""``recalign recommend``: ranked recommendations from a language model for a history you type.

    recalign recommend --model DIR --history "Toy Story (1995)" "Fargo (1996)" [--candidates T ...] [-k 10]
    recalign recommend --model DIR --history ... --sample 20      # 20 random unseen items as candidates

Titles are matched to the catalogue exactly, then case-insensitively (with or without the year when
the catalogue has one); an unknown or ambiguous title is a one-line error (exit 2) with the closest
catalogue titles as suggestions.

Three ways to choose what is ranked:

- ``--candidates``: exactly those titles, with the candidate prompt the models are trained on (the
  list appears in the prompt, as in evaluation);
- ``--sample N``: N items drawn (``--seed``) from the catalogue minus the history, ranked the same way;
- neither: the **whole catalogue minus the history**, scored against a prompt *without* a list (a list
  of ~1,700 titles would not fit). Every title is an answer scored with the prompt computed once per
  chunk of titles (shared-prefix scoring), but that is still ~20k answer tokens for ML-100K: about a
  minute for SmolLM2 on a laptop CPU, with a progress bar. Models fine-tuned on candidate prompts have
  not seen this open phrasing, so their catalogue-wide ranking is weaker than their candidate ranking.

The catalogue is ``--dataset``/``--path`` if given, else the dataset of the run directory's
``config.yaml``, else the embedded ML-100K. :func:`recommend` is the Python API.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recalign.errors import RecalignInputError

#: answers scored per shared-prefix pass when ranking the whole catalogue
CATALOGUE_CHUNK = 64


@dataclass
class Recommendation:
    rank: int
    item_idx: int
    item_id: str
    title: str
    score: float


def match_titles(dataset, titles: list[str], what: str = "history") -> list[int]:
    """Catalogue indices of ``titles``: exact match first, then case-insensitive; unknown -> error."""
    from recalign.lm.prompts import display_titles

    shown = display_titles(dataset)
    raw = [str(t) for t in dataset.items["title"]]
    exact: dict[str, int] = {}
    folded: dict[str, list[int]] = {}
    for i, (a, b) in enumerate(zip(shown, raw)):
        for t in {a, b}:
            exact.setdefault(t, i)
            folded.setdefault(" ".join(t.casefold().split()), []).append(i)
    out = []
    for t in titles:
        t_clean = " ".join(str(t).split())
        if t_clean in exact:
            out.append(exact[t_clean])
            continue
        hits = sorted(set(folded.get(t_clean.casefold(), [])))
        if len(hits) == 1:
            out.append(hits[0])
            continue
        if len(hits) > 1:
            names = "; ".join(shown[i] for i in hits[:3])
            raise RecalignInputError(f"{what} title {t!r} is ambiguous ({names}); give the exact title")
        close = difflib.get_close_matches(t_clean, shown, n=3, cutoff=0.6)
        hint = f"; did you mean: {'; '.join(close)}" if close else ""
        raise RecalignInputError(f"unknown {what} title {t!r} (not in the {dataset.name} catalogue){hint}")
    return out


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
    progress: bool = True,
) -> list[Recommendation]:
    """Top-``k`` items for a typed history (titles), best first; see the module docstring for modes."""
    import torch
    from tqdm.auto import tqdm

    from recalign.lm.prompts import (
        build_candidate_prompt,
        build_open_prompt,
        display_titles,
        encode_answer,
        encode_prompt,
    )
    from recalign.lm.scoring import answer_logprobs

    if k < 1:
        raise RecalignInputError(f"-k must be >= 1, got {k}", source="command line")
    if not history:
        raise RecalignInputError("--history needs at least one title", source="command line")
    hist = match_titles(dataset, history, "history")
    titles = display_titles(dataset)
    seen = set(hist)
    if candidates:
        pool = match_titles(dataset, candidates, "candidate")
        pool = list(dict.fromkeys(pool))  # a title given twice is one candidate
    elif sample:
        unseen = np.array([i for i in range(dataset.n_items) if i not in seen], dtype=np.int64)
        if sample < 1:
            raise RecalignInputError(f"--sample must be >= 1, got {sample}", source="command line")
        rng = np.random.default_rng([seed, len(hist)])
        pool = rng.choice(unseen, size=min(sample, len(unseen)), replace=False).tolist()
    else:
        pool = [i for i in range(dataset.n_items) if i not in seen]
    if not pool:
        raise RecalignInputError("nothing to rank: every catalogue item is in the history")

    listed = bool(candidates) or bool(sample)
    if listed:
        prompt = build_candidate_prompt(
            dataset, hist, pool, seed=seed, user=0, position=len(hist), max_history=max_history
        )
    else:
        prompt = build_open_prompt(
            dataset, hist, seed=seed, user=0, position=len(hist), max_history=max_history
        )
    p_ids = encode_prompt(tokenizer, prompt)
    answers = [encode_answer(tokenizer, titles[i]) for i in pool]
    chunk = len(answers) if listed else CATALOGUE_CHUNK
    starts = range(0, len(answers), chunk)
    scores: list[float] = []
    model.eval()
    with torch.inference_mode():
        for s in tqdm(starts, desc="scoring catalogue", disable=not (progress and len(starts) > 1)):
            res = answer_logprobs(model, [p_ids], [answers[s : s + chunk]])
            scores.extend(res.sum[0].float().tolist())
    order = np.argsort(-np.asarray(scores), kind="stable")[: min(k, len(pool))]
    ids = dataset.items["item_id"].tolist()
    return [
        Recommendation(
            rank=r + 1,
            item_idx=int(pool[j]),
            item_id=str(ids[pool[j]]),
            title=titles[pool[j]],
            score=float(scores[j]),
        )
        for r, j in enumerate(order)
    ]


def register(subparsers: argparse._SubParsersAction) -> None:
    from recalign.cli.cmd_data import _add_source_args

    p = subparsers.add_parser(
        "recommend",
        help="rank items for a typed history with a saved LM",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="run directory, adapter directory or base model name/path")
    p.add_argument(
        "--history", nargs="+", required=True, metavar="TITLE", help="watched titles, oldest first"
    )
    p.add_argument("--candidates", nargs="+", default=None, metavar="TITLE", help="rank only these titles")
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="rank N random unseen items (seeded) instead of all",
    )
    p.add_argument("-k", type=int, default=10, help="how many recommendations to print (default 10)")
    p.add_argument(
        "--seed", type=int, default=None, help="prompt phrasing / sample seed (default: the model's)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="model weights (default auto)",
    )
    _add_source_args(p, default=None)
    p.set_defaults(func=cmd_recommend)


def _catalogue_source(args: argparse.Namespace, run_dir: Path) -> tuple[str, str | None, dict]:
    from recalign.cli.cmd_data import _parse_opts

    if args.dataset or args.path:
        return args.dataset or "ml-100k", args.path, _parse_opts(args.opt)
    cfg = run_dir / "config.yaml"
    if run_dir.is_dir() and cfg.is_file():
        from recalign.config import read_yaml

        data = read_yaml(cfg).get("data") or {}
        if isinstance(data, dict) and data.get("dataset"):
            return str(data["dataset"]), data.get("path"), dict(data.get("options") or {})
    return "ml-100k", None, {}


def cmd_recommend(args: argparse.Namespace) -> int:
    from recalign.cli.cmd_data import load_with_options
    from recalign.lm.lora import ADAPTER_META, load_lm, resolve_model

    src = resolve_model(args.model)
    meta = {}
    if src.adapter is not None and (src.adapter / ADAPTER_META).is_file():
        meta = json.loads((src.adapter / ADAPTER_META).read_text(encoding="utf-8"))
    name, path, opts = _catalogue_source(args, Path(args.model))
    dataset = load_with_options(name, path, opts)
    # Validate titles before the (slower) model load, so a typo fails fast.
    match_titles(dataset, args.history, "history")
    if args.candidates:
        match_titles(dataset, args.candidates, "candidate")
    model, tok, _ = load_lm(args.model, dtype=args.dtype)
    recs = recommend(
        model,
        tok,
        dataset,
        args.history,
        candidates=args.candidates,
        sample=args.sample,
        k=args.k,
        seed=args.seed if args.seed is not None else int(meta.get("seed", 0)),
        max_history=int(meta.get("max_history", 10)),
    )
    if args.json:
        print(json.dumps([r.__dict__ for r in recs], indent=2))
        return 0
    width = max(len(r.title) for r in recs)
    for r in recs:
        print(f"{r.rank:>3}. {r.title:<{width}}  {r.score:9.3f}")
    return 0
