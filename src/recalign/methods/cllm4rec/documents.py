"""The three kinds of CLLM4Rec documents, their per-epoch sampling, and batching into tensors.

- **Collaborative** (pretraining): ``"<user_i> has interacted with <item_a> <item_b> …"``. The user token
  is the *soft* part of the prompt, "has interacted with" the *hard* part, the item list the main text.
  Interactions are a set, not a sentence, so the list is shuffled anew every epoch (the paper's
  stochastic reordering) and long histories are cut into random sub-lists of at most ``max_items``
  (the frozen backbone's cost grows with length; a random sub-list per epoch still visits everything).
  Loss positions: every item of the main text, predicted from the token before it.
- **Content** (pretraining): ``"<user_i> writes the following review for <item_j>: …"`` when the dataset
  has reviews (only reviews of *training* interactions — a review of a test item would leak it), else
  an item description ``"<item_j> is titled …; genres: …"`` built from title, year and genres. Loss
  positions: the word tokens of the main text.
- **Recommendation** (fine-tuning): ``"<user_i> has interacted with <kept items>; the user will interact
  with:"`` where ~20% of the (sub-sampled) history is *held out* (masked) and becomes the target set of a
  multinomial likelihood over the item head. The targets are exactly the held-out items (the paper),
  not all past items (the released code).

All sampling is a pure function of ``(seed, stream, epoch)`` so that a resumed run sees exactly the
batches an uninterrupted run would have seen.
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


def collab_documents(
    tok: IDTokenizer,
    sequences: list[np.ndarray],
    max_items: int,
    seed: int,
    epoch: int,
    docs_per_user: int = 1,
) -> list[Document]:
    """One shuffled sub-list of at most ``max_items`` items per user (``docs_per_user`` > 1 takes
    further disjoint sub-lists of the same shuffle, for long histories). Users without items are skipped.
    The returned list is in a seeded random order."""
    rng = np.random.default_rng([seed, STREAM_COLLAB, epoch])
    docs: list[Document] = []
    for u, seq in enumerate(sequences):
        if len(seq) == 0:
            continue
        perm = rng.permutation(np.unique(np.asarray(seq, dtype=np.int64)))
        prompt = tok.encode(COLLAB_PROMPT.format(user=user_token(u)), add_bos=True)
        for k in range(docs_per_user):
            chunk = perm[k * max_items : (k + 1) * max_items].tolist()
            if not chunk:
                break
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
    """Per user with >= 2 training items: a random sub-history of at most ``max_items`` items, of which
    ``mask_ratio`` are held out as targets and the rest form the prompt (shuffled). Seeded per epoch."""
    rng = np.random.default_rng([seed, STREAM_REC, epoch])
    docs = []
    for u, seq in enumerate(sequences):
        uniq = np.unique(np.asarray(seq, dtype=np.int64))
        if len(uniq) < 2:
            continue
        sub = rng.permutation(uniq)[:max_items]
        kept, held = mask_history(sub, mask_ratio, rng)
        docs.append(Document(u, rec_prompt(tok, u, kept.tolist()), [], held.tolist(), sub.tolist()))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


# ---------------------------------------------------------------------- batching
def collate_lm(docs: list[Document], pad_id: int) -> dict:
    """Right-padded ``prompt + main`` sequences with the (row, position) of every hidden state that
    predicts a main-text token: position ``len(prompt) + k - 1`` predicts ``main[k]``."""
    seqs = [d.prompt + d.main for d in docs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    pred, targets = [], []
    for r, (d, s) in enumerate(zip(docs, seqs)):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
        for k, t in enumerate(d.targets):
            pred.append((r, len(d.prompt) + k - 1))
            targets.append(t)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pred_pos": torch.tensor(pred, dtype=torch.long).reshape(-1, 2),
        "targets": torch.tensor(targets, dtype=torch.long),
        **ids_in(docs),
    }


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
