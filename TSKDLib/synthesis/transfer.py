"""Teacher labelling of synthetic slices and the on-disk synthetic transfer set.

TS-KD (Liang et al., arXiv 2503.06976, Sec. 3) enlarges the distillation transfer set with
diffusion-generated images pseudo-labelled by the fine-tuned teacher. Synthetic slices carry the
teacher's *soft* probabilities for distillation and are never ground truth: converted to a
:class:`~TSKDLib.data.case.SliceSet` they are unlabelled (labels ``-1``, ``labelled`` False).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from TSKDLib.data.case import SliceSet
from TSKDLib.data.classmap import ClassMap
from TSKDLib.errors import ConfigError, ModelPackageError
from TSKDLib.data.io import atomic_dir

FORMAT = "tskd-synthetic-transfer"
FORMAT_VERSION = 1
#: Teacher callable: ``images (B, 1, S, S) float32 in [0, 1] -> probabilities (B, K+1, S, S)``
#: summing to 1 over the class axis (e.g. ``class_probabilities(teacher(images).logits)``).
TeacherProba = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Confidence and labelling
# ------------------------------------------------------------------------------------------------
def teacher_confidence(probs: torch.Tensor, region_threshold: float = 0.05) -> dict[str, torch.Tensor]:
    """Per-slice certainty of the teacher's labelling.

    The statistics are taken over the *structure region* ``U = {1 - p_background >= 0.05}``
    (predicted structures and their uncertain borders), because over the whole slice the easy
    background dominates any mean; a slice with an empty ``U`` is judged over all pixels (a
    confident "nothing here").

    Parameters
    ----------
    probs: ``(B, K+1, H, W)`` class probabilities (class axis 1, background first).

    Returns
    -------
    dict of ``(B,)`` float32 tensors: ``confidence`` (mean max-probability over ``U``, in
    ``[1/(K+1), 1]``), ``entropy`` (mean entropy over ``U`` divided by ``log(K+1)``, in ``[0, 1]``),
    ``foreground_fraction`` (fraction of pixels whose argmax is a structure).
    """
    p = probs.float()
    k1 = p.shape[1]
    maxp = p.max(1).values
    ent = -(p.clamp_min(1e-8).log() * p).sum(1) / math.log(max(k1, 2))
    region = (1 - p[:, 0]) >= region_threshold
    empty = ~region.flatten(1).any(1)
    region = region | empty[:, None, None]
    w = region.float()
    denom = w.flatten(1).sum(1)
    conf = (maxp * w).flatten(1).sum(1) / denom
    entropy = (ent * w).flatten(1).sum(1) / denom
    fg = (p.argmax(1) > 0).float().flatten(1).mean(1)
    return {"confidence": conf, "entropy": entropy.clamp(0, 1), "foreground_fraction": fg}


@torch.no_grad()
def label_images(images: torch.Tensor, teacher_proba: TeacherProba, num_classes: int,
                 batch_size: int = 8) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Label slices with the teacher.

    Parameters
    ----------
    images: ``(M, 1, S, S)`` float32 in ``[0, 1]``.
    teacher_proba: callable ``(B, 1, S, S) -> (B, K+1, S, S)`` probabilities (any device; the result
        is moved to the CPU).
    num_classes: K.

    Returns ``(probabilities (M, K+1, S, S) float16, stats)`` with ``stats`` from
    :func:`teacher_confidence` (computed on the float32 probabilities).

    Raises :class:`ConfigError` if the teacher returns the wrong shape or non-probabilities.
    """
    out, stats = [], {"confidence": [], "entropy": [], "foreground_fraction": []}
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        p = teacher_proba(x)
        p = p.detach().float().cpu()
        want = (x.shape[0], num_classes + 1, x.shape[-2], x.shape[-1])
        if tuple(p.shape) != want:
            raise ConfigError(f"teacher returned probabilities of shape {tuple(p.shape)}; expected {want} "
                              "(B, K+1, S, S).", fix="Pass a callable returning class_probabilities(logits).")
        s = p.sum(1)
        if not torch.isfinite(p).all() or (s - 1).abs().max() > 1e-2 or p.min() < -1e-4:
            raise ConfigError("teacher output is not a probability map (must be >= 0 and sum to 1 "
                              "over the class axis).", fix="Apply class_probabilities() to the logits.")
        for k, v in teacher_confidence(p).items():
            stats[k].append(v)
        out.append(p.half())
    probs = torch.cat(out) if out else torch.zeros(0, num_classes + 1, *images.shape[-2:], dtype=torch.float16)
    return probs, {k: (torch.cat(v) if v else torch.zeros(0)) for k, v in stats.items()}


