"""Issue #16: the paper's setting by default, the truncated-backbone check, fine-tuning alternation,
early stopping with resume, records that name the depth, NaN scores ranked last."""

import json

import numpy as np
import pytest
import torch
from test_cllm4rec_cli import files  # noqa: F401  (the fixture: tiny ML-100K files + saved backbone)

from recalign.cli.main import main
from recalign.errors import RecalignInputError
from recalign.lm.loading import build_tiny_llama
from recalign.methods.cllm4rec.config import CLLM4RecConfig, non_default_settings
from recalign.methods.cllm4rec.documents import item_description
from recalign.methods.cllm4rec.protocol import holdout_split, top_k_excluding_seen
from recalign.methods.cllm4rec.recommender import (
    CLLM4RecRecommender,
    build_model,
    check_backbone_depth,
    make_validator,
)
from recalign.methods.cllm4rec.training import TrainingData, run_stage


def _data(tok, dataset, split):
    return TrainingData.build(tok, dataset, split.train_sequences(dataset))


def test_defaults_are_the_paper_setting():
    cfg = CLLM4RecConfig()
    assert cfg.model.num_layers is None  # the whole backbone
    assert cfg.pretrain.content_ratio > 0 and cfg.finetune.content_ratio > 0  # content LM in both stages
    assert cfg.finetune.max_items == 0  # the whole history in the prompt
    assert cfg.finetune.patience > 0 and cfg.finetune.validate_every > 0 and cfg.data.valid_ratio > 0
    # trained to convergence in pretraining too: early stopping on validation Recall@20 under an epoch cap
    assert (
        cfg.pretrain.patience > 0
        and cfg.pretrain.validate_every > 0
        and cfg.pretrain.epochs > cfg.pretrain.patience
    )
    assert non_default_settings(cfg) == {}
    cfg.model.num_layers, cfg.threads, cfg.method = 4, 1, "x"  # execution fields are not settings
    assert non_default_settings(cfg) == {"model.num_layers": 4}


# ---------------------------------------------------------------------- truncated backbone check
def _sharp_backbone(base_tokenizer, scale: float):
    """A 2-layer tiny Llama whose final norm is scaled: large scales give confident random word
    predictions, i.e. a content loss far above the uniform bound."""
    bb = build_tiny_llama(base_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1)
    with torch.no_grad():
        bb.model.norm.weight.mul_(scale)
    return bb


