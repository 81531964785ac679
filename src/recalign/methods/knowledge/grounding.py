"""Grounding free-text answers to catalogue items.

A retrieval answer is free text; to count as a recommendation it has to name an item of the catalogue.
Two ways, usable together:

- **Constrained decoding** (:class:`TitleTrie`, :func:`constrained_generate`): a trie of the answer token
  sequences of every title (exactly the ids the scorer and SFT use, end-of-answer token included) limits
  every decoding step to tokens that continue *some* title, so greedy or beam search can only produce
  catalogue titles. Works for decoder-only and encoder-decoder models through transformers'
  ``prefix_allowed_tokens_fn``.
- **Nearest title** (:class:`TitleMatcher`): for unconstrained text. Titles and text are normalised
  (case, accents, punctuation, whitespace, and MovieLens' trailing articles — "Usual Suspects, The" is
  also known as "The Usual Suspects"), then: an exact normalised match; else the longest catalogue
  title contained in the text (the generation protocol's substring rule, DESIGN.md section 2); else the
  most similar title by character-trigram Jaccard similarity, if it reaches ``min_similarity``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_ARTICLES = ("the", "a", "an", "il", "la", "le", "les", "l'", "el", "das", "der", "die")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.+), (?P<art>" + "|".join(_ARTICLES) + r")(?P<year> \(\d{4}\))?$")
_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize_title(text: str) -> str:
    """Lower-case ASCII words separated by single spaces; a trailing ", The" moved to the front."""
    t = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    t = " ".join(t.lower().split())
    m = _TRAILING_ARTICLE.match(t)
    if m:
        t = f"{m.group('art')} {m.group('body')}{m.group('year') or ''}"
    return " ".join(_NON_WORD.sub(" ", t).split())


def _trigrams(s: str) -> set[str]:
    s = f"  {s} "
    return {s[i : i + 3] for i in range(len(s) - 2)}


@dataclass
class Match:
    """The grounded item (``None`` when nothing matched), how it matched, and the similarity."""

    item: int | None
    how: str
    score: float


class TitleMatcher:
    """Maps free text to the catalogue index of the title it names (see the module docstring).

    Duplicate titles (ML-100K has a few) resolve to the lowest index.
    """

    def __init__(self, titles: Sequence[str], min_similarity: float = 0.5) -> None:
        self.titles = list(titles)
        self.norm = [normalize_title(t) for t in self.titles]
        self.min_similarity = float(min_similarity)
        self.exact: dict[str, int] = {}
        for i, n in enumerate(self.norm):
            self.exact.setdefault(n, i)
        self.grams = [_trigrams(n) for n in self.norm]

    def match(self, text: str) -> Match:
        n = normalize_title(text)
        if not n:
            return Match(None, "empty", 0.0)
        if n in self.exact:
            return Match(self.exact[n], "exact", 1.0)
        padded = f" {n} "
        best, best_len = None, 0
        for i, t in enumerate(self.norm):  # whole-word containment, longest title wins
            if t and len(t) > best_len and f" {t} " in padded:
                best, best_len = i, len(t)
        if best is not None:
            return Match(best, "contained", 1.0)
        g = _trigrams(n)
        scores = [len(g & h) / len(g | h) if g | h else 0.0 for h in self.grams]
        i = max(range(len(scores)), key=lambda k: (scores[k], -k)) if scores else None
        if i is not None and scores[i] >= self.min_similarity:
            return Match(i, "similar", float(scores[i]))
        return Match(None, "none", float(scores[i]) if i is not None else 0.0)


class TitleTrie:
    """A trie over the answer token sequences of catalogue titles.

    Args:
        sequences: per item, its answer token ids (ending with the end-of-answer token, which makes the
            set prefix-free: "Heat" and "Heat (1995)" end in different leaves).
    """

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.root: dict = {}
        self.leaf_items: dict[tuple[int, ...], list[int]] = {}
        self.sequences: list[tuple[int, ...]] = []  # item -> its answer ids
        for item, seq in enumerate(sequences):
            node = self.root
            for tok in seq:
                node = node.setdefault(int(tok), {})
            key = tuple(int(t) for t in seq)
            self.sequences.append(key)
            self.leaf_items.setdefault(key, []).append(item)

    @classmethod
    def from_titles(cls, titles: Sequence[str], encode: Callable[[str], list[int]]) -> TitleTrie:
        return cls([encode(t) for t in titles])

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that continue ``prefix`` towards some title (empty when ``prefix`` leaves the trie)."""
        node = self.root
        for tok in prefix:
            node = node.get(int(tok))
            if node is None:
                return []
        return list(node)

    def items(self, sequence: Sequence[int]) -> list[int]:
        """Items whose full answer sequence is ``sequence`` (several when titles are duplicated)."""
        return list(self.leaf_items.get(tuple(int(t) for t in sequence), []))

    def __len__(self) -> int:
        return len(self.leaf_items)