class IntensityTeacher:
    """A deterministic, non-learned stand-in teacher: per-class Gaussian intensity model.

    Fitted on the labelled slices of a :class:`SliceSet` (class mean/std of intensity and class
    frequency), it returns ``softmax(log prior_k + log N(x; mu_k, sd_k))`` smoothed with a 5x5 mean
    filter: ``(B, 1, S, S) -> (B, K+1, S, S)``. For tests and benchmarks when no fine-tuned
    teacher is at hand; it is not a segmentation model.
    """

    def __init__(self, slices: SliceSet):
        lab = slices.labelled_subset()
        if len(lab) == 0:
            raise ConfigError("IntensityTeacher needs labelled slices.")
        x = lab.images[:, 0]
        y = lab.labels
        K = slices.class_map.num_classes
        mu, sd, prior = [], [], []
        for k in range(K + 1):
            v = x[(y == k) & lab.valid]
            if v.numel() < 2:
                v = x[lab.valid]
                prior.append(1e-3)
            else:
                prior.append(v.numel() / float(lab.valid.sum()))
            mu.append(float(v.mean()))
            sd.append(max(float(v.std()), 0.02))
        self.mu = torch.tensor(mu).view(1, -1, 1, 1)
        self.sd = torch.tensor(sd).view(1, -1, 1, 1)
        self.logprior = torch.tensor(prior).log().view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(images.float(), 5, 1, 2, count_include_pad=False)
        ll = -0.5 * ((x - self.mu) / self.sd) ** 2 - self.sd.log() + self.logprior
        return torch.softmax(ll, 1)


