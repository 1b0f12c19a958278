"""Where and how an operation runs: device, dtype, remote code, progress bars.

Every operation takes the same ``runtime=`` keyword, so device and dtype are
never an option of one command's config and a parameter of another's. What
changes the numbers a run computes (seeds, sizes, methods) stays in the
operation's config; the runtime says only where it runs (the dtype, which
does change numbers, is recorded in every output's provenance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sumcircuit.config import Config, option
from sumcircuit.errors import ConfigError


def _checked(parser: str, text: str) -> str:
    """A device or dtype checked by ``sumcircuit.models.<parser>`` when the command line is parsed.

    A wrong one is a usage error before anything is loaded or made; torch is imported only then.
    """
    import argparse

    from sumcircuit import models
    from sumcircuit.errors import ModelError

    try:
        getattr(models, parser)(text)
    except ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


@dataclass(frozen=True)
class Runtime(Config):
    """Device, dtype and the rest of how an operation runs (the same for every operation).

    Example:
        >>> import sumcircuit as sc
        >>> sc.Runtime(device="cpu", dtype="bfloat16").dtype
        'bfloat16'
    """

    device: str = option("cpu", help="cpu, cuda, cuda:1, ...", group="runtime", cli_type=lambda t: _checked("parse_device", t))
    dtype: str = option("float32", help="float32, bfloat16 or float16", group="runtime",
                        cli_type=lambda t: _checked("parse_dtype", t))
    trust_remote_code: bool = option(False, help="allow model code from the hub (off unless asked)", group="runtime")
    progress: bool = option(True, help="progress bars", group="runtime")

    def check(self) -> None:
        if not self.device.strip():
            raise ConfigError("device", "expected a device such as cpu or cuda:0, got ''")

    def with_device(self, device: str) -> Runtime:
        """The same runtime on ``device`` (each process of a multi-process run picks its own)."""
        return self.replace(device=device)


def coerce_runtime(runtime: Runtime | dict[str, Any] | None) -> Runtime:
    """``runtime`` as a :class:`Runtime` (None: the defaults; a dict: its fields)."""
    from sumcircuit.config import coerce_config

    return coerce_config(Runtime, runtime, "runtime")
