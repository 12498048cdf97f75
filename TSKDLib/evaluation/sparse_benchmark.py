"""Sparse-slice benchmark for 3D scans (``tskd benchmark --protocol sparse-slices``).

How a radiologist spreads a few labels: per class, the slices at 25, 50 and 75 % of its extent
along the slice axis (``--slices-per-class 3``; in general ``(i + 1) / (n + 1)`` for i < n), and
every class is labelled on every chosen slice. Each method then learns from exactly those labels:

- ``fill_between``: Slicer's "Fill between slices" (ITK morphological contour interpolation,
  :mod:`TSKDLib.evaluation.interpolation`); no training, scored within the scan only;
- ``teacher``: the LoRA fine-tuned foundation model;
- ``scratch``, ``task_agnostic``, ``tskd_nosyn``, ``tskd``: the student, trained by
  :func:`TSKDLib.distillation.distill.distill` at the same budget (see :mod:`TSKDLib.evaluation.benchmark`).

Scores, per class, Dice and HD95 (mm):

- ``within``: on the same scan, every *unlabelled* slice, pooled as one volume; also split into
  ``between`` (strictly between the scan's first and last labelled slice) and ``outside``;
- ``other``: on every slice of each held-out scan, after training on one scan (one experiment per
  training scan) or on several (``--train-groups``).

Each model's prediction is also scored after the 3D clean-up ``tskd segment`` applies by default
(islands under 50 mm^3 removed, holes filled, components under a fifth of the largest removed
for the classes the training run finds to be one object: :func:`TSKDLib.distillation.distill.single_object_classes`),
as method ``<method>+post``: what the user gets from the exported model. For percentile-normalised
scans (MR) ``+post`` also includes ``tskd segment``'s intensity standardisation: a scan whose
classes come out darker or brighter than in the training scans' labelled slices is predicted
again with its intensities scaled (:func:`TSKDLib.deploy.inference.intensity_factor`).

One experiment = (training scans, seed). Its teacher, teacher outputs and prepared slices are kept
in ``WORK/`` (``--work-dir``), so a rerun with other distillation settings reuses them (the
teacher is the slow part on a CPU). HD95 on the unlabelled slices is computed on the volume with
the labelled slices blanked in both prediction and reference (their voxel spacing kept).

Data: ``../shared/data/chaos_mr_t2_dev`` (CHAOS MR T2, non-commercial licence: benchmarks only),
and the bundled TotalSegmentator MR/CT.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from TSKDLib.data.preprocess import FittedNormalization, Normalization
from TSKDLib.errors import ConfigError, LabelError
from TSKDLib.evaluation.metrics import dice_hd95, summarise_seeds
from TSKDLib.pipeline.progress import ProgressReporter

SPARSE_METHODS = ("fill_between", "teacher", "scratch", "task_agnostic", "tskd_nosyn", "tskd")
REGIONS = ("within", "between", "outside", "other")


def sparse_slice_indices(label_slices: np.ndarray, num_classes: int, per_class: int = 3) -> list[int]:
    """The slices a radiologist would label: per class, ``per_class`` slices evenly inside its extent.

    Parameters
    ----------
    label_slices:
        ``(N, H, W)`` reference class indices ``0..K`` along the slice axis (axis 0).
    per_class:
        Slices per class, at fractions ``(i + 1) / (per_class + 1)`` of the class's extent
        (first to last slice holding it); 3 gives 25, 50 and 75 %.

    Returns the sorted distinct slice indices (a class absent from the scan contributes none).
    """
    if per_class < 1:
        raise ConfigError("--slices-per-class must be at least 1.")
    flat = label_slices.reshape(label_slices.shape[0], -1)
    chosen: set[int] = set()
    for c in range(1, num_classes + 1):
        z = np.flatnonzero((flat == c).any(1))
        if len(z) == 0:
            continue
        for i in range(per_class):
            f = (i + 1) / (per_class + 1)
            chosen.add(int(round(z[0] + f * (z[-1] - z[0]))))
    return sorted(chosen)


def region_masks(num_slices: int, labelled: Sequence[int]) -> dict[str, np.ndarray]:
    """``(N,)`` bool masks of the unlabelled slices: ``within`` (all), ``between`` (strictly
    between the first and last labelled slice) and ``outside`` (the rest)."""
    lab = np.zeros(num_slices, bool)
    lab[list(labelled)] = True
    idx = np.arange(num_slices)
    lo, hi = (min(labelled), max(labelled)) if len(labelled) else (0, -1)
    between = ~lab & (idx > lo) & (idx < hi)
    return {"within": ~lab, "between": between, "outside": ~lab & ~between}


def score_regions(pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing: Sequence[float],
                  masks: dict[str, np.ndarray]) -> dict[str, dict[int, dict[str, float]]]:
    """Dice/HD95 per class on each region: slices outside the region are blanked in both volumes.

    ``pred``, ``ref``: ``(N, H, W)`` class indices; ``spacing``: mm along ``(N, H, W)``."""
    out = {}
    for name, m in masks.items():
        if not m.any():
            continue
        p, r = pred.copy(), ref.copy()
        p[~m] = 0
        r[~m] = 0
        out[name] = dice_hd95(p, r, num_classes, spacing)
    return out


@dataclass
class SparseConfig:
    """Settings of the sparse-slice benchmark (see the module docstring)."""

    methods: list[str] = field(default_factory=lambda: ["fill_between", "teacher", "scratch", "tskd_nosyn"])
    seeds: list[int] = field(default_factory=lambda: [0])
    per_class: int = 3
    train_groups: list[list[int]] | None = None  # indices into the scans; default: each scan alone
    preset: str = "fast"
    size: int = 256
    teacher: dict = field(default_factory=dict)
    synthesis: dict = field(default_factory=dict)
    distillation: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    device: str = "auto"
    work_dir: str | None = None
    other_scans: bool = True  # score on the held-out scans too
    teacher_other: bool = True  # ... also the teacher there (slow on a CPU: ~2-3 s per slice)


def _with_sparse_labels(case, per_class: int):
    from TSKDLib.data.case import with_labelled

    lab = case.label_slices()
    picks = sparse_slice_indices(lab, case.class_map.num_classes, per_class)
    if not picks:
        raise LabelError("no class of the task appears in this scan.", case.labels_path,
                         "Check the class map and the label file.")
    flags = np.zeros(case.num_slices, bool)
    flags[picks] = True
    return with_labelled(case, flags), picks


def _spacing(case) -> tuple[float, float, float]:
    """mm along the canonical slice stack ``(N, H, W)`` of an axial case."""
    sx, sy, sz = case.canonical_image.GetSpacing()
    return (sz,) + case.slice_spacing()


def _proba_to_labels(probs, resizer) -> np.ndarray:
    import torch
    return resizer.from_model(torch.as_tensor(probs).float(), "bilinear").argmax(1).to(torch.uint8).numpy()


def _predict(proba: Callable, case, size: int, normalization=None) -> np.ndarray:
    from TSKDLib.data.case import predict_case

    return predict_case(proba, case, size, normalization)


def _training_medians(train_cases) -> list[dict]:
    """``{class name: median}`` per training scan, on its labelled slices, as ``tskd train``
    records them (:func:`TSKDLib.deploy.inference.case_class_intensities`); {} for CT."""
    from TSKDLib.deploy.inference import case_class_intensities

    return [case_class_intensities(c, Normalization.for_modality(c.modality, c.image_slices()))
            for c in train_cases]


def _intensity_reference(train_cases, names) -> dict[int, float]:
    """What ``tskd train`` records for the intensity standardisation, from the training scans'
    labelled slices (:func:`_training_medians`), combined as
    :attr:`TSKDLib.deploy.inference.ModelPackage.intensity_reference` combines them; {} for CT.
    Students that learn the scans standardised replace it (:func:`_standardized_slices`)."""
    from TSKDLib.deploy.inference import reference_intensities

    return reference_intensities(_training_medians(train_cases), names)


@dataclass
class _ScaledNormalization(Normalization):
    """A normalisation whose normalised intensities are multiplied by ``factor`` (``hi`` becomes
    ``lo + (hi - lo) / factor``, as :func:`TSKDLib.deploy.inference.standardized_range`)."""

    factor: float = 1.0

    def fit(self, volume: np.ndarray) -> FittedNormalization:
        f = super().fit(volume)
        return FittedNormalization(f.lo, f.lo + (f.hi - f.lo) / self.factor)


class _Experiment:
    """One (training scans, seed): prepared slices, the teacher and its outputs, kept in ``work``."""

    def __init__(self, cases: list, seed: int, cfg: SparseConfig, work: Path | None, progress):
        from TSKDLib.pipeline.config import PipelineConfig

        self.cases, self.seed, self.cfg, self.work, self.progress = cases, seed, cfg, work, progress
        # the figures measure each method at its step budget, not the speed of a (shared) machine:
        # the distillation's wall-clock cap is off unless the config sets one
        distillation = {"max_seconds": None, **cfg.distillation}
        pc = PipelineConfig(preset=cfg.preset, teacher=cfg.teacher, synthesis=cfg.synthesis,
                            distillation=distillation, student=cfg.student, device=cfg.device, seed=seed)
        pc.data.images = ["-"]
        pc.data.size = cfg.size
        self.stage = pc.stage_configs()
        self._slices = self._teacher = self._cache = None
        self.timings: dict[str, float] = {}

    def _timed(self, name, fn):
        t0 = time.monotonic()
        r = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - t0
        return r

    @property
    def slices(self):
        if self._slices is None:
            from TSKDLib.data.case import SliceSet, normalization_kind, prepare_slices
            p = self.work / "slices.pt" if self.work else None
            if p is not None and p.is_file():
                self._slices = SliceSet.load(p)
                if self._slices.intensity is None:  # saved before SliceSet.intensity existed
                    self._slices.intensity = normalization_kind(self.cases)
            else:
                self._slices = prepare_slices(self.cases, self.cfg.size)
                if p is not None:
                    self._slices.save(p)
        return self._slices

    @property
    def teacher(self):
        if self._teacher is None:
            from TSKDLib.teacher import build_teacher, finetune_teacher, load_teacher, save_teacher
            tdir = self.work / "teacher" if self.work else None
            if tdir is not None and (tdir / "teacher.json").is_file():
                self._teacher = load_teacher(tdir, device=self.stage["teacher"].device
                                             if self.stage["teacher"].device != "auto" else "cpu")
            else:
                from TSKDLib.data.dataset import SliceDataset
                tcfg = self.stage["teacher"]
                t = build_teacher(self.slices.class_map.names, tcfg)
                t, history = self._timed("teacher_finetune", lambda: finetune_teacher(
                    t, SliceDataset(self.slices.labelled_subset(), augment=True, seed=self.seed), tcfg))
                if tdir is not None:
                    save_teacher(t, tdir, tcfg, history)
                self._teacher = t
            self._teacher.eval()
        return self._teacher

    @property
    def cache(self):
        if self._cache is None:
            from TSKDLib.distillation.distill import TransferSet, build_teacher_cache
            transfer = TransferSet.build(self.slices)
            d = self.work / "teacher_cache" if self.work else None
            self._cache = self._timed("teacher_cache", lambda: build_teacher_cache(
                self.teacher, transfer.images, directory=d))
        return self._cache

    def teacher_proba_for_case(self, ci: int) -> Callable:
        """The teacher's cached probabilities of training case ``ci``, as a slice-batch function."""
        import torch
        sel = (self.slices.case_index == ci).nonzero().flatten().numpy()
        probs = self.cache.probs[sel]
        state = {"i": 0}

        def proba(x):
            i = state["i"]
            state["i"] += len(x)
            return torch.from_numpy(np.asarray(probs[i:i + len(x)], dtype=np.float32))
        return proba


