"""The ``sasa`` command line: the only file that parses arguments.

Each sub-command is one ``_add_<name>(subparsers)`` function that declares its flags and sets ``func`` to a
handler; handlers import their engine lazily so ``sasa --help`` stays fast.

Status: ``info`` here; other commands are added by their engines.
"""

from __future__ import annotations

import argparse
import sys


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters and GFLOPs of models, optionally beside the paper's table")
    p.add_argument("names", nargs="*", help="model names (default: all paper models)")
    p.add_argument("--paper", action="store_true", help="print SPEC section 3's table beside our counts")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--list", action="store_true", help="list registered model names and exit")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from .info import model_table

    from .models import list_models

    if args.list:
        print("\n".join(list_models()))
        return 0
    print(model_table(args.names or None, paper=args.paper, num_classes=args.num_classes, image_size=args.image_size))
    return 0


COMMANDS = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sasa", description="Stand-Alone Self-Attention in Vision Models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"sasa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