@torch.no_grad()
def constrained_generate(
    model,
    prompt_ids: Sequence[int],
    trie: TitleTrie,
    *,
    stop_ids: Sequence[int],
    num_beams: int = 1,
    num_return: int = 1,
    max_new_tokens: int = 48,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Catalogue items named by (beam) search restricted to the title trie, best first.

    ``prompt_ids`` is the encoded prompt (``encode_prompt`` for decoder-only models, ``encode_source``
    for encoder-decoder ones); the answer tokens are read back through the trie, so each returned entry
    is the list of items (usually one) whose title was produced. Entries whose search was cut off by
    ``max_new_tokens`` before a title ended are dropped. ``length_penalty`` is transformers' (finished
    beams ranked by ``sum log-prob / length**length_penalty``); 0 ranks them by the summed log-prob, the
    score every other part of recalign ranks titles by.
    """
    from recalign.lm.modules import is_seq2seq, unwrap_peft

    base = unwrap_peft(model)
    device = next(base.parameters()).device
    seq2seq = is_seq2seq(model)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    offset = 1 if seq2seq else len(prompt_ids)  # decoder start token / the prompt precede the answer
    stop = [int(s) for s in stop_ids]

    def allowed(_batch: int, sent: torch.Tensor) -> list[int]:
        prefix = sent.tolist()[offset:]
        if prefix and prefix[-1] in stop:
            return stop  # finished beam: keep it finished
        nxt = trie.allowed(prefix)
        return nxt or stop

    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        num_beams=max(num_beams, num_return),
        num_return_sequences=num_return,
        do_sample=False,
        length_penalty=length_penalty,
        prefix_allowed_tokens_fn=allowed,
        eos_token_id=stop,
        pad_token_id=base.config.pad_token_id if base.config.pad_token_id is not None else stop[0],
    )
    results = []
    for row in out.tolist():
        answer = row[offset:]
        # keep up to and including the first stop token (the rest is padding)
        for k, tok in enumerate(answer):
            if tok in stop:
                answer = answer[: k + 1]
                break
        items = trie.items(answer)
        if items:
            results.append(items)
    return results


@torch.no_grad()
def trie_beam_search(
    model, prompt_ids: Sequence[int], trie: TitleTrie, *, beams: int, max_new_tokens: int = 64
) -> dict[int, float]:
    """Titles found by a ``beams``-wide beam search over the trie, item -> summed answer log-prob.

    Decoder-only models only (encoder-decoders: :func:`constrained_generate`). Unlike transformers'
    beam search, which expands the prompt to ``beams`` copies before its first forward pass, the prompt
    runs once and its KV cache is then shared by index-selecting rows, so a step costs ``beams`` tokens
    however long the prompt is. A finished title (its end-of-answer token taken) leaves the beam, which
    keeps the ``beams`` best unfinished prefixes by summed log-prob -- so at least ``beams`` titles are
    returned when the catalogue has that many. The log-probs are full-vocabulary log-softmaxes summed
    over the title's tokens, the scorer's definition, computed on a different kernel path (callers that
    need exact scores re-score the titles).
    """
    from transformers import DynamicCache

    from recalign.lm.modules import cache_kwarg, head_logits, unwrap_peft
    from recalign.lm.scoring import decoder_and_head

    decoder, head = decoder_and_head(model)
    device = next(unwrap_peft(model).parameters()).device
    cache = DynamicCache(config=unwrap_peft(model).config)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    hidden = decoder(input_ids=ids, use_cache=True, **cache_kwarg(decoder, cache)).last_hidden_state[:, -1]
    live: list[tuple[tuple[int, ...], float, dict]] = [((), 0.0, trie.root)]  # prefix, score, trie node
    found: dict[int, float] = {}
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(head_logits(model, head, hidden), dim=-1)
        nxt: list[tuple[float, int, int, dict]] = []  # score, parent row, token, child node
        for row, (prefix, score, node) in enumerate(live):
            toks = list(node)
            if not toks:
                continue
            vals = logp[row, toks].tolist()
            for tok, v in zip(toks, vals):
                child, s = node[tok], score + v
                if child:
                    nxt.append((s, row, tok, child))
                else:  # the end-of-answer token: a complete title
                    for item in trie.items(prefix + (tok,)):
                        found[item] = max(found.get(item, -float("inf")), s)
        if not nxt:
            break
        nxt.sort(key=lambda x: -x[0])
        nxt = nxt[:beams]
        parents = torch.tensor([p for _, p, _, _ in nxt], dtype=torch.long, device=device)
        cache.reorder_cache(parents)
        live = [(live[p][0] + (tok,), s, child) for s, p, tok, child in nxt]
        step_ids = torch.tensor([[tok] for _, _, tok, _ in nxt], dtype=torch.long, device=device)
        hidden = decoder(input_ids=step_ids, use_cache=True, **cache_kwarg(decoder, cache)).last_hidden_state[
            :, -1
        ]
    return found
