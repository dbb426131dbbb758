"""Small pieces the sub-commands share: JSON output, peak memory, argument types, output checks,
the progress reporter. Torch-free (the parser must not load torch)."""

from __future__ import annotations

import argparse
import json
import resource
import sys

from ..dtypes import DTYPE_CHOICES
from ..options import Option, in_range, range_text


def emit(result: dict, as_json: bool, human: str) -> None:
    """Print the human report, or the result as one JSON object on the last stdout line."""
    if as_json:
        print(json.dumps(result, default=str))
    else:
        print(human)
    sys.stdout.flush()


def peak_rss_mb() -> float:
    """This process's peak resident set. Linux's VmHWM starts afresh at exec; ru_maxrss would
    carry over the peak of the parent that started us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def option_type(o: Option):
    """An argparse type for a numeric option: parsed and range-checked with the option table's own bounds."""
    def parse(text: str):
        try:
            value = o.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if o.type is int else 'a number'}, got {text!r}")
        if not in_range(o, value):
            raise argparse.ArgumentTypeError(f"expected a value in {range_text(o)}, got {text}")
        return value
    return parse


def default_text(o: Option) -> str:
    """' (default 256); range [8, 32768]': what a flag's help adds from the option table."""
    text = "" if o.default is None or o.default == "" else \
        f" (default {str(o.default).lower() if o.type is bool else o.default})"
    if o.numeric and (o.lo is not None or o.hi is not None):
        text += f"{';' if text else ''} range {range_text(o)}"
    return text


def add_option_flag(group, o: Option, **kw) -> argparse.Action:
    """The flag of one option-table entry (welore_core/options.py). Its argparse default stays None, so the
    config's own default applies (and a recipe's value is not overridden by a flag that was not given)."""
    help = (o.help + default_text(o)).replace("%", "%%")
    if o.type is bool:
        return group.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None,
                                  help=help, **kw)
    if o.choices:
        return group.add_argument(o.flag, dest=o.name, choices=o.choices, default=None, help=help, **kw)
    return group.add_argument(o.flag, dest=o.name, type=option_type(o) if o.numeric else str, default=None,
                              help=help, **kw)


def given_options(args: argparse.Namespace, table: dict) -> dict:
    """The option-table flags given on the command line (by option name)."""
    return {name: getattr(args, name) for name in table if getattr(args, name, None) is not None}


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto (default: a GPU when present), cpu or cuda[:N]")


def add_dtype_flag(p: argparse.ArgumentParser, what: str = "the written weights") -> None:
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help=f"dtype of {what}: auto (the source's; a GGUF source gives bf16), bf16, fp16 or fp32. "
                        "Computation stays in fp32 where the maths needs it")


def check_outputs(args: argparse.Namespace, *flags: str) -> None:
    """Refuse, before any work, output directories that exist (unless --overwrite) or that two
    flags share. `flags` are argparse dests such as "out", "merged_out"."""
    from ..outputs import check_outputs as check

    paths = {"--" + f.replace("_", "-"): getattr(args, f, None) for f in flags}
    check(paths, overwrite=bool(getattr(args, "overwrite", False)))


def progress_for(args: argparse.Namespace):
    """The command's progress reporter (a context manager that ends its line on exit)."""
    from ..progress import cli_progress

    return cli_progress(quiet=bool(getattr(args, "quiet", False)))
