"""Hybrid item tokens (LLaRA): prompts with soft item tokens through every shared-prefix path.

Each test could fail in a specific way: a path that ignored the soft tokens (fed the clamped ids), fed
them at the wrong positions, detached the projector, or changed the text-only path.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recalign.data.splits import build_split
from recalign.errors import RecalignInputError
from recalign.lm.generation import generate_answers
from recalign.lm.hybrid import (
    PROJECTOR_FILE,
    PROJECTOR_META,
    attach_item_tokens,
    decoder_inputs,
    item_tokens_of,
    load_item_tokens,
    load_item_tokens_state,
    new_item_tokens,
    save_item_tokens,
)
from recalign.lm.joint import score_and_generate
from recalign.lm.prompts import (
    ITEM_SLOT_OPEN,
    display_titles,
    encode_answer,
    encode_prompt,
    examples_to_prompts,
    item_slot,
    stop_token_ids,
)
from recalign.lm.reference import cache_key, cached_reference_logprobs, model_fingerprint
from recalign.lm.scoring import answer_logprobs, naive_answer_logprobs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _grad_check import assert_grads_match_naive  # noqa: E402

TOL = 1e-4
N_ITEMS = 26
D_REC = 8


def _hybrid(model, seed: int = 0, n_items: int = N_ITEMS):
    """A deep copy of ``model`` with a fresh projector over a random item table attached (trainable)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items, D_REC, generator=g) * 0.1
    torch.manual_seed(seed)
    attach_item_tokens(m, new_item_tokens(m, table, hidden=16), trainable=True)
    return m


