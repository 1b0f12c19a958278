"""Where a study's stages run: one after another in this process, or side by side as Ray tasks.

The stage graph already says what each stage reads. The Ray executor hands
it to Ray as it is: one remote task per stage, whose arguments are the tasks
of the stages it needs, so Ray's own scheduler runs each stage as soon as its
inputs are done and a worker with its resources is free. A stage does in a
worker exactly what it does in this process (:func:`execute_stage`: skip when
its key matches, resume when interrupted, write ``stage.json`` last), so a
study is the same whichever executor ran it, and a killed driver or worker
is resumed by rerunning the command: finished stages are skipped, and each
stage folder is locked by the one process writing it.

Ray is optional (``pip install "sumcircuit[ray]"``). ``RAY_ADDRESS`` connects
to an existing cluster; otherwise a local instance starts with ``workers`` CPUs.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sumcircuit.config import NON_NEGATIVE_REAL, POSITIVE, Config, option
from sumcircuit.errors import ConfigError, SumcircuitError
from sumcircuit.registry import Registry

if TYPE_CHECKING:  # the graph reads files (artifacts: torch); `--help` and `import sumcircuit` must not
    from sumcircuit.study.graph import Stage, StageOutcome, StageRunner

    Executor = Callable[[StageRunner, list[Stage]], None]
    ExecutorFactory = Callable[["ExecutorConfig", str], AbstractContextManager[Executor | None]]

_GROUP = "scale-out"


@dataclass(frozen=True)
class ExecutorConfig(Config):
    """How a study's stages are run (where, not what: the results are the same).

    Example:
        >>> import sumcircuit as sc
        >>> sc.ExecutorConfig(executor="ray", workers=2).cpus_per_stage
        1
    """

    executor: Literal["sequential", "ray"] = option(
        "sequential", help="sequential: one stage after another in this process; ray: every stage whose inputs "
                           "are done runs as a Ray task (pip install 'sumcircuit[ray]'; RAY_ADDRESS names a "
                           "cluster)", group=_GROUP)
    workers: int | None = option(None, help="ray: CPUs of the local Ray instance (default: all of this machine's; "
                                            "not used with RAY_ADDRESS)", bound=POSITIVE, group=_GROUP)
    cpus_per_stage: int = option(1, help="ray: CPUs (and torch threads) of each stage", bound=POSITIVE, group=_GROUP)
    gpus_per_stage: float | None = option(None, help="ray: GPUs of each stage that loads a model (default: 1 when "
                                                     "the device is CUDA, else 0)", bound=NON_NEGATIVE_REAL,
                                          group=_GROUP)

    def check(self) -> None:
        if self.executor == "sequential" and (self.workers is not None or self.gpus_per_stage is not None):
            raise ConfigError("workers" if self.workers is not None else "gpus_per_stage",
                              "applies to executor 'ray' only")


EXECUTORS: Registry[ExecutorFactory] = Registry("stage executor")


def executor_for(cfg: ExecutorConfig, device: str) -> AbstractContextManager[Executor | None]:
    """The executor ``cfg`` names, for stages whose models go on ``device``, held open for one study.

    It yields None for this process, one stage after another.
    """
    return EXECUTORS.get(cfg.executor)(cfg, device)


EXECUTORS.register("sequential", lambda cfg, device: nullcontext(None))


# ---------------------------------------------------------------- Ray


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (it is re-raised by the driver as it is), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # an exception type that cannot be rebuilt from its args
        return SumcircuitError(str(exc)) if isinstance(exc, SumcircuitError) else RuntimeError(
            f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _Failed:
    """A stage that raised (or could not start because a stage it needs did)."""

    name: str
    error: BaseException | None


def _stage_task(run_dir: str, stage: Stage, threads: int, needs: tuple[str, ...],
                *upstream: StageOutcome | _Failed | str) -> StageOutcome | _Failed:
    """The body of one Ray task: the stage, as :func:`execute_stage` runs it anywhere."""
    failed = [u for u in upstream if isinstance(u, _Failed)]
    if failed:
        return _Failed(stage.name, None)
    import torch

    from sumcircuit.study.graph import StageOutcome, execute_stage

    torch.set_num_threads(threads)
    keys = {n: (u.key if isinstance(u, StageOutcome) else str(u)) for n, u in zip(needs, upstream)}
    try:
        return execute_stage(Path(run_dir), stage, keys)
    except Exception as exc:  # re-raised by the driver, as the sequential run would raise it
        return _Failed(stage.name, _portable(exc))


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor", "'ray' needs Ray: pip install 'sumcircuit[ray]' (or pip install ray)") from None
    return ray


@contextmanager
def ray_session(workers: int | None) -> Iterator[Any]:
    """Ray, initialised: as it is if already running, else the cluster ``RAY_ADDRESS`` names, else a local
    instance of ``workers`` CPUs; what this call started is shut down when it ends."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers or os.cpu_count() or 1}
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True, **local)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class RayExecutor:
    """Submits every stage as a Ray task; a stage's task waits on the tasks of the stages it needs."""

    cfg: ExecutorConfig
    device: str

    def resources(self, stage: Stage) -> dict[str, float]:
        """What one stage asks Ray for: its CPUs, and a GPU when it loads a model on CUDA."""
        gpus = self.cfg.gpus_per_stage
        if gpus is None:
            gpus = 1.0 if self.device.startswith("cuda") else 0.0
        return {"num_cpus": float(self.cfg.cpus_per_stage), "num_gpus": 0.0 if stage.kind == "select" else gpus}

    def __call__(self, runner: StageRunner, stages: list[Stage]) -> None:
        ray = _ray()
        task = ray.remote(max_retries=0)(_stage_task)
        refs: dict[str, Any] = {}
        for stage in stages:
            done = runner.upstream(stage, submitted=refs)
            # a stage of this batch is waited on through its task; one of an earlier batch gives its key
            upstream: Sequence[Any] = [refs[n] if n in refs else done[n] for n in stage.needs]
            refs[stage.name] = task.options(name=stage.name, **self.resources(stage)).remote(
                str(runner.run_dir), stage, self.cfg.cpus_per_stage, stage.needs, *upstream)
        self._collect(ray, runner, stages, refs)

    @staticmethod
    def _collect(ray: Any, runner: StageRunner, stages: list[Stage], refs: dict[str, Any]) -> None:
        """Record the outcomes (in the stages' order); the first failure cancels the rest and is raised."""
        from sumcircuit.study.graph import StageOutcome

        pending = {ref: name for name, ref in refs.items()}
        outcomes: dict[str, StageOutcome | _Failed] = {}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    outcome = outcomes[pending.pop(ref)] = ray.get(ref)
                    if isinstance(outcome, _Failed) and outcome.error is not None:
                        raise outcome.error
        except BaseException:  # a failure or an interrupt: stages still running resume on the next run
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            for stage in stages:
                outcome = outcomes.get(stage.name)
                if isinstance(outcome, StageOutcome):
                    runner.record(outcome)


@contextmanager
def _ray_executor(cfg: ExecutorConfig, device: str) -> Iterator[Executor]:
    if ":" in device and device.startswith("cuda"):
        raise ConfigError("device", f"{device}: with executor 'ray', give 'cuda' (Ray assigns each stage its GPU)")
    with ray_session(cfg.workers):
        yield RayExecutor(cfg, device)


EXECUTORS.register("ray", _ray_executor)
