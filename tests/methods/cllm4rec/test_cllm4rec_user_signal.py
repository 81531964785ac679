"""benchmarks/cllm4rec_user_signal.py: its NLLs are the training loss's, its unigram is counted by hand, and
the swapped-user score differs from the own one only through the user rows."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from recalign.methods.cllm4rec.documents import collab_documents, collate_lm

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location(
        "user_signal_bench", ROOT / "benchmarks" / "cllm4rec_user_signal.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_derangement_moves_everyone(probe):
    for seed in range(20):
        p = probe.derangement(5, np.random.default_rng(seed))
        assert sorted(p) == list(range(5)) and not np.any(p == np.arange(5))
    with pytest.raises(ValueError):
        probe.derangement(1, np.random.default_rng(0))


def test_unigram_counts_distinct_items_per_user(probe):
    logp = probe.unigram_log_probs([np.array([0, 0, 1]), np.array([1, 2]), np.array([], dtype=np.int64)], 4)
    # distinct per user: item 0 once, item 1 twice, item 2 once -> 1/4, 2/4, 1/4; item 3 never
    assert np.allclose(np.exp(logp[:3]), [0.25, 0.5, 0.25]) and logp[3] == -np.inf


def test_doc_nlls_are_the_collaborative_training_loss(probe, make_model, split, dataset):
    model, tok = make_model()
    seqs = split.train_sequences(dataset)
    docs = collab_documents(tok, seqs, 8, 0, 0)[:6]
    per_doc = probe.doc_nlls(model, docs, tok.pad_id, batch_size=4)
    assert [len(x) for x in per_doc] == [len(d.targets) for d in docs]
    with torch.no_grad():
        ref = float(model.collab_lm_loss(collate_lm(docs, tok.pad_id)))
    assert np.concatenate(per_doc).mean() == pytest.approx(ref, rel=1e-5)
    # per target, in the document's order: each document alone, by the obvious path (log-softmax of the
    # item head at the position before each target), equals its slice of the batched NLLs
    for doc, got in zip(docs, per_doc):
        one = collate_lm([doc], tok.pad_id)
        with torch.no_grad():
            h = model.hidden_states(one["input_ids"], one["attention_mask"], "collab")[0]
            logp = torch.log_softmax(model.item_logits(h), dim=-1)
        prompt_len = len(doc.prompt)
        want = [-float(logp[prompt_len + k - 1, t]) for k, t in enumerate(doc.targets)]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_swapping_users_changes_nothing_when_user_rows_are_equal(probe, make_model, split, dataset):
    model, tok = make_model()
    seqs = split.train_sequences(dataset)
    users = range(8)
    out = probe.user_signal(model, tok, seqs, users=users, max_items=8, seed=0, batch_size=4)
    assert out["users"] == 8 and out["documents"] >= 8
    assert out["targets"] == sum(len(np.unique(seqs[u])) for u in users)  # every interaction once
    # distinct random user rows: the swap moves the NLL
    assert abs(out["paired_per_document"]["swapped_minus_own"]["mean"]) > 0
    with torch.no_grad():
        model.collab_user.weight[:] = model.collab_user.weight[0]
    same = probe.user_signal(model, tok, seqs, users=users, max_items=8, seed=0, batch_size=4)
    assert same["paired_per_document"]["swapped_minus_own"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert same["mean_nll_per_target"]["own"] == pytest.approx(
        same["mean_nll_per_target"]["swapped"], abs=1e-4
    )
    # the unigram does not depend on the model
    assert same["mean_nll_per_target"]["unigram"] == out["mean_nll_per_target"]["unigram"]
