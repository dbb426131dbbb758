"""Option tables: one per job type (compress, finetune, evaluate), read from a config dataclass's field metadata.

Torch-free (the service's request path and the CLI parser import it). A config dataclass declares each
option once, `field(default=..., metadata=opt(help, lo=, hi=, choices=...))`; `option_table(cls)` turns
those fields into flat `Option`s (one name each: the REST param, the CLI flag `--name-with-dashes`), and
`check_options(cfg, table)` checks a built config against the same ranges. The `welore` flags
(cli/common.add_option_flags), the REST params (api/jobs/params.py), the worker's call and the console form
(built from the REST schema) are all derived from these tables, so a default or a range exists once.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Optional

from .errors import InvalidArgument


def opt(help: str, *, flag: Optional[str] = None, lo=None, hi=None, lo_open=False, hi_open=False, choices=None,
        **kw) -> dict:
    """Field metadata: the option's help, its range (`lo`/`hi`, open or closed) or `choices`; `flag` is
    the flat name when it differs from the field's (the CLI flag is `--<flag with dashes>`)."""
    return {"flag": flag, "help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "choices": tuple(choices) if choices is not None else None, **kw}


@dataclass(frozen=True)
class Option:
    name: str  # flat name: REST param; CLI flag --name-with-dashes
    path: tuple[str, ...]  # where it lives in the config (("calibration", "samples"))
    type: type
    default: Any
    help: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Optional[tuple] = None
    tristate: bool = False  # a bool whose None means "auto"
    target: bool = False  # one of the mutually exclusive targets (compress: err / params_kept)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def numeric(self) -> bool:
        return self.type in (int, float)


_TYPES = {"float": float, "Optional[float]": float, "int": int, "Optional[int]": int, "str": str,
          "Optional[str]": str, "bool": bool, "Optional[bool]": bool}


def option_table(cls, sections: Optional[dict[str, type]] = None) -> dict[str, Option]:
    """The flat options of config dataclass `cls`; `sections` maps a field name to the nested config
    dataclass it holds (its fields become options too, with a two-part path)."""
    sections = sections or {}
    out: dict[str, Option] = {}

    def add(c, prefix: tuple[str, ...]) -> None:
        for f in fields(c):
            if f.name in sections:
                add(sections[f.name], (f.name,))
                continue
            if not f.metadata:
                continue
            m = dict(f.metadata)
            name = m.pop("flag") or f.name
            if name in out:
                raise TypeError(f"option {name} is declared twice in {cls.__name__}")
            default = f.default if f.default is not MISSING else None
            out[name] = Option(name=name, path=prefix + (f.name,),
                               type=_TYPES[str(f.type).replace("typing.", "")], default=default, **m)

    add(cls, ())
    return out


def range_text(o: Option) -> str:
    """[lo, hi], (lo, hi), [lo, ∞) ...: the option's range as its messages write it."""
    lo = "-∞" if o.lo is None else f"{o.lo:g}"
    hi = "∞" if o.hi is None else f"{o.hi:g}"
    return f"{'(' if o.lo_open or o.lo is None else '['}{lo}, {hi}{')' if o.hi_open or o.hi is None else ']'}"


def in_range(o: Option, value) -> bool:
    low_bad = o.lo is not None and (value <= o.lo if o.lo_open else value < o.lo)
    high_bad = o.hi is not None and (value >= o.hi if o.hi_open else value > o.hi)
    return not (low_bad or high_bad or value != value)


def check_value(o: Option, value: Any) -> None:
    """Raise InvalidArgument naming the option and its allowed values unless `value` fits (None: the default)."""
    if value is None:
        return
    if o.type is bool:
        if not isinstance(value, bool):
            raise InvalidArgument(f"{o.name} must be true or false; received {value!r}")
        return
    if o.type is str:
        if not isinstance(value, str) or (not value and o.default != ""):
            raise InvalidArgument(f"{o.name} must be a non-empty string; received {value!r}")
        if o.choices and value not in o.choices:
            raise InvalidArgument(f"{o.name} must be one of {', '.join(o.choices)}; received {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (o.type is int and not isinstance(value, int)):
        raise InvalidArgument(f"{o.name} must be {'an integer' if o.type is int else 'a number'}; received {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidArgument(f"{o.name} must be a finite number; received {value!r}")
    if not in_range(o, value):
        raise InvalidArgument(f"{o.name} must be in {range_text(o)}; received {value}")


def check_options(cfg, table: dict[str, Option]) -> None:
    """Every option of a built config against its range (a nested section that is None is skipped)."""
    for o in table.values():
        obj: Any = cfg
        for part in o.path[:-1]:
            obj = getattr(obj, part)
            if obj is None:
                break
        if obj is not None:
            check_value(o, getattr(obj, o.path[-1]))


def check_known(options: dict, table: dict[str, Option], what: str) -> None:
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise InvalidArgument(f"unknown {what} option(s) {', '.join(unknown)}; expected some of {', '.join(table)}")


def flat_kwargs(options: dict, table: dict[str, Option], what: str) -> dict:
    """Flat options (CLI flags / REST params by option name; None = the default) as keyword arguments of a
    config without sections."""
    check_known(options, table, what)
    return {table[k].path[-1]: v for k, v in options.items() if v is not None}
