"""Preference summaries: the LM reads a user's recent history and describes their tastes in a sentence or two.

Prompt. The history is the user's last ``max_history`` items, oldest first, each as its display title
(with year) and, when the catalogue has them, its genres -- genres are what a small LM can generalise
from, titles alone often are not. The phrasings are registered as the prompt task
``preference_summary`` in :mod:`recalign.lm.prompts` (several phrasings, one chosen per
``(seed, user, position)`` like every other task), each ending with the marker ``"Summary:"``. The
prompt then goes through the one tokenisation rule (``encode_prompt``): for a chat model such as
SmolLM2-Instruct it is the user turn of the model's chat template with the assistant header appended,
and the summary is the assistant's reply.

Sampling. DPO needs *different* summaries of the same user to compare, so summaries are sampled
(temperature, nucleus top-p), N per user, in batches of whole users. The N summaries of a user share
their prompt, so the prompt is run once and its KV cache copied to the N rows
(:func:`recalign.lm.sampling.sample_continuations`): on SmolLM2 and this CPU a summary costs ~0.3 s
instead of ~1 s with the prompt listed N times through ``generate``. Every batch is seeded from ``(seed,
tag, batch index)``: the same request list and settings give the same texts on every run, and a batch's
texts do not depend on which batches ran before it -- which is what makes the sharded, resumable writing
below exact.

Resumability. Sampling a few thousand summaries with a 135M model on a CPU takes a long time. With a
``shard_dir``, each batch is written as its own JSONL shard (write-then-rename) the moment it is done,
next to a manifest fingerprinting the requests and settings; a rerun reuses finished shards and refuses
(one-line error) a directory written for different requests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError
from recalign.io import atomic_write_json, atomic_write_text
from recalign.lm.prompts import (
    PromptTemplate,
    display_titles,
    format_list,
    get_templates,
    item_noun,
    register_template,
    resolve_template,
)

SUMMARY_TASK = "preference_summary"
SUMMARY_MARKER = "Summary:"

SUMMARY_TEMPLATES = [
    PromptTemplate(
        name="summary_describe",
        text=(
            "A user recently watched these {nouns}, oldest first:\n{history}\n\n"
            "Describe this user's {noun} preferences in one or two sentences: the genres, eras and moods "
            "they enjoy. Do not list the titles.\n" + SUMMARY_MARKER
        ),
        history_style="numbered",
        answer_marker=SUMMARY_MARKER,
    ),
    PromptTemplate(
        name="summary_profile",
        text=(
            "Here is the recent {noun} history of a user (oldest to newest):\n{history}\n\n"
            "Write a short profile of this user's taste in {nouns} (one or two sentences, no titles).\n"
            + SUMMARY_MARKER
        ),
        history_style="lines",
        answer_marker=SUMMARY_MARKER,
    ),
    PromptTemplate(
        name="summary_recommender",
        text=(
            "You help a recommender system. The user enjoyed: {history}.\n"
            "Summarise in one or two sentences what kind of {nouns} this user likes, so that new "
            "{nouns} can be suggested.\n" + SUMMARY_MARKER
        ),
        history_style="quoted",
        answer_marker=SUMMARY_MARKER,
    ),
]


def _register() -> None:
    known = {t.name for t in get_templates_safe()}
    for t in SUMMARY_TEMPLATES:
        if t.name not in known:
            register_template(SUMMARY_TASK, t)


def get_templates_safe() -> list[PromptTemplate]:
    try:
        return get_templates(SUMMARY_TASK)
    except RecalignInputError:
        return []


_register()


# ---------------------------------------------------------------------- prompts
def history_lines(
    dataset: RecDataset,
    history: Sequence[int] | np.ndarray,
    max_history: int = 10,
    include_genres: bool = True,
) -> list[str]:
    """The last ``max_history`` items as ``"Title (year) [Genre, Genre]"`` (genres only if present)."""
    hist = np.asarray(history, dtype=np.int64)[-max_history:]
    titles = display_titles(dataset, hist)
    if not include_genres or "genres" not in dataset.items.columns:
        return titles
    genres = dataset.items["genres"].iloc[hist].tolist()
    out = []
    for t, g in zip(titles, genres):
        parts = [
            p.strip() for p in str(g).split("|") if p.strip() and p.strip().lower() not in ("nan", "none")
        ]
        out.append(f"{t} [{', '.join(parts)}]" if parts else t)
    return out


def summary_prompt(
    dataset: RecDataset,
    history: Sequence[int] | np.ndarray,
    *,
    template: PromptTemplate | int | str | None = None,
    seed: int = 0,
    user: int = 0,
    position: int = 0,
    max_history: int = 10,
    include_genres: bool = True,
) -> str:
    """The summary instruction for one user's history (phrasing chosen by seed unless given)."""
    t = resolve_template(template, seed=seed, user=user, position=position, task=SUMMARY_TASK)
    noun, nouns = item_noun(dataset)
    lines = history_lines(dataset, history, max_history, include_genres)
    return t.text.format(noun=noun, nouns=nouns, history=format_list(lines, t.history_style))


@dataclass
class SummaryRequest:
    """One prompt to summarise: the example it belongs to (user, position of the target) and the text."""

    user: int
    position: int
    prompt: str


