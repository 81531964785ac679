"""Joint candidate scoring + greedy generation (one pass per prompt) equals the two separate protocols."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from recalign.data.splits import build_split
from recalign.lm.generation import generate_answers, pad_id
from recalign.lm.joint import joint_unsupported, score_and_generate
from recalign.lm.prompts import encode_answer, encode_prompt, stop_token_ids
from recalign.lm.recommender import LMRecommender
from recalign.lm.scoring import answer_logprobs
from recalign.methods.zeroshot import EvalConfig, evaluate_lm

# prompts of different lengths (left/right padding matters)
PROMPTS = [
    "Heat (1995)\nAnswer:",
    "Star Wars (1977), Toy Story (1995), Fargo (1996), Alien (1979), Babe (1995)\nAnswer:",
    "Alien",
    "Twelve Monkeys (1995), Casablanca (1942)\nAnswer:",
]
MAX_NEW = 8


def _sharp(model):
    """A copy with scaled-up weights, so greedy outputs vary instead of repeating one token."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m.eval()


def _hf_greedy_ids(model, tok, prompts, max_new_tokens):
    """Token ids of ``model.generate`` exactly as ``generate_answers`` calls it, cut before the first stop."""
    stops = stop_token_ids(tok)
    enc = [encode_prompt(tok, p) for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad_id(tok), dtype=torch.long)
    att = torch.zeros((len(enc), width), dtype=torch.long)
    for r, e in enumerate(enc):
        ids[r, width - len(e) :] = torch.tensor(e)
        att[r, width - len(e) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=att,
            num_beams=1,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad_id(tok),
        )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


@pytest.fixture(scope="module")
def stopping(tiny_model, tiny_tokenizer):
    """``(model, row, step)``: the sharpened tiny Llama, rewired so that prompt ``row``'s greedy answer
    ends at the stop token after ``step`` tokens while another prompt still runs to ``MAX_NEW``.

    The stop token's row of the (tied) output embedding becomes twice the row of a token ``t`` that the
    prompt emits at ``step``: where ``t`` was the greedy choice (with a positive logit) the stop token now
    wins. The stop token is never fed as input here (prompts carry BOS only; an answer's last token is
    never fed), so only the output side changes. The first (row, step) that gives the wanted scenario
    under ``model.generate`` is used (deterministic: seeded model).
    """
    tok = tiny_tokenizer
    base = _sharp(tiny_model)
    plain = _hf_greedy_ids(base, tok, PROMPTS, MAX_NEW)
    stop = stop_token_ids(tok)[0]
    for row, ids in enumerate(plain):
        for step in range(2, MAX_NEW - 1):
            if ids[step] in ids[:step]:
                continue
            model = copy.deepcopy(base)
            with torch.no_grad():
                emb = model.get_output_embeddings().weight
                emb[stop] = 2 * emb[ids[step]]
            lengths = [len(g) for g in _hf_greedy_ids(model, tok, PROMPTS, MAX_NEW)]
            if lengths[row] == step and MAX_NEW in lengths:
                return model, row, step
    pytest.fail("no early-stopping scenario found")  # pragma: no cover


@pytest.fixture(scope="module")
def stopping_model(stopping):
    return stopping[0]


def _encoded(tok, titles):
    p_ids = [encode_prompt(tok, p) for p in PROMPTS]
    # different numbers of answers per prompt, of different lengths
    a_ids = [[encode_answer(tok, t) for t in titles[b : b + 3 + 2 * b]] for b in range(len(PROMPTS))]
    return p_ids, a_ids


def test_joint_scores_equal_packed_scoring(stopping_model, tiny_tokenizer, titles):
    tok = tiny_tokenizer
    p_ids, a_ids = _encoded(tok, titles)
    with torch.inference_mode():
        ref = answer_logprobs(stopping_model, p_ids, a_ids, impl="packed")
        got = score_and_generate(
            stopping_model, p_ids, a_ids, stop_ids=stop_token_ids(tok), max_new_tokens=MAX_NEW
        ).scores
    assert torch.equal(got.mask, ref.mask) and torch.equal(got.n_tokens, ref.n_tokens)
    assert torch.isfinite(got.sum[got.mask]).all() and torch.isinf(got.sum[~got.mask]).all()
    torch.testing.assert_close(got.sum[got.mask], ref.sum[ref.mask], atol=1e-5, rtol=0)


def test_joint_greedy_equals_generate(stopping, tiny_tokenizer, titles):
    stopping_model, row, step = stopping
    tok = tiny_tokenizer
    p_ids, a_ids = _encoded(tok, titles)
    with torch.inference_mode():
        got = score_and_generate(
            stopping_model,
            p_ids,
            a_ids,
            stop_ids=stop_token_ids(tok),
            max_new_tokens=MAX_NEW,
            pad_id=pad_id(tok),
        )
    want = _hf_greedy_ids(stopping_model, tok, PROMPTS, MAX_NEW)
    assert got.generated == want
    lengths = [len(g) for g in got.generated]
    assert lengths[row] == step  # stopped early at the stop token
    assert MAX_NEW in lengths  # another row ran to max_new_tokens
    texts = [tok.decode(g, skip_special_tokens=True).strip() for g in got.generated]
    assert texts == generate_answers(
        stopping_model, tok, PROMPTS, batch_size=4, max_new_tokens=MAX_NEW, progress=False
    )
    assert len(set(texts)) > 1 and all(texts)


