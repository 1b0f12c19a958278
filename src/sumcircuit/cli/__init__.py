"""The ``sumcircuit`` command: argparse subcommands, one module per command, flags generated from configs.

Each command module defines ``register(subparsers)``; its handler is stored
as the ``handler`` default (not ``run``: a command may have a positional
argument of that name, as ``report RUN`` does). Every causal method in the
registry gets its command (:mod:`sumcircuit.cli.causal`). Errors a user can
act on (:class:`SumcircuitError`) are printed as one line with exit code 2,
never as a traceback; a parameter the library names is shown as its flag.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from sumcircuit.errors import ConfigError, SumcircuitError
from sumcircuit.version import __version__

BEFORE = ("models", "data", "analyze", "finetune", "evaluate", "circuit")
AFTER = ("reproduce", "compare", "report")


def commands() -> tuple[str, ...]:
    """Every command, in the order ``--help`` lists them (registered causal methods in the middle)."""
    from sumcircuit.causal.registry import CAUSAL_METHODS

    return (*BEFORE, *CAUSAL_METHODS.names(), *AFTER)


COMMANDS: tuple[str, ...] = commands()


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (imports no torch: flags come from the configs)."""
    parser = argparse.ArgumentParser(
        prog="sumcircuit",
        description="What changes inside a GPT-like model when it is fine-tuned to summarize.")
    parser.add_argument("--version", action="version", version=f"sumcircuit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in BEFORE:
        importlib.import_module(f"sumcircuit.cli.{name}").register(subparsers)
    importlib.import_module("sumcircuit.cli.causal").register(subparsers)
    for name in AFTER:
        importlib.import_module(f"sumcircuit.cli.{name}").register(subparsers)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the run is, so it unwinds like Ctrl-C: claims released, finished outputs kept."""


INTERRUPTED = "interrupted; finished outputs kept; rerun to resume"


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _quiet_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """An interrupt that lands in a finalizer is the same interrupt: no "Exception ignored" traceback."""
    if not isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
        sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM unwinds the run as SIGINT does (only the main thread can install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, hook = signal.signal(signal.SIGTERM, _terminate), sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (2: an error the user can act on; 130/143: SIGINT/SIGTERM)."""
    with _signals():
        try:
            return _main(argv)
        except (KeyboardInterrupt, Terminated) as exc:  # during parsing or teardown
            print(f"sumcircuit: {INTERRUPTED}", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130


def _main(argv: Sequence[str] | None) -> int:
    from sumcircuit.cli.common import in_flags
    from sumcircuit.cli.generate import flag_for

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ok = False
    try:
        code = int(args.handler(args) or 0)
        ok = True
        return code
    except ConfigError as err:
        print(f"sumcircuit {args.command}: error: {flag_for(args, err.param)}: {in_flags(err.reason, args)}",
              file=sys.stderr)
        return 2
    except SumcircuitError as err:
        print(f"sumcircuit {args.command}: error: {in_flags(str(err), args)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file system problem (disk full, permissions): one line, not a traceback
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"sumcircuit {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"sumcircuit {args.command}: {INTERRUPTED}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        from sumcircuit.distributed import teardown

        teardown(wait=ok)


if __name__ == "__main__":
    sys.exit(main())
