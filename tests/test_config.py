"""The config parser: defaults <- YAML <- dotted overrides, typed, unknown keys rejected."""

from dataclasses import dataclass
from typing import Literal

import pytest

from recalign.config import (
    cfg_field,
    config_to_dict,
    describe_config,
    load_config,
    parse_overrides,
    save_config,
)
from recalign.errors import RecalignInputError


@dataclass
class Inner:
    r: int = cfg_field(8, "rank")
    targets: list[str] = cfg_field(["q_proj", "v_proj"], "modules")


@dataclass
class Outer:
    lr: float = cfg_field(1e-4, "learning rate")
    name: str = cfg_field("x", "a name")
    loss: Literal["dpo", "sdpo"] = cfg_field("sdpo", "loss")
    limit: int | None = cfg_field(None, "optional cap")
    flag: bool = cfg_field(False, "a switch")
    inner: Inner = cfg_field(Inner(), "nested")


def test_defaults_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.01\ninner:\n  r: 4\n")
    cfg = load_config(Outer, p, ["inner.targets=a,b", "flag=true", "limit=3", "loss=dpo"])
    assert cfg.lr == 0.01 and cfg.inner.r == 4 and cfg.inner.targets == ["a", "b"]
    assert cfg.flag is True and cfg.limit == 3 and cfg.loss == "dpo" and cfg.name == "x"


def test_mutable_defaults_are_not_shared():
    a, b = Outer(), Outer()
    a.inner.targets.append("z")
    assert b.inner.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["lrr=1"], "unknown key 'lrr'"),
        (["inner.rank=2"], "unknown key 'inner.rank'"),
        (["lr=fast"], "expected a number"),
        (["loss=ipo"], "must be one of"),
        (["flag=maybe"], "expected true/false"),
        (["noequals"], "must look like key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, needle):
    with pytest.raises(RecalignInputError) as e:
        load_config(Outer, None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("lr: 1\ninner: [unclosed\n")
    with pytest.raises(RecalignInputError) as e:
        load_config(Outer, p)
    assert "bad.yaml:" in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  alpha: 3\n")
    with pytest.raises(RecalignInputError, match=r"c\.yaml.*unknown key 'inner\.alpha'"):
        load_config(Outer, p)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Outer, None, ["inner.r=2", "name=run"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Outer, tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_describe_lists_every_field_with_help():
    lines = describe_config(Outer)
    assert any(line.startswith("inner.r (int, default 8): rank") for line in lines)
    assert len(lines) == 7
    assert any("loss (one of dpo|sdpo" in line for line in lines)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
