"""Data-parallel training across processes with ``torchrun`` and PyTorch DDP (issue 6).

One process per device, launched by ``torchrun`` (https://pytorch.org/docs/stable/elastic/run.html),
which sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``) in each
process's environment::

    torchrun --nproc_per_node=4 -m TSKDLib train scan.nii.gz --labels seg.nrrd --out runs/liver

The trainable module of teacher fine-tuning and of distillation is wrapped in
:class:`torch.nn.parallel.DistributedDataParallel`
(https://pytorch.org/docs/stable/generated/torch.nn.parallel.DistributedDataParallel.html): each
rank computes the loss on its own share of every batch and DDP all-reduces (averages) the
gradients during ``backward()``, so all ranks apply the same update and hold the same weights.
Nothing here averages gradients by hand.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function is a no-op: :func:`init` does
nothing, :func:`world_size` is 1, :func:`rank` 0, :func:`is_main` True, :func:`wrap_ddp` returns the
module unchanged, :func:`broadcast` returns its argument. Single-device and CPU runs execute exactly
the code they executed before (same results bit for bit).

Backends: NCCL for CUDA devices (each process uses ``cuda:LOCAL_RANK``), Gloo for the CPU. Control
messages (barriers while rank 0 runs a stage alone, small Python objects) go through a Gloo group,
so waiting ranks do not spin on a GPU; its timeout (``TSKD_DDP_TIMEOUT_S``, default 24 h) covers
stages that only rank 0 runs, such as synthesis.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, TypeVar

import torch
from torch import nn

T = TypeVar("T")

_CONTROL_GROUP = None  # Gloo group for barriers and object broadcasts (the default group on the CPU)
_OWNS_GROUP = False  # True when init() created the default process group


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    """``LOCAL_RANK`` as torchrun sets it (0 when unset): the GPU index of this process."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def world_size() -> int:
    """Number of processes training together (1 without torchrun)."""
    return torch.distributed.get_world_size() if is_active() else 1


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return torch.distributed.get_rank() if is_active() else 0


def is_main() -> bool:
    """True on rank 0, the only rank that writes files, checkpoints and progress."""
    return rank() == 0


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("TSKD_DDP_TIMEOUT_S", 24 * 3600)))


def _wants_cuda(device: str | torch.device | None) -> bool:
    name = str(device if device is not None else "auto")
    return torch.cuda.is_available() and name != "cpu"


def init(device: str | torch.device | None = "auto") -> bool:
    """Join the process group that torchrun prepared; no-op without torchrun or if already joined.

    ``device``: the requested device (``auto``/``cuda``/``cuda:N``/``cpu``): NCCL with
    ``torch.cuda.set_device(LOCAL_RANK)`` when it is a CUDA device, else Gloo.

    Returns True if this call created the process group (then :func:`cleanup` destroys it).
    """
    global _CONTROL_GROUP, _OWNS_GROUP
    if env_world_size() <= 1 or not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return False
    if _wants_cuda(device):
        torch.cuda.set_device(local_rank())
        torch.distributed.init_process_group("nccl", timeout=_timeout(),
                                             device_id=torch.device("cuda", local_rank()))
        _CONTROL_GROUP = torch.distributed.new_group(backend="gloo", timeout=_timeout())
    else:
        torch.distributed.init_process_group("gloo", timeout=_timeout())
        _CONTROL_GROUP = None  # the default (Gloo) group
    _OWNS_GROUP = True
    return True


def cleanup() -> None:
    """Destroy the process group if :func:`init` created it (no-op otherwise)."""
    global _CONTROL_GROUP, _OWNS_GROUP
    if _OWNS_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CONTROL_GROUP, _OWNS_GROUP = None, False


def device_for(device: torch.device) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for any CUDA request under torchrun
    (one GPU per process), the device unchanged otherwise."""
    if is_active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if is_active():
        torch.distributed.barrier(group=_CONTROL_GROUP)


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself on one process)."""
    if not is_active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def all_equal(obj: Any) -> bool:
    """True if every rank passed an equal picklable ``obj`` (always True on one process)."""
    if not is_active():
        return True
    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, obj, group=_CONTROL_GROUP)
    return all(v == values[0] for v in values)


def mean(t: torch.Tensor) -> torch.Tensor:
    """Average of a (detached) tensor over ranks, for reporting losses; ``t`` itself on one process."""
    if not is_active():
        return t
    t = t.detach().clone()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t / world_size()


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only while the other ranks wait; returns its result on rank 0, None on
    the others. If it raises on rank 0, the other ranks raise :class:`TSKDError` too (instead of
    waiting forever). On one process: ``fn()``."""
    if not is_active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:
            error = exc
    failed = broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        from TSKDLib.errors import TSKDError
        raise TSKDError(f"rank 0 failed, stopping rank {rank()} too ({failed}).")
    return result


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False,
             broadcast_buffers: bool = True) -> nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` under torchrun, else
    ``module`` unchanged.

    Only parameters with ``requires_grad`` are all-reduced (frozen foundation-model weights are
    not). At construction DDP broadcasts rank 0's parameters and buffers, so all ranks start from
    the same weights (e.g. after loading a resume checkpoint). The loss must be computed from the
    *wrapper's* output for DDP to synchronise the gradients. ``find_unused_parameters`` is needed
    only when some trainable parameters get no gradient in some steps. ``broadcast_buffers=False``
    skips re-broadcasting rank 0's buffers before every forward (for modules whose buffers never
    change, e.g. frozen BatchNorm statistics); they are still synchronised once at construction.
    """
    if not is_active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    kwargs: dict[str, Any] = {}
    if not broadcast_buffers:  # newer torch renamed the per-forward buffer sync
        import inspect
        name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        kwargs[name] = False
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused_parameters, **kwargs)
