"""Typed configuration: one dataclass per component, YAML files plus dotted command-line overrides.

Design:
- Every config is a ``@dataclass`` whose fields carry a ``help`` string in their metadata
  (``cfg_field(default, "what it does")``). The help is shown by ``recalign <cmd> --help-config``.
- ``load_config(cls, yaml_path, overrides)`` merges, in order: dataclass defaults, the YAML file, then
  ``key.sub=value`` overrides. Unknown keys are rejected (a typo never silently does nothing), values are
  coerced to the annotated type, and every problem is a one-line :class:`RecalignInputError` naming the
  file and the key.
- Nested configs are nested dataclasses; overrides reach them with dots (``model.lora_r=16``).
- Range constraints live in the annotation, ``dim: Annotated[int, Ge(1)]`` / ``lr: Annotated[float, Gt(0)]``,
  and the loader enforces them (one-line ``must be >= 1`` naming the dotted key) before the config's own
  ``validate()``; ``validate()`` calls :func:`check_constraints` too, so a config built in Python is held
  to the same rules.
- ``save_config`` writes the resolved config next to the outputs so a run can be reproduced exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from recalign.errors import RecalignInputError

T = TypeVar("T")


def cfg_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a help string. Mutable defaults (lists, dicts) are copied per instance."""
    metadata = {"help": help}
    if isinstance(default, list | dict | set) or (
        dataclasses.is_dataclass(default) and not isinstance(default, type)
    ):
        return dataclasses.field(
            default_factory=lambda d=default: copy.deepcopy(d), metadata=metadata, **kwargs
        )
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclasses.dataclass(frozen=True)
class Ge:
    """Field constraint ``value >= bound`` (in ``Annotated[int, Ge(1)]``)."""

    bound: float
    #: say the value too (``must be >= 1, got 0``), as some configs always have
    show_value: bool = False

    def fails(self, value: Any) -> bool:
        return value < self.bound

    def problem(self, value: Any) -> str:
        return f"must be >= {self.bound:g}" + (f", got {value}" if self.show_value else "")


@dataclasses.dataclass(frozen=True)
class Gt:
    """Field constraint ``value > bound`` (in ``Annotated[float, Gt(0)]``)."""

    bound: float
    #: say the value too (``must be > 1, got 0``), as some configs always have
    show_value: bool = False

    def fails(self, value: Any) -> bool:
        return value <= self.bound

    def problem(self, value: Any) -> str:
        return f"must be > {self.bound:g}" + (f", got {value}" if self.show_value else "")


