"""Quick update: fine-tune the current student on its transfer set plus newly corrected slices.

``tskd update MODEL --image SCAN --labels LABELS --class-map MAP --slices 12,17 --out NEW_MODEL``

The teacher is not touched: the run directory's prepared slices (``prepare/slices.pt``), the
synthetic slices (``synthesis/transfer``, when the run made them) and the teacher-output cache
(``distillation/teacher_cache``) are reused as they are. The corrected slices join the transfer set as
labelled slices; their "teacher" probabilities are the one-hot of the user's labels (labelled
slices are trained on the user's labels anyway, :func:`TSKDLib.distill.teacher_pseudo_labels`).
The student starts from the current weights (``student.pt`` of the package, or of the run) and
runs a short :func:`TSKDLib.distill.distill` (``fast`` preset, ``steps`` + ``finetune_steps``,
half of every batch from labelled slices). The result is a new model package (never the input
one) with its Dice on the corrected slices before and after (model grid, per class).

Nothing here changes :mod:`TSKDLib.distill` or :mod:`TSKDLib.pipeline`; it calls their functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, InputError, ModelPackageError

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
        The corrected scan and its labels (any format :func:`TSKDLib.case.load_case` reads;
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
        "mean_after", "slices", "seconds", "steps", "run_dir"}``: Dice on the corrected slices at
        the model's input grid (``(S, S)`` after resize), classes absent from both prediction and
        labels count as 1.

    Raises
    ------
    ConfigError, InputError, ModelPackageError
        Run or weights not found, axis or classes that differ from the model's, no slice.
    """
    import torch

    from .case import SliceSet, load_case, prepare_slices
    from .distill import DistillConfig, TeacherCache, TransferSet, distill, evaluate_dice
    from .export import export_model_package, sha256_file
    from .preprocess import Normalization
    from .student import load_student, save_student

    t0 = time.monotonic()
    run_dir, package = find_run(model, run)
    out = Path(out)
    if out.exists() and not overwrite:
        from .errors import RunExistsError

        raise RunExistsError("output model package exists and would be overwritten.", out,
                             "Choose another --out folder or pass --overwrite.")
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
    slices = sorted(set(int(s) for s in slices))
    if not slices:
        raise InputError("no corrected slice given.", labels, "List the slices you corrected with --slices.")
    base = SliceSet.load(run_dir / "prepare" / "slices.pt")
    names = list(base.class_map.names)
    case = load_case(image, labels, class_map or {"classes": card["classes"]}, classes=names,
                     labelled_slices=slices, axis=model_axis, require_labels=False)
    if list(case.class_map.names) != names:
        raise InputError(f"the labels have classes {case.class_map.names}, the model {names}.", labels,
                         "Use the model's class names in the class map (same classes, same order).")
    norm_dict = card.get("normalization") or {}
    known = {f.name for f in fields(Normalization)}
    norm = Normalization(**{k: v for k, v in norm_dict.items() if k in known})
    new = prepare_slices([case], base.size, norm, only_labelled=True)
    if len(new) == 0:
        raise InputError("none of the given slices holds a label.", labels, "Check --slices.")

    # transfer set + cache of the run, extended by the corrected slices
    synthetic = None
    state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").is_file() else {}
    if (state.get("stages") or {}).get("synthesis", {}).get("done") and (run_dir / "synthesis" / "transfer").is_dir():
        from .synthesis import SyntheticTransferSet

        synthetic = SyntheticTransferSet.load(run_dir / "synthesis" / "transfer").images
    transfer = TransferSet.build(base, synthetic)
    cache = TeacherCache.load(run_dir / "distillation" / "teacher_cache")
    if len(cache) != len(transfer) or cache.probs is None:
        raise ConfigError(f"the run's teacher cache ({len(cache)} slices) does not match its transfer set "
                          f"({len(transfer)}).", run_dir / "distillation" / "teacher_cache",
                          "Run the full pipeline again (tskd train) to rebuild the teacher outputs.")
    k1 = len(names) + 1
    onehot = np.zeros((len(new), k1) + tuple(new.labels.shape[1:]), np.float16)
    lab = new.labels.numpy().clip(0)
    for c in range(k1):
        onehot[:, c] = lab == c
    probs = np.concatenate([np.asarray(cache.probs), onehot])
    ext_cache = TeacherCache(probs, None, None)
    case_offset = int(transfer.case_index.max()) + 1 if len(transfer) else 0
    ext = TransferSet(torch.cat([transfer.images, new.images.float()]),
                      torch.cat([transfer.labels, new.labels]),
                      torch.cat([transfer.valid, new.valid]),
                      torch.cat([transfer.labelled, torch.ones(len(new), dtype=torch.bool)]),
                      torch.cat([transfer.synthetic, torch.zeros(len(new), dtype=torch.bool)]),
                      transfer.num_classes,
                      torch.cat([transfer.case_index, new.case_index + case_offset]),
                      torch.cat([transfer.slice_index, new.slice_index]))

    weights = _student_weights(package, run_dir)
    student = load_student(weights)
    before = evaluate_dice(student, new.images.float(), new.labels, num_classes=len(names))
    cfg = DistillConfig.preset("fast", steps=int(steps), finetune_steps=int(finetune_steps),
                               min_steps=min(int(steps), 100), max_seconds=None, w_feat=0.0,
                               lr=1e-3, warmup_steps=min(20, max(int(steps) // 5, 1)), seed=seed,
                               device=device, num_threads=threads, checkpoint_every=10**9)
    res = distill(ext, cfg, ext_cache, student=student, progress=progress,
                  validation=(new.images.float(), new.labels))
    updated = res.model.eval().cpu()
    after = evaluate_dice(updated, new.images.float(), new.labels, num_classes=len(names))

    dice_before = dict(zip(names, [float(v) for v in before["per_class"]]))
    dice_after = dict(zip(names, [float(v) for v in after["per_class"]]))
    training = dict(card.get("training") or {})
    training["run_dir"] = str(run_dir.resolve())
    history = list(training.get("quick_updates") or [])
    history.append({"image": str(image), "slices": slices, "steps": int(steps), "finetune_steps": int(finetune_steps),
                    "dice_before": dice_before, "dice_after": dice_after,
                    "from": card.get("name"), "seconds": round(time.monotonic() - t0, 1)})
    training["quick_updates"] = history
    validation = dict(card.get("validation") or {})
    validation["quick_update_dice"] = {"before": dice_before, "after": dice_after, "slices": slices}
    export_model_package(updated, out, base.class_map, norm_dict, input_size=int(card.get("input_size", base.size)),
                         slice_axis=model_axis, name=f"{card.get('name') or 'model'} (updated)",
                         training=training, validation=validation, teacher=card.get("teacher") or {},
                         torchscript=False, overwrite=overwrite, acquisition=card.get("acquisition") or {})
    # keep the PyTorch weights in the package (checksummed like the rest), for the next update
    save_student(updated, out / "student.pt")
    new_card = json.loads((out / "model_card.json").read_text())
    new_card["files"]["student.pt"] = sha256_file(out / "student.pt")
    tmp = out / "model_card.json.tmp"
    tmp.write_text(json.dumps(new_card, indent=1))
    tmp.replace(out / "model_card.json")
    mean = (lambda d: float(np.mean(list(d.values()))) if d else None)
    return {"model_dir": str(out), "dice_before": dice_before, "dice_after": dice_after,
            "mean_before": mean(dice_before), "mean_after": mean(dice_after), "slices": slices,
            "seconds": time.monotonic() - t0, "steps": int(steps) + int(finetune_steps),
            "run_dir": str(run_dir)}
