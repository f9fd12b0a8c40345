"""Command line: ``evolq eval``, ``evolq quantize``, ``evolq allocate``, ``evolq demo``, ``evolq landscape``,
``evolq export``.

This package builds the parser from one module per verb (``eval_cmd``, ``quantize_cmd``,
``allocate_cmd``, ``demo_cmd``, ``landscape_cmd``, ``export_cmd``: each its ``add_parser(sub)`` and
``run(args)``), the argument groups they share in ``args`` and what they share beyond parsing in
``shared``; ``main`` runs one verb. User mistakes print one line (``evolq: error: ...``) and exit
with code 2; Ctrl-C exits with 130 after the last finished block has been checkpointed.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import EvolQError
from . import allocate_cmd, demo_cmd, eval_cmd, export_cmd, landscape_cmd, quantize_cmd
from .args import add_scale_out_args
from .shared import quant_config

__all__ = ["main", "build_parser", "quant_config", "add_scale_out_args"]

# the verbs in the order --help lists them
VERBS = {"eval": eval_cmd, "quantize": quantize_cmd, "allocate": allocate_cmd, "demo": demo_cmd,
         "landscape": landscape_cmd, "export": export_cmd}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``evolq: error: ...``, exit 2), like evolq's own."""

    def error(self, message):
        self.exit(2, f"evolq: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evolq", description="Post-training quantization by evolutionary "
                                                                "search over quantization scales (Evol-Q).")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS.values():
        verb.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return VERBS[args.command].run(args)
    except EvolQError as e:
        print(f"evolq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evolq: interrupted; finished blocks are checkpointed: rerun with --resume", file=sys.stderr)
        return 130