def test_joint_max_new_tokens_one_and_all_rows_stopping(stopping, tiny_tokenizer, titles):
    stopping_model, row, step = stopping
    tok = tiny_tokenizer
    p_ids, a_ids = _encoded(tok, titles)
    with torch.inference_mode():
        one = score_and_generate(stopping_model, p_ids, a_ids, stop_ids=stop_token_ids(tok), max_new_tokens=1)
        # the early-stopping row alone: the loop ends when its only row has stopped
        alone = score_and_generate(
            stopping_model,
            p_ids[row : row + 1],
            a_ids[row : row + 1],
            stop_ids=stop_token_ids(tok),
            max_new_tokens=MAX_NEW,
        )
    assert one.generated == [g[:1] for g in _hf_greedy_ids(stopping_model, tok, PROMPTS, 1)]
    assert one.steps == 0
    assert len(alone.generated[0]) == step and alone.steps == step


def test_joint_unsupported_reasons(tiny_model, tiny_tokenizer):
    from recalign.lm.seq2seq import build_tiny_t5

    assert joint_unsupported(tiny_model) is None
    assert "encoder-decoder" in joint_unsupported(build_tiny_t5(tiny_tokenizer))
    m = copy.deepcopy(tiny_model)
    m.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in joint_unsupported(m)
    with pytest.raises(ValueError, match="repetition_penalty"):
        score_and_generate(m, [[1, 2]], [[[3]]], stop_ids=[2])


@pytest.fixture
def eval_setup(tiny_dataset, tiny_model, tiny_tokenizer):
    ds = tiny_dataset()
    split = build_split(ds, "loo", n_candidates=5)
    return ds, split.stage("test"), _sharp(tiny_model), tiny_tokenizer


def _records(setup, *, joint, protocols=("candidates", "generation"), model=None):
    ds, test, sharp, tok = setup
    cfg = EvalConfig(protocols=list(protocols), batch_size=4, max_new_tokens=6, joint=joint)
    return evaluate_lm(
        model or sharp, tok, ds, test, method="x", split_name="loo", cfg=cfg, max_history=3, progress=False
    )


def _comparable(r):
    """A record as a dict without its timings and joint bookkeeping; NaN metrics as a string (NaN != NaN)."""
    d = r.to_dict()
    d.pop("seconds")
    extra = d.pop("extra", {})
    extra.pop("joint", None)
    if extra:
        d["extra"] = extra
    d["metrics"] = {k: "nan" if math.isnan(v) else v for k, v in d["metrics"].items()}
    return d


def test_evaluate_lm_joint_records_equal_separate(eval_setup):
    joint = _records(eval_setup, joint=True)
    separate = _records(eval_setup, joint=False)
    assert [r.protocol for r in joint] == ["candidates", "generation"]
    assert all("joint" in r.extra for r in joint) and not any("joint" in r.extra for r in separate)
    assert [_comparable(r) for r in joint] == [_comparable(r) for r in separate]
    assert len(set(joint[1].extra["answers_sample"])) > 1  # real, varied answers were compared
    for r in joint:
        assert r.seconds >= 0 and r.extra["joint"]["total_seconds"] >= r.seconds


def test_evaluate_lm_joint_keeps_protocol_order_and_other_protocols(eval_setup):
    joint = _records(eval_setup, joint=True, protocols=("generation", "full", "candidates"))
    separate = _records(eval_setup, joint=False, protocols=("generation", "full", "candidates"))
    assert [r.protocol for r in joint] == ["generation", "full", "candidates"]
    assert "joint" not in joint[1].extra
    assert [_comparable(r) for r in joint] == [_comparable(r) for r in separate]


def test_evaluate_lm_single_protocol_and_unsupported_models_run_separately(eval_setup):
    (cand,) = _records(eval_setup, joint=True, protocols=("candidates",))
    assert "joint" not in cand.extra
    m = copy.deepcopy(eval_setup[2])
    m.generation_config.no_repeat_ngram_size = 2
    assert not any("joint" in r.extra for r in _records(eval_setup, joint=True, model=m))


def test_recommender_score_and_generate_matches_its_parts(eval_setup):
    ds, test, model, tok = eval_setup
    rec = LMRecommender(model, tok, ds, batch_size=3, max_history=3, progress=False)
    res = rec.score_and_generate(test, max_new_tokens=5)
    assert (res.scores == rec.score_candidates(test)).all()
    assert res.answers == generate_answers(
        model, tok, res.prompts, batch_size=3, max_new_tokens=5, progress=False
    )
    assert set(res.seconds) == {"prepare", "shared_forward", "scoring", "decoding", "total"}


def test_kv_scoring_and_joint_decoding_emit_no_cache_warnings(stopping_model, tiny_tokenizer, titles):
    """API users see no transformers deprecation warning from our KV-cache calls (``past_key_values`` was
    renamed ``cache``): the argument name is read from the decoder's signature (lm.modules.cache_kwarg)."""
    import warnings

    p_ids, a_ids = _encoded(tiny_tokenizer, titles)
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        kv = answer_logprobs(stopping_model, p_ids, a_ids, impl="kv")
        score_and_generate(
            stopping_model, p_ids, a_ids, stop_ids=stop_token_ids(tiny_tokenizer), max_new_tokens=4
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not messages, messages
    ref = answer_logprobs(stopping_model, p_ids, a_ids, impl="packed")
    torch.testing.assert_close(kv.sum[kv.mask], ref.sum[ref.mask], atol=1e-4, rtol=1e-5)