def _batch(vocab: int, seed: int = 0):
    """Prompts of different lengths with soft tokens (also one at the very start and one at the end),
    a text-only prompt among them, and 1-5 answers each."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(4, vocab, (n,), generator=g).tolist()

    prompts = [
        toks(3) + [-1] + toks(4) + [-(N_ITEMS)] + toks(2),
        [-5] + toks(6) + [-7, -8] + toks(1),
        toks(9),  # text only
        toks(2) + [-3],
    ]
    answers = [[toks(n) for n in ls] for ls in ([3, 1, 5], [2, 4], [1, 6], [2, 2, 3, 1, 4])]
    return prompts, answers


@pytest.fixture
def hybrid_model(tiny_model):
    return _hybrid(tiny_model)


def _close(a, b, tol=TOL):
    assert torch.equal(a.mask, b.mask)
    diff = (a.sum[a.mask] - b.sum[b.mask]).abs().max().item()
    assert diff <= tol, diff


# ---------------------------------------------------------------------- the three scoring paths
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("impl", ["packed", "kv"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_hybrid_scores_equal_naive(hybrid_model, tiny_tokenizer, attn, impl, chunk_size):
    hybrid_model.config._attn_implementation = attn
    prompts, answers = _batch(len(tiny_tokenizer))
    with torch.no_grad():
        ref = naive_answer_logprobs(hybrid_model, prompts, answers)
        got = answer_logprobs(hybrid_model, prompts, answers, impl=impl, chunk_size=chunk_size)
        # the soft tokens matter: the clamped ids (soft token -> id 0) give other numbers
        clamped = [[max(t, 0) for t in p] for p in prompts]
        plain = answer_logprobs(hybrid_model, clamped, answers, impl=impl, chunk_size=chunk_size)
    _close(got, ref)
    hybrid_rows = [0, 1, 3]
    assert (got.sum[hybrid_rows] - plain.sum[hybrid_rows]).abs()[got.mask[hybrid_rows]].min() > 1e-4
    # the text-only prompt scores exactly as it does without soft tokens elsewhere in the batch
    assert torch.allclose(got.sum[2][got.mask[2]], plain.sum[2][plain.mask[2]], atol=1e-5)


@pytest.mark.parametrize("impl", ["packed", "kv"])
def test_hybrid_gradients_equal_naive(hybrid_model, tiny_tokenizer, impl):
    """Gradients of the LM's weights *and* of the projector equal the naive path's; the projector gets a
    non-zero gradient (it is not detached)."""
    prompts, answers = _batch(len(tiny_tokenizer), seed=1)
    assert_grads_match_naive(hybrid_model, prompts, answers, impl, TOL)


def test_text_only_prompts_take_the_input_ids_path(hybrid_model, tiny_model, tiny_tokenizer, monkeypatch):
    """Text-only prompts on a hybrid model: the decoder gets ``input_ids`` (never ``inputs_embeds``) and
    the scores are bitwise those of the same model without a projector."""
    prompts, answers = _batch(len(tiny_tokenizer))
    text = [[max(t, 0) for t in p] for p in prompts]
    decoder = hybrid_model.get_decoder()
    seen = []
    original = type(decoder).forward

    def spy(self, *args, **kwargs):
        seen.append(sorted(k for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(decoder), "forward", spy)
    with torch.no_grad():
        for impl in ("packed", "kv"):
            got = answer_logprobs(hybrid_model, text, answers, impl=impl)
            want = answer_logprobs(tiny_model, text, answers, impl=impl)
            assert torch.equal(got.sum, want.sum)
        assert seen and all(s == ["input_ids"] for s in seen)
        seen.clear()
        answer_logprobs(hybrid_model, prompts, answers)
        assert seen == [["inputs_embeds"]]
    assert decoder_inputs(hybrid_model, torch.tensor(text[0])[None]).keys() == {"input_ids"}


def test_soft_tokens_without_projector_are_an_error(tiny_model, tiny_tokenizer):
    prompts, answers = _batch(len(tiny_tokenizer))
    with pytest.raises(RecalignInputError, match="no hybrid projector"):
        answer_logprobs(tiny_model, prompts, answers)
    with pytest.raises(ValueError, match="plain ids"):
        answer_logprobs(tiny_model, [[5, 6]], [[[7, -2]]])


# ---------------------------------------------------------------------- prompts with item tokens
def _split(tiny_dataset):
    ds = tiny_dataset()
    return ds, build_split(ds, "loo", n_candidates=5)


def test_hybrid_prompt_text_and_ids(tiny_dataset, tiny_tokenizer, tiny_chat_tokenizer):
    ds, split = _split(tiny_dataset)
    ex = split.stage("test").head(3)
    plain = examples_to_prompts(ds, ex, seed=0, max_history=4)
    hybrid = examples_to_prompts(ds, ex, seed=0, max_history=4, item_tokens=True)
    titles = display_titles(ds)
    for p, h, (_, row) in zip(plain, hybrid, ex.iterrows()):
        items = list(row["history"][-4:]) + list(row["candidates"])
        # one mark right after every listed title, nothing else changed
        for i in items:
            assert titles[i] + item_slot(i) in h.prompt
        stripped = h.prompt
        for i in set(items):
            stripped = stripped.replace(item_slot(i), "")
        assert stripped == p.prompt and ITEM_SLOT_OPEN not in p.prompt
        assert (h.candidates, h.target) == (p.candidates, p.target)
        for tok in (tiny_tokenizer, tiny_chat_tokenizer):
            ids = encode_prompt(tok, h.prompt)
            soft = [-t - 1 for t in ids if t < 0]
            assert soft == items  # in prompt order: history, then candidates
            # the text between soft tokens is the text-only prompt's, tokenised piece by piece
            assert tok.decode([t for t in ids if t >= 0]) == tok.decode(encode_prompt(tok, p.prompt))
            k = ids.index(-(items[0] + 1))
            assert tok.decode(ids[:k]).endswith(titles[items[0]])
    # a prompt without marks: the unchanged rule
    assert encode_prompt(tiny_tokenizer, plain[0].prompt) == [
        tiny_tokenizer.bos_token_id
    ] + tiny_tokenizer.encode(plain[0].prompt, add_special_tokens=False)


def test_joint_generation_equals_separate_path(tiny_model, tiny_tokenizer, tiny_dataset):
    """Joint scoring + greedy decoding of hybrid prompts == packed scoring + ``model.generate`` on
    ``inputs_embeds`` (generate_answers), and the answers differ from the text-only prompts' answers."""
    ds, split = _split(tiny_dataset)
    model = _hybrid(tiny_model, n_items=ds.n_items)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper outputs: greedy answers vary
    model.eval()
    ex = split.stage("test").head(4)
    prompts = examples_to_prompts(ds, ex, seed=0, max_history=4, item_tokens=True)
    titles = display_titles(ds)
    p_ids = [encode_prompt(tiny_tokenizer, p.prompt) for p in prompts]
    a_ids = [[encode_answer(tiny_tokenizer, titles[int(c)]) for c in cands] for cands in ex["candidates"]]
    stops = stop_token_ids(tiny_tokenizer)
    with torch.inference_mode():
        joint = score_and_generate(model, p_ids, a_ids, stop_ids=stops, max_new_tokens=6, pad_id=0)
        packed = answer_logprobs(model, p_ids, a_ids)
    _close(joint.scores, packed, tol=1e-5)
    answers = generate_answers(model, tiny_tokenizer, prompts, batch_size=1, max_new_tokens=6, progress=False)
    joint_text = [tiny_tokenizer.decode(g, skip_special_tokens=True).strip() for g in joint.generated]
    assert joint_text == answers
    plain = examples_to_prompts(ds, ex, seed=0, max_history=4)
    text_answers = generate_answers(
        model, tiny_tokenizer, plain, batch_size=1, max_new_tokens=6, progress=False
    )
    assert text_answers != answers