def run_sparse_benchmark(scans: list, cfg: SparseConfig, out: str | Path,
                         progress: ProgressReporter | None = None, name: str = "scans") -> dict:
    """Run the sparse-slice protocol; write ``results.csv``, ``results.md``, ``dice_per_organ.png``.

    Parameters
    ----------
    scans:
        :class:`TSKDLib.data.case.Case` objects with *complete* reference labels (axial slicing).
    cfg:
        :class:`SparseConfig`.

    Returns ``{"rows": [...], "summary": {...}}``; rows have ``dataset, method, train, seed, case,
    region, class, dice, hd95``.
    """
    import torch

    from TSKDLib.evaluation.benchmark import start_run

    progress, out = start_run(cfg.methods, SPARSE_METHODS, progress, out)
    sparse = [_with_sparse_labels(c, cfg.per_class) for c in scans]
    groups = cfg.train_groups or [[i] for i in range(len(scans))]
    rows: list[dict] = []
    timings: dict[str, list[float]] = {}
    progress.stage_start("sparse-slice benchmark", len(groups) * len(cfg.seeds))
    done = 0
    for group in groups:
        tests = [sparse[i][0] for i in range(len(scans)) if i not in group] if cfg.other_scans else []
        for seed in cfg.seeds:
            torch.manual_seed(seed)
            scorer = _Scorer(name, [sparse[i] for i in group], tests, seed, cfg, rows, scans[0].class_map)
            work = Path(cfg.work_dir) / f"{scorer.group_name}_seed{seed}" if cfg.work_dir else None
            if work is not None:
                work.mkdir(parents=True, exist_ok=True)
            ex = _Experiment(scorer.train_cases, seed, cfg, work, progress)
            _run_methods(ex, scorer, cfg, out, timings)
            for key, v in ex.timings.items():
                timings.setdefault(key, []).append(v)
            done += 1
            progress.update(done, message=f"{scorer.group_name} seed {seed}")
            _write(out, rows, timings, name)
    progress.stage_end({})
    return {"rows": rows, "summary": summarise_sparse(rows)}