# ------------------------------------------------------------------------------------------------
# The transfer set
# ------------------------------------------------------------------------------------------------
@dataclass
class SyntheticTransferSet:
    """Teacher-labelled synthetic slices for distillation (TS-KD stage 2).

    Attributes
    ----------
    images: ``(M, 1, S, S)`` float32 in ``[0, 1]`` (the data layer's normalised intensity space).
    probabilities: ``(M, K+1, S, S)`` float16 teacher class probabilities (class axis 1,
        background first), summing to 1 over the class axis. Soft targets, never ground truth.
    confidence: ``(M,)`` float32 teacher confidence (:func:`teacher_confidence`).
    manifest: JSON-able dict: ``format``, ``format_version``, ``size``, ``num_classes``,
        ``class_map``, ``filter`` (thresholds and counts), ``config``, ``items`` (one per slice:
        ``index``, ``source`` = "diffusion", ``seed``, ``sample_index``, ``confidence``,
        ``entropy``, ``foreground_fraction``, ``condition`` = the real label map it was conditioned
        on ``{"case", "slice"}`` or None, ``condition_dice``), ``dropped`` (same, for slices the
        filter removed).

    Loading with ``mmap=True`` (default) maps the arrays from disk, so distillation can stream a
    large set; ``ds[i]`` returns one slice.
    """

    images: torch.Tensor
    probabilities: torch.Tensor
    confidence: torch.Tensor
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        m = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must be (M, 1, S, S); got {tuple(self.images.shape)}.")
        if self.probabilities.shape[0] != m or self.probabilities.shape[-2:] != self.images.shape[-2:]:
            raise ValueError(f"probabilities {tuple(self.probabilities.shape)} do not match images "
                             f"{tuple(self.images.shape)}.")
        if self.confidence.shape != (m,):
            raise ValueError(f"confidence must be ({m},); got {tuple(self.confidence.shape)}.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict:
        """``{"image": (1,S,S) float32, "probabilities": (K+1,S,S) float32, "confidence": float}``."""
        return {"image": torch.as_tensor(self.images[i]).float(),
                "probabilities": torch.as_tensor(self.probabilities[i]).float(),
                "confidence": float(self.confidence[i])}

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        """K (foreground classes)."""
        return int(self.probabilities.shape[1]) - 1

    @property
    def class_map(self) -> ClassMap | None:
        cm = self.manifest.get("class_map")
        return ClassMap.from_json_dict(cm) if cm else None

    def teacher_labels(self) -> torch.Tensor:
        """Argmax of the teacher probabilities, ``(M, S, S)`` int64 (pseudo-labels, not ground truth)."""
        return torch.as_tensor(self.probabilities).argmax(1)

    # -- SliceSet view ---------------------------------------------------------------------------
    def to_slice_set(self, class_map: ClassMap | None = None) -> SliceSet:
        """The synthetic slices as an *unlabelled* :class:`SliceSet`.

        ``labels`` are ``-1`` everywhere and ``labelled`` False, so no supervised loss can use a
        synthetic slice as ground truth; ``valid`` is all True (generated images have no padding
        mask); ``case_names == ["synthetic"]``, ``case_index`` 0, ``slice_index`` = position in
        this set. Raises :class:`ConfigError` without a class map."""
        cm = class_map or self.class_map
        if cm is None:
            raise ConfigError("the transfer set has no class map; pass class_map.")
        m, s = len(self), self.size
        return SliceSet(images=torch.as_tensor(self.images).float().clone(),
                        labels=torch.full((m, s, s), -1, dtype=torch.int64),
                        valid=torch.ones(m, s, s, dtype=torch.bool),
                        labelled=torch.zeros(m, dtype=torch.bool),
                        case_index=torch.zeros(m, dtype=torch.int64),
                        slice_index=torch.arange(m, dtype=torch.int64),
                        class_map=cm, case_names=["synthetic"], subjects=["synthetic"])

    def concat_to(self, real: SliceSet) -> SliceSet:
        """``real`` followed by the synthetic slices (unlabelled; case ``"synthetic"`` appended,
        its ``case_index`` = ``len(real.case_names)``). Raises :class:`ConfigError` if sizes or
        classes differ."""
        if real.size != self.size:
            raise ConfigError(f"real slices are {real.size} px, synthetic {self.size} px.")
        if self.class_map is not None and real.class_map.names != self.class_map.names:
            raise ConfigError(f"real classes {real.class_map.names} differ from synthetic "
                              f"{self.class_map.names}.")
        syn = self.to_slice_set(real.class_map)
        ci = len(real.case_names)
        return SliceSet(images=torch.cat([real.images, syn.images]),
                        labels=torch.cat([real.labels, syn.labels]),
                        valid=torch.cat([real.valid, syn.valid]),
                        labelled=torch.cat([real.labelled, syn.labelled]),
                        case_index=torch.cat([real.case_index, syn.case_index + ci]),
                        slice_index=torch.cat([real.slice_index, syn.slice_index]),
                        class_map=real.class_map, case_names=list(real.case_names) + ["synthetic"],
                        subjects=list(real.subjects) + ["synthetic"], intensity=real.intensity)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``images.npy``, ``probabilities.npy``, ``confidence.npy``, ``manifest.json``
        atomically (built in ``<dir>.tmp-<pid>``, then renamed over any previous set)."""
        directory = Path(directory)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.manifest,
                    "count": len(self), "size": self.size, "num_classes": self.num_classes}
        with atomic_dir(directory) as tmp:  # full disk / permission: one line, previous set kept
            np.save(tmp / "images.npy", np.ascontiguousarray(torch.as_tensor(self.images).float().numpy()))
            np.save(tmp / "probabilities.npy",
                    np.ascontiguousarray(torch.as_tensor(self.probabilities).half().numpy()))
            np.save(tmp / "confidence.npy", np.ascontiguousarray(torch.as_tensor(self.confidence).float().numpy()))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "SyntheticTransferSet":
        """Read a set written by :meth:`save`; ``mmap`` maps the arrays (copy-on-write) instead of
        reading them. Raises :class:`ModelPackageError` for a missing/corrupt/unknown-format set."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelPackageError(f"synthetic transfer set manifest unreadable ({exc}).", directory,
                                    "Re-run the synthesis stage.") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ModelPackageError(f"not a {FORMAT} v{FORMAT_VERSION} folder.", directory,
                                    "Re-run the synthesis stage with this TSKD version.")
        mode = "c" if mmap else None
        try:
            arrays = [np.load(directory / f"{n}.npy", mmap_mode=mode)
                      for n in ("images", "probabilities", "confidence")]
        except (OSError, ValueError) as exc:
            raise ModelPackageError(f"synthetic transfer set arrays unreadable ({exc}).", directory,
                                    "Re-run the synthesis stage.") from None
        images, probs, conf = (torch.from_numpy(a) for a in arrays)
        if images.shape[0] != manifest.get("count"):
            raise ModelPackageError("synthetic transfer set arrays and manifest disagree.", directory,
                                    "Re-run the synthesis stage.")
        return cls(images, probs, conf, manifest)
