"""Training stages (alternation, loss decrease, resume) and the Recommender adapter."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recalign.errors import RecalignInputError
from recalign.evaluation.protocols import evaluate_candidates, evaluate_full
from recalign.methods.cllm4rec.documents import collate_lm, content_corpus, content_documents
from recalign.methods.cllm4rec.protocol import evaluate_multi_target
from recalign.methods.cllm4rec.recommender import CLLM4RecRecommender
from recalign.methods.cllm4rec.training import TrainingData, _loss_items, _schedule, _shard, run_stage


def _data(tok, dataset, split):
    return TrainingData.build(tok, dataset, split.train_sequences(dataset))


def test_schedule_alternates_and_numbers_each_stream():
    kinds = [_schedule(s, 2) for s in range(7)]
    assert kinds == [(0, 0), (1, 0), (1, 1), (0, 1), (1, 2), (1, 3), (0, 2)]
    assert [_schedule(s, 0) for s in range(3)] == [(0, 0), (0, 1), (0, 2)]


def test_each_step_updates_only_its_side(make_model, make_config, dataset, split):
    cfg = make_config(pretrain__collab_steps=1, pretrain__content_ratio=1, pretrain__mutual_lambda=1.0)
    model, tok = make_model(cfg)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    before = model.id_state()
    cfg.pretrain.collab_steps, cfg.pretrain.content_ratio = 1, 0  # exactly one collaborative step
    run_stage(model, _data(tok, dataset, split), cfg, "pretrain")
    after = model.id_state()
    assert not torch.equal(before["collab_item"], after["collab_item"])
    assert not torch.equal(before["collab_user"], after["collab_user"])
    assert torch.equal(before["content_item"], after["content_item"])  # fixed side untouched
    assert torch.equal(before["content_user"], after["content_user"])
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())


def test_pretrain_and_finetune_losses_decrease(make_model, make_config, dataset, split):
    cfg = make_config(pretrain__collab_steps=20, finetune__steps=20)
    model, tok = make_model(cfg)
    data = _data(tok, dataset, split)
    pre = run_stage(model, data, cfg, "pretrain")
    fine = run_stage(model, data, cfg, "finetune")
    assert pre.steps == 40 and [r["kind"] for r in pre.log[:4]] == ["collab", "content"] * 2
    # batches hold documents of similar length (a loss per batch depends on it): compare whole epochs
    n_pre, n_fine = pre.batches_per_epoch, fine.batches_per_epoch
    assert pre.mean_loss("collab", False, n_pre) < pre.mean_loss("collab", True, n_pre) - 0.1
    assert max(r["reg"] for r in pre.log) > 0  # the sides drift and are pulled together
    assert fine.mean_loss("rec", False, n_fine) < fine.mean_loss("rec", True, n_fine) - 0.1
    # the fitted model separates the two taste clusters: a cluster-A user's top items are cluster-A items
    rec = CLLM4RecRecommender(cfg, model=model, tokenizer=tok)
    test = split.stage("test")
    top = [rec.recommend(u, h, k=5) for u, h in zip(test["user"], test["history"])]
    in_cluster = np.mean([np.mean([(i < 20) == (u < 8) for i in t]) for u, t in zip(test["user"], top)])
    assert in_cluster > 0.7


def test_a_content_step_lowers_the_content_loss(make_model, dataset):
    # A random tiny backbone predicts words almost uniformly, so the content loss barely moves over a
    # few steps; what must hold is that a small step along the gradient of the ID rows lowers it.
    model, tok = make_model()
    docs = content_documents(tok, content_corpus(dataset), 12, seed=0, epoch=0)[:8]
    batch = collate_lm(docs, tok.pad_id)
    before = model.content_lm_loss(batch)
    before.backward()
    with torch.no_grad():
        for p in model.side_parameters("content"):
            p -= 1e-2 * p.grad / p.grad.norm()
        after = model.content_lm_loss(batch)
    assert after < before


def test_resume_equals_uninterrupted_run(make_model, make_config, dataset, split, tmp_path):
    cfg = make_config(pretrain__collab_steps=4, pretrain__checkpoint_every=3)
    full, tok = make_model(cfg)
    run_stage(full, _data(tok, dataset, split), cfg, "pretrain")

    first, tok = make_model(cfg)
    part = run_stage(first, _data(tok, dataset, split), cfg, "pretrain", tmp_path, stop_after=5)
    assert not part.completed and part.steps == 5
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["step"] == 5 and meta["stage"] == "pretrain"
    (state,) = tmp_path.glob("state-*.safetensors")  # older tensors cleaned up
    tensors = load_file(state)  # plain safetensors: tables + both sides' Adam moments, no pickle
    assert {
        "table.collab_item",
        "table.content_user",
        "opt.collab.1.exp_avg",
        "opt.content.0.exp_avg_sq",
    } <= set(tensors)

    resumed, tok = make_model(cfg)  # a fresh process: new tables, new optimisers
    rest = run_stage(resumed, _data(tok, dataset, split), cfg, "pretrain", tmp_path)
    assert rest.completed and rest.steps == 8 and len(rest.log) == 8
    assert rest.seconds >= meta["seconds"] > 0  # time is cumulative over the interruption
    for name, t in full.id_state().items():
        assert torch.allclose(t, resumed.id_state()[name], atol=1e-6), name

    # a resumed run must keep the global batch (batch size x processes) the checkpoint was written with
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["global_batch"] == [cfg.pretrain.batch_size, cfg.pretrain.content_batch_size]
    other = make_config(pretrain__collab_steps=4, pretrain__checkpoint_every=3, pretrain__batch_size=2)
    model, tok = make_model(other)
    with pytest.raises(RecalignInputError, match="global batch"):
        run_stage(model, _data(tok, dataset, split), other, "pretrain", tmp_path)


def test_shards_of_a_global_batch_cover_it_once_and_weight_the_mean_by_items(dataset, split, make_model):
    """Data parallelism: contiguous slices (the last may be short or empty) and, for the LM losses, each
    slice's share of the global mean is weighted by its target tokens, not by its documents."""
    docs = list(range(5))
    assert [_shard(docs, r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [_shard(docs[:1], r, 2) for r in range(2)] == [[0], []]
    assert _shard(docs, 0, 1) is docs
    model, tok = make_model()
    batch = content_documents(tok, content_corpus(dataset), 40, seed=0, epoch=0)[:6]
    assert len({len(d.targets) for d in batch}) > 1  # slices of different token counts
    whole = model.content_lm_loss(collate_lm(batch, tok.pad_id))
    shares = []
    for r in range(2):
        part = _shard(batch, r, 2)
        local = model.content_lm_loss(collate_lm(part, tok.pad_id))
        shares.append(local * (_loss_items(part, False) / _loss_items(batch, False)))
    assert torch.allclose(sum(shares), whole, atol=1e-5)
    assert _loss_items(batch, True) == 6  # the recommendation loss averages over users


def test_full_ranking_excludes_seen_items(make_model, make_config, dataset, split):
    cfg = make_config()
    model, tok = make_model(cfg)
    rec = CLLM4RecRecommender(cfg, model=model, tokenizer=tok)
    test = split.stage("test")
    for u, h in zip(test["user"], test["history"]):
        top = rec.recommend(u, h, k=dataset.n_items - len(h))
        assert not set(top) & set(h.tolist())
        assert len(set(top)) == dataset.n_items - len(h)  # every unseen item, once
    scores = rec.score_all(test)
    assert scores.shape == (len(test), dataset.n_items)
    assert np.allclose(np.exp(scores).sum(1), 1, atol=1e-4)  # one softmax over all items
    cand = rec.score_candidates(test)
    assert np.allclose(cand, np.take_along_axis(scores, np.stack(test["candidates"]), axis=1))
    # the shared protocols accept it as a Recommender
    assert 0 <= evaluate_full(rec, test, ks=(10,))["HR@10"] <= 1
    assert 0 <= evaluate_candidates(rec, test, ks=(1,))["HR@1"] <= 1
    m = evaluate_multi_target(rec, test, ks=(5, 10))
    assert 0 <= m["Recall@5"] <= 1 and 0 <= m["NDCG@10"] <= 1


@pytest.mark.parametrize("threads, expected", [(3, 3), (0, min(2, os.cpu_count() or 1))])
def test_pipeline_stages_apply_the_threads_policy_and_restore_it(
    monkeypatch, tmp_path, make_config, threads, expected
):
    """``cfg.threads`` (0: the cores, at most 2) holds inside every stage of the Python API, as it does
    under ``recalign cllm4rec``; the caller's setting is back afterwards."""
    from recalign.methods.cllm4rec import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "_train", lambda *a, **k: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(pipeline, "_evaluate", lambda *a, **k: seen.append(torch.get_num_threads()) or [])
    cfg = make_config()
    cfg.threads = threads
    before = torch.get_num_threads()
    pipeline.pretrain(cfg, tmp_path)
    pipeline.finetune(cfg, tmp_path)
    pipeline.evaluate(cfg, tmp_path)
    assert seen == [expected] * 3
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_user_lr_scale_moves_user_rows_that_much_further(make_model, make_config, dataset, split, stage):
    """Adam's first step moves every coordinate with a gradient by ~lr (|m/sqrt(v)| = 1): the user rows
    of the batch by lr x user_lr_scale, the item rows by lr; at scale 1 both by lr."""
    moved = {}
    for scale in (1.0, 8.0):
        cfg = make_config(
            pretrain__collab_steps=1, pretrain__content_ratio=0, pretrain__lr=1e-3, pretrain__user_lr_scale=scale,
            finetune__steps=1, finetune__content_ratio=0, finetune__lr=1e-3, finetune__user_lr_scale=scale,
        )  # fmt: skip
        model, tok = make_model(cfg)
        before = model.id_state()
        run_stage(model, _data(tok, dataset, split), cfg, stage)
        after = model.id_state()
        moved[scale] = {k: float((after[k] - before[k]).abs().max()) for k in ("collab_user", "collab_item")}
    for scale, m in moved.items():
        assert m["collab_user"] == pytest.approx(1e-3 * scale, rel=1e-3)
        assert m["collab_item"] == pytest.approx(1e-3, rel=1e-3)
