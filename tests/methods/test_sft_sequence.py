"""``recalign sft`` with ``format: sequence`` on a tiny Llama: trains, records the true counts, saves the
prompt format with the adapter, and ``evaluate`` reloads it to the same scores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.config import load_config  # noqa: E402
from recalign.errors import RecalignInputError  # noqa: E402
from recalign.evaluation.records import read_records  # noqa: E402
from recalign.methods.sft import SFTConfig, run_sft  # noqa: E402
from recalign.methods.zeroshot import EvalConfig, evaluate_saved_model  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _lm_tiny.tiny_env(tmp_path_factory.mktemp("sftseq"))


def seq_cfg(data_dir, model_dir, **over) -> SFTConfig:
    o = {
        "format": "sequence",
        "window": 8,
        "min_context": 2,
        "n_train": 0,
        "max_history": 6,
        "training": {**_lm_tiny.TINY_TRAINING, "max_steps": 10, "save_steps": 5},
        "eval": {"n_test": 8, "protocols": ["candidates"]},
    }
    return load_config(SFTConfig, overrides=_lm_tiny.sft_overrides(data_dir, model_dir, **{**o, **over}))


def test_sequence_sft_trains_records_counts_and_reloads(env, tmp_path):
    _, data_dir, model_dir = env
    cfg = seq_cfg(data_dir, model_dir)
    res = run_sft(cfg, tmp_path / "run", command="recalign sft seq", progress=False)
    nll = [h["nll"] for h in res.log_history if "nll" in h]
    assert len(nll) == 10 and sum(nll[-3:]) / 3 < sum(nll[:3]) / 3 - 0.3, nll
    out = tmp_path / "run"
    meta = json.loads((out / "adapter" / "recalign_adapter.json").read_text())
    assert meta["prompt_format"] == "sequence" and meta["max_history"] == 6
    run = json.loads((out / "metrics.json").read_text())["run"]
    counts = run["train_counts"]
    assert counts["n_targets"] > counts["n_documents"] > 0  # several next-item targets per document
    assert run["examples_seen"] == 40 and run["format"] == "sequence"
    (rec,) = read_records(out / "records.json")
    assert rec.protocol == "candidates" and rec.extra["prompt_format"] == "sequence"
    assert rec.extra["train_counts"] == counts
    again = evaluate_saved_model(
        str(out), cfg.data, cfg=EvalConfig(n_test=8, protocols=["candidates"]), seed=cfg.seed,
        progress=False, dtype="float32",
    )  # fmt: skip
    assert again[0].metrics == pytest.approx(rec.metrics, abs=1e-9)


def test_sequence_format_refuses_generation_and_bad_windows(env):
    _, data_dir, model_dir = env
    with pytest.raises(RecalignInputError, match="eval.protocols"):
        seq_cfg(data_dir, model_dir, eval={"protocols": ["candidates", "generation"]}).validate()
    with pytest.raises(RecalignInputError, match="window"):
        seq_cfg(data_dir, model_dir, window=2).validate()
    with pytest.raises(RecalignInputError, match="format"):
        seq_cfg(data_dir, model_dir, format="documents").validate()


def test_align_from_a_sequence_model_trains_on_its_prompt(env, tmp_path):
    """S-DPO from a sequence-SFT run: the preference prompt is the history-only list and each answer an
    item line (exactly what the model is evaluated with), and the aligned adapter keeps the format."""
    from recalign.lm.lora import load_lm
    from recalign.lm.sequence import SequenceCodec
    from recalign.methods import load_data
    from recalign.methods.align import AlignConfig, build_examples, run_align, training_frame

    _, data_dir, model_dir = env
    sft_cfg = seq_cfg(data_dir, model_dir, training={"max_steps": 4, "batch_size": 4, "progress": False})
    sft_cfg.eval.n_test = 0
    run_sft(sft_cfg, tmp_path / "sft", progress=False)
    cfg = load_config(
        AlignConfig,
        overrides={
            "model": str(tmp_path / "sft"), "dtype": "float32", "loss": "sdpo", "negatives": 2,
            "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "llara", "candidates": 5},
            "n_train": 8, "max_history": 6,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
            "training": {"learning_rate": 1e-2, "max_steps": 3, "batch_size": 4, "save_steps": 3,
                         "logging_steps": 1, "progress": False},
            "eval": {"n_test": 6, "protocols": ["candidates"]},
        },
    )  # fmt: skip
    data = load_data(cfg.data)
    model, tok, _ = load_lm(cfg.model, dtype="float32")
    frame = training_frame(cfg, data)
    examples, pref = build_examples(
        cfg, model, tok, data, frame, tmp_path / "ref", False, prompt_format="sequence"
    )
    codec = SequenceCodec(tok, data.dataset)
    for ex, hist, chosen, rejected in zip(examples, frame["history"], pref.chosen, pref.rejected):
        assert ex["prompt"] == codec.prompt(list(hist)[-6:])
        assert ex["answers"] == [codec.lines[int(chosen)]] + [codec.lines[int(r)] for r in rejected]
    res = run_align(cfg, tmp_path / "sdpo", progress=False)
    meta = json.loads((tmp_path / "sdpo" / "adapter" / "recalign_adapter.json").read_text())
    assert meta["prompt_format"] == "sequence"
    assert res.records[0].extra["prompt_format"] == "sequence"
    assert res.metrics["run"]["prompt_format"] == "sequence"
    bad = load_config(AlignConfig, overrides={"model": str(tmp_path / "sft"), "dtype": "float32",
                                              "data": cfg.data.__dict__, "eval": {"protocols": ["generation"]}})  # fmt: skip
    with pytest.raises(RecalignInputError, match="eval.protocols"):
        run_align(bad, tmp_path / "bad", progress=False)
