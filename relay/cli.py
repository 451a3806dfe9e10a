"""The ``relay`` command.

Each subcommand lives in the module that owns the capability and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (``(argparse.Namespace) -> int``, the exit status). This module only
collects them, loads configuration errors into one clear line and maps exit codes.

Exit codes: 0 ok, 1 fatal, 2 warnings (``relay check``) or usage/configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from relay.settings import ConfigError

# Modules that contribute subcommands, in the order `relay --help` lists them.
COMMAND_MODULES = (
    "relay.commands",
    "relay.reload",
    "relay.sink",
    "relay.suppress",
    "relay.eventscli",
    "relay.statscli",
    "relay.dkimcli",
    "relay.throttlecli",
    "relay.queuecli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="SMTP relay server and its admin tools.")
    parser.add_argument("--config", "-c", help="path to relay.toml (default: $RELAY_CONFIG, ./relay.toml)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
