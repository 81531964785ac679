"""Hybrid item tokens in the sequence format (LLaRA soft tokens in sequence-SFT documents).

Each test could fail in a specific way: a soft token that carried a loss label or shifted the loss spans,
an objective that fed the clamped ids instead of the projected embeddings (or detached the projector),
evaluation prompts that were not a prefix of the training documents, scoring paths that disagreed on
hybrid prompts, a reloaded model that lost its projector, windows that leaked a held-out item into a
soft token, or a projector whose output did not matter.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recalign.data.splits import build_split
from recalign.errors import RecalignInputError
from recalign.lm.hybrid import attach_item_tokens, item_tokens_of, new_item_tokens, prompt_embeddings
from recalign.lm.scoring import answer_logprobs, naive_answer_logprobs
from recalign.lm.sequence import (
    SequenceCodec,
    SequenceLMRecommender,
    SequenceObjective,
    Window,
    sequence_examples,
    sequence_token_logprobs,
    split_windows,
)
from recalign.methods.hybrid import CurriculumObjective, HybridConfig, hybrid_sequence_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _grad_check import assert_grads_match_naive  # noqa: E402

TOL = 1e-4
D_REC = 8
ITEMS = np.array([3, 7, 1, 12, 5, 20])


def _hybrid(model, n_items: int, seed: int = 0):
    """A deep copy of ``model`` with a fresh projector over a random item table attached (trainable)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items, D_REC, generator=g) * 0.1
    torch.manual_seed(seed)
    attach_item_tokens(m, new_item_tokens(m, table, hidden=16), trainable=True)
    return m


@pytest.fixture
def ds(tiny_dataset):
    return tiny_dataset()


@pytest.fixture
def hybrid_model(tiny_model, ds):
    return _hybrid(tiny_model, ds.n_items)


def _batch(examples: list[dict]) -> dict:
    return {k: [e[k] for e in examples] for k in examples[0]}


def _windows():
    return [
        Window(user=0, start=0, items=ITEMS, first_target=2),
        Window(user=1, start=0, items=np.array([9, 8, 7]), first_target=1),
    ]


# ---------------------------------------------------------------------- documents
def test_hybrid_document_layout_and_labels(ds, tiny_tokenizer):
    """A soft token right after every item's line but the last; the loss spans are exactly the text
    document's line spans (shifted by the soft tokens before them) and never cover a soft token; every
    history-only hybrid prompt is a prefix of the document, ending where its target line starts."""
    text, hyb = SequenceCodec(tiny_tokenizer, ds), SequenceCodec(tiny_tokenizer, ds, item_tokens=True)
    w = Window(user=0, start=0, items=ITEMS, first_target=2)
    doc_t, doc_h = text.document(w), hyb.document(w)
    ids = doc_h["tokens"]
    assert [-t - 1 for t in ids if t < 0] == [int(i) for i in ITEMS[:-1]]
    assert [t for t in ids if t >= 0] == doc_t["tokens"]
    assert len(doc_h["targets"]) == len(doc_t["targets"]) == len(ITEMS) - 2
    for k, (start, end) in zip(range(2, len(ITEMS)), doc_h["targets"]):
        assert all(t >= 0 for t in ids[start:end])  # no soft token is ever a label
        assert ids[start:end] == hyb.lines[int(ITEMS[k])]
        assert ids[start - 1] == -(int(ITEMS[k - 1]) + 1)  # predicted from the previous item's soft token
        prompt = hyb.prompt(ITEMS[:k])
        assert ids[: len(prompt)] == prompt and start == len(prompt)
    t_start, t_end = doc_t["targets"][0]
    assert doc_h["targets"][0] == [t_start + 2, t_end + 2]  # after the soft tokens of the 2 context items
    # the loss averages over the same target tokens with or without soft tokens
    assert SequenceObjective.loss_items(_batch([doc_h])) == SequenceObjective.loss_items(_batch([doc_t]))


def test_a_span_over_a_soft_token_is_refused(hybrid_model):
    batch = {"tokens": [[1, 5, 6, -3, 7, 8]], "targets": [[[3, 5]]]}
    with pytest.raises(ValueError, match="soft item token"):
        sequence_token_logprobs(hybrid_model, batch)


