"""The quickstart's ``sdpo`` stage and config, without a model: defaults, validation and the wiring into
``run_align``. The stage end to end on a tiny Llama (records, adapter, step-0 loss, resume) is tested
through the CLI in tests/cli/test_lm_cli.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from recalign.config import config_to_dict, load_config
from recalign.errors import RecalignInputError
from recalign.methods import quickstart as qs
from recalign.methods.quickstart import QuickstartConfig, QuickstartContext, QuickstartSDPOConfig

REPO = Path(__file__).resolve().parents[2]


def test_defaults_run_sdpo_after_sft_and_every_field_has_help():
    cfg = QuickstartConfig()
    assert cfg.stages == ["baselines", "zeroshot", "sft", "sdpo"]
    s = cfg.sdpo
    assert (s.negatives, s.beta, s.strategy, s.reference) == (3, 1.0, "random", "precomputed")
    assert (s.training.max_steps, s.training.batch_size, s.training.learning_rate) == (12, 4, 5e-4)
    for f in dataclasses.fields(QuickstartSDPOConfig):
        assert f.metadata.get("help"), f.name
    cfg.validate()


def test_shipped_config_matches_the_defaults():
    """`make demo` runs the code defaults; configs/quickstart.yaml documents them and must not drift."""
    cfg = load_config(QuickstartConfig, REPO / "configs" / "quickstart.yaml")
    assert cfg.stages == QuickstartConfig().stages
    assert config_to_dict(cfg.sdpo) == config_to_dict(QuickstartSDPOConfig())
    assert config_to_dict(cfg) == config_to_dict(QuickstartConfig())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages=[baselines,sdpo]"], "list sft before sdpo"),
        (["stages=[sdpo,sft]"], "list sft before sdpo"),
        (["data.candidates=3"], "3 negatives need at least 4 candidates"),
        (["sdpo.beta=0"], "must be > 0"),
        (["sdpo.negatives=0"], "must be >= 1"),
        (["sdpo.training.batch_size=0"], "must be >= 1"),
        (["sdpo.lora.enabled=false"], "S-DPO trains an adapter"),
    ],
)
def test_invalid_sdpo_settings_are_one_line_errors(overrides, message):
    with pytest.raises(RecalignInputError, match=message):
        load_config(QuickstartConfig, overrides=overrides)


def test_without_sdpo_the_candidate_count_is_not_constrained():
    load_config(QuickstartConfig, overrides=["stages=[baselines,sft]", "data.candidates=3"])


def _ctx(tmp_path, resume: bool) -> QuickstartContext:
    cfg = load_config(
        QuickstartConfig,
        overrides=["seed=7", "max_history=5", "sdpo.beta=0.5", "dtype=float32", "format=candidates"],
    )
    data = object()  # the stage hands the prepared data through untouched
    test = pd.DataFrame({"user": [1, 2], "position": [3, 4]})
    return QuickstartContext(cfg=cfg, output_dir=tmp_path, data=data, test_examples=test, command="cmd",
                             resume=resume, progress=False)  # fmt: skip


def test_stage_hands_the_sft_run_and_shared_rows_to_run_align(tmp_path, monkeypatch):
    import recalign.methods.align as align

    seen = {}

    def fake_run_align(cfg, output_dir, *, data, test_examples, command, progress):
        seen.update(cfg=cfg, out=output_dir, data=data, test=test_examples, command=command)
        return align.AlignResult(Path(output_dir), Path(output_dir) / "adapter", ["record"], {}, 16, 1.0, 0.1)

    monkeypatch.setattr(align, "run_align", fake_run_align)
    ctx = _ctx(tmp_path, resume=True)
    ctx.artifacts["sft"] = str(tmp_path / "sft")
    assert qs.stage_sdpo(ctx) == ["record"]
    cfg = seen["cfg"]
    assert cfg.model == str(tmp_path / "sft") and cfg.loss == "sdpo" and cfg.method_name() == "sdpo"
    assert (cfg.negatives, cfg.beta, cfg.seed, cfg.max_history, cfg.dtype) == (3, 0.5, 7, 5, "float32")
    assert cfg.training.resume is True and cfg.training.progress is False
    assert ctx.cfg.sdpo.training.resume is False  # the stage's config is copied, not changed
    assert cfg.eval is ctx.cfg.eval and cfg.data is ctx.cfg.data
    assert seen["test"] is ctx.test_examples and seen["data"] is ctx.data and seen["command"] == "cmd"
    assert seen["out"] == tmp_path / "sdpo" and ctx.artifacts["sdpo"] == str(tmp_path / "sdpo")


def test_stage_without_an_sft_run_is_an_input_error(tmp_path):
    with pytest.raises(RecalignInputError, match="run the sft stage before it"):
        qs.stage_sdpo(_ctx(tmp_path, resume=False))


def test_stage_sections_are_the_recipe_configs_without_the_run_wide_fields():
    """No stage config field is silently dropped: every SFTConfig / AlignConfig field is run-wide, a
    quickstart key, or a named default; a field added to AlignConfig appears under sdpo by itself."""
    from recalign.methods.align import AlignConfig
    from recalign.methods.sft import SFTConfig

    top = {f.name for f in dataclasses.fields(QuickstartConfig)}
    assert set(qs.RUN_WIDE) | set(qs.SFT_FROM_TOP) <= top
    sft = {f.name for f in dataclasses.fields(SFTConfig)}
    assert sft == set(qs.RUN_WIDE) | set(qs.SFT_FROM_TOP) | set(qs.SFT_DEFAULTS)
    align = {f.name for f in dataclasses.fields(AlignConfig)}
    section = {f.name for f in dataclasses.fields(QuickstartSDPOConfig)}
    assert section == align - set(qs.RUN_WIDE) - set(qs.SDPO_FIXED) - set(qs.SDPO_UNUSED)
    with pytest.raises(RecalignInputError, match="unknown key 'sdpo.seed'"):
        load_config(QuickstartConfig, overrides=["sdpo.seed=3"])  # run-wide: set at the top level


def test_sft_stage_hands_the_top_level_settings_to_run_sft(tmp_path, monkeypatch):
    import recalign.methods.sft as sft

    seen = {}

    def fake_run_sft(cfg, output_dir, *, data, test_examples, command, progress):
        seen.update(cfg=cfg, out=output_dir)
        return sft.SFTResult(Path(output_dir), Path(output_dir) / "adapter", ["record"], {}, 16, 1.0, 0.1)

    monkeypatch.setattr(sft, "run_sft", fake_run_sft)
    ctx = _ctx(tmp_path, resume=True)
    assert qs.stage_sft(ctx) == ["record"]
    cfg = seen["cfg"]
    assert (cfg.model, cfg.method, cfg.seed, cfg.max_history, cfg.dtype) == (
        "smollm2",
        "sft",
        7,
        5,
        "float32",
    )
    assert cfg.n_train == ctx.cfg.n_train and cfg.lora is ctx.cfg.lora
    assert cfg.training.resume is True and ctx.cfg.training.resume is False
    assert cfg.eval is ctx.cfg.eval and cfg.data is ctx.cfg.data and seen["out"] == tmp_path / "sft"


def test_an_align_field_the_old_section_lacked_reaches_run_align(tmp_path, monkeypatch):
    import recalign.methods.align as align

    seen = {}

    def fake_run_align(cfg, output_dir, *, data, test_examples, command, progress):
        seen["cfg"] = cfg
        return align.AlignResult(Path(output_dir), Path(output_dir) / "adapter", ["record"], {}, 16, 1.0, 0.1)

    monkeypatch.setattr(align, "run_align", fake_run_align)
    ctx = _ctx(tmp_path, resume=False)
    ctx.cfg = load_config(QuickstartConfig, overrides=["sdpo.sample_seed=11", "sdpo.scoring_impl=kv"])
    ctx.artifacts["sft"] = str(tmp_path / "sft")
    qs.stage_sdpo(ctx)
    assert (seen["cfg"].sample_seed, seen["cfg"].scoring_impl, seen["cfg"].prompt) == (11, "kv", "candidates")


def test_sequence_format_reaches_both_stages_without_the_generation_protocol(tmp_path, monkeypatch):
    """``format=sequence``: the sft stage trains sequence SFT with the run's window settings; both training
    stages evaluate only what a history-only model supports (no generation), the run-wide eval untouched."""
    import recalign.methods.align as align
    import recalign.methods.sft as sft

    seen = {}

    def fake_run_sft(cfg, output_dir, **_):
        seen["sft"] = cfg
        return sft.SFTResult(Path(output_dir), Path(output_dir) / "adapter", ["s"], {}, 16, 1.0, 0.1)

    def fake_run_align(cfg, output_dir, **_):
        seen["sdpo"] = cfg
        return align.AlignResult(Path(output_dir), Path(output_dir) / "adapter", ["a"], {}, 16, 1.0, 0.1)

    monkeypatch.setattr(sft, "run_sft", fake_run_sft)
    monkeypatch.setattr(align, "run_align", fake_run_align)
    ctx = _ctx(tmp_path, resume=False)
    ctx.cfg = load_config(QuickstartConfig, overrides=["format=sequence", "window=12", "min_context=3"])
    assert ctx.cfg.eval.protocols == ["candidates", "generation"]
    qs.stage_sft(ctx)
    qs.stage_sdpo(ctx)
    s = seen["sft"]
    assert (s.format, s.window, s.min_context) == ("sequence", 12, 3)
    assert s.eval.protocols == ["candidates"] and seen["sdpo"].eval.protocols == ["candidates"]
    assert seen["sdpo"].model == str(tmp_path / "sft")
    assert ctx.cfg.eval.protocols == ["candidates", "generation"]  # copied, not changed
    # the candidate format keeps the run's own eval settings
    ctx.cfg = load_config(QuickstartConfig, overrides=["format=candidates"])
    qs.stage_sft(ctx)
    assert seen["sft"].format == "candidates" and seen["sft"].eval is ctx.cfg.eval


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["format=text"], "must be candidates or sequence"),
        (["format=sequence", "window=4"], "must be > min_context"),
        (["format=sequence", "min_context=0"], "field 'min_context': must be >= 1"),
    ],
)
def test_bad_sequence_settings_are_one_line_errors(overrides, message):
    with pytest.raises(RecalignInputError, match=message):
        load_config(QuickstartConfig, overrides=overrides)
