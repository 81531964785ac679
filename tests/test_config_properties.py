"""Property-based tests: the config parser either returns a typed config or a one-line input error."""

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from recalign.config import cfg_field, load_config
from recalign.errors import RecalignInputError


@dataclass
class Cfg:
    lr: float = cfg_field(1e-3, "learning rate")
    steps: int = cfg_field(10, "steps")
    name: str = cfg_field("a", "name")
    tags: list[str] = cfg_field([], "tags")
    on: bool = cfg_field(False, "switch")


keys = st.sampled_from(["lr", "steps", "name", "tags", "on", "bogus", "lr.x", ""])
values = st.text(min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_overrides_never_crash(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config(Cfg, None, overrides)
    except RecalignInputError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert isinstance(cfg.lr, float) and isinstance(cfg.steps, int) and isinstance(cfg.on, bool)
        assert isinstance(cfg.name, str) and all(isinstance(t, str) for t in cfg.tags)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_text_gives_config_or_one_line_error(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        load_config(Cfg, p)
    except RecalignInputError as e:
        assert "\n" not in str(e) and "c.yaml" in str(e)