@pytest.mark.parametrize("split_name", ["llara", "loo"])
def test_hybrid_windows_never_hold_a_held_out_item(ds, tiny_tokenizer, split_name):
    """The hybrid documents are cut from the same windows: every line *and every soft token* is an item
    at a training position before the user's first held-out example (the curriculum's text copy too)."""
    split = build_split(ds, split_name, n_candidates=5, seed=0)
    held = split.examples[split.examples["stage"] != "train"]
    first_held = held.groupby("user")["position"].min().to_dict()
    wins = split_windows(split, ds, window=5, min_context=2)
    docs = hybrid_sequence_examples(HybridConfig(curriculum=True), tiny_tokenizer, ds, wins)
    plain = sequence_examples(tiny_tokenizer, ds, wins)
    seqs = ds.sequences()
    assert len(docs) == len(wins) > 0
    for w, doc, p in zip(wins, docs, plain):
        allowed = seqs[w.user][: first_held.get(w.user, len(seqs[w.user]))]
        soft = [-t - 1 for t in doc["tokens"] if t < 0]
        assert soft == [int(i) for i in w.items[:-1]] and set(soft) <= set(allowed.tolist())
        assert (doc["text_tokens"], doc["text_targets"]) == (p["tokens"], p["targets"])
        assert [t for t in doc["tokens"] if t >= 0] == p["tokens"]


# ---------------------------------------------------------------------- the objective
def test_hybrid_objective_is_the_nll_of_an_embeds_forward_and_trains_the_projector(
    ds, tiny_tokenizer, hybrid_model
):
    docs = sequence_examples(tiny_tokenizer, ds, _windows(), item_tokens=True)
    batch = _batch(docs)
    model = hybrid_model
    model.train()
    loss, _ = SequenceObjective()(model, batch)
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, spans in zip(batch["tokens"], batch["targets"]):
            logits = model(inputs_embeds=prompt_embeddings(model, torch.tensor([ids]))).logits[0]
            for start, end in spans:
                tgt = torch.tensor(ids[start:end])
                total += torch.nn.functional.cross_entropy(
                    logits[start - 1 : end - 1], tgt, reduction="sum"
                ).item()
                n += end - start
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    model.zero_grad()
    loss.backward()
    proj = item_tokens_of(model)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in proj.parameters())
    # the same targets without soft tokens: another loss (the soft tokens reach the predictions)
    with torch.no_grad():
        text_loss, _ = SequenceObjective()(model, _batch(sequence_examples(tiny_tokenizer, ds, _windows())))
    assert abs(text_loss.item() - loss.item()) > 1e-4


@pytest.mark.parametrize("impl", ["packed", "kv"])
def test_training_targets_equal_the_evaluation_scores(ds, tiny_tokenizer, hybrid_model, impl):
    """Train/eval consistency: the objective's log-prob of each target line of a hybrid document equals
    that line's shared-prefix score after the hybrid history-only prompt (packed, kv and naive)."""
    codec = SequenceCodec(tiny_tokenizer, ds, item_tokens=True)
    w = Window(user=0, start=0, items=ITEMS, first_target=2)
    doc = codec.document(w)
    with torch.no_grad():
        lp = sequence_token_logprobs(hybrid_model, _batch([doc]))
        prompts = [codec.prompt(ITEMS[:k]) for k in range(2, len(ITEMS))]
        answers = [[codec.lines[int(ITEMS[k])]] for k in range(2, len(ITEMS))]
        got = answer_logprobs(hybrid_model, prompts, answers, impl=impl).sum[:, 0]
        ref = naive_answer_logprobs(hybrid_model, prompts, answers).sum[:, 0]
    sizes = [end - start for start, end in doc["targets"]]
    per_line = torch.stack([c.sum() for c in torch.split(lp, sizes)])
    assert (per_line - ref).abs().max().item() <= TOL
    assert (got - ref).abs().max().item() <= TOL


