"""``recalign dpo4rec``: flags map onto the typed config; bad input is a one-line error with exit code 2."""

import argparse
from pathlib import Path

import pytest

from recalign.cli.cmd_dpo4rec import build_config
from recalign.cli.main import main

CONFIG = str(Path(__file__).resolve().parents[3] / "configs" / "dpo4rec_ml100k.yaml")


def _ns(**kw):
    base = dict(config=CONFIG, samples=None, iterations=None, users=None, overrides=[])
    base.update(kw)
    return argparse.Namespace(**base)


def test_shortcut_flags_and_dotted_overrides_reach_the_config():
    cfg = build_config(
        _ns(samples=6, iterations=2, users=50, overrides=["dpo.beta=0.3", "fusion.mode=concat"])
    )
    assert (cfg.summary.samples, cfg.iterations, cfg.users) == (6, 2, 50)
    assert cfg.dpo.beta == 0.3 and cfg.fusion.mode == "concat"
    # untouched fields keep the YAML's values
    assert cfg.summary.max_new_tokens == 40 and cfg.dpo.training.batch_size == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples", "1"], "summary.samples"),
        (["fusion.mode=sum"], "fusion.mode"),
        (["nonsense.key=1"], "unknown key 'nonsense'"),
        (["reward_k=50"], "reward_k"),
    ],
)
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, argv, message):
    code = main(["dpo4rec", "--config", CONFIG, "--output", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_output_is_required_and_help_config_lists_fields(capsys):
    assert main(["dpo4rec"]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["dpo4rec", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "summary.temperature (float, default 1.0)" in out and "dpo.training.learning_rate" in out


def test_library_config_loader_matches_the_command_line():
    """``load_dpo4rec_config`` is ``build_config`` without argparse (what benchmarks/dpo4rec.py calls)."""
    from recalign.methods.dpo4rec.config import load_dpo4rec_config

    over = ["dpo.beta=0.3", "summary.samples=5"]
    lib = load_dpo4rec_config(CONFIG, over, samples=6, iterations=2, users=50)
    assert lib == build_config(_ns(samples=6, iterations=2, users=50, overrides=over))
    assert (lib.summary.samples, lib.iterations, lib.users, lib.dpo.beta) == (5, 2, 50, 0.3)
