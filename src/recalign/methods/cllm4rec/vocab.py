"""User/item ID tokens on top of a backbone tokenizer.

CLLM4Rec gives every user and every item one *atomic* token (``<user_7>``, ``<item_42>``) instead of
letting BPE cut ``item_42`` into ``item``, ``_``, ``42`` — pieces that are shared by every item and
carry no identity. :class:`IDTokenizer` wraps any Hugging Face tokenizer and:

- splits ID tokens out of the text with the regex ``<user_\\d+>|<item_\\d+>`` *before* BPE, so BPE
  only ever sees the words between them;
- maps ``<user_i>`` to ``V + i`` and ``<item_j>`` to ``V + n_users + j`` where ``V`` is the backbone's
  vocabulary size, so word ids, user ids and item ids occupy disjoint ranges and a single id tensor
  can carry all three (the model routes each range to its own embedding table);
- decodes back to the same text.

Spacing rule (what makes the round trip exact without wasting tokens): an ID token *absorbs one space
directly before it*, the way byte-level BPE folds a leading space into ``Ġword``. An item list
``"with <item_1> <item_2>"`` is therefore 3 tokens (``Ġwith``, item 1, item 2), not 5 with two lone
space tokens; and decoding puts one space before every ID token that is not at the start of the
text. ``decode(encode(t)) == t`` holds for every *canonical* text: one where each ID token is either at
the start or preceded by exactly one space (all documents recalign builds are canonical). A
non-canonical text such as ``"(<item_1>)"`` still encodes fine and decodes to its canonical form
``"( <item_1>)"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from recalign.errors import RecalignInputError

ID_PATTERN = re.compile(r"(<user_\d+>|<item_\d+>)")
_ID_FULL = re.compile(r"<(user|item)_(\d+)>")


def user_token(u: int) -> str:
    return f"<user_{int(u)}>"


def item_token(i: int) -> str:
    return f"<item_{int(i)}>"


class IDTokenizer:
    """A backbone tokenizer extended with ``n_users`` user tokens and ``n_items`` item tokens.

    Args:
        base: the backbone's (fast) tokenizer; only ``encode``/``decode`` without special tokens are used.
        n_users, n_items: sizes of the ID vocabularies.
        vocab_size: first id after the word vocabulary; defaults to ``len(base)``. Pass the backbone's
            embedding-table size when it is larger than the tokenizer (padded vocabularies), so no
            ID token collides with a real word row.
        add_bos: start every encoded document with the backbone's BOS token (if it has one).
    """

    def __init__(
        self,
        base,
        n_users: int,
        n_items: int,
        vocab_size: int | None = None,
        add_bos: bool = True,
    ) -> None:
        self.base = base
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.vocab_size = int(vocab_size if vocab_size is not None else len(base))
        if self.vocab_size < len(base):
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer ({len(base)})")
        self.bos_id = base.bos_token_id if add_bos else None
        pad = base.pad_token_id if base.pad_token_id is not None else base.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    # ------------------------------------------------------------------ id ranges
    @property
    def user_offset(self) -> int:
        return self.vocab_size

    @property
    def item_offset(self) -> int:
        return self.vocab_size + self.n_users

    @property
    def total_size(self) -> int:
        """Word vocabulary + user tokens + item tokens."""
        return self.vocab_size + self.n_users + self.n_items

    def user_id(self, u: int) -> int:
        if not 0 <= u < self.n_users:
            raise RecalignInputError(f"user index {u} outside 0..{self.n_users - 1}")
        return self.user_offset + int(u)

    def item_id(self, i: int) -> int:
        if not 0 <= i < self.n_items:
            raise RecalignInputError(f"item index {i} outside 0..{self.n_items - 1}")
        return self.item_offset + int(i)

    def is_item(self, token_id: int) -> bool:
        return self.item_offset <= token_id < self.total_size

    def is_user(self, token_id: int) -> bool:
        return self.user_offset <= token_id < self.item_offset

    # ------------------------------------------------------------------ encode / decode
    def _id_of(self, token: str) -> int:
        m = _ID_FULL.fullmatch(token)
        assert m is not None
        kind, idx = m.group(1), int(m.group(2))
        return self.user_id(idx) if kind == "user" else self.item_id(idx)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``: BPE for words, one id per ID token (see the module doc for spaces)."""
        out: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        parts = ID_PATTERN.split(text)
        # re.split with one capture group alternates text, id, text, id, ..., text
        for k, part in enumerate(parts):
            if k % 2 == 1:
                out.append(self._id_of(part))
                continue
            if k + 1 < len(parts) and part.endswith(" "):
                part = part[:-1]  # the space before an ID token belongs to the ID token
            if part:
                out.extend(self.base.encode(part, add_special_tokens=False))
        return out

    def decode(self, ids: Sequence[int], skip_bos: bool = True) -> str:
        """Inverse of :meth:`encode` on canonical text."""
        pieces: list[str] = []
        words: list[int] = []
        started = False

        def flush() -> None:
            if words:
                pieces.append(self.base.decode(words, clean_up_tokenization_spaces=False))
                words.clear()

        for t in (int(x) for x in ids):
            if skip_bos and not started and self.bos_id is not None and t == self.bos_id:
                started = True
                continue
            started = True
            if t < self.vocab_size:
                words.append(t)
                continue
            flush()
            if t < self.item_offset:
                tok = user_token(t - self.user_offset)
            elif t < self.total_size:
                tok = item_token(t - self.item_offset)
            else:
                raise ValueError(f"token id {t} is beyond the ID vocabulary ({self.total_size})")
            pieces.append((" " if pieces else "") + tok)
        flush()
        return "".join(pieces)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """Human-readable token strings (for debugging and docs)."""
        out = []
        for t in (int(x) for x in ids):
            if t < self.vocab_size:
                out.append(self.base.convert_ids_to_tokens(t))
            elif t < self.item_offset:
                out.append(user_token(t - self.user_offset))
            else:
                out.append(item_token(t - self.item_offset))
        return out
