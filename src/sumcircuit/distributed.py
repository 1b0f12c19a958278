"""Running one command on several processes: Hugging Face Accelerate over ``torch.distributed``.

A launcher (``accelerate launch``, ``torchrun``) starts N copies of the same
command. Each copy calls :func:`setup`, which joins the process group through
:class:`accelerate.PartialState` (NCCL on GPUs, gloo on CPUs); nothing here
schedules work itself. Started as one plain process, :func:`setup` does not
even create a ``PartialState``, and every helper below is the identity: the
single-process code path is the one it always was.

Conventions every command follows
- **Sharding** is deterministic and depends only on the number of items and
  the world size: items are cut into consecutive *blocks* (a resumable shard
  of documents, a generation batch, a forward batch) and the blocks are dealt
  round-robin, block ``b`` to rank ``b % world``. A *round* is ``world``
  consecutive blocks, one per rank (the last round may leave ranks idle with
  an empty block). Because blocks are the same as in a single-process run,
  per-document numbers are computed on the very same padded batches, and
  concatenating rank 0's, rank 1's, ... block of a round gives the global
  document order back.
- **Reductions** sum in float64 (gloo and NCCL both sum float64), so merged
  accumulators differ from a single-process run only by summation order.
- **Only rank 0 writes files** and reads resume state; what other ranks need
  from it (how many documents are done, whether it failed) is broadcast, so
  a multi-node run does not need a shared file system for the output folder.
- Code that only rank 0 runs goes through :func:`on_main`, which hands rank 0's
  error to every rank: no rank waits forever in a collective that rank 0 will
  never reach.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor

from sumcircuit.errors import SumcircuitError

T = TypeVar("T")
log = logging.getLogger(__name__)
_ENV_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class DistributedError(SumcircuitError):
    """A multi-process run that cannot go on (bad device for N processes, a rank that failed)."""


class RankFailedError(DistributedError):
    """Raised on every other rank when rank 0 failed in a step only it runs (its message is kept)."""


# ---------------------------------------------------------------- process group

def _launched_world_size() -> int:
    """World size announced by a launcher's environment (1 when started as a plain process)."""
    for name in _ENV_WORLD:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def _state() -> Any:
    """The shared ``PartialState`` when this is a multi-process run, else None (never created)."""
    from accelerate import PartialState

    if PartialState._shared_state:  # already set up (by setup() or by an Accelerator)
        state = PartialState()
        return state if state.num_processes > 1 else None
    return None


