"""Model pieces: input embeddings, the item head, and the stop-gradient of the mutual regulariser."""

import torch
import torch.nn.functional as F

from recalign.methods.cllm4rec.documents import collab_documents, collate_lm, rec_prompt


def test_embed_routes_id_ranges_to_their_tables(make_model):
    model, tok = make_model()
    ids = torch.tensor([tok.encode("<user_3> has interacted with <item_7>", add_bos=True)])
    for side, shift in (("collab", 1.0), ("content", -1.0)):
        users, items = model.tables(side)
        with torch.no_grad():
            users.weight[3] += shift  # make the sides differ
        emb = model.embed(ids, side)
        assert torch.equal(emb[0, 1], users.weight[3])
        assert torch.equal(emb[0, -1], items.weight[7])
        assert torch.equal(emb[0, 2], model.word_embeddings.weight[ids[0, 2]])
    assert not torch.equal(model.embed(ids, "collab")[0, 1], model.embed(ids, "content")[0, 1])


def test_item_head_is_a_softmax_over_items_only(make_model, dataset):
    model, tok = make_model()
    ids = torch.tensor([rec_prompt(tok, 2, [1, 5, 9])])
    logp = model.rec_item_log_probs(ids, torch.ones_like(ids))
    assert logp.shape == (1, dataset.n_items)  # no word (or user) token can be predicted
    assert torch.allclose(logp.exp().sum(-1), torch.ones(1), atol=1e-5)
    # tied to the collaborative item table: the logits are h · z_item
    h = model.hidden_states(ids, torch.ones_like(ids), "collab")[0, -1]
    assert torch.allclose(logp[0], F.log_softmax(h @ model.collab_item.weight.T, -1), atol=1e-5)
    with torch.no_grad():
        model.collab_item.weight[4] += 5 * h / h.norm()  # moving item 4 towards h raises only its score
    logp2 = model.rec_item_log_probs(ids, torch.ones_like(ids))
    assert logp2[0].argmax() == 4


def test_collab_loss_targets_the_item_positions(make_model, dataset, split):
    model, tok = make_model()
    docs = collab_documents(tok, split.train_sequences(dataset), 5, seed=0, epoch=0)[:3]
    batch = collate_lm(docs, tok.pad_id)
    assert len(batch["targets"]) == sum(len(d.targets) for d in docs)
    # the hidden state before each item predicts that item
    for (r, p), t in zip(batch["pred_pos"].tolist(), batch["targets"].tolist()):
        assert batch["input_ids"][r, p + 1] == tok.item_id(t)
    h = model.hidden_states(batch["input_ids"], batch["attention_mask"], "collab")
    rows, pos = batch["pred_pos"].T
    manual = F.cross_entropy(h[rows, pos] @ model.collab_item.weight.T, batch["targets"])
    assert torch.allclose(model.collab_lm_loss(batch), manual)


def test_mutual_regulariser_gradient_reaches_only_the_updated_side(make_model):
    model, _ = make_model()
    with torch.no_grad():  # start the sides apart so the regulariser is non-zero
        model.content_item.weight.add_(0.5)
        model.content_user.weight.sub_(0.5)
    users, items = torch.tensor([1, 2]), torch.tensor([0, 3, 7])
    for side, other in (("collab", "content"), ("content", "collab")):
        model.zero_grad(set_to_none=True)
        reg = model.mutual_regulariser(side, users, items, lam=0.7)
        assert reg > 0
        reg.backward()
        for p in model.side_parameters(side):
            assert p.grad is not None and p.grad.abs().sum() > 0
        for p in model.side_parameters(other):
            assert p.grad is None  # stop-gradient: the fixed side gets nothing
        assert all(p.grad is None for p in model.backbone.parameters())
    # value: λ · mean over the 5 ids of the squared distance
    expected = (
        0.7
        * torch.cat(
            [
                (model.collab_user.weight[users] - model.content_user.weight[users]).pow(2).sum(-1),
                (model.collab_item.weight[items] - model.content_item.weight[items]).pow(2).sum(-1),
            ]
        ).mean()
    )
    assert torch.allclose(model.mutual_regulariser("collab", users, items, 0.7), expected)
    assert model.mutual_regulariser("collab", users, items, 0.0) == 0


def test_scoring_runs_sdpa_under_auto_and_restores_the_training_kernel(make_model, make_config, split):
    """auto: eager attention trains, sdpa scores (no backward there); the scores agree to float rounding."""
    import numpy as np

    from recalign.methods.cllm4rec.recommender import CLLM4RecRecommender

    cfg = make_config()
    model, tok = make_model(cfg)
    assert cfg.model.attn_implementation == "auto"
    assert model.backbone.config._attn_implementation == "eager"
    attn = model.backbone.base_model.layers[0].self_attn
    seen = []
    hook = attn.register_forward_pre_hook(lambda m, args: seen.append(m.config._attn_implementation))
    ex = split.stage("test")
    try:
        auto = CLLM4RecRecommender(cfg, model=model, tokenizer=tok).score_all(ex)
        n = len(seen)
        eager_cfg = make_config(model__attn_implementation="eager")
        eager = CLLM4RecRecommender(eager_cfg, model=model, tokenizer=tok).score_all(ex)
    finally:
        hook.remove()
    assert n >= 1 and seen == ["sdpa"] * n + ["eager"] * (len(seen) - n) and len(seen) > n
    assert np.allclose(auto, eager, atol=1e-4)
    assert model.backbone.config._attn_implementation == "eager"  # training continues with eager
