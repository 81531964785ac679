"""The one rule for turning prompts and answers into token ids, and hybrid soft item-token marks.

Tokenisation: one rule for every stage
--------------------------------------
:func:`encode_prompt` and :func:`encode_answer` are the *only* way prompts and answers become token ids
in recalign -- SFT, S-DPO/DMPO/DPO, reference log-prob precomputation, candidate scoring and generation all
call them, and the model always sees exactly ``encode_prompt(p) + encode_answer(a)``. (The S-DPO reference
code tokenises the prompt with BOS in SFT and without it in DPO, so the preference stage trains on inputs
the SFT model never saw; a single function makes that impossible.)

- **Chat models** (the tokenizer has a ``chat_template``, e.g. SmolLM2-Instruct): the prompt text is the
  content of one user turn, rendered by the model's own template with ``add_generation_prompt=True``
  (so the ids end with the assistant header, e.g. ``<|im_start|>assistant\\n``, and include whatever
  system turn / BOS the template adds by default). The answer is the assistant message: the answer text
  tokenised without special tokens, followed by the template's end-of-turn token (``<|im_end|>`` for
  ChatML; found by rendering a sentinel conversation, see :func:`end_of_turn_id`). Generation stops on
  the same token.
- **Plain tokenizers** (no chat template): ``[BOS] + prompt`` (BOS only if the tokenizer has one) and
  ``" " + answer + [EOS]``. The leading space makes the answer read ``"Answer: Title"`` as one text;
  byte-level BPE tokenizers (GPT-2 style, Llama-3, Qwen, SmolLM base and the tiny test tokenizer) then
  encode the title as they would inside running text.

Answers are always tokenised separately from the prompt (never ``tokenize(prompt + answer)``), so the
boundary between prompt and answer tokens is exact and identical for every candidate.
"""

from __future__ import annotations

import contextlib
import re

from recalign.errors import RecalignInputError

#: Hybrid item tokens (:mod:`recalign.lm.hybrid`): a prompt text marks the soft token of item ``i`` as
#: ``ITEM_SLOT_OPEN + str(i) + ITEM_SLOT_CLOSE`` (private-use characters, never in a title and never
#: whitespace, so chat templates that trim do not touch them). :func:`encode_prompt` turns each mark
#: into the id ``-(i + 1)``; a prompt without marks is encoded exactly as before.
ITEM_SLOT_OPEN = "\ue000"
ITEM_SLOT_CLOSE = "\ue001"
_SLOT_RE = re.compile(f"{ITEM_SLOT_OPEN}(\\d+){ITEM_SLOT_CLOSE}")


def item_slot(item_idx: int) -> str:
    """The mark of item ``item_idx``'s soft token in a prompt text (see :data:`ITEM_SLOT_OPEN`)."""
    return f"{ITEM_SLOT_OPEN}{int(item_idx)}{ITEM_SLOT_CLOSE}"


def soft_token_id(item_idx: int) -> int:
    """The prompt token id standing for item ``item_idx``'s soft token: ``-(item_idx + 1)``."""
    return -(int(item_idx) + 1)


def is_chat_tokenizer(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_EOT_CACHE_ATTR = "_recalign_end_of_turn_id"


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an answer: the chat template's end-of-turn token, else EOS.

    For chat templates we render ``[user: "u", assistant: SENTINEL]`` and take the first special token
    after the sentinel (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3, ``<end_of_turn>`` for
    Gemma). Cached on the tokenizer object.
    """
    cached = getattr(tokenizer, _EOT_CACHE_ATTR, None)
    if cached is not None:
        return cached
    eot = tokenizer.eos_token_id
    if is_chat_tokenizer(tokenizer):
        sentinel = "XQZSENTINELQZX"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        if sentinel in text:
            suffix = text.split(sentinel, 1)[1]
            special = set(tokenizer.all_special_ids)
            for tid in tokenizer.encode(suffix, add_special_tokens=False):
                if tid in special:
                    eot = tid
                    break
    if eot is None:
        raise RecalignInputError("tokenizer has neither an end-of-turn token nor an EOS token")
    with contextlib.suppress(AttributeError):  # exotic tokenizer objects: just don't cache
        setattr(tokenizer, _EOT_CACHE_ATTR, int(eot))
    return int(eot)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` exactly as every stage feeds them (see the module docstring).

    A prompt holding soft item-token marks (:func:`item_slot`) is encoded by
    :func:`_encode_hybrid_prompt`; every other prompt takes the path below, unchanged.
    """
    if ITEM_SLOT_OPEN in prompt:
        return _encode_hybrid_prompt(tokenizer, prompt)
    if is_chat_tokenizer(tokenizer):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # BatchEncoding in transformers 5
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([int(bos)] if bos is not None else []) + [int(i) for i in ids]


def _encode_hybrid_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt with soft item-token marks: the text between marks tokenised piece by piece, each mark
    replaced by the id ``-(item + 1)`` (:func:`soft_token_id`).

    The whole prompt is rendered first as :func:`encode_prompt` would (chat template with the generation
    prompt, or BOS + text), then split at the marks; each piece is tokenised without special tokens,
    which is how transformers tokenises a rendered chat template. A title and what follows it are thus
    tokenised apart (the soft token sits between them), as LLaRA's placeholder token does.
    """
    if is_chat_tokenizer(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids: list[int] = []
    else:
        text = prompt
        bos = tokenizer.bos_token_id
        ids = [int(bos)] if bos is not None else []
    pieces = _SLOT_RE.split(text)
    if ITEM_SLOT_OPEN in pieces[0] or any(ITEM_SLOT_OPEN in p for p in pieces[::2]):
        raise RecalignInputError("malformed soft item-token mark in a prompt")
    for k, piece in enumerate(pieces):
        if k % 2:
            ids.append(soft_token_id(int(piece)))
        elif piece:
            ids.extend(int(i) for i in tokenizer.encode(piece, add_special_tokens=False))
    return ids


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of ``answer`` as a continuation of :func:`encode_prompt`, end-of-turn/EOS included."""
    if is_chat_tokenizer(tokenizer):
        ids = tokenizer.encode(answer, add_special_tokens=False)
    else:
        ids = tokenizer.encode(" " + answer.strip(), add_special_tokens=False)
    return [int(i) for i in ids] + [end_of_turn_id(tokenizer)]


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a generated answer: end-of-turn and EOS (deduplicated)."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids
