"""Reference log-probs: the safetensors cache and the adapter-disabled pass, on a tiny Llama."""

import copy

import numpy as np
import pytest
import torch

from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
from recalign.lm.reference import (
    adapter_disabled,
    cache_key,
    model_fingerprint,
    precompute_reference_logprobs,
    reference_answer_logprobs,
    tokenize_preference_data,
)
from recalign.lm.scoring import naive_answer_logprobs
from recalign.methods.preference_data import PreferenceData

TITLES = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Fargo (1996)", "Alien (1979)", "Big (1988)"]


def pref_data(rejected=((1, 2), (3, 4), (5, 0))):
    rejected = np.asarray(rejected)
    chosen = np.array([0, 2, 4])
    prompts = [
        "The user watched Heat (1995) and Big (1988). Which next? Answer:",
        "History: Fargo (1996), Alien (1979), Toy Story (1995). Pick one. Answer:",
        "Liked: Casino (1995). Candidates follow. Answer:",
    ]
    return PreferenceData(
        users=np.arange(3),
        positions=np.ones(3, dtype=int),
        prompts=prompts,
        chosen=chosen,
        rejected=rejected,
        chosen_titles=[TITLES[i] for i in chosen],
        rejected_titles=[[TITLES[i] for i in row] for row in rejected],
        strategy="random",
        seed=0,
    )


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(pref_data().prompts + TITLES * 3, vocab_size=300)


@pytest.fixture()
def model(tok):
    m = build_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    m.config._attn_implementation = "eager"
    return m.eval()


def test_cache_hit_returns_identical_tensors_and_matches_naive_scoring(tmp_path, model, tok):
    data = pref_data()
    first = precompute_reference_logprobs(model, tok, data, tmp_path, batch_size=2)
    assert not first.from_cache
    assert first.path is not None and first.path.is_file()
    assert first.logprobs.shape == (3, 3) and first.logprobs.dtype == torch.float32
    assert torch.isfinite(first.logprobs).all() and (first.logprobs < 0).all()

    second = precompute_reference_logprobs(model, tok, data, tmp_path, batch_size=3)
    assert second.from_cache
    assert second.key == first.key
    assert torch.equal(second.logprobs, first.logprobs)
    assert torch.equal(second.n_tokens, first.n_tokens)
    assert torch.equal(second.mask, first.mask)

    # the cached numbers are the true reference log-probs (naive full-sequence scoring)
    prompts, answers = tokenize_preference_data(tok, data)
    with torch.no_grad():
        naive = naive_answer_logprobs(model, prompts, answers)
    torch.testing.assert_close(first.logprobs, naive.sum.float(), atol=1e-4, rtol=1e-5)
    assert first.n_tokens.tolist() == [[len(a) for a in ans] for ans in answers]


def test_cache_is_safetensors_with_the_key_in_metadata(tmp_path, model, tok):
    from safetensors import safe_open

    ref = precompute_reference_logprobs(model, tok, pref_data(), tmp_path)
    raw = ref.path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_len < len(raw)  # safetensors layout: u64 length + JSON header
    with safe_open(str(ref.path), framework="pt") as f:
        assert f.metadata()["key"] == ref.key
        assert sorted(f.keys()) == ["logprobs", "mask", "n_tokens"]
    assert list(tmp_path.iterdir()) == [ref.path]  # no temporary files left behind


def test_changed_dataset_or_model_changes_the_key(tmp_path, model, tok):
    base = precompute_reference_logprobs(model, tok, pref_data(), tmp_path)
    # different negatives for one example → different answers → a miss, and different numbers
    other = precompute_reference_logprobs(model, tok, pref_data(rejected=((1, 2), (3, 5), (5, 0))), tmp_path)
    assert other.key != base.key and not other.from_cache
    assert torch.equal(other.logprobs[0], base.logprobs[0])
    assert not torch.equal(other.logprobs[1], base.logprobs[1])
    # a changed prompt misses too
    data = pref_data()
    data.prompts[2] = data.prompts[2].replace("Casino", "Heat")
    assert precompute_reference_logprobs(model, tok, data, tmp_path).key != base.key
    # a changed weight (same architecture) changes the fingerprint and misses
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(changed) != model_fingerprint(model)
    again = precompute_reference_logprobs(changed, tok, pref_data(), tmp_path)
    assert again.key != base.key and not again.from_cache
    # ...while an identical copy (e.g. loaded from another path) hits
    same = copy.deepcopy(model)
    same.config._name_or_path = "/elsewhere/model"
    assert precompute_reference_logprobs(same, tok, pref_data(), tmp_path).from_cache
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_cache_key_depends_on_token_boundaries():
    # [1, 2] + [3] and [1] + [2, 3] hold the same ids but are different (prompt, answer) splits
    assert cache_key("fp", [[1, 2]], [[[3]]]) != cache_key("fp", [[1]], [[[2, 3]]])
    assert cache_key("fp", [[1, 2]], [[[3]]]) != cache_key("fp2", [[1, 2]], [[[3]]])
    assert cache_key("fp", [[1, 2]], [[[3]]]) == cache_key("fp", [[1, 2]], [[[3]]])


def test_adapter_disabled_logprobs_equal_the_base_model(model, tok):
    from peft import LoraConfig, get_peft_model

    prompts, answers = tokenize_preference_data(tok, pref_data())
    with torch.no_grad():
        base_scores = naive_answer_logprobs(model, prompts, answers).sum
    peft_model = get_peft_model(
        copy.deepcopy(model),
        # init_lora_weights=False: B is random rather than zero, so the adapter really changes outputs
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.train()
    with torch.no_grad():
        adapted = naive_answer_logprobs(peft_model.eval(), prompts, answers).sum
    peft_model.train()
    assert (adapted - base_scores).abs().max() > 1e-3  # the adapter is active by default

    ref = reference_answer_logprobs(peft_model, prompts, answers)
    torch.testing.assert_close(ref.sum, base_scores, atol=1e-5, rtol=1e-5)
    assert not ref.sum.requires_grad
    assert peft_model.training  # mode restored
    with adapter_disabled(peft_model), torch.no_grad():
        off = naive_answer_logprobs(peft_model, prompts, answers).sum
    torch.testing.assert_close(off, base_scores, atol=1e-5, rtol=1e-5)
    # and the adapter is back on after the block
    with torch.no_grad():
        back_on = naive_answer_logprobs(peft_model.eval(), prompts, answers).sum
    torch.testing.assert_close(back_on, adapted)


def test_adapter_disabled_refuses_a_plain_model(model):
    with pytest.raises(TypeError, match="no LoRA adapter"), adapter_disabled(model):
        pass
