"""One training engine for the three trained models: the LoRA teacher (stage 1), the diffusion
UNet (stage 2) and the student (stage 3, distillation and fine-tune).

Why our own small engine and not Hugging Face Accelerate or MONAI's ``SupervisedTrainer``: the
three loops need (a) batches and augmentations that are a pure function of ``(seed, step)``, so
that a resumed run ends with bit-identical weights, (b) a learning rate set per step from a plan
that can change during training (the distillation plans its cosine to fit a wall-clock budget
after timing 20 steps, and evidence may end its phase early), (c) rank-0-only, atomic,
single-file checkpoints whose settings are checked on resume, and (d) per-stage CPU thread
counts. Accelerate's ``prepare`` wraps data loaders and schedulers it then steps itself, and its
``save_state`` writes a folder of files non-atomically; MONAI's Ignite engines own the epoch loop.
Both would need (a)-(d) bolted on again. What this module uses from PyTorch directly is what those
libraries use too: :class:`~torch.nn.parallel.DistributedDataParallel` (through
:mod:`TSKDLib.engine.distributed`), :func:`torch.autocast` and :class:`torch.amp.GradScaler`.

Pieces
------
:func:`warmup_cosine` / :func:`warmup_constant`
    Learning-rate multipliers (linear warm-up, then cosine decay to 0, or constant).
:class:`Plateau`
    "Has the monitored score stopped improving" (early stopping and best-weights bookkeeping).
:class:`ResumeFile`
    The one resume policy: an atomic checkpoint written by rank 0 that records the settings and
    data it was trained with; a checkpoint from other settings is a :class:`CheckpointError`
    naming every setting that changed.
:class:`Trainer`
    Device placement, DDP wrapping, mixed precision (autocast + float16 loss scaling), gradient
    clipping, the per-step learning rate, and :meth:`Trainer.fit`: the loop that calls the
    stage's ``train_step(step) -> loss`` and then its hooks ``hook(step)`` (validation, early
    stopping, logging, checkpointing), in the order the stage lists them.
:func:`cpu_threads`
    ``torch.set_num_threads`` for the duration of a stage, restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from TSKDLib.engine import distributed
from TSKDLib.errors import CheckpointError

#: config fields that never change results, hence never block a resume (every stage)
RUNTIME_FIELDS = ("device", "threads", "checkpoint_every", "log_every", "max_seconds")

# ------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ------------------------------------------------------------------------------------------------
def warmup_cosine(step: int, warmup_steps: int, total: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear ``(step + 1) /
    warmup_steps`` during warm-up, then a half cosine from 1 to 0 at ``total`` (Loshchilov &
    Hutter, SGDR, ICLR 2017, without restarts; warm-up as in Goyal et al. 2017)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def warmup_constant(step: int, warmup_steps: int) -> float:
    """Multiplier at ``step``: linear warm-up over ``warmup_steps``, then 1 (the diffusion model,
    trained with an EMA of its weights)."""
    return min(1.0, (step + 1) / max(1, warmup_steps))


# ------------------------------------------------------------------------------------------------
# Early stopping
# ------------------------------------------------------------------------------------------------
@dataclass
class Plateau:
    """Tracks a score that should rise (validation Dice, distillation fit/agreement).

    :meth:`observe` returns True when the score is the best so far (any gain: the caller keeps
    those weights). A check counts as progress, resetting ``bad``, only when it gains at least
    ``min_delta`` over the best (``strict``: more than ``min_delta``); ``stalled(patience)`` says
    whether ``patience`` checks in a row made no such progress.
    """

    min_delta: float = 0.0
    strict: bool = False
    best: float | None = None
    best_step: int | None = None
    bad: int = 0

    def observe(self, score: float, step: int) -> bool:
        """Record one check; True when ``score`` is the best so far."""
        prev = self.best
        if prev is None:
            progress = True
        elif self.strict:
            progress = score > prev + self.min_delta
        else:
            progress = score >= prev + self.min_delta
        self.bad = 0 if progress else self.bad + 1
        is_best = prev is None or score > prev
        if is_best:
            self.best, self.best_step = score, step
        return is_best

    def stalled(self, patience: int) -> bool:
        return self.bad >= patience


# ------------------------------------------------------------------------------------------------
# Checkpoints: one resume policy
# ------------------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def changed_settings(saved: dict, current: dict) -> list[str]:
    """``"name: saved -> current"`` for every (dotted, nested) entry that differs."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


def settings_identity(settings: dict, ignore: Iterable[str] = RUNTIME_FIELDS) -> dict:
    """A config's fields minus those that do not change results (:data:`RUNTIME_FIELDS`)."""
    drop = set(ignore)
    return {k: v for k, v in settings.items() if k not in drop}


