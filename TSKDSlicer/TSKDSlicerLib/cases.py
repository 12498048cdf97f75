"""Training cases from the scene to a run folder (MRML + files; no Qt, no ``slicer.app``).

Moved out of the module's logic so it runs on a ``slicer-core`` scene in CI. A case is
``(volumeNode, segmentationNode, segmentIds, slices)``:

- the user's own labels: every slice (along the training axis) holding a label counts as
  labelled, plus ``slices`` = slices marked as all background;
- a model's prediction (see :func:`TSKDSlicerLib.mrml_io.mark_prediction`): *only* ``slices``,
  the slices a person checked or corrected, count; a prediction is never paired with another
  volume (:func:`TSKDSlicerLib.mrml_io.check_training_labels`).

Labels that do not look drawn slice by slice along the training axis (another plane, 3D tools)
raise :class:`LabelPlaneWarning` unless the caller confirmed (``accept_label_warnings``).
"""

from __future__ import annotations

import os

from . import labels, mrml_io, training

AXIS_NAMES_BY_RAS = {0: "sagittal", 1: "coronal", 2: "axial"}


class LabelPlaneWarning(ValueError):
    """The labels look drawn in another plane or with 3D tools; ``problems`` lists why."""

    def __init__(self, problems: list[str]):
        super().__init__("\n\n".join(problems))
        self.problems = problems


def slice_axis(volumeNode, orientation: str = "acquisition") -> int:
    """numpy axis of ``arrayFromVolume`` holding ``orientation`` slices (the backend's rule)."""
    dims = volumeNode.GetImageData().GetDimensions() if volumeNode.GetImageData() else None
    return labels.slice_axis_for(mrml_io.ijk_to_ras(volumeNode), orientation, size=dims,
                                 spacing=volumeNode.GetSpacing())


def axis_names(volumeNode) -> dict:
    """``{numpy axis: "axial"/"coronal"/"sagittal"}`` for messages (dominant RAS direction)."""
    import numpy as np
    m = mrml_io.ijk_to_ras(volumeNode)[:3, :3]
    out = {}
    for column in range(3):  # IJK column -> numpy axis 2 - column
        out[2 - column] = AXIS_NAMES_BY_RAS[int(np.argmax(np.abs(m[:, column])))]
    return out


def case_labelled_slices(volumeNode, segmentationNode, segmentIds, slices, orientation="acquisition",
                         array=None) -> list[int]:
    """The slices of one case that count as labelled (see the module docstring)."""
    if mrml_io.is_prediction(segmentationNode):
        return sorted(set(int(s) for s in slices))
    axis = slice_axis(volumeNode, orientation)
    if array is None:
        array = mrml_io.segments_to_label_array(segmentationNode, segmentIds, volumeNode)
    return labels.effective_labelled_slices(array, axis, slices)


def prepare_training_request(cases, run_dir: str, preset: str = "fast", device: str = "auto",
                             advanced: dict | None = None, orientation: str = "acquisition",
                             accept_label_warnings: bool = False) -> training.TrainRequest:
    """Export each case into ``run_dir/inputs/case_NNN`` and write the run's request.

    Raises ``ValueError`` (no case, no labelled slice, different segments per case),
    :class:`TSKDSlicerLib.mrml_io.MRMLIOError` (prediction misuse, export failure) and
    :class:`LabelPlaneWarning` (unless ``accept_label_warnings``) before anything is started.
    """
    if not cases:
        raise ValueError("No training case.")
    first_names = mrml_io.segment_names(cases[0][1], cases[0][2])
    images, label_files, specs, explicit, class_map = [], [], [], False, ""
    problems: list[str] = []
    for n, (vol, seg, ids, slices) in enumerate(cases):
        if not vol or not seg or not ids:
            raise ValueError(f"Case {n + 1}: select a volume, its labels and at least one segment.")
        names = mrml_io.segment_names(seg, ids)
        if names != first_names:
            raise ValueError(f"Case {n + 1}: segments {names} differ from {first_names}.")
        slices = [int(s) for s in slices]
        mrml_io.check_training_labels(vol, seg, slices)
        out = mrml_io.export_training_inputs(vol, seg, ids, os.path.join(run_dir, "inputs", f"case_{n:03d}"))
        axis = slice_axis(vol, orientation)
        prediction = mrml_io.is_prediction(seg)
        if prediction:
            labelled = sorted(set(slices))  # a prediction counts only where a person checked it
            n_slices = out["array"].shape[axis]
            if any(not 0 <= s < n_slices for s in labelled):
                raise ValueError(f"{vol.GetName()}: checked slices must be in 0..{n_slices - 1}.")
        else:
            labelled = labels.effective_labelled_slices(out["array"], axis, slices)
            if not accept_label_warnings:
                problems += [f"{vol.GetName()}: {p}" for p in
                             labels.label_plane_problems(out["array"], axis, axis_names(vol))]
        if not labelled:
            raise ValueError(f"{vol.GetName()}: no labelled slice. Draw at least one slice.")
        class_map = class_map or out["class_map"]
        images.append(out["image"])
        label_files.append(out["labels"])
        specs.append(labels.labelled_slices_spec(labelled))
        explicit = explicit or bool(slices)
    if problems:
        raise LabelPlaneWarning(problems)
    # Explicit slices when the user listed slices (then for every image, as the backend wants one
    # spec per image); otherwise the backend's default (slices holding a label) is the same.
    request = training.TrainRequest(run_dir=run_dir, images=images, labels=label_files,
                                    labelled_slices=specs if explicit else [], preset=preset, device=device,
                                    advanced=advanced or {}, class_map=class_map,
                                    classes={str(i + 1): n for i, n in enumerate(first_names)},
                                    axis=orientation)
    request.write()
    return request
