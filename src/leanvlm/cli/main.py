"""The ``leanvlm`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings

from ..errors import LeanVLMError
from . import bench, flops, generate, train, viz
from . import eval as eval_cmd

COMMANDS = {
    "bench": bench,
    "eval": eval_cmd,
    "flops": flops,
    "generate": generate,
    "train": train,
    "viz": viz,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanvlm",
        description="Spend less compute on visual tokens: token reduction for Hugging Face VLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers logs, per image processor, that it falls back to PIL without torchvision; the
    fallback is what this project expects on CPU machines, so the notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers").addFilter(_DropTorchvisionFallbackNotice())
    for handler in hf_logging.get_logger("transformers").handlers:
        handler.addFilter(_DropTorchvisionFallbackNotice())
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command].run(args) or 0
    except LeanVLMError as err:  # a bad input: one line naming it and what to do
        if args.debug:
            traceback.print_exc()
        print(f"leanvlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leanvlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (anything else: one line, the traceback with --debug)
        if args.debug:
            traceback.print_exc()
        text = str(err).strip()
        first = text.splitlines()[0] if text else ""
        hint = "" if args.debug else " (run again with --debug for the traceback)"
        print(f"leanvlm {args.command}: error: {type(err).__name__}: {first}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
