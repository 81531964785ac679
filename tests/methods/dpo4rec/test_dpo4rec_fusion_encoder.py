"""Fusion model (shapes, identity at init, training moves it and lowers the loss) and sentence encoders."""

import numpy as np
import pytest
import torch

from recalign.baselines.sasrec import SASRecConfig, SASRecEncoder
from recalign.methods.dpo4rec.config import FusionConfig
from recalign.methods.dpo4rec.encoder import CachedEncoder, HashingEncoder
from recalign.methods.dpo4rec.fusion import AugmentedRecommender, KnowledgeAugmentedSASRec, SummaryFusion

N_ITEMS = 30
TEXT_DIM = 16


def _backbone(seed=0):
    torch.manual_seed(seed)
    cfg = SASRecConfig(max_len=8, hidden_size=16, inner_size=32, n_heads=2, n_layers=1)
    return SASRecEncoder(N_ITEMS, cfg)


@pytest.mark.parametrize("mode", ["gated", "concat"])
def test_fusion_shapes_and_identity_at_initialisation(mode):
    fusion = SummaryFusion(hidden=16, text_dim=TEXT_DIM, mode=mode)
    h = torch.randn(5, 16)
    e = torch.randn(5, TEXT_DIM)
    u = fusion(h, e)
    assert u.shape == (5, 16)
    # before training the augmented model is exactly the backbone
    assert torch.allclose(u, h, atol=1e-6)
    with pytest.raises(ValueError):
        fusion(h, torch.randn(4, TEXT_DIM))
    with pytest.raises(ValueError):
        fusion(h, torch.randn(5, TEXT_DIM + 1))


def test_augmented_model_logits_shape():
    model = KnowledgeAugmentedSASRec(_backbone(), TEXT_DIM)
    seqs = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    logits = model(seqs, torch.tensor([3, 2]), torch.randn(2, TEXT_DIM))
    assert logits.shape == (2, N_ITEMS)


