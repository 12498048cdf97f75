"""Fine-tuning the task-specific teacher on the labelled slices (TS-KD Stage 1).

Liang et al. (arXiv 2503.06976) fine-tune the foundation model on the target task with LoRA
before distillation, supervised by the few labelled images. Here: Dice + cross-entropy on the
K+1 class probabilities of :func:`~TSKDLib.teacher.model.class_probabilities`, AdamW, linear
warm-up then cosine decay, validation Dice on the labelled slices farthest from the others with
early stopping, then a refit on every labelled slice (``TeacherConfig.refit``), and resumable
checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from TSKDLib.engine import distributed
from TSKDLib.engine.loop import (Plateau, ResumeFile, Trainer, checkpoint_hook, cpu_threads, settings_identity,
                            warmup_cosine)
from TSKDLib.pipeline.presets import StoppingSettings, upgrade_names
from TSKDLib.errors import ConfigError, LabelError
from TSKDLib.evaluation.metrics import dice
from TSKDLib.pipeline.progress import NullProgress, ProgressReporter
from TSKDLib.engine.runtime import resolve_device
from TSKDLib.teacher.lora import DEFAULT_TARGETS, LoraSettings
from TSKDLib.teacher.model import TaskSpecificTeacher, autocast_for, class_logits, labelmap

RESUME_FILE = "teacher_resume.pt"
REFIT_RESUME_FILE = "teacher_refit_resume.pt"


@dataclass
class TeacherConfig(StoppingSettings):
    """Settings of teacher fine-tuning (defaults follow the paper's LoRA teacher).

    Attributes
    ----------
    backend, checkpoint:
        Foundation model (:data:`~TSKDLib.teacher.backbones.BACKENDS`) and its weight file
        (None for the packaged LiteMedSAM).
    lora_rank, lora_alpha, lora_dropout, lora_targets:
        See :class:`~TSKDLib.teacher.lora.LoraSettings`. Default targets: encoder and decoder
        attention (paper); the ``fast`` preset adapts the decoder only.
    steps:
        Optimiser steps (upper bound; early stopping may end sooner).
    batch_size:
        Slices per step *per process*. Under ``torchrun`` with N processes each rank draws its own
        ``batch_size`` slices and DDP averages the gradients: the effective batch is
        ``N * batch_size`` (see :func:`finetune_teacher`).
    lr, weight_decay:
        AdamW learning rate (peak, after warm-up) and decoupled weight decay (not applied to
        prompt tokens). 1e-3 suits LoRA with rank 8 and tens to hundreds of steps.
    warmup_steps:
        Linear warm-up steps from 0 to ``lr``; then cosine decay to 0 at ``steps``
        (:func:`TSKDLib.engine.loop.warmup_cosine`). Older configs call it ``warmup``.
    val_fraction:
        Share of the labelled slices held out for validation Dice (none when fewer than 3 are
        labelled, or 0). The held-out slices are the ones farthest from the other labelled
        slices of their scan (organ ends, not neighbours of training slices; issue 15 item 4),
        each class keeping at least one training slice.
    refit:
        After the validated run, train again from the same initial adapters on *every* labelled
        slice for ``steps`` steps and hand over that teacher; its reported validation figures
        are the held-out ones of the first run (a conservative estimate: that teacher saw fewer
        slices). Holding 1-2 of 6-9 labelled slices out of the final teacher lost organ ends:
        on CHAOS MR the refit students gained 0.02-0.05 Dice (benchmarks/RESULTS.md section 6).
    val_every, patience, min_delta:
        Validate every ``val_every`` steps; stop after ``patience`` validations that do not
        raise the best mean validation Dice by at least ``min_delta``; the best validated
        weights are kept (a smaller gain still updates them).
    seed:
        Seeds the LoRA initialisation, the split, batch order, dropout and (per step) the
        dataset's MONAI augmentations: runs are reproducible on the CPU.
    device:
        ``"auto"`` (CUDA when available, with autocast mixed precision), ``"cpu"`` or ``"cuda"``.
    threads:
        PyTorch CPU threads while training (None: leave torch's setting).
    cache_embeddings:
        Encode each training slice once with the frozen encoder and train the decoder side on
        the cached ``(256, 64, 64)`` embeddings (float32, 4 MiB per view). None = automatic:
        when no LoRA sits in the encoder. Ignored (False) when the encoder is adapted.
    cache_views:
        With cached embeddings: views per training slice: the un-augmented slice plus
        ``cache_views - 1`` augmented draws from the dataset (if it augments).
    checkpoint_every:
        Save a resume checkpoint to ``work_dir`` every this many steps (and at the end).
    dice_weight, ce_weight:
        Weights of the two loss terms.
    """

    backend: str = "litemedsam"
    checkpoint: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 200
    batch_size: int = 4
    warmup_steps: int = 10
    weight_decay: float = 0.01
    val_fraction: float = 0.2
    refit: bool = True
    val_every: int = 20
    patience: int = 4
    cache_embeddings: bool | None = None
    cache_views: int = 1
    dice_weight: float = 1.0
    ce_weight: float = 1.0

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        self.lora_settings()  # validates LoRA values
        for name in ("steps", "batch_size", "val_every", "checkpoint_every", "cache_views"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"teacher {name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"teacher val_fraction must be in [0, 1), got {self.val_fraction}.")
        if self.lr <= 0 or self.warmup_steps < 0 or self.patience < 1 or not 0 <= self.min_delta < 1:
            raise ConfigError("teacher lr must be > 0, warmup_steps >= 0, patience >= 1 and 0 <= min_delta < 1.")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}.", fix="use auto, cpu or cuda.")

    @classmethod
    def preset(cls, name: str, **overrides) -> "TeacherConfig":
        """The teacher settings of a preset (:data:`TSKDLib.pipeline.presets.PRESETS`), with overrides.

        ``balanced`` (alias ``paper``): LoRA on encoder + decoder attention (the default fields).
        ``fast``: CPU preset: LoRA on the decoder attention + prompt tokens, frozen encoder with
        cached embeddings, at most 60 steps of 4 slices, early stopping. ``quality``: 600 steps.
        Raises :class:`ConfigError` for an unknown preset or setting.
        """
        from TSKDLib.pipeline.presets import stage_preset

        return cls(**{**stage_preset(name, "teacher"), **upgrade_names(overrides, "teacher")})

    def lora_settings(self) -> LoraSettings:
        """The LoRA part as :class:`LoraSettings`."""
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TeacherConfig":
        """From a plain dict (JSON; older names such as ``warmup`` are read too). Raises
        :class:`ConfigError` for an unknown setting."""
        data = upgrade_names(data, "teacher")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown teacher setting(s) {sorted(unknown)}.")
        return cls(**data)


# -- loss and metric ---------------------------------------------------------------------------------
class MaskedDiceCELoss(nn.Module):
    """Dice + cross-entropy on K+1 class probabilities, over labelled valid pixels only.

    Pixels with label ``-1`` (unlabelled) or ``valid == False`` (padding) are removed from both
    terms: ignored by the cross-entropy, zeroed in prediction and target of MONAI's
    ``DiceLoss`` (so they add nothing to intersections or sums). Dice is computed over the
    whole batch per class (``batch=True``) without background, which is stable when a class is
    absent from some slices (Milletari et al. 2016; nnU-Net's Dice + CE, Isensee et al. 2021).

    Call with ``logits (B, K, S, S)``, ``labels (B, S, S)`` int64 in -1..K, ``valid (B, S, S)``
    bool; returns ``(total, dice, ce)`` scalars.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(include_background=False, softmax=False, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
        full = class_logits(logits.float())  # (B, K+1, S, S)
        keep = valid & (labels >= 0)
        if not bool(keep.any()):
            raise LabelError("a training batch holds no labelled pixel.")
        ce = F.cross_entropy(full, torch.where(keep, labels, torch.full_like(labels, -100)), ignore_index=-100)
        keep_f = keep.unsqueeze(1).to(full.dtype)
        probs = torch.softmax(full, dim=1) * keep_f
        target = F.one_hot(labels.clamp(min=0), full.shape[1]).permute(0, 3, 1, 2).to(full.dtype) * keep_f
        dice = self.dice(probs, target)
        return self.dice_weight * dice + self.ce_weight * ce, dice.detach(), ce.detach()


def dice_per_class(pred: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-slice, per-class Dice (:func:`TSKDLib.evaluation.metrics.dice`, ``ignore_empty``).

    Parameters
    ----------
    pred, labels:
        ``(N, S, S)`` int64 labelmaps in 0..K (labels may hold -1: treated as background).
    valid:
        ``(N, S, S)`` bool; padding is set to background in both before comparing.

    Returns
    -------
    ``(N, K)`` float Dice; NaN where the class is absent from the reference slice.
    """
    return dice(torch.where(valid, pred, 0), torch.where(valid & (labels > 0), labels, 0), num_classes)


def _nanmean(x: torch.Tensor, dim=None):
    x = x.float()
    mask = ~torch.isnan(x)
    s = torch.where(mask, x, 0).sum(dim) if dim is not None else x[mask].sum()
    n = mask.sum(dim) if dim is not None else mask.sum()
    return s / n.clamp(min=1) if dim is not None else (s / n if n > 0 else torch.tensor(float("nan")))


# -- samples -------------------------------------------------------------------------------------------
class _Samples:
    """Uniform access to training samples.

    Accepts a :class:`TSKDLib.data.case.SliceSet` (tensors), a :class:`TSKDLib.data.dataset.SliceDataset`
    (possibly augmenting) or any sequence of sample dicts with ``image (1,S,S)``,
    ``label (S,S)``, ``valid (S,S)`` and ``labelled``.
    """

    def __init__(self, samples):
        self.samples = samples
        self.tensors = samples if hasattr(samples, "images") and hasattr(samples, "labelled") else None
        base = getattr(samples, "slices", None)
        if self.tensors is None and base is not None and hasattr(base, "images"):
            self.tensors = base  # un-augmented tensors behind a SliceDataset
        self.transform = getattr(samples, "transform", None) if self.tensors is not samples else None

    def __len__(self):
        return len(self.samples)

    def labelled_indices(self) -> list[int]:
        if self.tensors is not None:
            return torch.nonzero(torch.as_tensor(self.tensors.labelled), as_tuple=False).flatten().tolist()
        return [i for i in range(len(self.samples)) if bool(self.samples[i]["labelled"])]

    def raw(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Un-augmented ``images (n,1,S,S), labels (n,S,S), valid (n,S,S)``."""
        if self.tensors is not None:
            i = torch.as_tensor(list(idx), dtype=torch.long)
            t = self.tensors
            return t.images[i].float(), t.labels[i].long(), t.valid[i].bool()
        return self.fetch(idx)

    def fetch(self, idx: Sequence[int], seed: int | None = None):
        """Samples as the dataset yields them (augmented if it augments), stacked."""
        if self.tensors is self.samples:
            return self.raw(idx)
        if seed is not None and self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed)  # deterministic, resumable augmentation
        items = [self.samples[i] for i in idx]
        images = torch.stack([torch.as_tensor(it["image"]).float() for it in items])
        labels = torch.stack([torch.as_tensor(it["label"]).long() for it in items])
        valid = torch.stack([torch.as_tensor(it["valid"]).bool() for it in items])
        return images, labels, valid


def _positions(source: _Samples, idx: Sequence[int]) -> list[tuple[int, int]] | None:
    """``(case, slice)`` of samples ``idx`` when the samples carry them (a SliceSet), else None."""
    t = source.tensors
    if t is None or not hasattr(t, "case_index") or not hasattr(t, "slice_index"):
        return None
    i = torch.as_tensor(list(idx), dtype=torch.long)
    return list(zip(t.case_index[i].tolist(), t.slice_index[i].tolist()))


def far_holdout(labelled: Sequence[int], positions: Sequence[tuple[int, int]] | None, labels: torch.Tensor,
                n_val: int, seed: int) -> list[int]:
    """Choose ``n_val`` validation slices among the labelled ones: those farthest from the other
    labelled slices of their scan, so validation measures the teacher away from its training
    slices (organ ends, other levels) rather than on a neighbour of one (issue 15, item 4).

    Parameters
    ----------
    labelled:
        Sample indices of the labelled slices.
    positions:
        ``(case index, slice index)`` per labelled slice (same order), or None when unknown
        (then the order is random by ``seed``). A slice alone in its scan counts as farthest.
    labels:
        ``(n, S, S)`` int64 labels of those slices (``-1`` unlabelled); a slice is not held out if
        that would leave one of its classes without a training slice.
    n_val:
        How many to hold out (fewer when class coverage forbids more).
    seed:
        Breaks ties between equally far slices (numpy ``default_rng(seed)`` permutation).

    Returns the held-out sample indices, sorted.
    """
    n = len(labelled)
    rank = np.random.default_rng(seed).permutation(n)  # tie-breaker
    if positions is None:
        dist = np.zeros(n)
    else:
        dist = np.array([min((abs(s - s2) for j, (c2, s2) in enumerate(positions) if j != i and c2 == c),
                             default=np.inf) for i, (c, s) in enumerate(positions)])
    order = sorted(range(n), key=lambda i: (-dist[i], rank[i]))
    classes = [set(torch.unique(labels[i]).tolist()) - {-1, 0} for i in range(n)]
    count: dict[int, int] = {}
    for cs in classes:
        for c in cs:
            count[c] = count.get(c, 0) + 1
    held: list[int] = []
    for i in order:
        if len(held) >= n_val:
            break
        if all(count[c] > 1 for c in classes[i]):
            held.append(i)
            for c in classes[i]:
                count[c] -= 1
    return sorted(labelled[i] for i in held)


def _batch_indices(train: list[int], step: int, batch_size: int, seed: int) -> list[int]:
    """Stateless epoch-wise shuffled batches: a pure function of (step, seed), so resuming is exact.

    Under DDP, rank ``r`` of ``W`` asks for the virtual step ``step * W + r``: the W ranks take
    consecutive, disjoint shares of the same epoch-wise permutation (one global batch per step)."""
    n = len(train)
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(train[int(perm[j])])
    return out


class _TeacherLogits(nn.Module):
    """The teacher's trainable forward as one module, so that DDP can wrap it.

    ``forward(x)``: with ``cached``, ``x`` are frozen-encoder embeddings ``(B, 256, 64, 64)`` and
    the result is :meth:`TaskSpecificTeacher.decode` (``(B, K, size, size)`` logits); else ``x``
    are slices ``(B, 1, S, S)`` and the result is ``teacher(x).logits``. Same operations as
    calling the teacher directly, so results do not change on one device.
    """

    def __init__(self, teacher: TaskSpecificTeacher, cached: bool, size: int):
        super().__init__()
        self.teacher, self.cached, self.size = teacher, cached, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached:
            return self.teacher.decode(x, self.size)
        return self.teacher(x).logits


# -- the training loop ----------------------------------------------------------------------------------
@torch.no_grad()
def _encode_all(teacher: TaskSpecificTeacher, images: torch.Tensor, device, batch_size: int = 4) -> torch.Tensor:
    chunks = []
    for i in range(0, images.shape[0], batch_size):
        with autocast_for(device):
            chunks.append(teacher.embed(images[i:i + batch_size].to(device)).float())
    return torch.cat(chunks)


@torch.no_grad()
def _validate(teacher, images, labels, valid, device, embeddings=None, batch_size: int = 4) -> torch.Tensor:
    """Per-slice per-class Dice ``(N, K)`` of the teacher's labelmap on validation slices."""
    teacher.eval()
    preds = []
    for i in range(0, images.shape[0], batch_size):
        with autocast_for(device):
            if embeddings is not None:
                logits = teacher.decode(embeddings[i:i + batch_size], images.shape[-1])
            else:
                logits = teacher(images[i:i + batch_size].to(device)).logits
        preds.append(labelmap(logits.float()).cpu())
    return dice_per_class(torch.cat(preds), labels, valid, teacher.num_classes)


def finetune_teacher(teacher: TaskSpecificTeacher, train_samples, config: TeacherConfig | None = None,
                     progress: ProgressReporter | None = None, work_dir: str | Path | None = None,
                     val_samples=None) -> tuple[TaskSpecificTeacher, dict]:
    """Fine-tune the LoRA adapters and class prompt tokens on the labelled slices.

    Parameters
    ----------
    teacher:
        A :class:`TaskSpecificTeacher` (its ``class_names`` define K).
    train_samples:
        :class:`TSKDLib.data.case.SliceSet`, :class:`TSKDLib.data.dataset.SliceDataset` (MONAI
        augmentations come from it) or a sequence of sample dicts (``image (1,S,S)`` float32
        [0, 1], ``label (S,S)`` int64 -1..K, ``valid (S,S)`` bool, ``labelled`` bool).
        Unlabelled samples are dropped before anything else: they never reach the loss.
    config:
        :class:`TeacherConfig` (default: the paper preset).
    progress:
        Reporter; stage ``teacher`` with ``total = config.steps``; metrics ``loss``,
        ``val_dice``, ``lr``.
    work_dir:
        Folder for the resume checkpoint (``teacher_resume.pt``, written atomically every
        ``checkpoint_every`` steps, :class:`TSKDLib.engine.loop.ResumeFile`). If it holds one from
        the same settings, classes and slices, training continues from it; one from other
        settings or data is a :class:`CheckpointError` naming what changed.
    val_samples:
        Optional explicit validation samples (same forms); default: ``val_fraction`` of the
        labelled training slices, drawn with ``seed``.

    Multi-GPU (``torchrun``, see :mod:`TSKDLib.engine.distributed`): every rank runs this function on
    the same data; the LoRA adapters and prompt tokens are trained through
    :class:`~torch.nn.parallel.DistributedDataParallel` (gradients all-reduced in ``backward``,
    https://pytorch.org/docs/stable/notes/ddp.html). Each rank draws a disjoint share of
    ``batch_size`` slices of every step (effective batch ``world_size * batch_size``); the Dice
    + CE loss is computed per share and DDP averages the gradients. Each rank computes the
    embedding cache and validation Dice itself; rank 0's validation decides best step and early
    stopping for all. Only rank 0 writes ``teacher_resume.pt`` and reports progress; all ranks
    resume from the same file. Without torchrun nothing changes.

    Returns
    -------
    ``(teacher, history)``: the teacher in eval mode holding the best validated weights (or
    the last ones without validation), and a dict with ``loss`` (per step), ``val`` (list of
    ``{"step", "dice", "per_class"}``), ``initial_val_dice`` (before training), ``best_step``,
    ``best_val_dice``, ``stopped_early``,
    ``steps_run``, ``seconds_per_step``, ``cached_embeddings``, ``train_indices``,
    ``val_indices``, ``resumed_from``. ``teacher.validation`` receives the best figures.
    With ``config.refit`` (and held-out slices, no explicit ``val_samples``) the returned teacher
    is the refit on every labelled slice; ``history["refit"]`` is that run's history and
    ``teacher.validation`` adds ``refit_slices`` and ``refit_steps``.

    Raises
    ------
    LabelError
        No labelled slice, or labels outside ``-1..K`` for the teacher's K classes.
    ConfigError
        Invalid settings, or a config whose LoRA settings differ from the teacher's.
    CheckpointError
        A resume file in ``work_dir`` that is unreadable or from other settings or data.

    The loop is :class:`TSKDLib.engine.loop.Trainer` (AdamW, warm-up + cosine, gradient clipping at
    norm 1, autocast on CUDA) with a validation / early-stopping hook and a checkpoint hook.
    """
    config = config or TeacherConfig()
    with cpu_threads(config.threads):
        initial = teacher.trainable_state_dict()
        teacher, history = _TeacherTraining(teacher, config, progress, work_dir).run(train_samples, val_samples)
        if not (config.refit and val_samples is None and history["val_indices"]):
            return teacher, history
        validation = dict(teacher.validation)
        teacher.load_trainable_state_dict(initial)
        refit = _TeacherTraining(teacher, replace(config, val_fraction=0.0), progress, work_dir,
                                 resume_name=REFIT_RESUME_FILE)
        teacher, refit_history = refit.run(train_samples, None)
        teacher.validation = {**validation, "refit_slices": len(refit_history["train_indices"]),
                              "refit_steps": refit_history["steps_run"]}
        return teacher, {**history, "refit": refit_history}


class _TeacherTraining:
    """State of one :func:`finetune_teacher` call: data split, embedding cache, engine, hooks."""

    def __init__(self, teacher: TaskSpecificTeacher, config: TeacherConfig, progress, work_dir,
                 resume_name: str = RESUME_FILE):
        distributed.init(config.device)  # no-op without torchrun or when already initialised
        self.n_ranks, self.rank = distributed.world_size(), distributed.rank()
        self.progress = progress if (progress is not None and distributed.is_main()) else NullProgress()
        if config.lora_settings() != teacher.lora_settings:
            raise ConfigError("the teacher's LoRA settings differ from the training config.",
                              fix="build the teacher with config.lora_settings() (see build_teacher).")
        self.teacher, self.config, self.work_dir, self.resume_name = teacher, config, work_dir, resume_name
        self.device = distributed.device_for(resolve_device(config.device))
        teacher.to(self.device)
        self.loss_fn = MaskedDiceCELoss(config.dice_weight, config.ce_weight)
        self.best_state = None

    # -- data ---------------------------------------------------------------------------------------
    def _split(self, train_samples, val_samples) -> None:
        """Labelled training / validation slices (``val_fraction`` of the labelled ones, by seed)."""
        k, config = self.teacher.num_classes, self.config
        self.source = source = _Samples(train_samples)
        labelled = source.labelled_indices()
        if not labelled:
            raise LabelError("no labelled slice among the teacher's training samples.",
                             fix="label at least one slice (or pass its index as labelled).")
        _, lab_labels, _ = source.raw(labelled)
        if int(lab_labels.max()) > k or int(lab_labels.min()) < -1:
            raise LabelError(f"training labels hold class indices {int(lab_labels.min())}..{int(lab_labels.max())} "
                             f"but the teacher has {k} class(es) {self.teacher.class_names}.",
                             fix="use the same class map for the data and the teacher.")
        self.size = int(lab_labels.shape[-1])
        if val_samples is not None:
            vsrc = _Samples(val_samples)
            self.val_idx = vsrc.labelled_indices()
            self.val_data = vsrc.raw(self.val_idx) if self.val_idx else None
            self.train_idx = list(labelled)
            return
        n_val = int(round(config.val_fraction * len(labelled))) if len(labelled) >= 3 else 0
        self.val_idx = far_holdout(labelled, _positions(source, labelled), lab_labels, n_val, config.seed)
        self.train_idx = sorted(set(labelled) - set(self.val_idx))
        self.val_data = source.raw(self.val_idx) if self.val_idx else None

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; no weight decay on the class prompt tokens."""
        t = self.teacher
        decay = [p for n, p in t.named_parameters() if p.requires_grad and n != "prompt_tokens"]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                  {"params": [t.prompt_tokens], "weight_decay": 0.0}], lr=self.config.lr)

    def _build_cache(self) -> None:
        """Frozen-encoder embeddings of the training views and the validation slices."""
        config, source = self.config, self.source
        views = [source.raw(self.train_idx)]
        for v in range(1, config.cache_views):
            views.append(source.fetch(self.train_idx, seed=config.seed * 7919 + v))
        self.cache = (_encode_all(self.teacher, torch.cat([v[0] for v in views]), self.device),
                      torch.cat([v[1] for v in views]), torch.cat([v[2] for v in views]))
        if self.val_data is not None:
            self.val_emb = _encode_all(self.teacher, self.val_data[0], self.device)

    # -- checkpoint -----------------------------------------------------------------------------------
    def _resume(self, optimizer) -> int:
        """Restore the resume file if there is one; returns the step to start from."""
        identity = {"settings": settings_identity(self.config.to_dict()),
                    "data": {"class_names": list(self.teacher.class_names), "train_slices": self.train_idx,
                             "validation_slices": self.val_idx}}
        path = Path(self.work_dir) / self.resume_name if self.work_dir is not None else None
        self.resume = ResumeFile(path, "teacher", identity)
        state = self.resume.load()
        start = 0
        if state is not None:
            self.teacher.load_trainable_state_dict(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            self.history, self.best_state, start = state["history"], state["best"], state["step"]
            self.plateau = Plateau(**state["plateau"])
            self.history["resumed_from"] = start
            self._scaler_state = state["scaler"]
        self.resume.check_ranks_agree(start)
        return start

    def _payload(self, step: int) -> dict:
        return {"step": step, "trainable": self.teacher.trainable_state_dict(),
                **self.trainer.state_dict(), "rng": torch.get_rng_state(), "history": self.history,
                "best": self.best_state, "plateau": vars(self.plateau)}

    # -- the loop -----------------------------------------------------------------------------------
    def _train_step(self, step: int) -> torch.Tensor:
        config, device = self.config, self.device
        self.teacher.train()
        share = step * self.n_ranks + self.rank  # this rank's share of the global batch (= step on one process)
        positions = _batch_indices(list(range(len(self.train_idx) * self.n_views)), share, config.batch_size,
                                   config.seed)
        if self.cache is not None:
            pos = torch.as_tensor(positions)
            x, labels, valid = (c[pos].to(device) for c in self.cache)
        else:
            idx = [self.train_idx[p] for p in positions]
            x, labels, valid = (t.to(device) for t in self.source.fetch(idx, seed=config.seed * 1_000_033 + share))
        with self.trainer.autocast():
            logits = self.trainer.net(x)
        loss, dice_l, ce_l = self.loss_fn(logits, labels, valid)
        self.parts = torch.stack([loss.detach(), dice_l, ce_l]).float()
        return loss

    def _validate(self) -> tuple[float, torch.Tensor]:
        per_class = _nanmean(_validate(self.teacher, *self.val_data, self.device, embeddings=self.val_emb), dim=0)
        mean = float(_nanmean(per_class))
        if self.n_ranks > 1:  # rank 0's figures decide best step and early stopping on every rank
            mean, per_class = distributed.broadcast((mean, per_class.cpu()))
        return mean, per_class

    def _after_step(self, step: int) -> None:
        """Record the loss, validate when due (best weights, early stopping), report progress."""
        h, config = self.history, self.config
        loss, dice_l, ce_l = (float(v) for v in Trainer.global_mean(self.parts))
        h["loss"].append(loss)
        h["dice_loss"].append(dice_l)
        h["ce_loss"].append(ce_l)
        h["steps_run"] = step
        metrics = {"loss": loss, "lr": self.trainer.lr(step)}
        if self.val_data is not None and (step % config.val_every == 0 or step == config.steps):
            mean, per_class = self._validate()
            h["val"].append({"step": step, "dice": mean, "per_class": per_class.tolist()})
            metrics["val_dice"] = mean
            if self.plateau.observe(mean, step):
                h["best_val_dice"], h["best_step"] = mean, step
                self.best_state = self.teacher.trainable_state_dict()
            if self.plateau.stalled(config.patience):
                h["stopped_early"] = True
                self.trainer.end = step
        self.progress.update(step=step, metrics=metrics)

    def run(self, train_samples, val_samples) -> tuple[TaskSpecificTeacher, dict]:
        config, teacher, progress = self.config, self.teacher, self.progress
        self._split(train_samples, val_samples)
        use_cache = (config.cache_embeddings is not False) and not teacher.adapts_encoder
        if config.cache_embeddings and teacher.adapts_encoder:
            progress.log("teacher: embeddings are not cached because the encoder carries LoRA.", level="warning")
        optimizer = self._optimizer()
        self.history = _new_history(use_cache, self.train_idx, self.val_idx)
        self.plateau, self._scaler_state = Plateau(config.min_delta), None
        start = self._resume(optimizer)
        what = (f"refit on all {len(self.train_idx)} labelled slices" if self.resume_name == REFIT_RESUME_FILE
                else f"{len(self.train_idx)} training / {len(self.val_idx)} validation slices")
        progress.stage_start("teacher", config.steps, message=f"{what}, K={teacher.num_classes}")
        if start:
            progress.update(step=start, message=f"resumed at step {start}")
        end = start if self.history["stopped_early"] else config.steps
        self.cache = self.val_emb = None
        if use_cache and start < end:
            self._build_cache()
        self.n_views = config.cache_views if use_cache else 1
        # Frozen modules stay in eval mode, so their buffers never change: no per-step broadcast.
        self.trainer = Trainer(_TeacherLogits(teacher, self.cache is not None, self.size), optimizer, self.device,
                               lambda step: config.lr * warmup_cosine(step, config.warmup_steps, config.steps),
                               end, clip_grad_norm=1.0, ddp={"broadcast_buffers": False},
                               clip_params=[p for p in teacher.parameters() if p.requires_grad])
        if self._scaler_state:
            self.trainer.scaler.load_state_dict(self._scaler_state)
        if start == 0:
            torch.manual_seed(config.seed)  # LoRA dropout; a resumed run restored the RNG state
            if self.val_data is not None and start < end:  # Dice of the untrained prompts, for reference
                self.history["initial_val_dice"] = self._validate()[0]
        t0 = time.perf_counter()
        save = checkpoint_hook(self.resume, config.checkpoint_every, self._payload, self.trainer)
        step = self.trainer.fit(start, self._train_step, [self._after_step, save])
        if step > start:
            self.history["seconds_per_step"] = (time.perf_counter() - t0) / (step - start)
        return self._finish(step)

    def _finish(self, step: int) -> tuple[TaskSpecificTeacher, dict]:
        """Best validated weights into the teacher, its ``validation`` figures, stage end."""
        teacher, h = self.teacher, self.history
        if self.best_state is not None:
            teacher.load_trainable_state_dict(self.best_state)
        teacher.eval()
        best = next((v for v in h["val"] if v["step"] == h["best_step"]), None)
        teacher.validation = {"n_slices": len(self.val_idx), "best_step": h["best_step"],
                              "mean_dice": h["best_val_dice"],
                              "dice": ({n: d for n, d in zip(teacher.class_names, best["per_class"])} if best else {})}
        self.progress.stage_end({"loss": h["loss"][-1] if h["loss"] else None, "val_dice": h["best_val_dice"],
                                 "steps": step})
        return teacher, h


def _new_history(cached: bool, train_idx: list[int], val_idx: list[int]) -> dict[str, Any]:
    return {"loss": [], "dice_loss": [], "ce_loss": [], "val": [], "initial_val_dice": None, "best_step": None,
            "best_val_dice": None, "stopped_early": False, "steps_run": 0, "seconds_per_step": None,
            "cached_embeddings": cached, "train_indices": train_idx, "val_indices": val_idx, "resumed_from": None}


def build_teacher(class_names: Sequence[str], config: TeacherConfig | None = None) -> TaskSpecificTeacher:
    """Load the configured foundation model and wrap it as a :class:`TaskSpecificTeacher`.

    Raises :class:`~TSKDLib.errors.CheckpointError` / ``LabelError`` / ``ConfigError`` as
    :func:`~TSKDLib.teacher.backbones.load_foundation_model` and :class:`TaskSpecificTeacher`.
    """
    from TSKDLib.teacher.backbones import load_foundation_model

    config = config or TeacherConfig()
    backbone = load_foundation_model(config.backend, config.checkpoint)
    teacher = TaskSpecificTeacher(backbone, class_names, config.lora_settings(), seed=config.seed)
    return teacher.to(resolve_device(config.device))
