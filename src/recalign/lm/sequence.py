"""Sequence SFT: a user's chronological history as one document, a next-item target at every item.

Why: the candidate-prompt SFT of LLaRA / S-DPO spends a whole ~440-token prompt (history + 20 candidate
titles + chat template) on *one* ~10-token target, so a CPU session trains on a few hundred of a split's
tens of thousands of next-item examples. A sequential recommender (SASRec) instead predicts every
position of a sequence in one pass. This module does the same for a language model: a *window* of a
user's training sequence is written as a plain list, one title per line,

    <bos>A user's movies, oldest first:\\n
    Toy Story (1995)\\n
    Fargo (1996)\\n
    ...

and the causal-LM loss is taken on the tokens of every line after the first ``min_context`` (title and
its newline, which ends the item the way end-of-turn ends a chat answer). One forward pass of ~250
tokens thus gives ~20 next-item targets instead of one.

Tokenisation is one rule for training and evaluation: the header and each line are tokenised
*separately* and concatenated (:func:`encode_item_line`), so the evaluation prompt -- the header plus the
history lines -- is token for token a prefix of a training document, and a candidate's answer is exactly
the ids its line would have in a document. Candidates are scored by that answer's log-probability through
the shared-prefix scorer (:func:`recalign.lm.scoring.answer_logprobs`), on the same seeded 20-candidate
lists as every other method; the prompt lists no candidates (a history-only, "open" prompt), so the model
cannot copy from the list and the whole catalogue can be ranked the same way (:meth:`score_all`).

Windows never contain a validation or test target: they are cut from
:meth:`recalign.data.splits.Split.train_sequences` (for ``llara``: each user's items up to the last
training target; for ``loo``: all but the last two). Every item at index ``>= min_context`` of such a
sequence is a target of exactly one window (consecutive windows overlap by ``min_context`` items, which
are context only in the later window).

**Hybrid item tokens** (LLaRA, :mod:`recalign.lm.hybrid`; ``recalign sft`` with ``format: sequence`` and
``hybrid.enabled``): with ``item_tokens=True`` every item's line is followed by that item's soft token
(id ``-(item + 1)``, :func:`recalign.lm.prompts.soft_token_id`: a frozen SASRec's item embedding through
the trainable projector), so a document reads ``Toy Story (1995)\\n[emb] Fargo (1996)\\n[emb] ...`` and
the hidden state that predicts an item's first token sits on the previous item's soft token. The loss
spans are the same line spans as without soft tokens: a soft token is never a label (it is input only;
:func:`sequence_token_logprobs` refuses a target span that covers one), and the last item of a document
gets none (nothing after it is predicted). The evaluation prompt carries the soft token after every
history line and is again token for token a prefix of a training document; a candidate's answer is its
plain line, as in training. A candidate's own soft token would come *after* its line, so it could not
change that line's log-probability: the candidates' soft tokens are left out, and the shared-prefix
scorer (packed / kv / naive, :func:`recalign.lm.scoring.answer_logprobs`) works unchanged because every
soft token lives in the prompt, which it feeds through :func:`recalign.lm.hybrid.decoder_inputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.lm.prompts import display_titles, item_noun, recent_history, soft_token_id

#: Document header (``{nouns}``: "movies", "items", ... from the dataset's catalogue).
HEADER = "A user's {nouns}, oldest first:\n"


# ---------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    """``items[first_target:]`` are the targets of this window (earlier items are context only);
    ``start`` is the index of ``items[0]`` in the user's sequence."""

    user: int
    start: int
    items: np.ndarray
    first_target: int


def sequence_windows(seqs: Sequence[np.ndarray], window: int, min_context: int) -> list[Window]:
    """Cut each user's training sequence into windows of at most ``window`` items.

    Every item at index ``>= min_context`` of a sequence is a target exactly once; a window's first
    ``min_context`` items (all of them for the first window of a user) are context. Sequences with at
    most ``min_context`` items give no window.
    """
    if window <= min_context:
        raise ValueError(f"window ({window}) must be larger than min_context ({min_context})")
    out: list[Window] = []
    step = window - min_context
    for user, seq in enumerate(seqs):
        seq = np.asarray(seq, dtype=np.int64)
        start = 0
        while start + min_context < len(seq):
            items = seq[start : start + window]
            out.append(Window(user=user, start=start, items=items, first_target=min_context))
            start += step
    return out


def split_windows(split: Split, dataset: RecDataset, window: int, min_context: int) -> list[Window]:
    """:func:`sequence_windows` over the split's training sequences (no held-out target inside)."""
    return sequence_windows(split.train_sequences(dataset), window, min_context)