# ---------------------------------------------------------------------- evaluation
def _rows(ds, n=4):
    split = build_split(ds, "llara", n_candidates=5, seed=0)
    return split.stage("test").head(n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("impl", ["packed", "kv"])
def test_hybrid_sequence_scores_agree_across_paths(ds, tiny_tokenizer, hybrid_model, attn, impl):
    hybrid_model.config._attn_implementation = attn
    ex = _rows(ds)
    rec = SequenceLMRecommender(hybrid_model, tiny_tokenizer, ds, max_history=3, batch_size=3,
                                impl=impl, all_chunk_size=7, progress=False)  # fmt: skip
    assert rec.item_tokens  # followed the model
    got = rec.score_candidates(ex)
    codec = SequenceCodec(tiny_tokenizer, ds, item_tokens=True)
    prompts = [codec.prompt(np.asarray(h)[-3:]) for h in ex["history"]]
    assert all(min(p) < 0 for p in prompts)
    answers = [[codec.lines[int(c)] for c in cands] for cands in ex["candidates"]]
    with torch.no_grad():
        want = naive_answer_logprobs(hybrid_model, prompts, answers).sum.numpy()
    np.testing.assert_allclose(got, want, atol=TOL)
    full = rec.score_all(ex.head(2))
    for r in range(2):
        np.testing.assert_allclose(full[r, np.asarray(ex["candidates"].iloc[r])], got[r], atol=TOL)


@pytest.mark.parametrize("impl", ["packed", "kv"])
def test_hybrid_sequence_gradients_equal_naive(ds, tiny_tokenizer, hybrid_model, impl):
    """Gradients of the LM's weights and of the projector through the hybrid history-only prompts."""
    ex = _rows(ds, 3)
    codec = SequenceCodec(tiny_tokenizer, ds, item_tokens=True)
    prompts = [codec.prompt(np.asarray(h)[-4:]) for h in ex["history"]]
    answers = [[codec.lines[int(c)] for c in cands[:3]] for cands in ex["candidates"]]
    assert_grads_match_naive(hybrid_model, prompts, answers, impl, TOL)


def test_projector_output_changes_the_scores(ds, tiny_tokenizer, tiny_model, hybrid_model):
    ex = _rows(ds)
    kw = dict(max_history=4, progress=False)
    hybrid = SequenceLMRecommender(hybrid_model, tiny_tokenizer, ds, **kw).score_candidates(ex)
    text_rec = SequenceLMRecommender(hybrid_model, tiny_tokenizer, ds, item_tokens=False, **kw)
    assert not text_rec.item_tokens
    text = text_rec.score_candidates(ex)
    # text-only prompts on the hybrid model: exactly the base model's (the unchanged input_ids path)
    base = SequenceLMRecommender(tiny_model, tiny_tokenizer, ds, **kw)
    assert not base.item_tokens
    np.testing.assert_array_equal(text, base.score_candidates(ex))
    assert np.abs(hybrid - text).min() > 1e-5
    with torch.no_grad():
        item_tokens_of(hybrid_model).projector.item_out.bias.add_(0.5)
    moved = SequenceLMRecommender(hybrid_model, tiny_tokenizer, ds, **kw).score_candidates(ex)
    assert np.abs(moved - hybrid).min() > 1e-5


def test_projector_of_another_catalogue_is_refused(ds, tiny_tokenizer, tiny_model, tiny_dataset):
    small = _hybrid(tiny_model, ds.n_items - 1)
    with pytest.raises(RecalignInputError, match="items") as e:
        SequenceLMRecommender(small, tiny_tokenizer, ds, progress=False)
    assert "\n" not in str(e.value)
    model = _hybrid(tiny_model, ds.n_items)
    item_tokens_of(model).info["catalogue_sha256"] = "0" * 64
    with pytest.raises(RecalignInputError, match="another catalogue"):
        SequenceLMRecommender(model, tiny_tokenizer, ds, progress=False)


# ---------------------------------------------------------------------- curriculum
def test_curriculum_swaps_whole_sequence_documents(ds, tiny_tokenizer, hybrid_model):
    """Text-only documents at step 0, hybrid ones once the ramp is over and in evaluation mode."""
    docs = hybrid_sequence_examples(HybridConfig(curriculum=True), tiny_tokenizer, ds, _windows())
    batch = _batch(docs)
    obj = CurriculumObjective(SequenceObjective(), span=0.5, seed=0)
    assert obj.loss_items(batch) == SequenceObjective.loss_items(batch)
    hybrid_model.train()
    with torch.no_grad():

        def plain_loss(item_tokens):
            docs = sequence_examples(tiny_tokenizer, ds, _windows(), item_tokens=item_tokens)
            return SequenceObjective()(hybrid_model, _batch(docs))[0]

        want_text, want_hybrid = plain_loss(False), plain_loss(True)
        obj.step, obj.max_steps = 0, 10
        got, logs = obj(hybrid_model, batch)
        assert logs["hybrid_share"] == 0.0 and got.item() == pytest.approx(want_text.item(), rel=1e-6)
        obj.step = 5
        got, logs = obj(hybrid_model, batch)
        assert logs["hybrid_share"] == 1.0 and got.item() == pytest.approx(want_hybrid.item(), rel=1e-6)
        hybrid_model.eval()
        obj.step = 0
        got, logs = obj(hybrid_model, batch)
        assert logs["hybrid_share"] == 1.0 and got.item() == pytest.approx(want_hybrid.item(), rel=1e-6)


# ---------------------------------------------------------------------- save and reload
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))


