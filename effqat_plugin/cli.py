"""`effqat` console script: one sub-command per module in ``effqat_plugin.commands``.

Each command module owns its arguments (``add_parser``) and its work (``run``), so commands can grow
independently without this file becoming a switchboard.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .env import prepare_runtime_env, quiet_third_party_logs

COMMANDS = ("quantize", "eval", "convert", "push", "pipeline", "e2e", "plan", "sample")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effqat", description="EfficientQAT for GPTQModel")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"effqat_plugin.commands.{name}")
        module.add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--verbose", action="store_true",
                       help="also show GPTQModel's / torch's / transformers' own log lines")
    return parser


def main(argv=None) -> int:
    prepare_runtime_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        command = sys.modules[args.func.__module__]
        quiet_third_party_logs(imports_gptqmodel=getattr(command, "USES_GPTQMODEL", True))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("effqat: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        print(f"effqat {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