class _Scorer:
    """Scores one (training scans, seed) experiment into ``rows``: by region on the training
    scans (:func:`score_regions`), whole-scan on the other scans (region ``other``)."""

    def __init__(self, dataset: str, train: list[tuple], tests: list, seed: int, cfg: SparseConfig, rows: list,
                 class_map):
        self.train_cases = [c for c, _ in train]
        self.picks = {c.name: p for c, p in train}
        self.group_name = "+".join(c.name for c in self.train_cases)
        self.dataset, self.tests, self.seed, self.cfg, self.rows = dataset, tests, seed, cfg, rows
        self.k, self.names = class_map.num_classes, class_map.names
        self.post_classes: tuple[int, ...] | None = None  # set: also score "<method>+post"
        self.locations: dict[int, tuple] = {}  # the one-object classes' training locations (x, y, radius)
        self.intensity_reference: dict[int, float] = {}  # class -> training scans' median intensity

    def _post(self, pred: np.ndarray, case) -> np.ndarray:
        """``tskd segment``'s default 3D clean-up of a ``(N, H, W)`` prediction."""
        from TSKDLib.deploy.inference import Cleanup, cleanup_labels
        return cleanup_labels(pred, self.k, _spacing(case), Cleanup.segment_default(self.post_classes,
                                                                                     locations=self.locations),
                              case.frame.frame_geometry(case.image))

    def set_post(self, classes) -> None:
        """Score ``<method>+post`` with these one-object classes, located where ``tskd train``
        records them: the mean over the training scans of their labelled voxels' centres."""
        from TSKDLib.deploy.inference import class_locations_lps, mean_class_locations
        self.post_classes = tuple(classes)
        self.locations = mean_class_locations(
            [class_locations_lps(c.label_slices(), c.frame.frame_geometry(c.image), self.post_classes,
                                 self.picks[c.name]) for c in self.train_cases], self.post_classes)
        self.intensity_reference = _intensity_reference(self.train_cases, self.names)

    def add(self, method: str, case, region: str, scores: dict) -> None:
        for cls, s in scores.items():
            self.rows.append({"dataset": self.dataset, "method": method, "train": self.group_name,
                              "seed": self.seed, "case": case.name, "region": region,
                              "class": self.names[cls - 1], **s})

    def within(self, method: str, predict_case_fn: Callable, proba: Callable | None = None) -> None:
        """``predict_case_fn(ci, case) -> (N, H, W)`` labels of training case ``ci``; ``proba``:
        the model's slice-batch probability function when it can be run again on rescaled
        intensities (``+post``'s standardisation; None for cached outputs)."""
        for ci, case in enumerate(self.train_cases):
            pred = predict_case_fn(ci, case)
            masks = region_masks(case.num_slices, self.picks[case.name])
            for name, p in self._variants(method, pred, case, proba):
                for region, scores in score_regions(p, case.label_slices(), self.k, _spacing(case), masks).items():
                    self.add(name, case, region, scores)

    def other(self, method: str, proba: Callable) -> None:
        """``proba``: a slice-batch probability function, run on each other scan."""
        for case in self.tests:
            for name, p in self._variants(method, _predict(proba, case, self.cfg.size), case, proba):
                self.add(name, case, "other", dice_hd95(p, case.label_slices(), self.k, _spacing(case)))

    def _variants(self, method: str, pred: np.ndarray, case, proba: Callable | None = None) -> list[tuple[str, np.ndarray]]:
        """The raw prediction, and (models only, when ``post_classes`` is set) what ``tskd
        segment`` makes of it by default, scored as ``<method>+post``: the intensity
        standardisation (when ``proba`` is given) and the clean-up."""
        if self.post_classes is None or method == "fill_between":
            return [(method, pred)]
        return [(method, pred), (f"{method}+post", self._post(self._standardized(pred, case, proba), case))]

    def _standardized(self, pred: np.ndarray, case, proba: Callable | None) -> np.ndarray:
        """``pred``, or the prediction of ``proba`` on ``case`` with its normalised intensities
        scaled as :func:`TSKDLib.deploy.inference.segment_image` scales them: by
        :func:`~TSKDLib.deploy.inference.intensity_factor` of the classes' medians under ``pred``
        against :attr:`intensity_reference` (percentile-normalised 3D scans only)."""
        from TSKDLib.deploy.inference import (
            INTENSITY_MIN_MM3,
            class_intensity_medians,
            intensity_factor,
        )

        raw = case.image_slices()
        norm = Normalization.for_modality(case.modality, raw)
        if proba is None or not self.intensity_reference or norm.kind != "percentile" or raw.shape[0] < 2:
            return pred
        fitted = norm.fit(raw)
        measured = class_intensity_medians(raw, pred, fitted.lo, fitted.hi, self.intensity_reference,
                                           min_voxels=math.ceil(INTENSITY_MIN_MM3 / math.prod(_spacing(case))))
        factor = intensity_factor(self.intensity_reference, measured)
        if factor == 1.0:
            return pred
        return _predict(proba, case, self.cfg.size, _ScaledNormalization(**norm.to_dict(), factor=factor))


