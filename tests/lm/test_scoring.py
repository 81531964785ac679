"""Shared-prefix scoring must equal the obvious full-sequence computation, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from recalign.lm.scoring import AnswerScores, answer_logprobs, naive_answer_logprobs

TOL = 1e-4


def random_batch(vocab: int, prompt_lens, answer_lens, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    answers = [[torch.randint(4, vocab, (n,), generator=g).tolist() for n in ls] for ls in answer_lens]
    return prompts, answers


# prompts of different lengths; answer counts 3/2/4/1 (padding to A_max=4), lengths 1..7
PROMPT_LENS = (9, 23, 4, 15)
ANSWER_LENS = ([3, 1, 5], [2, 7], [4, 1, 1, 6], [2])


def assert_close(a: AnswerScores, b: AnswerScores, tol: float = TOL) -> None:
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.n_tokens, b.n_tokens)
    assert torch.isinf(a.sum[~a.mask]).all() and torch.isinf(b.sum[~b.mask]).all()
    diff = (a.sum[a.mask] - b.sum[b.mask]).abs().max().item()
    assert diff <= tol, diff


@pytest.fixture
def model_with_attn(tiny_model, request):
    m = copy.deepcopy(tiny_model)
    m.config._attn_implementation = request.param
    return m


@pytest.mark.parametrize("model_with_attn", ["sdpa", "eager"], indirect=True)
@pytest.mark.parametrize("impl", ["packed", "kv"])
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_shared_prefix_equals_naive(model_with_attn, tiny_tokenizer, impl, chunk_size):
    prompts, answers = random_batch(len(tiny_tokenizer), PROMPT_LENS, ANSWER_LENS)
    with torch.no_grad():
        ref = naive_answer_logprobs(model_with_attn, prompts, answers)
        got = answer_logprobs(model_with_attn, prompts, answers, impl=impl, chunk_size=chunk_size)
    assert got.sum.shape == (4, 4)
    assert got.mask.tolist() == [
        [True] * 3 + [False],
        [True] * 2 + [False] * 2,
        [True] * 4,
        [True] + [False] * 3,
    ]
    assert_close(got, ref)
    # the values are real log-probs of multi-token sequences: negative and not all equal
    assert (got.sum[got.mask] < 0).all()
    assert got.sum[got.mask].unique().numel() == int(got.mask.sum())


def test_kv_cache_budget_splits_passes(tiny_model, tiny_tokenizer, monkeypatch):
    import recalign.lm.scoring as scoring

    prompts, answers = random_batch(len(tiny_tokenizer), PROMPT_LENS, ANSWER_LENS, seed=9)
    with torch.no_grad():
        ref = naive_answer_logprobs(tiny_model, prompts, answers)
        monkeypatch.setattr(scoring, "KV_CACHE_TOKENS", 50)  # 2 answer rows per pass (P_max = 23)
        got = answer_logprobs(tiny_model, prompts, answers, impl="kv")
    assert_close(got, ref)


def test_naive_batching_does_not_change_values(tiny_model, tiny_tokenizer):
    prompts, answers = random_batch(len(tiny_tokenizer), PROMPT_LENS, ANSWER_LENS, seed=3)
    with torch.no_grad():
        a = naive_answer_logprobs(tiny_model, prompts, answers)
        b = naive_answer_logprobs(tiny_model, prompts, answers, batch_size=1)
    assert_close(a, b, 1e-5)


def test_answers_do_not_see_each_other(tiny_model, tiny_tokenizer):
    """An answer's score is the same alone or packed after other answers (the tree mask is honoured)."""
    prompts, answers = random_batch(len(tiny_tokenizer), [12], [[5, 6, 4]], seed=1)
    with torch.no_grad():
        together = answer_logprobs(tiny_model, prompts, answers)
        alone = answer_logprobs(tiny_model, prompts, [[answers[0][2]]])
    assert abs(together.sum[0, 2].item() - alone.sum[0, 0].item()) <= 1e-5


def test_mean_is_length_normalised(tiny_model, tiny_tokenizer):
    prompts, answers = random_batch(len(tiny_tokenizer), [6, 8], [[3, 5], [2]], seed=2)
    with torch.no_grad():
        s = answer_logprobs(tiny_model, prompts, answers)
    assert torch.allclose(s.mean[0], s.sum[0] / torch.tensor([3.0, 5.0]))
    assert s.mean[1, 0] == pytest.approx(s.sum[1, 0].item() / 2)
    assert torch.isinf(s.mean[1, 1]) and s.mean[1, 1] < 0
    assert torch.equal(s.select(True), s.mean) and torch.equal(s.select(False), s.sum)