def test_saved_hybrid_sequence_model_reloads_and_scores_identically(tmp_path, capsys):
    """Adapter + projector saved with ``prompt_format: sequence`` reload (``load_lm``, ``recalign
    evaluate``) with the projector attached and the same hybrid scores and metrics."""
    import _lm_tiny

    from recalign.cli.main import main
    from recalign.data.prepare import DataPrepareConfig
    from recalign.evaluation.records import read_records
    from recalign.lm.loading import load_model
    from recalign.lm.lora import LoRAConfig, attach_lora, load_lm, save_adapter
    from recalign.methods import load_data, sample_examples
    from recalign.methods.zeroshot import EvalConfig, evaluate_lm

    _, data_dir, model_dir = _lm_tiny.tiny_env(tmp_path)
    data = load_data(DataPrepareConfig(dataset="ml-100k", path=str(data_dir), split="llara", candidates=5))
    model, tok = load_model(model_dir)
    torch.manual_seed(0)
    model = attach_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]))
    with torch.no_grad():  # a non-trivial adapter (LoRA's B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    table = torch.randn(data.dataset.n_items, D_REC, generator=torch.Generator().manual_seed(1))
    attach_item_tokens(model, new_item_tokens(model, table, hidden=8), trainable=True)
    adapter = save_adapter(model, tmp_path / "run" / "adapter", base_model=str(model_dir),
                           extra={"method": "sft-hybrid-sequence", "seed": 0, "max_history": 4,
                                  "prompt_format": "sequence"})  # fmt: skip
    rows = sample_examples(data.split.stage("test"), 6, 0, stage="test")
    model.eval()
    before = SequenceLMRecommender(model, tok, data.dataset, max_history=4, progress=False)
    scores = before.score_candidates(rows)
    records = evaluate_lm(model, tok, data.dataset, rows, method="sft-hybrid-sequence", split_name="llara",
                          cfg=EvalConfig(n_test=6, protocols=["candidates"]), max_history=4, progress=False,
                          prompt_format="sequence")  # fmt: skip
    assert records[0].extra["item_tokens"] is True

    kept, tok2, _ = load_lm(str(tmp_path / "run"), merge=False)
    assert item_tokens_of(kept) is not None
    again = SequenceLMRecommender(kept, tok2, data.dataset, max_history=4, progress=False)
    assert again.item_tokens
    np.testing.assert_allclose(again.score_candidates(rows), scores, atol=1e-6)
    merged, _, _ = load_lm(str(adapter))
    merged_rec = SequenceLMRecommender(merged, tok2, data.dataset, max_history=4, progress=False)
    np.testing.assert_allclose(merged_rec.score_candidates(rows), scores, atol=TOL)

    dest = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--dataset", "ml-100k", "--path", str(data_dir),
                 "--split", "llara", "--candidates", "5", "--n-test", "6", "--protocols", "candidates",
                 "--output", str(dest)]) == 0  # fmt: skip
    (rec,) = read_records(dest / "records.json")
    assert rec.extra["prompt_format"] == "sequence" and rec.extra["item_tokens"] is True
    assert rec.metrics == pytest.approx(records[0].metrics, abs=1e-9)
