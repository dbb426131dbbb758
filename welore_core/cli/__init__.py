"""The `welore` command line: one sub-command per module of this package, plus any that other
installed packages register under the `welore.commands` entry-point group (the service adds
`serve`, `worker`, `keys`, `db` that way, so this package never imports the web stack).

Every command draws progress on stderr; `--json` prints one JSON object as the last stdout
line. A WeloreError prints `error: <message>` and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import entry_points

from ..errors import WeloreError

COMMAND_MODULES = ["spectrum", "compress", "evaluate", "finetune"]
ENTRY_POINT_GROUP = "welore.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="welore", description="WeLore low-rank compression, "
                                     "evaluation and fine-tuning of Llama-family models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # a command not built yet
            raise
        module.register(sub)
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
    quiet_libraries()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command re-launching itself passes on
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