def _run_methods(ex: _Experiment, scorer: _Scorer, cfg: SparseConfig, out: Path, timings: dict) -> None:
    """Fill between slices, the teacher and each student method of ``cfg.methods`` on one
    experiment; scores them and writes each distillation's summary JSON to ``out``. The tables are
    rewritten after each method, so a run stopped part-way keeps the methods it finished."""
    from TSKDLib.distillation.distill import TransferSet, distill, method_config
    from TSKDLib.evaluation.benchmark import task_agnostic_cache, student_proba
    from TSKDLib.evaluation.interpolation import fill_between_slices

    if "fill_between" in cfg.methods:
        scorer.within("fill_between", lambda ci, case: fill_between_slices(case.label_slices(),
                                                                             scorer.picks[case.name]))
    dcfg = ex.stage["distillation"]
    if set(cfg.methods) & {"teacher", "task_agnostic", "tskd_nosyn", "tskd"}:  # one-object classes, as training finds them
        from TSKDLib.distillation.distill import single_object_classes, teacher_pseudo_labels
        info = teacher_pseudo_labels(ex.cache.probs, TransferSet.build(ex.slices), dcfg.pseudo_threshold)[1]
        scorer.set_post(single_object_classes(info))
    if "teacher" in cfg.methods:
        scorer.within("teacher", lambda ci, case: _predict(ex.teacher_proba_for_case(ci), case, cfg.size))
        if cfg.teacher_other:
            scorer.other("teacher", lambda x: ex.teacher.predict_proba(x))
        _write(out, scorer.rows, timings, scorer.dataset)
    students = set(cfg.methods) & {"scratch", "task_agnostic", "tskd_nosyn", "tskd"}
    student_slices = _standardized_slices(ex, scorer, dcfg.standardize) if students else None
    for method in ("scratch", "task_agnostic", "tskd_nosyn", "tskd"):
        if method not in cfg.methods:
            continue
        transfer = TransferSet.build(student_slices)
        cache = None if method == "scratch" else ex.cache
        if method == "task_agnostic":  # the pre-trained (not fine-tuned) encoder's embeddings
            cache = task_agnostic_cache(ex.teacher, ex.cache, TransferSet.build(ex.slices), ex.stage["teacher"],
                                        ex._timed, {})
        if method == "tskd":
            transfer, cache = _with_synthesis(ex, transfer, cache, student_slices)
        t0 = time.monotonic()
        res = distill(transfer, method_config("tskd" if method.startswith("tskd") else method, dcfg),
                      cache, student=ex.stage["student"])
        timings.setdefault(f"distill_{method}", []).append(time.monotonic() - t0)
        proba = student_proba(res.model)
        scorer.within(method, lambda ci, case: _predict(proba, case, cfg.size), proba)
        scorer.other(method, proba)
        summary = {k: res.metrics.get(k) for k in ("steps", "distill_steps", "planned_steps", "evidence_after",
                                                    "seconds", "stopped_by", "final_check")}
        (out / f"distill_{scorer.group_name}_seed{ex.seed}_{method}.json").write_text(
            json.dumps(summary, indent=1, default=str))
        _write(out, scorer.rows, timings, scorer.dataset)