class ResumeFile:
    """The atomic checkpoint of one training stage and its resume policy.

    ``identity`` is ``{"settings": {...}, "data": {...}}`` (JSON-like values): what the stage was
    trained with. :meth:`load` returns the saved payload when the file exists and its identity
    equals this one, None when there is no file, and raises :class:`CheckpointError` when the
    file is unreadable or was written with other settings or data (the message names each
    changed entry, saved -> now, and the fix). :meth:`save` writes ``payload`` plus the identity
    atomically (temporary file + rename, :func:`TSKDLib.data.io.atomic_write`), on rank 0 only.
    ``path`` None disables both.
    """

    def __init__(self, path: str | Path | None, stage: str, identity: dict):
        self.path = Path(path) if path is not None else None
        self.stage, self.identity = stage, identity

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # written atomically, so only a foreign or damaged file
            raise CheckpointError(f"the {self.stage} checkpoint is unreadable ({exc}).", self.path,
                                  "Delete it to restart this stage.") from None
        saved = state.get("identity") if isinstance(state, dict) else None
        if saved != self.identity:
            what = "; ".join(changed_settings(saved or {}, self.identity)) if saved else \
                "it was written by another TSKD version"
            raise CheckpointError(f"the {self.stage} checkpoint was written with other settings or data ({what}).",
                                  self.path, "Run with the settings it was written with, use a new run "
                                  "directory, or delete the checkpoint to restart this stage.")
        return state

    def save(self, payload: dict) -> None:
        if self.path is None or not distributed.is_main():
            return
        from TSKDLib.data.io import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {**payload, "identity": self.identity}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp), overwrite=True)

    def check_ranks_agree(self, step: int) -> None:
        """Raise :class:`CheckpointError` when the ranks resumed at different steps."""
        if not distributed.all_equal(step):
            raise CheckpointError(f"the ranks disagree on the resume step of the {self.stage} checkpoint.",
                                  self.path, "Run every rank on the same run directory (a shared file system).")


# ------------------------------------------------------------------------------------------------
# Runtime
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cpu_threads(n: int | None):
    """``torch.set_num_threads(n)`` inside, the previous value restored after (None: no change).
    On a CPU shared with other busy processes, fewer threads than cores avoids oversubscription."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); float32 on the CPU,
    where bfloat16 matmuls are slower without AMX."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


Hook = Callable[[int], None]


class Trainer:
    """The optimisation loop shared by every stage.

    Parameters
    ----------
    module:
        The trainable forward (``nn.Module``), already on ``device``. Under torchrun it is wrapped
        in DDP (:func:`TSKDLib.engine.distributed.wrap_ddp`, ``ddp`` are its keyword arguments);
        ``self.net`` is what ``train_step`` must call for DDP to all-reduce the gradients.
    optimizer:
        A ``torch.optim`` optimiser; every parameter group gets ``lr(step)`` before each step.
    lr:
        ``lr(step) -> float`` (absolute learning rate of the 0-based ``step``); looked up every
        step, so a plan that changes during training (the distillation's) is followed.
    clip_grad_norm, clip_params:
        Clip the global L2 norm of the gradients of ``clip_params`` (default: the optimiser's
        parameters) to this value (None: no clipping).
    mixed_precision:
        Autocast inside :meth:`autocast` on CUDA; float16 (no bfloat16) adds loss scaling with
        :class:`torch.amp.GradScaler`. No effect on the CPU.

    :meth:`fit` runs ``step`` from ``start`` while ``step < self.end`` (hooks may lower
    ``self.end`` to stop early): set the learning rate, ``loss = train_step(step)``, backward +
    clip + optimiser step (skipped when the loss has no gradient), then each hook with the number
    of steps done. Returns the steps done.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 lr: Callable[[int], float], end: int, clip_grad_norm: float | None = None,
                 mixed_precision: bool = True, ddp: dict | None = None,
                 clip_params: Sequence[nn.Parameter] | None = None):
        self.module, self.optimizer, self.device = module, optimizer, device
        self.lr, self.end, self.clip = lr, int(end), clip_grad_norm
        self.mixed_precision = mixed_precision
        fp16 = device.type == "cuda" and mixed_precision and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.net = distributed.wrap_ddp(module, device, **(ddp or {}))
        self.params = list(clip_params) if clip_params is not None else \
            [p for g in optimizer.param_groups for p in g["params"]]
        self.current_lr = float("nan")

    def autocast(self):
        """Context for the forward pass (see :func:`autocast`)."""
        return autocast(self.device, self.mixed_precision)

    def update(self, loss: torch.Tensor) -> None:
        """Backward, unscale + clip, optimiser step; nothing when ``loss`` needs no gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        if not loss.requires_grad:
            return
        self.scaler.scale(loss).backward()
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def fit(self, start: int, train_step: Callable[[int], torch.Tensor], hooks: Sequence[Hook] = ()) -> int:
        step = start
        while step < self.end:
            self.current_lr = self.lr(step)
            for group in self.optimizer.param_groups:
                group["lr"] = self.current_lr
            loss = train_step(step)
            self.update(loss)
            step += 1
            for hook in hooks:
                hook(step)
        return step

    def state_dict(self) -> dict:
        """Optimiser and loss-scaler state, for the stage's checkpoint."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @staticmethod
    def global_mean(values: torch.Tensor) -> torch.Tensor:
        """Mean over the ranks of a detached tensor of reported values (itself on one process)."""
        return distributed.mean(values.detach().float()) if distributed.world_size() > 1 else values.detach()


def checkpoint_hook(resume: ResumeFile, every: int, payload: Callable[[int], dict], trainer: Trainer,
                    also: Callable[[int], bool] | None = None) -> Hook:
    """A hook that saves ``payload(step)`` every ``every`` steps, at the end (``trainer.end``)
    and whenever ``also(step)`` is True."""
    def hook(step: int) -> None:
        if step % every == 0 or step >= trainer.end or (also is not None and also(step)):
            resume.save(payload(step))
    return hook


def trainable_state(module: nn.Module) -> dict:
    """A detached CPU copy of ``module.state_dict()`` (best weights kept in memory)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