# ---------------------------------------------------------------------- tokenisation (one rule)
def _bos(tokenizer) -> list[int]:
    return [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []


def encode_header(tokenizer, dataset: RecDataset) -> list[int]:
    """``<bos>`` + the header line's ids."""
    _, nouns = item_noun(dataset)
    return _bos(tokenizer) + [
        int(i) for i in tokenizer.encode(HEADER.format(nouns=nouns), add_special_tokens=False)
    ]


def encode_item_line(tokenizer, title: str) -> list[int]:
    """Ids of one item's line (``title + "\\n"``), tokenised on its own: in documents, prompts and answers."""
    return [int(i) for i in tokenizer.encode(title.strip() + "\n", add_special_tokens=False)]


class SequenceCodec:
    """Token ids of documents, prompts and answers for one tokenizer and catalogue (lines cached).

    ``item_tokens``: hybrid documents and prompts, each item's line followed by its soft token (see the
    module docstring); answers (:attr:`lines`) are plain ids either way.
    """

    def __init__(self, tokenizer, dataset: RecDataset, *, item_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.item_tokens = bool(item_tokens)
        self.header = encode_header(tokenizer, dataset)
        self.lines = [encode_item_line(tokenizer, t) for t in display_titles(dataset)]

    def _soft(self, item: int) -> list[int]:
        return [soft_token_id(int(item))] if self.item_tokens else []

    def prompt(self, history: Sequence[int] | np.ndarray) -> list[int]:
        """Header + one line per history item (oldest first), each followed by its soft token when
        hybrid: the prefix a next item is scored after."""
        ids = list(self.header)
        for i in history:
            ids.extend(self.lines[int(i)])
            ids.extend(self._soft(i))
        return ids

    def document(self, w: Window) -> dict:
        """``{"tokens": [...], "targets": [[start, end), ...]}``: token spans of the target lines (never
        a soft token: those sit between lines, after every item but the last)."""
        ids = list(self.header)
        spans: list[list[int]] = []
        last = len(w.items) - 1
        for k, item in enumerate(w.items):
            line = self.lines[int(item)]
            if k >= w.first_target:
                spans.append([len(ids), len(ids) + len(line)])
            ids.extend(line)
            if k < last:
                ids.extend(self._soft(item))
        return {"tokens": ids, "targets": spans}


def sequence_examples(
    tokenizer, dataset: RecDataset, windows: Sequence[Window], *, item_tokens: bool = False
) -> list[dict]:
    """Tokenised training documents, one per window (see :meth:`SequenceCodec.document`); hybrid ones
    (a soft token after each item's line) with ``item_tokens``."""
    codec = SequenceCodec(tokenizer, dataset, item_tokens=item_tokens)
    return [codec.document(w) for w in windows]


def model_prompt_format(src) -> str:
    """The prompt format a loaded model was trained with (``recalign_adapter.json``'s ``prompt_format``):
    ``"sequence"`` or ``"candidates"`` (the default, also for base models and plain peft adapters)."""
    import json

    from recalign.lm.lora import ADAPTER_META

    adapter = getattr(src, "adapter", None)
    if adapter is None or not (adapter / ADAPTER_META).is_file():
        return "candidates"
    meta = json.loads((adapter / ADAPTER_META).read_text(encoding="utf-8"))
    return str(meta.get("prompt_format", "candidates"))


def n_targets(examples: Sequence[dict]) -> int:
    """Next-item targets (items with a loss) over the documents."""
    return sum(len(ex["targets"]) for ex in examples)


# ---------------------------------------------------------------------- the objective
def _target_positions(batch: dict) -> tuple[list[int], list[int], list[int]]:
    rows, pos, tgt = [], [], []
    for b, (ids, spans) in enumerate(zip(batch["tokens"], batch["targets"])):
        for start, end in spans:
            for t in range(start, end):
                if ids[t] < 0:
                    raise ValueError(f"target span [{start}, {end}) of document {b} covers a soft item token")
                rows.append(b)
                pos.append(t - 1)  # the hidden state at t - 1 predicts token t
                tgt.append(ids[t])
    return rows, pos, tgt


def sequence_token_logprobs(model, batch: dict) -> torch.Tensor:
    """log p(token) of every target-line token of the batch's documents, ``[n_target_tokens]``.

    Documents are right-padded into one batch with a 2-D attention mask; the LM head (the vocabulary,
    the dominant CPU cost) runs only on the hidden states that predict a target token. Hybrid documents
    (soft item tokens, negative ids) enter the decoder as ``inputs_embeds`` through
    :func:`recalign.lm.hybrid.decoder_inputs`, differentiable in the projector; text-only documents take
    the plain ``input_ids`` path.
    """
    from recalign.lm.hybrid import decoder_inputs
    from recalign.lm.scoring import decoder_and_head, token_logprobs

    decoder, head = decoder_and_head(model)
    device = head.weight.device
    docs = batch["tokens"]
    t_max = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), t_max, dtype=torch.long, device=device)
    att = torch.zeros(len(docs), t_max, dtype=torch.long, device=device)
    for r, d in enumerate(docs):
        ids[r, : len(d)] = torch.tensor(d, device=device)
        att[r, : len(d)] = 1
    rows, pos, tgt = _target_positions(batch)  # checks first: no target is a soft token
    hidden = decoder(**decoder_inputs(model, ids), attention_mask=att).last_hidden_state
    h = hidden[torch.tensor(rows, device=device), torch.tensor(pos, device=device)]
    targets = torch.tensor(tgt, device=device)
    return token_logprobs(model, head, h, targets)