def _standardized_slices(ex: _Experiment, scorer: _Scorer, setting: bool | None):
    """The slices the students learn from, as ``tskd train`` gives them: each training scan's
    intensities multiplied by its factor (:func:`TSKDLib.deploy.inference.training_intensity_factors`,
    unless ``setting`` (``DistillConfig.standardize``) is False); the students' ``+post`` then
    standardises scans to the standardised medians (:attr:`_Scorer.intensity_reference`)."""
    from TSKDLib.deploy.inference import (
        reference_intensities,
        standardized_medians,
        training_intensity_factors,
    )

    if setting is False:
        return ex.slices
    per_scan = _training_medians(scorer.train_cases)  # read once: the factors and the reference
    factors = training_intensity_factors(per_scan, scorer.names)
    scorer.intensity_reference = reference_intensities(standardized_medians(per_scan, factors), scorer.names)
    return ex.slices.with_intensity_factors(factors)


def _with_synthesis(ex: _Experiment, transfer, cache, slices):
    """The transfer set with the synthetic slices (generated from, and labelled by the teacher
    on, the slices as prepared) appended to the students' ``slices``, and the teacher cache
    extended to them."""
    import tempfile

    from TSKDLib.evaluation.benchmark import with_synthetic_outputs
    from TSKDLib.distillation.distill import TransferSet
    from TSKDLib.synthesis import run_synthesis
    scfg = replace(ex.stage["synthesis"], seed=ex.seed)
    d = ex.work / "synthesis" if ex.work else Path(tempfile.mkdtemp(prefix="tskd-sparse-syn-"))
    syn = ex._timed("synthesis", lambda: run_synthesis(ex.slices, ex.teacher.predict_proba, d, scfg))
    full = TransferSet.build(slices, syn.images)
    if len(full) == len(transfer):
        return transfer, cache
    return full, with_synthetic_outputs(ex.teacher, cache, full.images[len(transfer):])