def build_requests(
    dataset: RecDataset,
    examples: pd.DataFrame,
    *,
    seed: int = 0,
    template: str | None = None,
    max_history: int = 10,
    include_genres: bool = True,
) -> list[SummaryRequest]:
    """A summary prompt per row of a split's examples frame (``user``, ``position``, ``history``)."""
    return [
        SummaryRequest(
            user=int(u),
            position=int(p),
            prompt=summary_prompt(
                dataset,
                h,
                template=template,
                seed=seed,
                user=int(u),
                position=int(p),
                max_history=max_history,
                include_genres=include_genres,
            ),
        )
        for u, p, h in zip(examples["user"], examples["position"], examples["history"])
    ]


# ---------------------------------------------------------------------- sampling
@dataclass
class SummaryRecord:
    """One generated summary (``sample`` = 0..N-1 for the N samples of one request)."""

    user: int
    position: int
    sample: int
    prompt: str
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def _fingerprint(requests: Sequence[SummaryRequest], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in requests:
        h.update(f"{r.user}|{r.position}|{len(r.prompt)}|".encode())
        h.update(r.prompt.encode())
    return h.hexdigest()


def _batch_seed(seed: int, tag: str, batch: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{tag}|{batch}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def generate_summaries(
    model,
    tokenizer,
    requests: Sequence[SummaryRequest],
    *,
    n_samples: int = 4,
    sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.9,
    max_new_tokens: int = 40,
    batch_size: int = 8,
    seed: int = 0,
    tag: str = "summaries",
    shard_dir: str | Path | None = None,
    progress: bool = True,
) -> list[SummaryRecord]:
    """``n_samples`` summaries per request (greedy decoding gives identical samples: use ``n_samples=1``).

    Requests are taken whole, ``max(1, batch_size // n_samples)`` per batch, so a batch decodes about
    ``batch_size`` summaries; each request's prompt is prefilled once for its ``n_samples`` summaries
    (:func:`recalign.lm.sampling.sample_continuations`; models it cannot serve fall back to
    ``generate`` over the prompt repeated). Each batch samples with a generator seeded from ``(seed,
    tag, batch index)``. With ``shard_dir`` every finished batch is saved and reused by a rerun (see the
    module docstring). The result is request-major (request 0's samples first).
    """
    if n_samples < 1:
        raise ValueError("n_samples must be >= 1")
    per_batch = max(1, batch_size // n_samples)
    settings = {
        "n_samples": n_samples,
        "sample": sample,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "tag": tag,
        "layout": "shared-prompt",  # batches of whole requests, one prefill each
    }
    shards = Path(shard_dir) if shard_dir is not None else None
    if shards is not None:
        shards.mkdir(parents=True, exist_ok=True)
        fp = _fingerprint(requests, settings)
        manifest = shards / "manifest.json"
        if manifest.is_file():
            old = json.loads(manifest.read_text(encoding="utf-8"))
            if old.get("fingerprint") != fp:
                raise RecalignInputError(
                    "holds summaries generated for other prompts or settings; use a fresh output directory",
                    source=shards,
                )
        else:
            atomic_write_json(manifest, {"fingerprint": fp, "requests": len(requests), **settings})
    out: list[SummaryRecord] = []
    starts = list(range(0, len(requests), per_batch))
    bar = tqdm(starts, desc=f"summaries ({tag})", unit="batch", disable=not progress)
    for b, start in enumerate(bar):
        chunk = requests[start : start + per_batch]
        shard = shards / f"shard-{b:05d}.jsonl" if shards is not None else None
        if shard is not None and shard.is_file():
            rows = [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines() if line]
            if len(rows) == len(chunk) * n_samples:
                out.extend(SummaryRecord(**row) for row in rows)
                continue
        texts = _batch_texts(
            model,
            tokenizer,
            [r.prompt for r in chunk],
            n_samples=n_samples,
            sample=sample,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=_batch_seed(seed, tag, b),
        )
        recs = [
            SummaryRecord(user=r.user, position=r.position, sample=s, prompt=r.prompt, text=texts[i][s])
            for i, r in enumerate(chunk)
            for s in range(n_samples)
        ]
        if shard is not None:
            atomic_write_text(shard, "".join(json.dumps(x.to_dict()) + "\n" for x in recs))
        out.extend(recs)
    bar.close()
    return out


def _batch_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n_samples: int,
    sample: bool,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> list[list[str]]:
    """``n_samples`` texts per prompt: one prefill per prompt where the model allows it, else ``generate``."""
    import torch

    from recalign.lm.generation import decode_answer, generate_answers, pad_id
    from recalign.lm.prompts import encode_prompt, stop_token_ids
    from recalign.lm.sampling import sample_continuations, shared_sampling_unsupported

    if shared_sampling_unsupported(model, max_new_tokens=max_new_tokens):  # e.g. encoder-decoders
        flat = generate_answers(
            model,
            tokenizer,
            [p for p in prompts for _ in range(n_samples)],
            batch_size=len(prompts) * n_samples,
            max_new_tokens=max_new_tokens,
            progress=False,
            do_sample=sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        return [flat[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))]
    stops = stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    try:
        out = sample_continuations(
            model,
            [encode_prompt(tokenizer, p) for p in prompts],
            n_samples=n_samples,
            stop_ids=stops,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature,
            top_p=top_p,
            pad_id=pad_id(tokenizer),
            generator=torch.Generator().manual_seed(int(seed)),
        )
    finally:
        if was_training:
            model.train()
    return [[decode_answer(tokenizer, ids, stops) for ids in per_prompt] for per_prompt in out.generated]


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