def test_examples_without_answers_and_bad_input(tiny_model, tiny_tokenizer):
    prompts, answers = random_batch(len(tiny_tokenizer), [6, 8], [[3, 5], []], seed=4)
    with torch.no_grad():
        s = answer_logprobs(tiny_model, prompts, answers)
        ref = naive_answer_logprobs(tiny_model, prompts, answers)
    assert not s.mask[1].any()
    assert_close(s, ref)
    with pytest.raises(ValueError, match="empty"):
        answer_logprobs(tiny_model, [[5, 6]], [[[7], []]])
    with pytest.raises(ValueError, match="answer lists"):
        answer_logprobs(tiny_model, [[5, 6]], [])
    with pytest.raises(ValueError, match="impl"):
        answer_logprobs(tiny_model, [[5, 6]], [[[7]]], impl="magic")


def _param_grads(model, fn, prompts, answers):
    model.zero_grad(set_to_none=True)
    s = fn(model, prompts, answers)
    # an S-DPO-like objective: logsumexp over each row's answers minus the first, plus a mean term
    x = torch.where(s.mask, s.sum, torch.full_like(s.sum, -1e4))
    loss = (torch.logsumexp(x, dim=1) - s.sum[:, 0]).sum() + s.mean[s.mask].mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss.item()


@pytest.mark.parametrize("impl", ["packed", "kv"])
def test_gradients_match_naive(tiny_model, tiny_tokenizer, impl):
    model = copy.deepcopy(tiny_model).train()
    prompts, answers = random_batch(len(tiny_tokenizer), PROMPT_LENS, ANSWER_LENS, seed=5)
    ref, loss_ref = _param_grads(model, naive_answer_logprobs, prompts, answers)
    got, loss_got = _param_grads(model, lambda m, p, a: answer_logprobs(m, p, a, impl=impl), prompts, answers)
    assert loss_got == pytest.approx(loss_ref, abs=1e-4)
    assert set(got) == set(ref) and len(got) > 10
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-6
        assert (got[name] - ref[name]).abs().max().item() <= 1e-4 * max(1.0, scale), name
    # gradients really reach the embedding table (through prompt and answer tokens)
    assert ref["model.embed_tokens.weight"].abs().sum() > 0


def _lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), cfg)


@pytest.mark.parametrize("impl", ["packed", "kv"])
def test_works_under_peft_lora(tiny_model, tiny_tokenizer, impl):
    peft_model = _lora(tiny_model)
    prompts, answers = random_batch(len(tiny_tokenizer), PROMPT_LENS, ANSWER_LENS, seed=6)
    with torch.no_grad():
        ref = naive_answer_logprobs(peft_model, prompts, answers)
        got = answer_logprobs(peft_model, prompts, answers, impl=impl)
        base = answer_logprobs(tiny_model, prompts, answers, impl=impl)
        with peft_model.disable_adapter():
            disabled = answer_logprobs(peft_model, prompts, answers, impl=impl)
    assert_close(got, ref)
    # the adapter is active (scores differ from the base model) and disabling it gives the base back
    assert (got.sum[got.mask] - base.sum[base.mask]).abs().max() > 1e-3
    assert_close(disabled, base, 1e-5)


def test_lora_gradients_only_on_adapter(tiny_model, tiny_tokenizer):
    peft_model = _lora(tiny_model).train()
    prompts, answers = random_batch(len(tiny_tokenizer), PROMPT_LENS, ANSWER_LENS, seed=7)
    ref, _ = _param_grads(peft_model, naive_answer_logprobs, prompts, answers)
    got, _ = _param_grads(peft_model, answer_logprobs, prompts, answers)
    assert ref and set(got) == set(ref) and all("lora_" in n for n in got)
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-4, rtol=1e-3), name


def test_inference_mode(tiny_model, tiny_tokenizer):
    prompts, answers = random_batch(len(tiny_tokenizer), PROMPT_LENS, ANSWER_LENS, seed=8)
    with torch.inference_mode():
        s = answer_logprobs(tiny_model, prompts, answers, impl="packed")
        k = answer_logprobs(tiny_model, prompts, answers, impl="kv")
    assert not s.sum.requires_grad
    assert_close(s, k)


@pytest.mark.slow
def test_smollm2_shared_prefix_equals_naive():
    from recalign.lm.loading import load_model
    from recalign.lm.prompts import encode_answer, encode_prompt

    model, tok = load_model("smollm2")
    model.eval()
    prompts_text = [
        "The user watched: Toy Story (1995), Heat (1995). Which one next? Alien (1979) or Fargo (1996)?\nAnswer:",
        "Pick a movie.\nAnswer:",
    ]
    answers_text = [
        ["Alien (1979)", "Fargo (1996)", "Casablanca (1942)"],
        ["Star Wars (1977)", "Babe (1995)"],
    ]
    prompts = [encode_prompt(tok, p) for p in prompts_text]
    answers = [[encode_answer(tok, a) for a in ans] for ans in answers_text]
    with torch.inference_mode():
        ref = naive_answer_logprobs(model, prompts, answers)
        for impl in ("packed", "kv"):
            assert_close(answer_logprobs(model, prompts, answers, impl=impl), ref)
