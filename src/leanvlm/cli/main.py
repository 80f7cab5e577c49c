"""The ``leanvlm`` command."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import LeanVLMError
from . import generate

COMMANDS = {"generate": generate}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanvlm",
        description="Spend less compute on visual tokens: token reduction for Hugging Face VLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command].run(args) or 0
    except LeanVLMError as err:
        print(f"leanvlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