def setup(device: str = "cpu") -> None:
    """Join the launcher's process group; a no-op in a plain single process.

    ``cpu=True`` for CPU devices: Accelerate only picks its multi-CPU (gloo)
    mode when asked, otherwise a CPU-only host would run N independent copies.
    """
    if _launched_world_size() <= 1:
        return
    from accelerate import PartialState

    if any(os.environ.get(v, "").lower() == "true" for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")):
        log.warning("this command is data parallel: every process holds whole models; the FSDP / DeepSpeed "
                    "settings of the Accelerate config shard weights for `finetune` only")

    cpu = str(device).startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1:
        raise DistributedError(f"the launcher announced {_launched_world_size()} processes but accelerate "
                               f"did not start a process group (distributed type {state.distributed_type}); "
                               "launch with `accelerate launch --multi_gpu --num_processes N` or torchrun")


def allow_precision(mixed_precision: str) -> None:
    """Let this process's next ``Accelerator`` use ``mixed_precision``.

    accelerate keeps one ``AcceleratorState`` per process and refuses an
    Accelerator with another mixed precision ("restart your runtime"), so a
    notebook that fine-tuned in bf16 could not fine-tune in fp32 next. That
    state holds nothing a finished run needs; the process group
    (``PartialState``) is kept. accelerate's own tests reset it the same way.
    """
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def world_size() -> int:
    """Processes in this run (1 without ``accelerate launch``)."""
    state = _state()
    return int(state.num_processes) if state is not None else 1


def rank() -> int:
    """This process's rank (0 when alone)."""
    state = _state()
    return int(state.process_index) if state is not None else 0


def is_distributed() -> bool:
    """Whether several processes run."""
    return world_size() > 1


def is_main_process() -> bool:
    """Whether this is rank 0 (the one that writes outputs)."""
    return rank() == 0


def local_device(device: str) -> str:
    """The device this process uses: ``cuda`` means this rank's own GPU under N processes."""
    state = _state()
    if state is None or str(device).startswith("cpu"):
        return str(device)
    if str(device) in ("cuda", "auto"):
        return str(state.device)
    raise DistributedError(f"`device` {device} names one device, but {state.num_processes} processes would "
                           "all use it; pass --device cuda (each process takes its own GPU)")


def barrier() -> None:
    """Wait for every process (a no-op when alone)."""
    if is_distributed():
        torch.distributed.barrier()


def teardown(*, wait: bool = True) -> None:
    """Leave the process group cleanly at the end of a command.

    Exiting with a live gloo group lets its threads race interpreter shutdown
    (seen as "terminate called without an active exception", exit -6, on a
    rank that had finished its work); a barrier then destroy avoids that.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            if wait:  # never after a failure: a rank that died would leave the others waiting
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. fills a model cache), the others after it."""
    state = _state()
    if state is None:
        yield
        return
    with state.main_process_first():
        yield


# ---------------------------------------------------------------- sharding

def blocks(n_items: int, block_size: int) -> list[range]:
    """``[0, n_items)`` cut into consecutive blocks of ``block_size`` (the last may be shorter)."""
    if block_size < 1:
        raise DistributedError(f"block size must be >= 1, got {block_size}")
    return [range(s, min(s + block_size, n_items)) for s in range(0, n_items, block_size)]


def rounds(n_items: int, block_size: int, world: int | None = None) -> list[list[range]]:
    """Blocks grouped ``world`` at a time: ``rounds(...)[k][r]`` is rank ``r``'s block in round ``k``.

    Ranks without a block in the last round get an empty range, so every rank
    runs the same number of rounds (and of collectives).
    """
    world = world_size() if world is None else world
    cut = blocks(n_items, block_size)
    out = []
    for k in range(0, len(cut), world):
        group = cut[k:k + world]
        out.append(group + [range(n_items, n_items)] * (world - len(group)))
    return out


def my_blocks(n_blocks: int) -> list[int]:
    """Indices of the blocks this rank processes when ``n_blocks`` are dealt round-robin."""
    return list(range(rank(), n_blocks, world_size()))


# ---------------------------------------------------------------- collectives

def _comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
    state = _state()
    backend = str(getattr(state, "backend", "") or "")
    return state.device if state is not None and "nccl" in backend else torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks, computed in float64; returned in the input's dtype and device."""
    if not is_distributed():
        return tensor
    # copy=True: all_reduce works in place and must never overwrite the caller's accumulator
    buf = tensor.detach().to(device=_comm_device(), dtype=torch.float64, copy=True).contiguous()
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return buf.to(device=tensor.device, dtype=tensor.dtype)


def all_reduce_sum_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`all_reduce_sum` of many tensors in one collective (flattened into one fp64 buffer)."""
    if not is_distributed() or not tensors:
        return dict(tensors)
    keys = sorted(tensors)  # the same order on every rank
    flat = torch.cat([tensors[k].detach().reshape(-1).to(device="cpu", dtype=torch.float64) for k in keys])
    flat = all_reduce_sum(flat)
    out, offset = {}, 0
    for k in keys:
        t = tensors[k]
        out[k] = flat[offset:offset + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype)
        offset += t.numel()
    return out


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks). Pickled: keep it small."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main_process() else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: T | None) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj  # type: ignore[return-value]
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` on every rank, in rank order. Pickled: keep it small."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; if it raises, every rank raises (rank 0 the original error).

    Returns ``fn()`` on rank 0 and None on the other ranks. Use it for steps
    that read or write the output folder.
    """
    if not is_distributed():
        return fn()
    value: T | None = None
    failure: BaseException | None = None
    if is_main_process():
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed on, then re-raised below
            failure = exc
    message = broadcast_from_main(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise RankFailedError(f"rank 0 failed: {message}")
    return value


def ordered_concat(parts: Sequence[Sequence[T]]) -> list[T]:
    """Gathered per-rank lists of one round, in rank order = global order of that round's blocks."""
    return [item for part in parts for item in part]