def _toy_data(n_users=40, seed=0):
    """Target item is determined by the text: text cluster c -> item 10 + c (the history is noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, TEXT_DIM)).astype(np.float32)
    histories, emb, targets, groups = [], [], [], []
    for u in range(n_users):
        c = u % 4
        for _ in range(2):
            histories.append(rng.integers(0, N_ITEMS, size=rng.integers(2, 7)))
            emb.append(centers[c] + 0.05 * rng.normal(size=TEXT_DIM).astype(np.float32))
            targets.append(10 + c)
            groups.append(u)
    return histories, np.stack(emb), np.array(targets), np.array(groups)


def test_one_training_step_changes_fusion_parameters_and_lowers_the_loss():
    hist, emb, tgt, _ = _toy_data()
    rec = AugmentedRecommender(
        _backbone(),
        max_len=8,
        text_dim=TEXT_DIM,
        config=FusionConfig(text_dropout=0.0, item_text=False),
        threads=1,
    )
    before = {k: v.clone() for k, v in rec.model.state_dict().items()}
    text, targets = torch.as_tensor(emb), torch.as_tensor(tgt)
    rec.model.train()
    rec.model.backbone.eval()
    opt = torch.optim.Adam([p for p in rec.model.parameters() if p.requires_grad], lr=1e-2)
    loss0 = rec.loss(hist, text, targets)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = rec.loss(hist, text, targets)
    after = rec.model.state_dict()
    assert not torch.equal(before["fusion.text_proj.weight"], after["fusion.text_proj.weight"])
    # the frozen backbone did not move
    assert torch.equal(before["backbone.item_emb.weight"], after["backbone.item_emb.weight"])
    assert float(loss1) < float(loss0.detach())


def test_fit_learns_a_text_signal_and_scores_candidates(tmp_path):
    hist, emb, tgt, groups = _toy_data()
    cfg = FusionConfig(
        epochs=60, lr=1e-2, holdout_fraction=0.25, text_dropout=0.0, batch_size=16, item_text=False
    )
    rec = AugmentedRecommender(_backbone(), max_len=8, text_dim=TEXT_DIM, config=cfg, threads=1).fit(
        hist, emb, tgt, groups
    )
    info = rec.fit_info
    assert info["holdout_examples"] == 20  # 10 of 40 users, 2 examples each
    assert info["best_holdout_loss"] < info["history"][0]["holdout_loss"]
    cands = np.stack([[10, 11, 12, 13, 0]] * len(tgt))
    scores = rec.score_candidates(hist, emb, cands)
    assert scores.shape == (len(tgt), 5)
    # the text decides the target: it should now be the top candidate for most examples
    assert (scores.argmax(1) == tgt - 10).mean() > 0.9
    # save / load round trip gives identical scores
    rec.save(tmp_path / "fusion.safetensors")
    other = AugmentedRecommender(_backbone(seed=1), max_len=8, text_dim=TEXT_DIM, config=cfg)
    other.load(tmp_path / "fusion.safetensors")
    np.testing.assert_allclose(other.score_candidates(hist, emb, cands), scores, rtol=1e-6)


def test_unfrozen_backbone_is_trained_too():
    hist, emb, tgt, groups = _toy_data(n_users=8)
    cfg = FusionConfig(epochs=2, freeze_backbone=False, holdout_fraction=0.0, item_text=False)
    backbone = _backbone()
    rec = AugmentedRecommender(backbone, max_len=8, text_dim=TEXT_DIM, config=cfg, threads=1).fit(
        hist, emb, tgt, groups
    )
    assert not torch.equal(rec.model.backbone.item_emb.weight, backbone.item_emb.weight)
    assert rec.fit_info["best_holdout_loss"] is None  # no hold-out: all epochs are kept


def test_item_text_match_starts_at_zero_and_learns_a_positive_weight():
    """Items 10..13 have the text of cluster 0..3: the summary-to-item-text match alone predicts the target."""
    hist, emb, tgt, groups = _toy_data()
    rng = np.random.default_rng(1)
    item_text = rng.normal(size=(N_ITEMS, TEXT_DIM)).astype(np.float32)
    centers = np.stack([emb[tgt == 10 + c].mean(0) for c in range(4)])
    item_text[10:14] = centers
    item_text /= np.linalg.norm(item_text, axis=1, keepdims=True)
    cfg = FusionConfig(epochs=30, lr=1e-3, holdout_fraction=0.0, text_dropout=0.0, text_match_lr=0.1)
    with pytest.raises(ValueError, match="item text"):
        AugmentedRecommender(_backbone(), max_len=8, text_dim=TEXT_DIM, config=cfg)
    rec = AugmentedRecommender(
        _backbone(), max_len=8, text_dim=TEXT_DIM, config=cfg, item_text=item_text, threads=1
    )
    cands = np.stack([[10, 11, 12, 13, 0]] * len(tgt))
    plain = AugmentedRecommender(
        _backbone(), max_len=8, text_dim=TEXT_DIM, config=FusionConfig(item_text=False), threads=1
    )
    # at initialisation the text match contributes nothing
    np.testing.assert_allclose(
        rec.score_candidates(hist, emb, cands), plain.score_candidates(hist, emb, cands), rtol=1e-5, atol=1e-6
    )
    rec.fit(hist, emb, tgt, groups)
    assert rec.fit_info["text_match"] > 1.0
    assert (rec.score_candidates(hist, emb, cands).argmax(1) == tgt - 10).mean() > 0.9


def test_hashing_encoder_is_deterministic_normalised_and_cached():
    enc = CachedEncoder(HashingEncoder(32))
    a = enc.encode(["Loves sci-fi and action", "loves SCI-FI and action!", "Enjoys romantic comedies", ""])
    assert a.shape == (4, 32) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a[0], a[1])  # case and punctuation do not matter
    assert float(a[0] @ a[2]) < 0.99
    assert enc.misses == 4 and enc.hits == 0
    b = enc.encode(["Enjoys romantic comedies", "Loves sci-fi and action"])
    np.testing.assert_array_equal(b[0], a[2])
    assert enc.hits == 2 and enc.misses == 4 and len(enc) == 4
    assert HashingEncoder(32).encode([]).shape == (0, 32)


def test_real_minilm_gives_384d_unit_vectors_that_order_by_meaning():
    from recalign.methods.dpo4rec.encoder import MiniLMEncoder

    enc = MiniLMEncoder(batch_size=4)
    v = enc.encode(
        [
            "This user loves science fiction and action movies.",
            "A fan of sci-fi and action films.",
            "Enjoys romantic comedies from the 1990s.",
        ]
    )
    assert enc.dim == 384 and v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.1