def summarise_sparse(rows: list[dict]) -> dict:
    """``{(method, region, class or 'mean'): {"dice_mean", "dice_std", "hd95_mean", "n", ...}}``
    (:func:`TSKDLib.evaluation.metrics.summarise_seeds`).

    Per seed, the Dice is averaged over experiments and cases (a class absent from prediction and
    reference does not count); mean and std are then taken over seeds."""
    acc: dict[tuple, dict[int, list]] = {}
    for r in rows:
        for cls in (r["class"], "mean"):
            acc.setdefault((r["method"], r["region"], cls), {}).setdefault(r["seed"], []).append(r)
    return summarise_seeds(acc)


def _write(out: Path, rows: list[dict], timings: dict, name: str) -> None:
    if not rows:
        return
    from TSKDLib.data.io import write_csv
    from TSKDLib.deploy.export import tool_versions

    write_csv(out / "results.csv", rows)
    s = summarise_sparse(rows)
    classes = list(dict.fromkeys(r["class"] for r in rows))
    methods = [m + post for m in SPARSE_METHODS for post in ("", "+post") if any(k[0] == m + post for k in s)]
    lines = [f"# {name}: sparse-slice benchmark", "",
             "`+post`: as `tskd segment` segments with the exported model by default: the intensity "
             "standardisation (percentile-normalised scans) and the 3D clean-up.", ""]
    for region in REGIONS:
        if not any(k[1] == region for k in s):
            continue
        lines += [f"## {region}", "", "| method | " + " | ".join(classes) + " | mean Dice | mean HD95 mm |",
                  "|---|" + "---|" * (len(classes) + 2)]
        for m in methods:
            if (m, region, "mean") not in s:
                continue
            cells = []
            for c in classes + ["mean"]:
                v = s.get((m, region, c))
                cells.append("" if v is None or math.isnan(v["dice_mean"]) else
                             f"{v['dice_mean']:.3f}" + (f" ± {v['dice_std']:.3f}" if v["seeds"] > 1 else ""))
            hd = s[(m, region, "mean")]["hd95_mean"]
            cells.append("n/a" if math.isnan(hd) else f"{hd:.1f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("seconds (mean per experiment): " + json.dumps({k: round(float(np.mean(v)), 1)
                                                                for k, v in timings.items()}))
    lines += ["", "tools: " + json.dumps(tool_versions())]  # students differ between torch versions
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        regions = [r for r in ("within", "other") if any(k[1] == r for k in s)]
        fig, axes = plt.subplots(1, len(regions), figsize=(6 * len(regions), 4), squeeze=False)
        for ax, region in zip(axes[0], regions):
            width = 0.8 / max(len(methods), 1)
            for j, m in enumerate(methods):
                vals = [s.get((m, region, c), {}).get("dice_mean", math.nan) for c in classes + ["mean"]]
                errs = [s.get((m, region, c), {}).get("dice_std", 0.0) for c in classes + ["mean"]]
                ax.bar(np.arange(len(vals)) + j * width, vals, width, yerr=errs, label=m, capsize=2)
            ax.set_xticks(np.arange(len(classes) + 1) + 0.4 - width / 2)
            ax.set_xticklabels(classes + ["mean"], rotation=20)
            ax.set_ylim(0, 1)
            ax.set_ylabel("Dice")
            ax.set_title(f"{name}: {region}")
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "dice_per_organ.png", dpi=90)
        plt.close(fig)
    except Exception as exc:  # the tables are already written
        import warnings
        warnings.warn(f"plot not written: {exc}")