class SequenceObjective:
    """Mean NLL over the target-line tokens of a batch of documents (every item after the context)."""

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        lp = sequence_token_logprobs(model, batch)
        loss = -lp.sum() / max(lp.numel(), 1)
        n_items = sum(len(s) for s in batch["targets"])
        return loss, {"nll": loss.detach(), "targets": float(n_items) / len(batch["tokens"])}

    @staticmethod
    def loss_items(batch: dict) -> int:
        """Target tokens the loss averages over (see :mod:`recalign.training.trainer`)."""
        return sum(end - start for spans in batch["targets"] for start, end in spans)


# ---------------------------------------------------------------------- the recommender
class SequenceLMRecommender:
    """Rank items by ``log p(line | header + history lines)`` under a sequence-SFT model.

    Implements the :class:`~recalign.recommender.Recommender` protocol used by the evaluation layer:
    ``score_candidates`` (the split's shared candidates) and ``score_all`` (the whole catalogue, seen
    items are excluded by the protocol). History: the last ``max_history`` items of each example.

    ``item_tokens``: hybrid prompts (a soft token after every history line, see the module docstring);
    the default ``None`` follows the model -- hybrid exactly when it carries a projector, which must have
    been built for ``dataset``'s catalogue (:func:`recalign.lm.hybrid.uses_item_tokens`, a one-line
    error otherwise). Candidates are scored as their plain lines either way: a candidate's own soft token
    would follow its line and could not change the line's log-probability.
    """

    def __init__(
        self,
        model,
        tokenizer,
        dataset: RecDataset,
        *,
        name: str = "sft-sequence",
        max_history: int = 20,
        batch_size: int = 8,
        impl: str = "packed",
        all_chunk_size: int = 128,
        progress: bool = True,
        item_tokens: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.name = name
        self.max_history = max_history
        self.batch_size = max(1, int(batch_size))
        self.impl = impl
        self.all_chunk_size = all_chunk_size
        self.progress = progress
        self._item_tokens = item_tokens
        self.codec = self._codec(dataset)

    def _codec(self, dataset: RecDataset) -> SequenceCodec:
        from recalign.lm.hybrid import uses_item_tokens

        hybrid = uses_item_tokens(self.model, dataset) if self._item_tokens is None else self._item_tokens
        return SequenceCodec(self.tokenizer, dataset, item_tokens=hybrid)

    @property
    def item_tokens(self) -> bool:
        """Whether the prompts carry soft item tokens."""
        return self.codec.item_tokens

    def fit(self, dataset: RecDataset, split: Split) -> SequenceLMRecommender:
        """No training here (``recalign sft`` with ``format: sequence`` trains); adopts ``dataset``."""
        if dataset is not self.dataset:
            self.dataset = dataset
            self.codec = self._codec(dataset)
        return self

    def prompts(self, examples: pd.DataFrame) -> list[list[int]]:
        return [self.codec.prompt(recent_history(h, self.max_history)) for h in examples["history"]]

    def score_candidates(self, examples: pd.DataFrame) -> np.ndarray:
        """``[n, C]`` summed log-prob of each candidate's line after the example's history."""
        prompts = self.prompts(examples)
        cands = [np.asarray(c, dtype=np.int64) for c in examples["candidates"]]
        n_c = max((len(c) for c in cands), default=0)
        out = np.full((len(prompts), n_c), -np.inf)
        batches = range(0, len(prompts), self.batch_size)
        show = self.progress and len(batches) > 1
        for start in tqdm(batches, desc=f"{self.name}: scoring", disable=not show):
            p = prompts[start : start + self.batch_size]
            a = [[self.codec.lines[int(i)] for i in c] for c in cands[start : start + self.batch_size]]
            s = self._score(p, a, None)
            out[start : start + len(p), : s.shape[1]] = s
        return out

    def score_all(self, examples: pd.DataFrame) -> np.ndarray:
        """``[n, n_items]`` log-prob of every catalogue item's line (one shared-prefix pass per example)."""
        prompts = self.prompts(examples)
        out = np.empty((len(prompts), len(self.codec.lines)))
        show = self.progress and len(prompts) > 1
        for i, p in enumerate(tqdm(prompts, desc=f"{self.name}: scoring catalogue", disable=not show)):
            out[i] = self._score([p], [self.codec.lines], self.all_chunk_size)[0]
        return out

    def _score(self, prompts, answers, chunk_size) -> np.ndarray:
        from recalign.lm.scoring import answer_logprobs

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                s = answer_logprobs(self.model, prompts, answers, impl=self.impl, chunk_size=chunk_size)
            return s.sum.float().cpu().numpy().astype(np.float64)
        finally:
            if was_training:
                self.model.train()
