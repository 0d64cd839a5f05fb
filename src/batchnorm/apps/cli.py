"""Command line: ``python -m batchnorm <command>`` (or the installed ``batchnorm`` script)."""

from __future__ import annotations

import argparse
import os
import sys


def _program() -> str:
    """How this command was invoked: the installed ``batchnorm`` script, or ``python -m``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "batchnorm" if name == "batchnorm" else "python -m batchnorm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_program(),
        description="Batch normalization as TensorFlow defines it, on PyTorch.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "demo", help="train small CNNs on handwritten digits: BatchNorm, its pitfalls and fixes")
    from . import demo as training_demo

    training_demo.add_arguments(demo)
    commands.add_parser(
        "walkthrough", help="a printed walkthrough of training/inference modes, value by value")
    from . import bench

    bench.add_arguments(commands.add_parser(
        "bench", help="speed against the memory-bandwidth limit, PyTorch and tf_keras; "
        "peak memory",
        description="Time batch normalization against the memory-bandwidth limit. Prints "
        f"markdown in {bench.WIDTH} columns; writes bench.json and bench.png to --out. "
        + bench.VERDICT_RULE))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "demo":
        training_demo.main(quick=args.quick, seed=args.seed, out=args.out, seeds=args.seeds)
        return 0
    if args.command == "walkthrough":
        from . import walkthrough

        walkthrough.run()
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
