"""The three kinds of CLLM4Rec documents, their per-epoch sampling, and batching into tensors.

- **Collaborative** (pretraining): ``"<user_i> has interacted with <item_a> <item_b> …"``. The user token
  is the *soft* part of the prompt, "has interacted with" the *hard* part, the item list the main text.
  Interactions are a set, not a sentence, so the list is shuffled anew every epoch (the paper's
  stochastic reordering); a history longer than ``max_items`` is cut into consecutive chunks of that
  shuffle (balanced sizes, at most ``max_items`` each), so **every interaction of every user is a
  target once per epoch**. Loss positions: every item of the main text, predicted from the token
  before it.
- **Content** (pretraining): ``"<user_i> writes the following review for <item_j>: …"`` when the dataset
  has reviews (only reviews of *training* interactions — a review of a test item would leak it), else
  an item description ``"<item_j> is titled …; genres: …"`` built from title, year and genres. Loss
  positions: the word tokens of the main text.
- **Recommendation** (fine-tuning): ``"<user_i> has interacted with <kept items>; the user will interact
  with:"`` where ~20% of the history (the whole history by default; ``max_items`` > 0 is a documented
  cap: a random sub-history) is *held out* (masked) and becomes the target set of a multinomial
  likelihood over the item head. The targets are exactly the held-out items (the paper),
  not all past items (the released code).

All sampling is a pure function of ``(seed, stream, epoch)`` so that a resumed run sees exactly the
batches an uninterrupted run would have seen.

Batching (:func:`length_buckets`, :func:`collate_lm`): an epoch's shuffled documents are grouped into
batches of similar length (less padding), and LM documents can be *packed* several to a row with a
block-diagonal causal 4-D mask and positions restarting at 0 per document — the same computation as
one row per document (exact up to float rounding), without the padding of short documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recalign.data.dataset import RecDataset
from recalign.methods.cllm4rec.vocab import IDTokenizer, item_token, user_token

COLLAB_PROMPT = "{user} has interacted with"
REVIEW_PROMPT = "{user} writes the following review for {item}:"
DESCRIPTION_PROMPT = "{item} is titled"
REC_PROMPT = "{user} has interacted with{items}; the user will interact with:"

# Stream ids keep the random generators of the different document kinds independent.
STREAM_COLLAB, STREAM_CONTENT, STREAM_REC = 1, 2, 3


@dataclass
class Document:
    """Prompt and main-text token ids. ``targets`` are what the loss positions must predict:
    item indices (collaborative, recommendation) or word ids (content)."""

    user: int
    prompt: list[int]
    main: list[int]
    targets: list[int]
    items: list[int]  # item indices whose ID embeddings appear (for the mutual regulariser)


# ---------------------------------------------------------------------- collaborative documents
def item_list_text(items) -> str:
    return "".join(" " + item_token(i) for i in items)


def chunk_sizes(n: int, max_items: int) -> list[int]:
    """Sizes of the consecutive chunks an ``n``-item list is cut into: ``ceil(n / max_items)`` chunks
    of balanced sizes (differing by at most one), so no chunk is a stub; ``max_items`` 0 = one chunk."""
    if n <= 0:
        return []
    if max_items <= 0 or n <= max_items:
        return [n]
    k = -(-n // max_items)
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def collab_prompt(tok: IDTokenizer, user: int) -> list[int]:
    """Token ids of a collaborative document's prompt for ``user`` (BOS, then the prompt naming the user's
    token); the document's item list follows it."""
    return tok.encode(COLLAB_PROMPT.format(user=user_token(user)), add_bos=True)


def collab_documents(
    tok: IDTokenizer,
    sequences: list[np.ndarray],
    max_items: int,
    seed: int,
    epoch: int,
) -> list[Document]:
    """Every user's distinct training items, shuffled, cut into consecutive chunks of at most
    ``max_items`` (:func:`chunk_sizes`; 0 = one document per user): one epoch makes every interaction a
    target exactly once. Users without items are skipped. The list is in a seeded random order."""
    rng = np.random.default_rng([seed, STREAM_COLLAB, epoch])
    docs: list[Document] = []
    for u, seq in enumerate(sequences):
        if len(seq) == 0:
            continue
        perm = rng.permutation(np.unique(np.asarray(seq, dtype=np.int64)))
        prompt = collab_prompt(tok, u)
        start = 0
        for size in chunk_sizes(len(perm), max_items):
            chunk = perm[start : start + size].tolist()
            start += size
            main = tok.encode(item_list_text(chunk))
            docs.append(Document(u, prompt, main, chunk, chunk))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


