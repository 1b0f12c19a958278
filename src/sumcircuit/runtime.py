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
    device_map: str | None = option(None, help="place each model's layers with Accelerate (a pair larger than one "
                                               "device): auto, balanced, balanced_low_0, sequential, or a JSON file "
                                               "{module: GPU index, cpu or disk}", group="placement")
    max_memory: str | None = option(None, help="with --device-map: memory per device for each model, e.g. "
                                               "'0=20GiB,cpu=8GiB' (what does not fit is offloaded to disk)",
                                    group="placement")
    offload_folder: str | None = option(None, help="with --device-map: where weights offloaded to disk go (default: "
                                                   "a temporary folder, removed afterwards)", group="placement")

    def check(self) -> None:
        if not self.device.strip():
            raise ConfigError("device", "expected a device such as cpu or cuda:0, got ''")
        if self.device_map is None:
            for name in ("max_memory", "offload_folder"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "applies only with device_map")
            return
        from sumcircuit.placement import parse_max_memory, read_device_map

        read_device_map(self.device_map)
        parse_max_memory(self.max_memory)

    def require_whole_models(self, what: str) -> None:
        """Refuse a device map where a command needs each model whole on one device (training, generation)."""
        if self.device_map is not None:
            raise ConfigError("device_map", f"{what} keeps each model whole on --device; a device map applies to "
                                            "analyze, patch and attribute")

    def with_device(self, device: str) -> Runtime:
        """The same runtime on ``device`` (each process of a multi-process run picks its own)."""
        return self.replace(device=device)


def coerce_runtime(runtime: Runtime | dict[str, Any] | None) -> Runtime:
    """``runtime`` as a :class:`Runtime` (None: the defaults; a dict: its fields)."""
    from sumcircuit.config import coerce_config

    return coerce_config(Runtime, runtime, "runtime")
