"""Quick update: fine-tune the current student on its transfer set plus newly corrected slices.

``tskd update MODEL --image SCAN --labels LABELS --class-map MAP --slices 12,17 --out NEW_MODEL``

The teacher is not touched: the run directory's prepared slices (``prepare/slices.pt``), the
synthetic slices (``synthesis/transfer``, when the run made them) and the teacher-output cache
(``distillation/teacher_cache``) are reused as they are. The corrected slices join the transfer set as
labelled slices; their "teacher" probabilities are the one-hot of the user's labels (labelled
slices are trained on the user's labels anyway, :func:`TSKDLib.distillation.distill.teacher_pseudo_labels`).
The student starts from the current weights (``student.pt`` of the package, or of the run) and
runs a short :func:`TSKDLib.distillation.distill.distill` (``fast`` preset, ``steps`` + ``finetune_steps``,
half of every batch from labelled slices). The result is a new model package (never the input
one) with its Dice on the corrected slices before and after (model grid, per class), and where it
changed the scan's *other* slices (:func:`changes_elsewhere`): nobody has checked those, so the
user is told which to review (on CHAOS MR a "correction" that erased the spleen from one slice,
a defect of the reference labels, lowered the spleen elsewhere, 0.84 -> 0.77; benchmarks/RESULTS.md
section 6, "Eighth pass").

Nothing here changes :mod:`TSKDLib.distillation.distill` or :mod:`TSKDLib.pipeline.run`; it calls their functions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import numpy as np

from TSKDLib.errors import ConfigError, InputError, ModelPackageError

#: a class whose masks from the previous and the updated model agree less than this (Dice) on the
#: slices nobody corrected is reported with the slices that changed most ("review these")
REVIEW_AGREEMENT = 0.95
#: how many of a class's most-changed slices are named
REVIEW_SLICES = 3

#: default length of a quick update (optimiser steps; ~30-60 s on a 2-core CPU at S = 256)
DEFAULT_STEPS = 150
DEFAULT_FINETUNE_STEPS = 40


def find_run(model: str | Path, run: str | Path | None = None) -> tuple[Path, Path | None]:
    """``(run directory, model package or None)`` for a run folder, its ``model/``, or a package
    whose card records its run (``training.run_dir``). Raises :class:`ConfigError` naming the fix."""
    p = Path(model)
    candidates = []
    if run is not None:
        candidates.append(Path(run))
    package = p if (p / "model_card.json").is_file() else (p / "model" if (p / "model" / "model_card.json").is_file()
                                                            else None)
    candidates += [p, p.parent]
    if package is not None:
        try:
            card = json.loads((package / "model_card.json").read_text())
            rd = (card.get("training") or {}).get("run_dir")
            if rd:
                candidates.append(Path(rd))
        except (OSError, json.JSONDecodeError):
            pass
    for c in candidates:
        if (c / "prepare" / "slices.pt").is_file() and (c / "distillation" / "teacher_cache" / "cache.json").is_file():
            return c, package
    raise ConfigError("the training run of this model (prepare/slices.pt and distillation/teacher_cache) was "
                      "not found.", p, "Pass the run folder of the training with --run RUN_DIR (the Slicer "
                      "module keeps runs in its runs folder), or run the full pipeline (tskd train).")


def corrected_slices(card: dict, image: str | Path) -> list[int]:
    """Slices of ``image`` that the quick updates behind a model were given as corrected.

    ``card``: a model card (``training.quick_updates``: one record per :func:`quick_update` in the
    model's history, each with the ``image`` it was given, resolved to an absolute path, and its
    ``slices``). A record counts when its image is the same file or DICOM folder as ``image``
    (``os.path.samefile``; the resolved paths when either is gone). Returns the sorted union of
    their ``slices``: file slice indices along the model's slice axis (a quick update always uses
    the model's axis). ``tskd segment`` does not name these among the slices to check first (the
    user corrected them already; benchmarks/RESULTS.md, section 6, "Eleventh pass")."""
    found: set[int] = set()
    target = Path(image)
    for record in (card.get("training") or {}).get("quick_updates") or []:
        src = record.get("image")
        if not src:
            continue
        try:
            same = os.path.samefile(src, target)
        except OSError:
            same = Path(src).resolve() == target.resolve()
        if same:
            found.update(int(k) for k in record.get("slices") or [])
    return sorted(found)


def _student_weights(package: Path | None, run: Path) -> Path:
    for c in ([package / "student.pt"] if package is not None else []) + [run / "distillation" / "student.pt"]:
        if c.is_file():
            return c
    raise ConfigError("no PyTorch student weights (student.pt) found to update.", run,
                      "Point at the run folder of a finished TSKD training.")


def quick_update(model: str | Path, image: str | Path, labels: str | Path, slices: Sequence[int],
                 out: str | Path, class_map=None, run: str | Path | None = None, axis: str | None = None,
                 steps: int = DEFAULT_STEPS, finetune_steps: int = DEFAULT_FINETUNE_STEPS, device: str = "auto",
                 threads: int | None = None, seed: int = 0, progress=None, overwrite: bool = False) -> dict:
    """Fine-tune the student of ``model`` on its transfer set plus ``slices`` of ``image``/``labels``.

    Parameters
    ----------
    model:
        A model package (a run's ``model/``, a library copy whose card records ``training.run_dir``,
        or a previous quick update) or the run folder.
    image, labels:
        The corrected scan and its labels (any format :func:`TSKDLib.data.case.load_case` reads;
        label values through ``class_map``); only ``slices`` are used (indices along the model's
        slice axis, the file's own slice numbers).
    out:
        Folder of the new model package (refused if it exists, unless ``overwrite``).
    run:
        The training run folder when it cannot be found from ``model``.
    axis:
        Slice axis (default: the model's ``slice_axis``); must equal the model's.
    steps, finetune_steps:
        Optimiser steps of the distillation and supervised phases.

    Returns
    -------
    dict
        ``{"model_dir", "dice_before": {class: Dice}, "dice_after": {...}, "mean_before",
        "mean_after", "slices", "seconds", "steps", "run_dir", "painted_before", "painted_after",
        "changes", "review"}``: Dice and painted pixels on the corrected slices as
        :func:`corrected_slice_scores` (Dice NaN for a class on none of them; the means skip
        NaN); ``changes`` and ``review`` as :func:`changes_elsewhere` on the scan's other slices.

    Raises
    ------
    ConfigError, InputError, ModelPackageError
        Run or weights not found, axis or classes that differ from the model's, no slice.
    """
    from TSKDLib.data.case import SliceSet
    from TSKDLib.distillation.distill import distill
    from TSKDLib.distillation.student import load_student

    t0 = time.monotonic()
    run_dir, package = find_run(model, run)
    out = _free_output(Path(out), overwrite)
    card, model_axis = _read_card(package, run_dir, axis)
    slices = sorted(set(int(s) for s in slices))
    if not slices:
        raise InputError("no corrected slice given.", labels, "List the slices you corrected with --slices.")
    base = SliceSet.load(run_dir / "prepare" / "slices.pt")
    names = list(base.class_map.names)
    case, new, norm = _corrected_slices(image, labels, slices, class_map, card, base, model_axis)
    base_factors, factor, medians = _update_intensities(run_dir, card, case, norm, base)
    base, new = base.with_intensity_factors(base_factors), new.with_intensity_factors([factor])
    ext, ext_cache = _extended_transfer(run_dir, base, new, len(names))

    student = load_student(_student_weights(package, run_dir))
    dice_before, painted_before = corrected_slice_scores(student, new.images, new.labels, names)
    elsewhere = _Elsewhere(case, base.size, norm, names, student, factor)  # the previous model on the other slices
    res = distill(ext, _update_config(steps, finetune_steps, seed, device, threads), ext_cache, student=student,
                  progress=progress, validation=(new.images.float(), new.labels))
    updated = res.model.eval().cpu()
    dice_after, painted_after = corrected_slice_scores(updated, new.images, new.labels, names)
    changes, review = elsewhere.report(updated)

    record = {"image": str(Path(image).resolve()), "slices": slices, "steps": int(steps), "finetune_steps": int(finetune_steps),
              "dice_before": dice_before, "dice_after": dice_after, "painted_before": painted_before,
              "painted_after": painted_after, "changes": changes, "review": review,
              "from": card.get("name"), "seconds": round(time.monotonic() - t0, 1),
              **({"intensity_factor": round(factor, 4)} if factor != 1.0 else {})}
    _write_package(updated, out, _with_scan_intensities(card, medians, image), base, run_dir, model_axis,
                   record, overwrite)
    mean = (lambda d: float(np.nanmean(list(d.values()))) if d and not all(np.isnan(list(d.values()))) else None)
    return {"model_dir": str(out), "dice_before": dice_before, "dice_after": dice_after,
            "mean_before": mean(dice_before), "mean_after": mean(dice_after), "slices": slices,
            "seconds": time.monotonic() - t0, "steps": int(steps) + int(finetune_steps),
            "run_dir": str(run_dir), "changes": changes, "review": review, "painted_before": painted_before,
            "painted_after": painted_after}


def _free_output(out: Path, overwrite: bool) -> Path:
    """``out``; RunExistsError when it exists and ``overwrite`` is not given."""
    if out.exists() and not overwrite:
        from TSKDLib.errors import RunExistsError

        raise RunExistsError("output model package exists and would be overwritten.", out,
                             "Choose another --out folder or pass --overwrite.")
    return out


def _update_intensities(run_dir: Path, card: dict, case, norm, base) -> tuple[list[float], float, dict]:
    """``(base factors, factor, medians)``: the intensity standardisation of a quick update.

    A run whose student learnt intensity-standardised scans (its ``distillation/summary.json``
    records ``intensity_factors``, one per scan of ``base``; ``DistillConfig.standardize``) is
    updated the same way: its scans get their training factors again, and the corrected scan
    the factor that brings its class medians on the corrected slices
    (:func:`TSKDLib.deploy.inference.case_class_intensities`) to the card's reference
    (:attr:`TSKDLib.deploy.inference.ModelPackage.intensity_reference`;
    :func:`TSKDLib.deploy.inference.intensity_factor`, every factor applied), as ``tskd segment``
    scales it. ``medians``: those medians after the factor (``{class name: median}``; {} for CT,
    2D images or cards without ``standardize``). Older runs: factors 1.0 and the medians as they
    are (the model then learns the scan as it is)."""
    from TSKDLib.deploy.inference import (
        case_class_intensities,
        intensity_factor,
        reference_intensities,
        standardized_medians,
    )

    std = (card.get("normalization") or {}).get("standardize")
    medians = case_class_intensities(case, norm) if isinstance(std, dict) else {}
    summary_path = run_dir / "distillation" / "summary.json"
    try:
        recorded = (json.loads(summary_path.read_text()).get("metrics") or {}).get("intensity_factors")
    except (OSError, json.JSONDecodeError):
        recorded = None
    if not isinstance(recorded, list) or len(recorded) != len(base.case_names):
        return [1.0] * len(base.case_names), 1.0, medians
    names = list(base.class_map.names)
    reference = reference_intensities(std.get("class_medians") or [], names) if isinstance(std, dict) else {}
    measured = {names.index(k) + 1: float(v) for k, v in medians.items() if k in names and float(v) > 0}
    factor = intensity_factor(reference, measured, tolerance=1.0) if reference and measured else 1.0
    return [float(f) for f in recorded], factor, standardized_medians([medians], [factor])[0]


def _with_scan_intensities(card: dict, medians: dict, image) -> dict:
    """The card with the corrected scan among the intensity standardisation's landmarks: its
    class medians on the corrected slices (``medians``, :func:`_update_intensities`) are added to
    ``normalization.standardize.class_medians``, replacing those of an earlier update of the same
    file. The model has now learnt that scan (standardised, for runs that standardise their scans),
    so the reference it is standardised to includes it
    (:attr:`TSKDLib.deploy.inference.ModelPackage.intensity_reference`). Unchanged for cards
    without ``standardize``."""
    normalization = dict(card.get("normalization") or {})
    std = normalization.get("standardize")
    if not medians or not isinstance(std, dict):
        return card
    key = str(Path(image).resolve())
    per_scan = list(std.get("class_medians") or [])
    scans = list(std.get("scans") or [])
    scans += [""] * (len(per_scan) - len(scans))
    if key in scans:
        i = scans.index(key)
        per_scan[i] = medians
    else:
        per_scan.append(medians)
        scans.append(key)
    normalization["standardize"] = {**std, "class_medians": per_scan, "scans": scans[:len(per_scan)]}
    return {**card, "normalization": normalization}


def _read_card(package: Path | None, run_dir: Path, axis: str | None) -> tuple[dict, str]:
    """``(model card, model slice axis)``; ConfigError when ``axis`` is given and differs."""
    card_path = (package or run_dir / "model") / "model_card.json"
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"model card unreadable ({exc}).", card_path,
                                "Point at a complete model package or run folder.") from None
    model_axis = card.get("slice_axis", "acquisition")
    if axis is not None and axis != model_axis:
        raise ConfigError(f"--axis {axis} differs from the model's slice axis {model_axis}.", card_path,
                          f"Use --axis {model_axis} (the slice numbers are along that axis).")
    return card, model_axis


def _corrected_slices(image, labels, slices: list[int], class_map, card: dict, base, model_axis: str):
    """``(case, new, normalization)``: the scan as a :class:`~TSKDLib.data.case.Case` (``slices``
    flagged labelled), its corrected slices as a :class:`~TSKDLib.data.case.SliceSet` on the
    model's grid (``base.size``) and the model's normalisation. InputError when the classes differ
    from the model's or no slice holds a label."""
    from TSKDLib.data.case import load_case, prepare_slices
    from TSKDLib.data.preprocess import Normalization

    names = list(base.class_map.names)
    case = load_case(image, labels, class_map or {"classes": card["classes"]}, classes=names,
                     labelled_slices=slices, axis=model_axis, require_labels=False)
    if list(case.class_map.names) != names:
        raise InputError(f"the labels have classes {case.class_map.names}, the model {names}.", labels,
                         "Use the model's class names in the class map (same classes, same order).")
    known = {f.name for f in fields(Normalization)}
    norm = Normalization(**{k: v for k, v in (card.get("normalization") or {}).items() if k in known})
    new = prepare_slices([case], base.size, norm, only_labelled=True)
    if len(new) == 0:
        raise InputError("none of the given slices holds a label.", labels, "Check --slices.")
    return case, new, norm


def _update_config(steps: int, finetune_steps: int, seed: int, device: str, threads: int | None):
    """The ``fast`` distillation settings of a quick update (no feature term: the corrected slices
    have no teacher embedding; no wall-clock cap; no checkpoint; evidence may end it after
    ``min(steps, 100)`` steps whatever the transfer set's size: ``min_epochs`` off)."""
    from TSKDLib.distillation.distill import DistillConfig

    return DistillConfig.preset("fast", steps=int(steps), finetune_steps=int(finetune_steps),
                                min_steps=min(int(steps), 100), min_epochs=0.0, max_seconds=None, w_feat=0.0,
                                lr=1e-3, warmup_steps=min(20, max(int(steps) // 5, 1)), seed=seed,
                                device=device, threads=threads, checkpoint_every=10**9)


class _Elsewhere:
    """The slices of the corrected scan that nobody corrected (model grid, the model's
    normalisation) and the previous student's labels there, taken before the update trains it."""

    def __init__(self, case, size: int, norm, names: Sequence[str], previous_model, factor: float = 1.0):
        from TSKDLib.data.case import prepare_case_slices
        from TSKDLib.distillation.distill import predict_labels

        flags = case.labelled if case.labelled is not None else np.zeros(case.num_slices, bool)
        rest = [i for i in range(case.num_slices) if not flags[i]]
        self.names = list(names)
        self.file_slices = [case.frame.frame_to_file_slice(i) for i in rest]
        # the scan's intensities as the update trains on them (:func:`_update_intensities`)
        self.images = (prepare_case_slices(case, size, norm, rest)[0] * factor).clamp(0, 1) if rest else None
        self.previous = predict_labels(previous_model, self.images) if rest else None

    def report(self, updated_model) -> tuple[dict, dict]:
        """``(changes, review)``: :func:`changes_elsewhere` of the previous and the updated model,
        and ``{class: slices}`` for the classes that agree less than :data:`REVIEW_AGREEMENT`."""
        from TSKDLib.distillation.distill import predict_labels

        if self.images is None:
            return {}, {}
        changes = changes_elsewhere(self.previous, predict_labels(updated_model, self.images), self.file_slices,
                                    self.names)
        review = {n: c["slices"] for n, c in changes.items() if c["agreement"] < REVIEW_AGREEMENT and c["slices"]}
        return changes, review


def corrected_slice_scores(model, images, labels, names: Sequence[str]) -> tuple[dict, dict]:
    """How a student does on the corrected slices (model grid).

    ``images (n, 1, S, S)`` in [0, 1] and ``labels (n, S, S)`` class indices ``0..K``. Returns
    ``(dice, painted)``: per class name, the Dice over the n slices pooled
    (:func:`TSKDLib.evaluation.metrics.dice_scores`; NaN where the class is on none of them), and
    the pixels the model gives the class on those slices whose labels hold none of it (what a
    correction that erases an organ asks the model to stop painting)."""
    from TSKDLib.distillation.distill import predict_labels
    from TSKDLib.evaluation.metrics import dice_scores

    pred = predict_labels(model, images.float())
    dice = dice_scores(pred, labels, len(names))["per_class"]
    painted = {}
    for k, name in enumerate(names, start=1):
        absent = ~(labels == k).flatten(1).any(1)
        painted[name] = int((pred[absent] == k).sum())
    return dict(zip(names, [float(v) for v in dice])), painted


def changes_elsewhere(previous, updated, file_slices: Sequence[int], names: Sequence[str]) -> dict:
    """Where an update changed a scan's segmentation outside the slices the user corrected.

    Parameters
    ----------
    previous, updated:
        ``(n, S, S)`` class indices ``0..K`` of the previous and the updated model on the same
        slices (model grid), in slice order.
    file_slices:
        ``(n,)`` the file's own slice numbers of those slices (along the model's slice axis).
    names:
        The K class names.

    Returns
    -------
    dict
        ``{name: {"agreement", "changed_pixels", "slices"}}``: Dice between the class's masks of
        the two models over the n slices (1.0 when neither paints it), the pixels that changed
        class membership, and up to :data:`REVIEW_SLICES` file slice numbers with the most change
        (most first; only slices that changed). The references are unknown there, so this says
        *where* to look, not whether the change is right.
    """
    import torch

    previous, updated = torch.as_tensor(previous), torch.as_tensor(updated)
    out = {}
    for k, name in enumerate(names, start=1):
        a, b = previous == k, updated == k
        total = int(a.sum() + b.sum())
        agreement = 2.0 * int((a & b).sum()) / total if total else 1.0
        per_slice = (a ^ b).flatten(1).sum(1)
        order = [int(i) for i in torch.argsort(per_slice, descending=True, stable=True)[:REVIEW_SLICES]
                 if int(per_slice[i]) > 0]
        out[name] = {"agreement": round(agreement, 4), "changed_pixels": int(per_slice.sum()),
                     "slices": [int(file_slices[i]) for i in order]}
    return out


def _extended_transfer(run_dir: Path, base, new, num_classes: int):
    """The run's transfer set (``base``, its prepared slices, + synthetic slices) and teacher cache, extended by the
    corrected slices ``new`` (labelled; their "teacher" probabilities are the one-hot labels).
    ConfigError when the run's cache does not match its transfer set."""
    import torch

    from TSKDLib.distillation.distill import TeacherCache, TransferSet

    synthetic = None
    state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").is_file() else {}
    if (state.get("stages") or {}).get("synthesis", {}).get("done") and (run_dir / "synthesis" / "transfer").is_dir():
        from TSKDLib.synthesis import SyntheticTransferSet

        synthetic = SyntheticTransferSet.load(run_dir / "synthesis" / "transfer").images
    transfer = TransferSet.build(base, synthetic)
    cache = TeacherCache.load(run_dir / "distillation" / "teacher_cache")
    if len(cache) != len(transfer) or cache.probs is None:
        raise ConfigError(f"the run's teacher cache ({len(cache)} slices) does not match its transfer set "
                          f"({len(transfer)}).", run_dir / "distillation" / "teacher_cache",
                          "Run the full pipeline again (tskd train) to rebuild the teacher outputs.")
    k1 = num_classes + 1
    onehot = np.zeros((len(new), k1) + tuple(new.labels.shape[1:]), np.float16)
    lab = new.labels.numpy().clip(0)
    for c in range(k1):
        onehot[:, c] = lab == c
    ext_cache = TeacherCache(np.concatenate([np.asarray(cache.probs), onehot]), None, None)
    case_offset = int(transfer.case_index.max()) + 1 if len(transfer) else 0
    ext = TransferSet(torch.cat([transfer.images, new.images.float()]),
                      torch.cat([transfer.labels, new.labels]),
                      torch.cat([transfer.valid, new.valid]),
                      torch.cat([transfer.labelled, torch.ones(len(new), dtype=torch.bool)]),
                      torch.cat([transfer.synthetic, torch.zeros(len(new), dtype=torch.bool)]),
                      transfer.num_classes,
                      torch.cat([transfer.case_index, new.case_index + case_offset]),
                      torch.cat([transfer.slice_index, new.slice_index]))
    return ext, ext_cache


def _write_package(updated, out: Path, card: dict, base, run_dir: Path, model_axis: str, record: dict,
                   overwrite: bool) -> None:
    """Export the updated student as a new model package at ``out`` (card: the previous card's
    training/teacher entries, ``training.quick_updates`` + ``record``, ``validation.quick_update_dice``)
    and keep its PyTorch weights (``student.pt``, checksummed in the card) for the next update."""
    from TSKDLib.data.io import atomic_write
    from TSKDLib.deploy.export import export_model_package, sha256_file
    from TSKDLib.distillation.student import save_student

    training = dict(card.get("training") or {})
    training["run_dir"] = str(run_dir.resolve())
    training["quick_updates"] = list(training.get("quick_updates") or []) + [record]
    validation = dict(card.get("validation") or {})
    validation["quick_update_dice"] = {"before": record["dice_before"], "after": record["dice_after"],
                                       "slices": record["slices"]}
    export_model_package(updated, out, base.class_map, card.get("normalization") or {},
                         input_size=int(card.get("input_size", base.size)),
                         slice_axis=model_axis, name=f"{card.get('name') or 'model'} (updated)",
                         training=training, validation=validation, teacher=card.get("teacher") or {},
                         torchscript=False, overwrite=overwrite, acquisition=card.get("acquisition") or {},
                         postprocessing=card.get("postprocessing"))
    save_student(updated, out / "student.pt")
    new_card = json.loads((out / "model_card.json").read_text())
    new_card["files"]["student.pt"] = sha256_file(out / "student.pt")
    text = json.dumps(new_card, indent=1)
    atomic_write(out / "model_card.json", lambda tmp: tmp.write_text(text), overwrite=True)
