"""The ``sumcircuit`` command: argparse subcommands, one module per command.

Each command module defines ``register(subparsers)``; its handler is stored
as the ``handler`` default (not ``run``: a command may have a positional
argument of that name, as ``report RUN`` does). Errors a user can act on (:class:`SumcircuitError`)
are printed as one line with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from sumcircuit.errors import SumcircuitError
from sumcircuit.version import __version__

# Command modules under sumcircuit.cli, in the order `--help` lists them.
COMMANDS: tuple[str, ...] = ("models", "data", "analyze", "finetune", "evaluate", "circuit", "ablate",
                             "patch", "attribute", "reproduce", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sumcircuit",
        description="What changes inside a GPT-like model when it is fine-tuned to summarize.")
    parser.add_argument("--version", action="version", version=f"sumcircuit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"sumcircuit.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ok = False
    try:
        code = int(args.handler(args) or 0)
        ok = True
        return code
    except SumcircuitError as err:
        print(f"sumcircuit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file system problem (disk full, permissions): one line, not a traceback
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"sumcircuit {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sumcircuit {args.command}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    finally:
        from sumcircuit.distributed import teardown

        teardown(wait=ok)


if __name__ == "__main__":
    sys.exit(main())
