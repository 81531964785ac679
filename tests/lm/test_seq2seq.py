"""Encoder-decoder scoring: the shared-encoder pass equals the naive one (values and gradients)."""

import pytest
import torch

from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
from recalign.lm.scoring import answer_logprobs
from recalign.lm.seq2seq import (
    build_tiny_t5,
    encode_source,
    encode_target,
    is_seq2seq,
    naive_seq2seq_answer_logprobs,
    seq2seq_answer_logprobs,
    text_encoders,
)

TEXTS = ["A user watched Toy Story (1995); Heat (1995). Which movie next? Answer: Babe (1995)"] * 4


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture
def batch(tok):
    prompts = [
        encode_source(tok, "A user watched Toy Story (1995); Heat (1995). Which movie next? Answer:"),
        encode_source(tok, "Which movie next? Answer:"),  # shorter: exercises encoder padding
        encode_source(tok, "Heat (1995). Answer:"),
    ]
    answers = [
        [encode_target(tok, t) for t in ("Babe (1995)", "Heat (1995)", "Toy Story (1995)")],
        [encode_target(tok, "Heat")],
        [],  # a prompt without answers
    ]
    return prompts, answers


def test_encoding_ends_with_eos_and_has_no_bos(tok):
    src = encode_source(tok, "Heat (1995)")
    tgt = encode_target(tok, " Heat (1995) ")
    assert src[-1] == tok.eos_token_id and tok.bos_token_id not in src
    assert tgt == src  # the answer is stripped, and both follow the same rule


def test_shared_equals_naive(tok, batch):
    model = build_tiny_t5(tok, seed=3).eval()
    prompts, answers = batch
    with torch.no_grad():
        naive = naive_seq2seq_answer_logprobs(model, prompts, answers)
        for chunk in (None, 1, 2):
            shared = seq2seq_answer_logprobs(model, prompts, answers, chunk_size=chunk)
            assert shared.mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
            assert torch.equal(shared.n_tokens, naive.n_tokens)
            real = shared.mask
            torch.testing.assert_close(shared.sum[real], naive.sum[real], atol=1e-4, rtol=1e-5)
            assert torch.isinf(shared.sum[~real]).all()
    # the scores are real log-probs: negative, and distinct answers get distinct scores
    assert (naive.sum[naive.mask] < 0).all()
    assert len(set(naive.sum[0].tolist())) == 3


def test_gradients_match_naive(tok, batch):
    prompts, answers = batch
    model = build_tiny_t5(tok, seed=4)
    grads = []
    for fn in (seq2seq_answer_logprobs, naive_seq2seq_answer_logprobs):
        model.zero_grad()
        s = fn(model, prompts[:2], answers[:2])
        s.sum[s.mask].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    # the encoder receives gradient through the shared pass
    assert any(n.startswith("encoder.") and g.abs().sum() > 0 for n, g in grads[0].items())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4)


def test_one_entry_point_for_both_families(tok):
    t5 = build_tiny_t5(tok, seed=0).eval()
    llama = build_tiny_llama(tok, seed=0).eval()
    assert is_seq2seq(t5) and not is_seq2seq(llama)
    for model in (t5, llama):
        enc_p, enc_a = text_encoders(model, tok)
        p = [enc_p("Which movie next? Answer:")]
        a = [[enc_a("Heat (1995)"), enc_a("Babe (1995)")]]
        with torch.no_grad():
            s = answer_logprobs(model, p, a, chunk_size=1)
        assert s.sum.shape == (1, 2) and torch.isfinite(s.sum).all()
    # decoder-only prompts start with BOS (prompts.encode_prompt), encoder inputs end with EOS
    assert text_encoders(llama, tok)[0]("x")[0] == tok.bos_token_id
    assert text_encoders(t5, tok)[0]("x")[-1] == tok.eos_token_id
