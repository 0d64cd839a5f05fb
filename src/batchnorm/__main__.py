"""Command line: ``python -m batchnorm <command>``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchnorm",
        description="Batch normalization as TensorFlow defines it, on PyTorch.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    commands.add_parser(
        "demo", help="a printed walkthrough of training/inference modes and their pitfalls")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import walkthrough

        walkthrough.run()
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
