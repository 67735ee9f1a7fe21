"""`python -m vitune.serving --model DIR [...]`: the same as `vitune serve --model DIR [...]`."""

from __future__ import annotations

import argparse
import os
import sys

from vitune.serving.cli_args import add_serve_parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m vitune.serving")
    add_serve_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:  # ConfigError and DataError are ValueErrors
        print(f"vitune serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
