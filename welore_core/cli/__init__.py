"""The `welore` command line: one sub-command per module of this package, plus any that other
installed packages register under the `welore.commands` entry-point group (the service adds
`serve`, `worker`, `keys`, `db` that way, so this package never imports the web stack).

Every command draws progress on stderr (bars on a terminal, a line per stage or per 10%
otherwise, nothing with `--quiet`); `--json` prints one JSON object as the last stdout line. A
WeloreError prints `error: <message>` and exits 2. Parsing imports no torch: `--help`,
`--version` and argument errors answer at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import entry_points

from ..version import __version__
from ..errors import WeloreError

COMMAND_MODULES = ["spectrum", "compress", "evaluate", "finetune", "export"]
ENTRY_POINT_GROUP = "welore.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="welore", description="WeLore low-rank compression, "
                                     "evaluation and fine-tuning of Llama-family models")
    parser.add_argument("--version", action="version", version=f"welore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # a command not built yet
            raise
        before = set(sub.choices)
        module.register(sub)
        for cmd in set(sub.choices) - before:
            sub.choices[cmd].add_argument("-q", "--quiet", action="store_true",
                                          help="no progress on stderr (errors and the report still print)")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()(sub)
    return parser


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command re-launching itself passes on
    quiet_libraries()
    from ..heap import fix_malloc_thresholds

    fix_malloc_thresholds()  # peak memory bounded by one layer, not by how many were processed
    try:
        return int(args.func(args) or 0)
    except WeloreError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing partial was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
