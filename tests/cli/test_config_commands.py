"""The shared ``--config/--output/--resume/--help-config/KEY=VALUE`` pattern of the config-driven commands
(:mod:`recalign.cli.common`), without running any recipe."""

from __future__ import annotations

import argparse

import pytest

from recalign.cli.common import config_from_args
from recalign.cli.main import main
from recalign.errors import RecalignInputError
from recalign.methods.sft import SFTConfig

COMMANDS = [["sft"], ["align"], ["knowledge"], ["dpo4rec"], ["cllm4rec", "run"], ["quickstart"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a))
def test_help_config_lists_every_field_with_help(argv, capsys):
    assert main([*argv, "--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 10 and all(": " in line and line.split(": ", 1)[1] for line in lines)


@pytest.mark.parametrize("argv", COMMANDS[:-1], ids=lambda a: " ".join(a))  # quickstart has a default
def test_output_is_required(argv, capsys):
    assert main([*argv, "seed=1"]) == 2
    assert capsys.readouterr().err == "error: command line: --output DIR is required\n"


def test_overrides_then_resume_reach_the_typed_config(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("n_train: 7\ntraining: {max_steps: 3}\n")
    args = argparse.Namespace(
        help_config=False, output=str(tmp_path), config=str(yaml_file), overrides=["training.max_steps=5"]
    )
    cfg = config_from_args(SFTConfig, args, resume=True)
    assert (cfg.n_train, cfg.training.max_steps, cfg.training.resume) == (7, 5, True)
    assert cfg.training.batch_size == SFTConfig().training.batch_size  # the recipe's default survives
    with pytest.raises(RecalignInputError, match="unknown key 'training.stepz'"):
        config_from_args(SFTConfig, argparse.Namespace(**{**vars(args), "overrides": ["training.stepz=1"]}))
