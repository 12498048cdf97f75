"""Process-level settings: the compute device and the allocator for training on the CPU.

:func:`resolve_device` is the one rule that turns a ``device`` setting into a device, for every
stage (teacher, synthesis, distillation, the pipeline).

glibc's ``malloc`` serves every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MiB by
default) with a fresh ``mmap`` and returns it with ``munmap`` when freed. PyTorch's CPU allocator
uses ``malloc``, so each training step of the LiteMedSAM decoder (batch 4 x 4 classes: tensors
of 16 x 32 x 256 x 256 float32 = 128 MiB) maps, zero-fills page by page and unmaps gigabytes:
on the 2-core reference machine 1.8 million page faults and 4.0 s of kernel time per 4.9 s step.
Keeping such blocks in the heap (threshold 1 GiB, trim threshold 256 MiB) makes the same step
2.6 s; the price is a higher peak resident memory (2.9 -> 4.7 GB in that measurement), since
freed blocks stay with the process for reuse. See ``mallopt(3)``; measured by
``benchmarks/bench_allocator.py`` (figures in ``benchmarks/RESULTS.md``, section 5).

Nothing changes on other C libraries (macOS, Windows, musl), and ``TSKD_MALLOC_TUNING=0`` in
the environment switches it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: ``mallopt`` parameter numbers from glibc's ``malloc.h``
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = 256 << 20

_applied: bool | None = None


def resolve_device(device):
    """A ``device`` setting -> ``torch.device``.

    ``"auto"`` -> ``cuda`` when a CUDA GPU is available, else ``cpu``; anything else (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, a ``torch.device``) is taken as given. Raises
    :class:`~TSKDLib.errors.ConfigError` when a CUDA device is requested and none is available.
    PyTorch is imported on first call only.
    """
    import torch

    from TSKDLib.errors import ConfigError

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was requested but CUDA is not available.",
                          fix="use device cpu or auto (--device), or install a CUDA build of PyTorch.")
    return torch.device(device)


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent).

    Returns True when the settings are in effect, False when not applicable (not Linux/glibc,
    or ``TSKD_MALLOC_TUNING=0``). Never raises: a failure leaves the allocator as it was.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("TSKD_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success (glibc); other C libraries may lack it (handled above)
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    _applied = ok
    return ok