def _constraints(cls: type) -> dict[str, tuple[Ge | Gt, ...]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for name, tp in hints.items():
        if typing.get_origin(tp) is typing.Annotated:
            marks = tuple(m for m in tp.__metadata__ if isinstance(m, Ge | Gt))
            if marks:
                out[name] = marks
    return out


def check_constraints(cfg: Any, prefix: str = "", *, nested: bool = True) -> None:
    """Enforce the ``Ge`` / ``Gt`` annotations of ``cfg``'s fields (None passes), and with ``nested``
    those of its nested configs; the first violation is a one-line error naming the dotted key."""
    for name, marks in _constraints(type(cfg)).items():
        value = getattr(cfg, name)
        for mark in marks:
            if value is not None and mark.fails(value):
                raise RecalignInputError(mark.problem(value), field=prefix + name)
    if nested:
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                check_constraints(value, f"{prefix}{f.name}.")


def config_subset(
    base: type,
    name: str,
    *,
    exclude: typing.Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    doc: str = "",
    module: str | None = None,
    namespace: dict[str, Any] | None = None,
) -> type:
    """A config dataclass with every field of ``base`` (type, constraints and help) but ``exclude``.

    For a section of a bigger config that runs ``base`` with some fields set for it (the quickstart's
    ``sdpo`` section is :class:`~recalign.methods.align.AlignConfig` without the run-wide model, data,
    seed, ...): a field added to ``base`` reaches the section without being copied. ``defaults`` replaces
    the defaults of some fields (a callable is a ``default_factory``); ``namespace`` adds methods
    (``validate``).
    """
    hints = typing.get_type_hints(base, include_extras=True)
    defaults = defaults or {}
    skip = set(exclude)
    unknown = sorted((skip | set(defaults)) - {f.name for f in dataclasses.fields(base)})
    if unknown:
        raise ValueError(f"{base.__name__} has no field {unknown[0]!r}")
    specs = []
    for f in dataclasses.fields(base):
        if f.name in skip:
            continue
        if f.name in defaults:
            d = defaults[f.name]
            kw: dict[str, Any] = {"default_factory": d} if callable(d) else {"default": d}
        else:
            kw = {"default": f.default, "default_factory": f.default_factory}  # type: ignore[misc]
        specs.append((f.name, hints[f.name], dataclasses.field(metadata=f.metadata, **kw)))
    ns = {"__doc__": doc or base.__doc__, "__module__": module or base.__module__, **(namespace or {})}
    return dataclasses.make_dataclass(name, specs, namespace=ns)


def _coerce(value: Any, tp: Any, where: str, source: str | None) -> Any:
    """Convert ``value`` (from YAML or a string override) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, source)
            except RecalignInputError as e:
                errors.append(e.problem)
        raise RecalignInputError(f"cannot read {value!r} as {tp}", source=source, field=where)
    if origin is typing.Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise RecalignInputError(f"must be one of {list(args)}, got {value!r}", source=source, field=where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecalignInputError(f"expected a mapping, got {value!r}", source=source, field=where)
        return _from_dict(tp, value, source, prefix=where + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v] if value.strip() else []
        if not isinstance(value, list | tuple):
            raise RecalignInputError(f"expected a list, got {value!r}", source=source, field=where)
        inner = args[0] if args else Any
        out = [_coerce(v, inner, where, source) for v in value]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise RecalignInputError(f"expected a mapping, got {value!r}", source=source, field=where)
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, where, source): _coerce(v, vt, where, source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise RecalignInputError(f"expected true/false, got {value!r}", source=source, field=where)
    if tp is int:
        if isinstance(value, bool):
            raise RecalignInputError(f"expected an integer, got {value!r}", source=source, field=where)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise RecalignInputError(
                f"expected an integer, got {value!r}", source=source, field=where
            ) from None
    if tp is float:
        if isinstance(value, bool):
            raise RecalignInputError(f"expected a number, got {value!r}", source=source, field=where)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecalignInputError(
                f"expected a number, got {value!r}", source=source, field=where
            ) from None
    if tp is str:
        if isinstance(value, dict | list):
            raise RecalignInputError(f"expected a string, got {value!r}", source=source, field=where)
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def _from_dict(cls: type[T], data: dict, source: str | None, prefix: str = "") -> T:
    hints = _resolve_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecalignInputError(
            f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})", source=source
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {
        k: _coerce(_from_field_default(fields[k], hints[k], v), hints[k], prefix + k, source)
        for k, v in data.items()
    }
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise RecalignInputError(str(e), source=source) from None
    check_constraints(obj, prefix, nested=False)  # nested configs were checked as they were built
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _from_field_default(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A partial mapping for a nested config starts from the field's own default instance.

    A recipe may default a nested config to non-class defaults (``default_factory=lambda:
    DataPrepareConfig(split="llara")``); overriding one key (``data.dataset=ml-1m``) must keep the
    others at the recipe's defaults, not silently reset them to the nested class's defaults.
    """
    factory = f.default_factory  # type: ignore[misc]
    if isinstance(value, dict) and dataclasses.is_dataclass(tp) and factory is not dataclasses.MISSING:
        base = factory()
        if dataclasses.is_dataclass(base):
            return deep_merge(config_to_dict(base), value)
    return value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict. Values are parsed as YAML scalars."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise RecalignInputError(f"override '{item}' must look like key=value", source="command line")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise RecalignInputError(f"override '{item}' has an empty key", source="command line")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key, value)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated with ``extra``, nested mappings merged key by key (neither is modified)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise RecalignInputError("is a directory, not a YAML config file", source=path)
    if not path.is_file():
        raise RecalignInputError("config file not found", source=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise RecalignInputError(f"invalid YAML: {problem}", source=path, line=line) from None
    except UnicodeDecodeError:
        raise RecalignInputError("not UTF-8 text", source=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecalignInputError("top level must be a mapping of keys to values", source=path)
    return data


def config_from_dict(cls: type[T], data: dict, source: str | None = None) -> T:
    return _from_dict(cls, data, source)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
) -> T:
    """Defaults ← YAML file ← dotted overrides, validated into ``cls``."""
    data: dict = {}
    source = None
    if path is not None:
        data = read_yaml(path)
        source = str(path)
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    if over:
        # Validate override keys separately so that an error names the command line, not the file.
        _check_keys(cls, over, "command line")
        data = deep_merge(data, over)
    return _from_dict(cls, data, source or ("command line" if over else None))


def _check_keys(cls: type, data: dict, source: str, prefix: str = "") -> None:
    hints = _resolve_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k, v in data.items():
        if k not in names:
            raise RecalignInputError(
                f"unknown key '{prefix}{k}' (known: {', '.join(sorted(names))})", source=source
            )
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            _check_keys(tp, v, source, prefix + k + ".")


def config_to_dict(cfg: Any) -> dict:
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (write-then-rename, so a partial file never looks complete)."""
    from recalign.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_config(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per field: ``key (type, default): help``; nested configs are expanded.

    ``defaults`` (an instance of ``cls``) supplies the shown defaults of a nested config whose field
    has a ``default_factory`` (so ``data.split`` shows the recipe's ``llara``, not the class's ``loo``).
    """
    lines = []
    hints = _resolve_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested = getattr(defaults, f.name, None) if defaults is not None else None
            if nested is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                nested = f.default_factory()  # type: ignore[misc]
            lines.extend(describe_config(tp, prefix + f.name + ".", nested))
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        if typing.get_origin(tp) is typing.Literal:
            tname = "one of " + "|".join(str(a) for a in typing.get_args(tp))
        else:
            tname = str(tp) if typing.get_args(tp) else getattr(tp, "__name__", str(tp))
            tname = tname.replace("typing.", "")
        lines.append(f"{prefix}{f.name} ({tname}, default {default!r}): {f.metadata.get('help', '')}")
    return lines
