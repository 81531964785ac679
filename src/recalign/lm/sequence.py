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

**The item head** (``hybrid.item_head``, :meth:`recalign.lm.hybrid.ItemTokens.add_item_head`, E4SRec /
CLLM4Rec style): the title-only hybrid run's training NLL was no lower than text SFT's -- decoding SASRec's
space into a dozen title tokens is a lot to ask of a LoRA adapter in 300 steps. With a head, the hidden
state that predicts a target line's first token (position ``span_start - 1``: the previous item's soft
token in a hybrid document) is also scored against the whole catalogue, ``h . Q(E_j) + b_j``, and the
objective adds ``item_head_weight`` x the mean cross-entropy of the target *item* (documents carry
``items``, the item id of every target span) to the title NLL, from the same decoder pass. Candidates
can then be ranked by the title (``item_score="title"``), by the head's log-softmax at the prompt's last
position (``"item"``: the last history item's soft token, which is exactly the hidden state that
predicted the target in training) or by their sum (``"sum"``, the default for a model with a head).
Without a head nothing changes: the same forward, loss and scores as before.
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
from recalign.errors import RecalignInputError
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
        """``{"tokens": [...], "targets": [[start, end), ...], "items": [...]}``: token spans of the
        target lines (never a soft token: those sit between lines, after every item but the last) and
        the item of each span, in the same order (the item head's labels)."""
        ids = list(self.header)
        spans: list[list[int]] = []
        items: list[int] = []
        last = len(w.items) - 1
        for k, item in enumerate(w.items):
            line = self.lines[int(item)]
            if k >= w.first_target:
                spans.append([len(ids), len(ids) + len(line)])
                items.append(int(item))
            ids.extend(line)
            if k < last:
                ids.extend(self._soft(item))
        return {"tokens": ids, "targets": spans, "items": items}


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


def _item_head(model):
    """The model's :class:`~recalign.lm.hybrid.ItemTokens` if it has an item head, else None (the same as
    :func:`recalign.lm.hybrid.item_head_of`, through the older ``item_tokens_of`` so that a long-running
    process that imported :mod:`recalign.lm.hybrid` before the head existed keeps working)."""
    from recalign.lm.hybrid import item_tokens_of

    module = item_tokens_of(model)
    return module if getattr(module, "item_head", None) is not None else None


def _item_positions(batch: dict) -> tuple[list[int], list[int], list[int]]:
    """(row, position of the hidden state that predicts the span's first token, item) per target span."""
    if "items" not in batch:
        raise ValueError("sequence documents carry no 'items' (the item head's labels)")
    rows, pos, items = [], [], []
    for b, (spans, its) in enumerate(zip(batch["targets"], batch["items"])):
        if len(spans) != len(its):
            raise ValueError(f"document {b} has {len(spans)} target spans but {len(its)} items")
        for (start, _), item in zip(spans, its):
            rows.append(b)
            pos.append(start - 1)
            items.append(int(item))
    return rows, pos, items