# ---------------------------------------------------------------------- reference cache
def test_reference_cache_key_includes_projector(hybrid_model, tiny_tokenizer, tmp_path):
    prompts, answers = _batch(len(tiny_tokenizer))
    first = cached_reference_logprobs(hybrid_model, prompts, answers, tmp_path)
    again = cached_reference_logprobs(hybrid_model, prompts, answers, tmp_path)
    assert again.from_cache and torch.equal(first.logprobs, again.logprobs)
    fp = model_fingerprint(hybrid_model)
    with torch.no_grad():
        item_tokens_of(hybrid_model).projector.item_out.bias.add_(0.1)
    assert model_fingerprint(hybrid_model) != fp
    changed = cached_reference_logprobs(hybrid_model, prompts, answers, tmp_path)
    assert not changed.from_cache and changed.key != first.key
    assert not torch.allclose(changed.logprobs[first.mask], first.logprobs[first.mask])
    # soft tokens are part of the prompt ids in the key
    assert cache_key(fp, [[1, -2]], [[[3]]]) != cache_key(fp, [[1, 2]], [[[3]]])


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip_scores_identically(hybrid_model, tiny_model, tiny_tokenizer, tmp_path):
    prompts, answers = _batch(len(tiny_tokenizer))
    path = save_item_tokens(hybrid_model, tmp_path)
    assert path == tmp_path / PROJECTOR_FILE
    meta = json.loads((tmp_path / PROJECTOR_META).read_text())
    assert (meta["n_items"], meta["d_rec"], meta["hidden"], meta["d_lm"]) == (N_ITEMS, D_REC, 16, 48)
    fresh = copy.deepcopy(tiny_model)
    attach_item_tokens(fresh, load_item_tokens(tmp_path))
    with torch.no_grad():
        a = answer_logprobs(hybrid_model, prompts, answers)
        b = answer_logprobs(fresh, prompts, answers)
    assert torch.equal(a.sum, b.sum)
    # restoring into an existing module (resume) copies the values in place
    other = _hybrid(tiny_model, seed=5)
    module = item_tokens_of(other)
    assert load_item_tokens_state(other, tmp_path) and item_tokens_of(other) is module
    assert torch.equal(module.projector.item_in.weight, item_tokens_of(hybrid_model).projector.item_in.weight)


def _one_line(excinfo, name):
    msg = str(excinfo.value)
    assert "\n" not in msg and name in msg, msg


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_projector_file_is_one_line_error(hybrid_model, tmp_path, damage):
    path = save_item_tokens(hybrid_model, tmp_path)
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00\x01not safetensors" * 8, "empty": b""}[damage]
    )
    with pytest.raises(RecalignInputError) as e:
        load_item_tokens(tmp_path)
    _one_line(e, PROJECTOR_FILE)


def test_mismatched_projector_is_one_line_error(hybrid_model, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    from recalign.lm.loading import build_tiny_llama

    path = save_item_tokens(hybrid_model, tmp_path)
    # a model of another width
    wide = build_tiny_llama(tiny_tokenizer, hidden_size=64, num_layers=1, num_heads=4)
    with pytest.raises(RecalignInputError, match="embeddings have 64") as e:
        attach_item_tokens(wide, load_item_tokens(tmp_path))
    _one_line(e, PROJECTOR_FILE)
    # the JSON record disagrees with the weights
    meta = json.loads((tmp_path / PROJECTOR_META).read_text())
    (tmp_path / PROJECTOR_META).write_text(json.dumps({**meta, "n_items": 99}))
    with pytest.raises(RecalignInputError, match="n_items") as e:
        load_item_tokens(tmp_path)
    _one_line(e, PROJECTOR_FILE)
    (tmp_path / PROJECTOR_META).write_text(json.dumps(meta))
    # inconsistent tensor shapes inside the file
    tensors = load_file(str(path))
    tensors["projector.item_in.weight"] = torch.zeros(16, D_REC + 1)
    save_file(tensors, str(path), metadata={"format": "recalign-hybrid-v1"})
    with pytest.raises(RecalignInputError, match="inconsistent shapes") as e:
        load_item_tokens(tmp_path)
    _one_line(e, PROJECTOR_FILE)
    # a soft token beyond the item table
    with pytest.raises(RecalignInputError, match="knows 26 items"), torch.no_grad():
        answer_logprobs(hybrid_model, [[4, -(N_ITEMS + 1)]], [[[5]]])


def test_lora_all_linear_leaves_the_projector_alone(hybrid_model):
    from recalign.lm.lora import LoRAConfig, attach_lora

    module = item_tokens_of(hybrid_model)
    peft_model = attach_lora(hybrid_model, LoRAConfig(target_modules=["all-linear"]))
    assert item_tokens_of(peft_model) is module
    names = [n for n, _ in peft_model.named_modules() if "recalign_item_tokens" in n and "lora" in n]
    assert names == []
    assert all(p.requires_grad for p in module.parameters())  # still trainable next to the adapter
    assert np.isfinite(sum(p.sum().item() for p in module.parameters()))