# ---------------------------------------------------------------------- content documents
def item_description(dataset: RecDataset, item: int) -> str:
    """``" Toy Story (1995); genres: Animation, Children's, Comedy"`` — the main text after "is titled".

    The year is appended only when the title does not already end with it (ML-100K titles do).
    """
    row = dataset.items.iloc[int(item)]
    title = str(row["title"]).strip()
    text = " " + title
    year = row.get("year") if "year" in row.index else None
    if isinstance(year, str | int) and str(year).strip() and str(year) not in title:
        text += f" ({year})"
    genres = row.get("genres") if "genres" in row.index else None
    if isinstance(genres, str) and genres.strip():
        text += "; genres: " + ", ".join(g for g in genres.split("|") if g)
    desc = row.get("description") if "description" in row.index else None
    if isinstance(desc, str) and desc.strip():
        text += ". " + desc.strip()
    return text


def content_corpus(
    dataset: RecDataset, train_sequences: list[np.ndarray] | None = None
) -> list[tuple[int | None, int, str]]:
    """``(user or None, item, main text)`` triples for the content LM.

    Reviews are used when the dataset has them, restricted to (user, item) pairs in the training
    sequences; otherwise one description per item (item metadata is not interaction data, so every
    catalogue item gets one).
    """
    if dataset.reviews is not None and len(dataset.reviews):
        rev = dataset.reviews
        if train_sequences is not None:
            allowed = {(u, int(i)) for u, s in enumerate(train_sequences) for i in s}
            keep = [(int(u), int(i)) in allowed for u, i in zip(rev["user_idx"], rev["item_idx"])]
            rev = rev[keep]
        out = [
            (int(u), int(i), " " + str(t).strip())
            for u, i, t in zip(rev["user_idx"], rev["item_idx"], rev["text"])
        ]
        if out:
            return out
    return [(None, i, item_description(dataset, i)) for i in range(dataset.n_items)]


def content_documents(
    tok: IDTokenizer,
    corpus: list[tuple[int | None, int, str]],
    max_text_tokens: int,
    seed: int,
    epoch: int,
    _cache: dict | None = None,
) -> list[Document]:
    """Tokenised content documents in a seeded random order (texts cut to ``max_text_tokens``)."""
    rng = np.random.default_rng([seed, STREAM_CONTENT, epoch])
    docs = []
    for user, item, text in corpus:
        key = (user, item, text)
        if _cache is not None and key in _cache:
            docs.append(_cache[key])
            continue
        if user is None:
            prompt_text = DESCRIPTION_PROMPT.format(item=item_token(item))
        else:
            prompt_text = REVIEW_PROMPT.format(user=user_token(user), item=item_token(item))
        prompt = tok.encode(prompt_text, add_bos=True)
        main = tok.encode(text)[:max_text_tokens]
        doc = Document(-1 if user is None else user, prompt, main, main, [item])
        if _cache is not None:
            _cache[key] = doc
        docs.append(doc)
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


# ---------------------------------------------------------------------- recommendation documents
def mask_history(items: np.ndarray, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split a history into (kept, held-out): ``round(ratio·n)`` items held out, at least one, and at
    least one kept (so a 2-item history holds out 1). Kept items come back in a random order."""
    items = np.asarray(items, dtype=np.int64)
    n = len(items)
    if n < 2:
        raise ValueError("masking needs at least 2 items")
    n_mask = int(min(n - 1, max(1, round(ratio * n))))
    perm = rng.permutation(n)
    return items[perm[n_mask:]], items[perm[:n_mask]]


def rec_prompt(tok: IDTokenizer, user: int, items) -> list[int]:
    return tok.encode(REC_PROMPT.format(user=user_token(user), items=item_list_text(items)), add_bos=True)


def rec_documents(
    tok: IDTokenizer,
    sequences: list[np.ndarray],
    max_items: int,
    mask_ratio: float,
    seed: int,
    epoch: int,
) -> list[Document]:
    """Per user with >= 2 training items: the whole distinct history (``max_items`` > 0: a random
    sub-history of at most that many), of which ``mask_ratio`` are held out as targets and the rest
    form the prompt (shuffled). Seeded per epoch."""
    rng = np.random.default_rng([seed, STREAM_REC, epoch])
    docs = []
    for u, seq in enumerate(sequences):
        uniq = np.unique(np.asarray(seq, dtype=np.int64))
        if len(uniq) < 2:
            continue
        sub = rng.permutation(uniq)
        if max_items > 0:
            sub = sub[:max_items]
        kept, held = mask_history(sub, mask_ratio, rng)
        docs.append(Document(u, rec_prompt(tok, u, kept.tolist()), [], held.tolist(), sub.tolist()))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


# ---------------------------------------------------------------------- batching
def doc_length(d: Document) -> int:
    return len(d.prompt) + len(d.main)


def length_buckets(docs: list[Document], batch_size: int, seed: int, epoch: int, window: int = 16):
    """The epoch's documents as batches of similar length: windows of ``window x batch_size``
    consecutive (already shuffled) documents are sorted by length and cut into batches, and the batch
    order is shuffled again (seeded). Every document is in exactly one batch; less padding per batch."""
    rng = np.random.default_rng([seed, 99, epoch])
    batches: list[list[Document]] = []
    span = max(1, window) * batch_size
    for start in range(0, len(docs), span):
        part = sorted(docs[start : start + span], key=doc_length)
        batches.extend(part[b : b + batch_size] for b in range(0, len(part), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit-decreasing packing of documents (by length) into rows of at most ``width`` tokens
    (a longer document gets a row of its own). Returns document indices per row, in document order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        L = lengths[i]
        for r, left in enumerate(room):
            if left >= L:
                rows[r].append(i)
                room[r] -= L
                break
        else:
            rows.append([i])
            room.append(max(width, L) - L)
    return [sorted(r) for r in rows]


def collate_lm(docs: list[Document], pad_id: int, pack: int = 0) -> dict:
    """``prompt + main`` sequences with the (row, position) of every hidden state that predicts a
    main-text token: position ``start + len(prompt) + k - 1`` predicts ``main[k]``.

    ``pack`` 0: one right-padded row per document and a 2-D padding mask. ``pack`` > 0: documents are
    packed into rows of at most ``max(pack, longest)`` tokens; each document keeps positions
    ``0..len-1`` and attends causally to itself only (an additive ``[rows, 1, T, T]`` mask in
    ``batch["mask_dtype"]``, built by :func:`packed_attention`), so the hidden states equal the
    unpacked ones.
    """
    seqs = [d.prompt + d.main for d in docs]
    layout = pack_rows([len(s) for s in seqs], pack) if pack > 0 else [[i] for i in range(len(docs))]
    width = max(sum(len(seqs[i]) for i in row) for row in layout)
    ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(layout), width), dtype=torch.long)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    segment = torch.full((len(layout), width), -1, dtype=torch.long)
    pred, targets = [], []
    for r, row in enumerate(layout):
        start = 0
        for i in row:
            d, s = docs[i], seqs[i]
            ids[r, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, start : start + len(s)] = 1
            positions[r, start : start + len(s)] = torch.arange(len(s))
            segment[r, start : start + len(s)] = i
            for k, t in enumerate(d.targets):
                pred.append((r, start + len(d.prompt) + k - 1))
                targets.append(t)
            start += len(s)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pred_pos": torch.tensor(pred, dtype=torch.long).reshape(-1, 2),
        "targets": torch.tensor(targets, dtype=torch.long),
        **ids_in(docs),
    }
    if pack > 0:
        batch["position_ids"] = positions
        batch["segment"] = segment
    return batch


def packed_attention(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[rows, 1, T, T]`` mask: causal within a document, nothing across documents; padding
    queries see only themselves (their outputs are never read)."""
    t = segment.shape[1]
    idx = torch.arange(t)
    causal = idx[None, :, None] >= idx[None, None, :]
    sq, sk = segment[:, :, None], segment[:, None, :]
    allowed = causal & (sk == sq) & (sk != -1)
    allowed = allowed | ((sq == -1) & (idx[None, :, None] == idx[None, None, :]))
    out = torch.zeros(segment.shape[0], 1, t, t, dtype=dtype)
    return out.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def collate_rec(docs: list[Document], pad_id: int) -> dict:
    """Right-padded prompts; targets as (row, item) pairs of the held-out items."""
    width = max(len(d.prompt) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    rows, targets = [], []
    for r, d in enumerate(docs):
        ids[r, : len(d.prompt)] = torch.tensor(d.prompt, dtype=torch.long)
        mask[r, : len(d.prompt)] = 1
        rows.extend([r] * len(d.targets))
        targets.extend(d.targets)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "target_rows": torch.tensor(rows, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        **ids_in(docs),
    }


def ids_in(docs: list[Document]) -> dict:
    users = sorted({d.user for d in docs if d.user >= 0})
    items = sorted({i for d in docs for i in d.items})
    return {"users": torch.tensor(users, dtype=torch.long), "items": torch.tensor(items, dtype=torch.long)}