def padded_hidden(model, docs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Final hidden states ``[B, T_max, d]`` (what the LM head sees) of right-padded id lists.

    A 2-D attention mask over right padding leaves every real token's positions and hidden state as if
    its row ran alone; hybrid ids (soft tokens) go in as ``inputs_embeds``
    (:func:`recalign.lm.hybrid.decoder_inputs`).
    """
    from recalign.lm.hybrid import decoder_inputs
    from recalign.lm.scoring import decoder_and_head

    decoder, head = decoder_and_head(model)
    device = head.weight.device
    t_max = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), t_max, dtype=torch.long, device=device)
    att = torch.zeros(len(docs), t_max, dtype=torch.long, device=device)
    for r, d in enumerate(docs):
        ids[r, : len(d)] = torch.tensor(list(d), device=device)
        att[r, : len(d)] = 1
    return decoder(**decoder_inputs(model, ids), attention_mask=att).last_hidden_state


def sequence_logprobs(model, batch: dict, *, items: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(token log-probs [n_target_tokens], item log-probs [n_target_items] or None)`` of a batch.

    The first is :func:`sequence_token_logprobs`'. With ``items`` (the model must have an item head,
    :func:`recalign.lm.hybrid.item_head_of`) the second is ``log softmax_j(h . Q(E_j) + b_j)`` at each
    target span's item, ``h`` the hidden state at ``span_start - 1``, from the *same* decoder pass.
    """
    from recalign.lm.scoring import decoder_and_head, token_logprobs

    _, head = decoder_and_head(model)
    device = head.weight.device
    rows, pos, tgt = _target_positions(batch)  # checks first: no target is a soft token
    module = None
    if items:
        module = _item_head(model)
        if module is None:
            raise ValueError("item log-probs asked for but the model has no item head")
        i_rows, i_pos, i_tgt = _item_positions(batch)
    hidden = padded_hidden(model, batch["tokens"])
    h = hidden[torch.tensor(rows, device=device), torch.tensor(pos, device=device)]
    token_lp = token_logprobs(model, head, h, torch.tensor(tgt, device=device))
    if module is None:
        return token_lp, None
    h_items = hidden[torch.tensor(i_rows, device=device), torch.tensor(i_pos, device=device)]
    item_lp = module.item_logits(h_items).log_softmax(-1)
    return token_lp, item_lp.gather(-1, torch.tensor(i_tgt, device=device)[:, None]).squeeze(-1)


def head_logprobs(model, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[B, n_items]`` item-head log-softmax ``log softmax_j(h . Q(E_j) + b_j)`` at each prompt's last
    token: one decoder pass over the right-padded prompts (:func:`padded_hidden`), differentiable."""
    module = _item_head(model)
    if module is None:
        raise RecalignInputError("item log-probs need a model with an item head (hybrid.item_head)")
    hidden = padded_hidden(model, prompts)
    dev = hidden.device
    last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    h = hidden[torch.arange(len(prompts), device=dev), last]
    return module.item_logits(h).log_softmax(-1)


def item_logprobs(model, prompts: Sequence[Sequence[int]], items: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[B, A]`` :func:`head_logprobs` gathered at each row's ``A`` items (differentiable).

    This is the item head's answer to "what comes next" over the whole catalogue, so it is the natural
    policy log-prob for preference alignment of an item-head model (``align.score=item``): one forward
    per prompt instead of one title per candidate."""
    if len(prompts) != len(items) or len({len(r) for r in items}) > 1:
        raise ValueError("item_logprobs wants one equally long item list per prompt")
    lp = head_logprobs(model, prompts)
    return lp.gather(-1, torch.tensor([list(map(int, r)) for r in items], device=lp.device))


def sequence_token_logprobs(model, batch: dict) -> torch.Tensor:
    """log p(token) of every target-line token of the batch's documents, ``[n_target_tokens]``.

    Documents are right-padded into one batch with a 2-D attention mask; the LM head (the vocabulary,
    the dominant CPU cost) runs only on the hidden states that predict a target token. Hybrid documents
    (soft item tokens, negative ids) enter the decoder as ``inputs_embeds`` through
    :func:`recalign.lm.hybrid.decoder_inputs`, differentiable in the projector; text-only documents take
    the plain ``input_ids`` path.
    """
    return sequence_logprobs(model, batch)[0]


class SequenceObjective:
    """Mean NLL over the target-line tokens of a batch of documents (every item after the context).

    A model with an item head (:func:`recalign.lm.hybrid.item_head_of`) gets ``item_head_weight`` x the
    mean cross-entropy of the target items over the catalogue added (logged as ``item_ce``; ``nll``
    stays the title NLL). The trainer weights a micro-batch's loss by its share of the step's *target
    tokens* (:meth:`loss_items`); the item term rides along with that weight, which is exact for one
    micro-batch per step (the benchmark configs) and close otherwise.
    """

    def __init__(self, item_head_weight: float = 1.0) -> None:
        self.item_head_weight = float(item_head_weight)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        n_items = sum(len(s) for s in batch["targets"])
        if _item_head(model) is None:
            lp = sequence_token_logprobs(model, batch)
            loss = -lp.sum() / max(lp.numel(), 1)
            return loss, {"nll": loss.detach(), "targets": float(n_items) / len(batch["tokens"])}
        lp, item_lp = sequence_logprobs(model, batch, items=True)
        nll = -lp.sum() / max(lp.numel(), 1)
        item_ce = -item_lp.sum() / max(item_lp.numel(), 1)
        loss = nll + self.item_head_weight * item_ce
        logs = {
            "nll": nll.detach(),
            "item_ce": item_ce.detach(),
            "targets": float(n_items) / len(batch["tokens"]),
        }
        return loss, logs

    @staticmethod
    def loss_items(batch: dict) -> int:
        """Target tokens the loss averages over (see :mod:`recalign.training.trainer`)."""
        return sum(end - start for spans in batch["targets"] for start, end in spans)


# ---------------------------------------------------------------------- the recommender
#: How :class:`SequenceLMRecommender` scores an item (see its docstring).
ITEM_SCORES = ("auto", "title", "item", "sum")


def resolve_item_score(model, item_score: str, *, field: str | None = None) -> str:
    """``item_score`` for ``model``: ``"auto"`` -> ``"sum"`` with an item head, ``"title"`` without; a
    one-line error (about ``field``, if given) for an unknown mode or a head mode without a head."""
    from recalign.errors import RecalignInputError

    if item_score not in ITEM_SCORES:
        raise RecalignInputError(
            f"unknown item score {item_score!r} (choose from {', '.join(ITEM_SCORES)})", field=field
        )
    head = _item_head(model) is not None
    if item_score == "auto":
        return "sum" if head else "title"
    if item_score != "title" and not head:
        raise RecalignInputError(
            f"item score {item_score!r} needs a model with an item head (hybrid.item_head); this one has none",
            field=field,
        )
    return item_score


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

    ``item_score`` (:data:`ITEM_SCORES`): ``"title"`` the line's log-prob (the only mode without an item
    head); ``"item"`` the item head's log-softmax over the catalogue at the prompt's last position;
    ``"sum"`` both added; ``"auto"`` (default) is ``"sum"`` for a model with an item head and
    ``"title"`` otherwise. Asking for ``"item"`` / ``"sum"`` of a model without a head is a one-line
    error.
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
        item_score: str = "auto",
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
        self.item_score = resolve_item_score(model, item_score)

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
        """``[n, C]`` score of each candidate after the example's history (:attr:`item_score`): the
        summed log-prob of its line, the item head's log-softmax, or both added."""
        prompts = self.prompts(examples)
        cands = [np.asarray(c, dtype=np.int64) for c in examples["candidates"]]
        n_c = max((len(c) for c in cands), default=0)
        out = np.full((len(prompts), n_c), -np.inf)
        batches = range(0, len(prompts), self.batch_size)
        show = self.progress and len(batches) > 1
        for start in tqdm(batches, desc=f"{self.name}: scoring", disable=not show):
            p = prompts[start : start + self.batch_size]
            c = cands[start : start + self.batch_size]
            s = np.zeros((len(p), max((len(x) for x in c), default=0)))
            if self.item_score != "item":
                s = s + self._score(p, [[self.codec.lines[int(i)] for i in x] for x in c], None)
            if self.item_score != "title":
                head = self._head_scores(p)
                for r, x in enumerate(c):
                    s[r, : len(x)] += head[r, x]
            out[start : start + len(p), : s.shape[1]] = s
        return out

    def score_all(self, examples: pd.DataFrame) -> np.ndarray:
        """``[n, n_items]`` score of every catalogue item (title: one shared-prefix pass per example)."""
        prompts = self.prompts(examples)
        out = np.zeros((len(prompts), len(self.codec.lines)))
        show = self.progress and len(prompts) > 1
        if self.item_score != "item":
            for i, p in enumerate(tqdm(prompts, desc=f"{self.name}: scoring catalogue", disable=not show)):
                out[i] = self._score([p], [self.codec.lines], self.all_chunk_size)[0]
        if self.item_score != "title":
            for start in range(0, len(prompts), self.batch_size):
                out[start : start + self.batch_size] += self._head_scores(
                    prompts[start : start + self.batch_size]
                )
        return out

    def _head_scores(self, prompts: list[list[int]]) -> np.ndarray:
        """``[len(prompts), n_items]`` :func:`head_logprobs` without gradients, as float64 numpy."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                lp = head_logprobs(self.model, prompts)
            return lp.float().cpu().numpy().astype(np.float64)
        finally:
            if was_training:
                self.model.train()

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
