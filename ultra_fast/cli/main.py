"""``ultra-fast <subcommand>``: argument parsing and dispatch; each subcommand lives in its own module."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..errors import UltraFastError
from . import bench_cmd, demo_cmd, eval_cmd, explain_cmd, explore_cmd, segment_cmd, text_cmd, train_w_cmd, tree_cmd

SUBCOMMANDS = {"explain": explain_cmd, "explore": explore_cmd, "segment": segment_cmd, "tree": tree_cmd, "demo": demo_cmd,
               "text": text_cmd, "train-w": train_w_cmd, "eval": eval_cmd,
               "bench": bench_cmd}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultra-fast", description="Exact ULTra explanation maps, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; 0 on success, 2 with a one-line message for a user's mistake.

    A user's mistake is an ``UltraFastError`` (a bad option, input, model or checkpoint) or an ``OSError``
    (a missing or unreadable file, a full disk). Any other exception is a bug: it propagates with its
    traceback instead of passing for a bad argument.
    """
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args) or 0
    except (UltraFastError, OSError) as e:
        print(f"ultra-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