def _trained_backbone(base_tokenizer, dataset):
    """A 2-layer tiny Llama trained for a few steps on the item descriptions (knows some words)."""
    bb = build_tiny_llama(base_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=2)
    texts = [item_description(dataset, i) for i in range(dataset.n_items)]
    enc = base_tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(bb.parameters(), lr=3e-2)
    bb.train()
    for _ in range(40):
        loss = bb(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    bb.eval()
    return bb


def test_truncated_backbone_above_the_uniform_bound_is_refused(dataset, split, base_tokenizer, make_config):
    cfg = make_config(model__num_layers=1)
    bb = _sharp_backbone(base_tokenizer, 40.0)
    model, tok = build_model(cfg, dataset.n_users, dataset.n_items, bb, base_tokenizer)
    assert (model.depth, model.full_depth) == (1, 2)
    assert len(bb.model.layers) == 2  # the caller's backbone keeps its layers
    with pytest.raises(RecalignInputError) as err:
        check_backbone_depth(model, _data(tok, dataset, split), cfg)
    msg = str(err.value)
    assert "\n" not in msg and "model.num_layers=1 (of 2)" in msg and "ln(300)" in msg
    loss = float(msg.split("loss is ")[1].split(",")[0])
    assert loss > np.log(300)
    # fit() refuses it before any training
    rec = CLLM4RecRecommender(cfg, backbone=bb, base_tokenizer=base_tokenizer)
    with pytest.raises(RecalignInputError, match="not below the uniform bound"):
        rec.fit(dataset, split)
    # the same backbone at full depth is not refused (the check is for truncation), and is recorded
    full = make_config()
    model, tok = build_model(full, dataset.n_users, dataset.n_items, bb, base_tokenizer)
    info = check_backbone_depth(model, _data(tok, dataset, split), full)
    assert info["backbone_layers"] == info["backbone_full_layers"] == 2


def test_truncated_backbone_below_the_uniform_bound_is_accepted(dataset, split, base_tokenizer, make_config):
    cfg = make_config(model__num_layers=1)
    bb = _trained_backbone(base_tokenizer, dataset)
    model, tok = build_model(cfg, dataset.n_users, dataset.n_items, bb, base_tokenizer)
    info = check_backbone_depth(model, _data(tok, dataset, split), cfg)
    assert info["untrained_content_loss"] < info["uniform_bound"] == round(float(np.log(300)), 4)
    assert info["backbone_layers"] == 1


def test_cli_refuses_a_truncated_backbone_with_one_line(files, tmp_path, base_tokenizer, capsys):  # noqa: F811
    bb = _sharp_backbone(base_tokenizer, 40.0)
    model_dir = tmp_path / "sharp"
    bb.save_pretrained(model_dir, safe_serialization=True)
    base_tokenizer.save_pretrained(model_dir)
    capsys.readouterr()
    args = ["--config", str(files), "--output", str(tmp_path / "run"), f"model.backbone={model_dir}"]
    assert main(["cllm4rec", "run", *args, "model.num_layers=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.num_layers=1 (of 2)" in err and "uniform bound" in err
    assert not (tmp_path / "run" / "pretrain.safetensors").exists()


# ---------------------------------------------------------------------- fine-tuning alternation
@pytest.mark.parametrize("ratio", [0, 1, 2])
def test_finetuning_alternates_content_batches_at_the_configured_ratio(
    make_model, make_config, dataset, split, ratio, monkeypatch
):
    cfg = make_config(finetune__steps=3, finetune__content_ratio=ratio, pretrain__content_batch_size=5)
    model, tok = make_model(cfg)
    sizes = []
    original = model.content_lm_loss
    monkeypatch.setattr(model, "content_lm_loss", lambda b: (sizes.append(len(b["items"])), original(b))[1])
    before = model.id_state()
    res = run_stage(model, _data(tok, dataset, split), cfg, "finetune")
    assert [r["kind"] for r in res.log] == (["rec"] + ["content"] * ratio) * 3
    assert res.steps == 3 * (1 + ratio)
    assert sizes == [5] * (3 * ratio)  # content batches of pretrain.content_batch_size item descriptions
    after = model.id_state()
    assert torch.equal(before["content_item"], after["content_item"]) == (ratio == 0)


# ---------------------------------------------------------------------- early stopping + resume
class ScriptedValidator:
    """Validation values by call number (continuing from ``offset`` after a resume); snapshots the
    tables seen at each call."""

    def __init__(self, values, offset=0):
        self.values, self.calls, self.tables = values, offset, {}

    def __call__(self, model):
        self.tables[self.calls] = model.id_state()
        v = self.values[self.calls]
        self.calls += 1
        return v


VALUES = [0.1, 0.3, 0.2, 0.25, 0.1, 0.5, 0.6]  # best at the 2nd validation; patience 2 stops at the 4th


def test_early_stopping_stops_keeps_the_best_tables_and_resumes(
    make_model, make_config, dataset, split, tmp_path
):
    cfg = make_config(finetune__steps=0, finetune__epochs=7, finetune__patience=2, finetune__content_ratio=1)
    model, tok = make_model(cfg)
    data = _data(tok, dataset, split)
    v = ScriptedValidator(VALUES)
    res = run_stage(model, data, cfg, "finetune", tmp_path / "full", validate=v)
    bpe = res.batches_per_epoch
    assert res.completed and res.stopped_early and v.calls == 4
    assert res.steps == 4 * bpe * 2  # 4 epochs of (1 rec + 1 content) steps, not 7
    assert [r["epoch"] for r in res.curve] == [1, 2, 3, 4]
    assert [r["valid_recall@20"] for r in res.curve] == VALUES[:4]
    assert set(res.curve[0]["loss"]) == {"rec", "content"}
    assert res.best["epoch"] == 2 and res.best["value"] == 0.3
    for name, t in v.tables[1].items():  # the stage's result is the best epoch's tables
        assert torch.equal(model.id_state()[name], t), name
    # a finished stage resumed does nothing more
    again, tok = make_model(cfg)
    res2 = run_stage(again, _data(tok, dataset, split), cfg, "finetune", tmp_path / "full", validate=v)
    assert res2.steps == res.steps and res2.stopped_early and v.calls == 4
    assert all(torch.equal(again.id_state()[k], t) for k, t in v.tables[1].items())

    # interrupted in epoch 3, resumed in a fresh process: same stop, same curve, same best tables
    first, tok = make_model(cfg)
    v1 = ScriptedValidator(VALUES)
    part = run_stage(first, _data(tok, dataset, split), cfg, "finetune", tmp_path / "cut", stop_after=5 * bpe,
                     validate=v1)  # fmt: skip
    assert not part.completed and v1.calls == 2
    resumed, tok = make_model(cfg)
    v2 = ScriptedValidator(VALUES, offset=len(part.curve))
    rest = run_stage(resumed, _data(tok, dataset, split), cfg, "finetune", tmp_path / "cut", validate=v2)
    assert rest.stopped_early and rest.steps == res.steps and rest.curve == res.curve
    for name, t in model.id_state().items():
        assert torch.allclose(resumed.id_state()[name], t, atol=1e-6), name


def test_real_validation_on_the_holdout_valid_stage(make_model, make_config, dataset):
    split = holdout_split(dataset, 0.2, seed=0, n_candidates=5, valid_ratio=0.1)
    cfg = make_config(pretrain__collab_steps=4, finetune__steps=0, finetune__epochs=2, finetune__patience=1)
    model, tok = make_model(cfg)
    validate = make_validator(cfg, tok, split)
    assert validate is not None and 0 <= validate(model) <= 1
    rec = CLLM4RecRecommender(cfg, model=model, tokenizer=tok).fit(dataset, split)
    fine = rec.results[1]
    assert 1 <= len(fine.curve) <= 2 and all(0 <= r["valid_recall@20"] <= 1 for r in fine.curve)
    assert make_validator(cfg, tok, holdout_split(dataset, 0.2, seed=0, n_candidates=5)) is None


# ---------------------------------------------------------------------- records
def test_records_name_the_backbone_depth_settings_and_curve(files, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["--config", str(files), "--output", str(out)]
    assert main(["cllm4rec", "run", *args, "finetune.steps=0", "finetune.epochs=2"]) == 0
    (rec,) = json.loads((out / "records.json").read_text())["records"]
    extra = rec["extra"]
    assert extra["backbone_layers"] == extra["backbone_full_layers"] == 2
    assert extra["dtype"] == "float32" and extra["uniform_bound"] == round(float(np.log(300)), 4)
    diff = extra["settings_differing_from_default"]
    assert (
        diff["pretrain.collab_steps"] == 2 and diff["finetune.epochs"] == 2 and "model.num_layers" not in diff
    )
    assert diff["model.backbone"].endswith("tiny")
    curve = extra["training"]["finetune"]["curve"]
    assert [r["epoch"] for r in curve] == [1, 2] and "valid_recall@20" in curve[0]
    saved = json.loads((out / "curve.json").read_text())
    assert saved["finetune"]["curve"] == curve and "pretrain" in saved
    assert json.loads((out / "backbone.json").read_text())["backbone_layers"] == 2


# ---------------------------------------------------------------------- NaN scores
def test_nan_scores_rank_last_and_never_first():
    nan, inf = np.nan, np.inf
    scores = np.array(
        [
            [nan, 0.5, -inf, 2.0, nan, 1.0],
            [nan, nan, nan, nan, nan, 0.0],
            [1.0, nan, 3.0, 3.0, -1.0, nan],
        ]
    )
    hist = [np.array([3]), np.array([], dtype=np.int64), np.array([0])]
    top = top_k_excluding_seen(scores, hist, 6)
    assert top[0].tolist() == [5, 1, 2, 0, 4, 3]  # numbers (even -inf), then NaN, then the history
    assert top[1].tolist() == [5, 0, 1, 2, 3, 4]
    assert top[2].tolist() == [2, 3, 4, 1, 5, 0]  # ties keep the lower index first
    assert top_k_excluding_seen(scores, hist, 2).tolist() == [[5, 1], [5, 0], [2, 3]]
    for row, h in zip(top_k_excluding_seen(scores, hist, 1), hist):
        assert row[0] not in h.tolist()


def test_without_the_regulariser_the_content_lm_cannot_reach_the_scoring_tables(
    make_model, make_config, dataset, split
):
    """The ablations' logic: items are scored by the collaborative tables only, and λ = 0 cuts the one
    path from the content side to them, so 'no-mutual' trains exactly the collaborative tables of
    'no-content' (same seed; benchmarks/cllm4rec.py's variants); the full model differs through the
    regulariser."""
    tables = {}
    for name, over in {
        "no-content": {
            "pretrain__content_ratio": 0,
            "finetune__content_ratio": 0,
            "pretrain__mutual_lambda": 0.0,
            "finetune__mutual_lambda": 0.0,
        },  # fmt: skip
        "no-mutual": {"pretrain__mutual_lambda": 0.0, "finetune__mutual_lambda": 0.0},
        "full": {},
    }.items():
        cfg = make_config(**over)
        model, tok = make_model(cfg)
        data = _data(tok, dataset, split)
        run_stage(model, data, cfg, "pretrain")
        run_stage(model, data, cfg, "finetune")
        tables[name] = model.id_state()
    for t in ("collab_user", "collab_item"):
        assert torch.allclose(tables["no-content"][t], tables["no-mutual"][t], atol=1e-6)
        assert not torch.allclose(tables["no-content"][t], tables["full"][t], atol=1e-4)


def test_cli_seed_option_and_early_stopping_summary(files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    args = [
        "--config",
        str(files),
        "--output",
        str(out),
        "--seed",
        "3",
        "finetune.steps=0",
        "finetune.epochs=2",
    ]
    assert main(["cllm4rec", "run", *args]) == 0
    printed = capsys.readouterr().out
    assert "best valid Recall@20" in printed
    (rec,) = json.loads((out / "records.json").read_text())["records"]
    assert rec["seed"] == 3 and rec["extra"]["settings_differing_from_default"]["seed"] == 3


def test_each_training_epoch_of_the_loop_covers_every_interaction(make_model, make_config, dataset, split):
    """Through the loop's own batching (length buckets, global batches): one epoch of the collaborative
    stream makes every training interaction a target exactly once, and the stage is that many steps."""
    from recalign.methods.cllm4rec.documents import collab_documents
    from recalign.methods.cllm4rec.training import _bucketed, _Stream

    cfg = make_config(pretrain__max_items=4, pretrain__collab_steps=0, pretrain__epochs=2)
    model, tok = make_model(cfg)
    data = _data(tok, dataset, split)
    stream = _Stream(
        _bucketed(lambda e: collab_documents(tok, data.sequences, 4, cfg.seed, e), 4, cfg.seed, 1), 4
    )
    everything = {(u, int(i)) for u, s in enumerate(data.sequences) for i in s}
    for epoch in (0, 1):
        batches = [
            stream.batch(epoch * stream.batches_per_epoch + b) for b in range(stream.batches_per_epoch)
        ]
        pairs = [(d.user, i) for batch in batches for d in batch for i in d.targets]
        assert len(pairs) == len(set(pairs)) and set(pairs) == everything
    res = run_stage(model, data, cfg, "pretrain")
    assert res.batches_per_epoch == stream.batches_per_epoch
    assert sum(r["kind"] == "collab" for r in res.log) == 2 * stream.batches_per_epoch
