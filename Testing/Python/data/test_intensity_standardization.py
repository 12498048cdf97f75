"""Intensity standardisation of MR scans (``tskd segment``'s second pass), on the real bundled MR.

A fluid-bright lesion raises a scan's 99.5th percentile, so percentile normalisation darkens
every organ (CHAOS scan 36, benchmarks/RESULTS.md, section 6, thirteenth pass). The factor that
:func:`TSKDLib.deploy.inference.standardized_range` finds from the organs' own intensities must
undo exactly that, leave an ordinary scan alone, and the reference must come from the training
scans' labelled voxels (``tskd train``) and take in a scan corrected by ``tskd update``. The
training scans themselves are standardised to one another before the student learns them, and
``tskd update`` trains a corrected scan standardised the same way.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TSKDLib.data.classmap import ClassMap
from TSKDLib.deploy.inference import (
    INTENSITY_FACTOR_RANGE,
    ModelPackage,
    class_intensity_medians,
    fit_normalization,
    intensity_factor,
    standardized_range,
)

TOTALSEG = Path(__file__).resolve().parents[2] / "Data" / "totalseg"
MR = TOTALSEG / "example_mr_sm.nii.gz"
SEG = TOTALSEG / "example_seg_mr.nii.gz"
MAP = TOTALSEG / "label_map_total_mr.json"
PERCENTILE = {"kind": "percentile", "width": 400.0, "level": 40.0, "low": 0.5, "high": 99.5}
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}  # label values of the file


def _scan():
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(MR))).astype(np.float32)  # (20, 91, 117), 3 mm voxels
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG)))
    labels = np.zeros(raw.shape, np.uint8)  # class indices 1..4 in ORGANS' order
    for k, value in enumerate(ORGANS, start=1):
        labels[raw == value] = k
    return image, labels, raw


def _package(class_medians, normalization=PERCENTILE) -> ModelPackage:
    norm = dict(normalization)
    if class_medians is not None:
        norm["standardize"] = {"class_medians": class_medians, "tolerance": 1.1}
    cmap = ClassMap.from_dict({str(v): n for v, n in ORGANS.items()})
    return ModelPackage(Path("."), {}, cmap, 64, "acquisition", norm, session=None)


def _with_bright_lesion(image, raw):
    """A copy with a fluid-bright mass (twice the 99.5th percentile) in 4 % of the voxels, on
    organ-free tissue: the organs' own voxels are unchanged."""
    out = image.copy()
    free = np.flatnonzero((raw == 0).ravel() & (image.ravel() > np.percentile(image, 50)))
    mass = free[: int(0.04 * image.size)]
    out.ravel()[mass] = 2.0 * np.percentile(image, 99.5)
    return out


def test_a_bright_lesion_darkens_the_organs_and_the_factor_restores_them():
    image, labels, raw = _scan()
    lo, hi = fit_normalization(PERCENTILE, image)
    reference = class_intensity_medians(image, labels, lo, hi, range(1, 5))
    assert set(reference) == {1, 2, 3, 4} and all(0.02 < v < 0.5 for v in reference.values())  # organs darker than fat on this MR
    # independently: the median of the normalised organ voxels
    norm = np.clip((image - lo) / (hi - lo), 0, 1)
    for k, v in reference.items():
        assert v == pytest.approx(float(np.median(norm[labels == k])), abs=1e-6)

    bright = _with_bright_lesion(image, raw)
    lo_b, hi_b = fit_normalization(PERCENTILE, bright)
    assert hi_b > 1.5 * hi  # the lesion moved the top percentile
    darker = class_intensity_medians(bright, labels, lo_b, hi_b, range(1, 5))
    assert all(darker[k] < 0.75 * reference[k] for k in reference)  # every organ darker

    pkg = _package([{name: reference[k] for k, name in enumerate(ORGANS.values(), start=1)}])
    assert pkg.intensity_reference == pytest.approx(reference)
    voxel_mm3 = 27.0
    lo2, hi2, factor = standardized_range(pkg, bright, lo_b, hi_b, labels, voxel_mm3)
    expected = (hi_b - lo_b) / (hi - lo)
    assert factor == pytest.approx(expected, rel=0.03) and lo2 == lo_b
    again = class_intensity_medians(bright, labels, lo2, hi2, range(1, 5))
    for k in reference:  # the organs are as bright as in the reference again
        assert again[k] == pytest.approx(reference[k], abs=0.02)

    # the reference scan itself, and one 5 % darker, are left alone (tolerance 1.1)
    assert standardized_range(pkg, image, lo, hi, labels, voxel_mm3) == (lo, hi, 1.0)
    assert standardized_range(pkg, image, lo, lo + (hi - lo) * 1.05, labels, voxel_mm3)[2] == 1.0
    # no reference (CT windows, older packages), a 2D image, or classes too small: no change
    assert standardized_range(_package(None), bright, lo_b, hi_b, labels, voxel_mm3)[2] == 1.0
    assert standardized_range(pkg, bright[:1], lo_b, hi_b, labels[:1], voxel_mm3)[2] == 1.0
    assert standardized_range(pkg, bright, lo_b, hi_b, labels, voxel_mm3=1e-3)[2] == 1.0  # < 2 mL of each class


def test_the_factor_is_a_median_over_classes_and_is_bounded():
    # one misplaced class does not steer it; the ratio is taken geometrically
    assert intensity_factor({1: 0.5, 2: 0.5, 3: 0.5}, {1: 0.25, 2: 0.25, 3: 0.9}) == pytest.approx(2.0)
    assert intensity_factor({1: 0.8, 2: 0.2}, {1: 0.4, 2: 0.2}) == pytest.approx(math.sqrt(2.0))
    lo, hi = INTENSITY_FACTOR_RANGE
    assert intensity_factor({1: 0.9, 2: 0.9}, {1: 0.01, 2: 0.01}) == hi
    assert intensity_factor({1: 0.01, 2: 0.01}, {1: 0.9, 2: 0.9}) == lo
    assert intensity_factor({1: 0.5, 2: 0.5}, {1: 0.52, 2: 0.47}) == 1.0  # within the tolerance
    # one class alone may be dark or bright through its disease: never enough
    assert intensity_factor({1: 0.5, 2: 0.5}, {2: 0.25}) == 1.0
    assert intensity_factor({1: 0.5}, {1: 0.25}) == 1.0
    # the card's per-scan medians: geometric mean, malformed entries ignored
    pkg = _package([{"liver": 0.2, "spleen": 0.5}, {"liver": 0.8, "spleen": "x", "kidney_left": 1.5}, "junk"])
    assert pkg.intensity_reference == pytest.approx({4: 0.4, 1: 0.5})


def test_tskd_update_adds_the_corrected_scan_to_the_reference(tmp_path):
    from TSKDLib.data.case import load_case
    from TSKDLib.data.preprocess import Normalization
    from TSKDLib.deploy.inference import case_class_intensities
    from TSKDLib.distillation.update import _with_scan_intensities

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = load_case(MR, SEG, MAP, classes=list(ORGANS.values()), labelled_slices=[6, 10, 14])
    norm = Normalization.preset("mr")
    medians = case_class_intensities(case, norm)
    image, labels, _ = _scan()
    lo, hi = fit_normalization(PERCENTILE, image)
    # the labelled slices' voxels only, in the case's class order
    on = [6, 10, 14]
    direct = class_intensity_medians(image[on], labels[on], lo, hi, range(1, 5))
    by_name = dict(zip(ORGANS.values(), (direct.get(k) for k in range(1, 5))))
    assert medians == pytest.approx({case.class_map.names[i]: by_name[n] for i, n in enumerate(case.class_map.names)},
                                    abs=1e-4)
    card = {"normalization": {**PERCENTILE, "standardize": {"class_medians": [{"liver": 0.3}], "scans": ["/train/a"],
                                                            "tolerance": 1.1}}}
    once = _with_scan_intensities(card, medians, MR)
    std = once["normalization"]["standardize"]
    assert std["class_medians"] == [{"liver": 0.3}, medians] and std["scans"] == ["/train/a", str(MR.resolve())]
    assert card["normalization"]["standardize"]["class_medians"] == [{"liver": 0.3}]  # the input card untouched
    twice = _with_scan_intensities(once, medians, MR)  # a second round on the same file replaces its entry
    assert twice["normalization"]["standardize"]["class_medians"] == [{"liver": 0.3}, medians]
    # tskd train's card: one entry per training scan that recorded medians, with its image file
    from TSKDLib.pipeline.run import _card_normalization
    info = {"normalization": norm.to_dict(), "cases": [{"image": str(MR), "class_intensity_medians": medians},
                                                        {"image": "/b.nii.gz", "class_intensity_medians": {}}]}
    card_norm = _card_normalization(info)
    assert card_norm["kind"] == "percentile" and card_norm["standardize"]["class_medians"] == [medians]
    assert card_norm["standardize"]["scans"] == [str(MR.resolve())]
    assert "standardize" not in _card_normalization({**info, "cases": info["cases"][1:]})
    # CT windows and cards without a reference are returned as they are
    assert _with_scan_intensities({"normalization": PERCENTILE}, medians, MR) == {"normalization": PERCENTILE}
    assert _with_scan_intensities(card, {}, MR) == card  # CT: no medians
    assert case_class_intensities(case, Normalization.preset("ct")) == {}


def test_sparse_benchmark_scores_post_with_the_standardisation(tmp_path):
    """``tskd benchmark --protocol sparse-slices`` scores ``<method>+post`` as ``tskd segment``
    would segment: trained on the real MR's sparse labels, a copy of it with a bright lesion is
    predicted again with its intensities scaled back to the training scan's, and the scan itself
    (within the tolerance) and a model without a reference are not."""
    import torch

    from TSKDLib.data.case import prepare_case_slices
    from TSKDLib.evaluation.sparse_benchmark import (
        SparseConfig,
        _Scorer,
        _with_sparse_labels,
    )

    image, _, _ = _scan()
    case, bright = _cases(tmp_path, labelled=None)
    train, picks = _with_sparse_labels(case, 3)
    scorer = _Scorer("mr", [(train, picks)], [bright], 0, SparseConfig(size=64), [], case.class_map)
    scorer.set_post([])
    # the reference: the training scan's labelled slices, normalised on the whole scan
    lo, hi = fit_normalization(PERCENTILE, image)
    names = case.class_map.names
    on = train.label_slices()
    for k, v in scorer.intensity_reference.items():
        mask = on[picks] == k
        assert v == pytest.approx(float(np.median(np.clip((train.image_slices()[picks][mask] - lo) / (hi - lo), 0, 1))),
                                  abs=1e-4), names[k - 1]  # card values: 4 decimals
    seen = []

    def proba(x):  # records what the model is shown; predicts background
        seen.append(x.clone())
        return torch.nn.functional.one_hot(torch.zeros(x.shape[0], 64, 64, dtype=torch.long), 5).permute(0, 3, 1, 2).float()

    ref_labels = bright.label_slices()
    assert scorer._standardized(ref_labels, case, proba) is ref_labels and not seen  # the training scan itself
    assert scorer._standardized(ref_labels, bright, None) is ref_labels  # cached outputs: nothing to rerun
    again = scorer._standardized(ref_labels, bright, proba)
    assert again.shape == ref_labels.shape and not again.any()  # the model's second prediction
    shown = torch.cat(seen)[:, 0]
    plain, _, _, _ = prepare_case_slices(case, 64)
    inside = plain[:, 0] > 0.05
    ratio = float(torch.median(shown[inside] / plain[:, 0][inside]))
    assert ratio == pytest.approx(1.0, abs=0.05)  # the lesion's darkening undone
    unscaled, _, _, _ = prepare_case_slices(bright, 64)
    assert float(torch.median(unscaled[:, 0][inside] / plain[:, 0][inside])) < 0.75
    # no reference (training scans with CT windows record none): nothing rerun
    scorer.intensity_reference = {}
    assert scorer._standardized(ref_labels, bright, proba) is ref_labels


def _cases(tmp_path, labelled=(6, 10, 14)):
    """The real MR and a copy with a bright lesion (the organs darker after normalisation), both
    labelled on ``labelled`` (None: every slice), as :class:`TSKDLib.data.case.Case` objects."""
    from TSKDLib.data.case import load_case

    image, _, raw = _scan()
    lesion = sitk.GetImageFromArray(_with_bright_lesion(image, raw))
    lesion.CopyInformation(sitk.ReadImage(str(MR)))
    sitk.WriteImage(lesion, str(tmp_path / "lesion.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [load_case(path, SEG, MAP, classes=list(ORGANS.values()),
                          labelled_slices=None if labelled is None else list(labelled))
                for path in (MR, tmp_path / "lesion.nii.gz")]


def _organ_medians(slices, ci, k) -> float:
    """Median of class ``k``'s pixels on the labelled prepared slices of scan ``ci``."""
    sel = slices.labelled & (slices.case_index == ci)
    return float(slices.images[sel][:, 0][slices.labels[sel] == k].median())


def test_training_scans_are_standardised_to_one_another(tmp_path):
    """``tskd train`` multiplies each training scan's normalised intensities by the factor that
    brings its labelled classes to their geometric mean over the scans, so the student learns the
    same organ as equally bright in every scan; the card's reference is then those medians."""
    import torch

    from TSKDLib.data.case import prepare_slices
    from TSKDLib.data.preprocess import Normalization
    from TSKDLib.deploy.inference import (
        case_class_intensities,
        standardized_medians,
        training_intensity_factors,
    )
    from TSKDLib.pipeline.run import _card_normalization, _training_factors

    cases = _cases(tmp_path)
    names = cases[0].class_map.names
    norm = Normalization.preset("mr")
    per_scan = [case_class_intensities(c, norm) for c in cases]
    ratios = [per_scan[0][n] / per_scan[1][n] for n in names]
    assert min(ratios) > 1.3  # the lesion darkened every organ
    factors = training_intensity_factors(per_scan, names)
    assert factors[0] < 1.0 < factors[1]
    # the median over classes of the ratio to the geometric mean: sqrt of the scans' ratio here
    assert factors[1] / factors[0] == pytest.approx(float(np.exp(np.median(np.log(ratios)))), rel=1e-6)
    assert factors[0] * factors[1] == pytest.approx(1.0, rel=0.02)
    after = standardized_medians(per_scan, factors)
    for n in names:  # the two scans' organs now agree
        assert after[1][n] == pytest.approx(after[0][n], rel=0.08), n

    slices = prepare_slices(cases, 64)
    std = slices.with_intensity_factors(factors)
    assert std is not slices and torch.equal(std.labels, slices.labels)
    for k in range(1, len(names) + 1):
        before = _organ_medians(slices, 1, k) / _organ_medians(slices, 0, k)
        now = _organ_medians(std, 1, k) / _organ_medians(std, 0, k)
        assert before < 0.77 and now == pytest.approx(1.0, abs=0.08), (names[k - 1], before, now)
    assert float(std.images.max()) <= 1.0 and not std.images[~std.valid[:, None]].any()  # padding stays 0
    assert slices.with_intensity_factors([1.0, 1.0]) is slices
    with pytest.raises(ValueError, match="2 scans"):
        slices.with_intensity_factors([1.0])
    # one scan is its own reference; CT windows and unlabelled scans record no medians
    assert training_intensity_factors(per_scan[:1], names) == [1.0]
    assert training_intensity_factors([{}, {}], names) == [1.0, 1.0]
    assert training_intensity_factors([per_scan[0], {}, per_scan[1]], names)[1] == 1.0

    # the pipeline's factors come from cases.json, the card records what the student saw
    info = {"normalization": norm.to_dict(),
            "cases": [{"image": str(c.image_path), "class_intensity_medians": m} for c, m in zip(cases, per_scan)]}
    assert _training_factors(info, names, None) == pytest.approx(factors)
    assert _training_factors(info, names, False) == [1.0, 1.0]
    card = _card_normalization(info, factors)["standardize"]
    assert card["class_medians"] == after and card["training_factors"] == [round(f, 4) for f in factors]
    assert _card_normalization(info)["standardize"]["class_medians"] == per_scan  # older runs: as measured


def test_tskd_update_standardises_the_corrected_scan(tmp_path):
    """A run that standardised its scans (``summary.json``'s ``intensity_factors``) is updated on
    a corrected scan scaled to the card's reference, and that scan's standardised medians join the
    reference; a run without them learns the scan as it is."""
    import json

    from TSKDLib.data.case import prepare_slices
    from TSKDLib.data.preprocess import Normalization
    from TSKDLib.deploy.inference import case_class_intensities
    from TSKDLib.distillation.update import _update_intensities

    plain, lesion = _cases(tmp_path)
    norm = Normalization.preset("mr")
    base = prepare_slices([plain], 64)
    reference = case_class_intensities(plain, norm)
    card = {"normalization": {**PERCENTILE, "standardize": {"class_medians": [reference], "tolerance": 1.1}}}
    run = tmp_path / "run"
    (run / "distillation").mkdir(parents=True)
    assert _update_intensities(run, card, lesion, norm, base) == ([1.0], 1.0, case_class_intensities(lesion, norm))
    (run / "distillation" / "summary.json").write_text(json.dumps({"metrics": {"intensity_factors": [1.0]}}))
    base_factors, factor, medians = _update_intensities(run, card, lesion, norm, base)
    raw = case_class_intensities(lesion, norm)
    assert base_factors == [1.0] and factor > 1.3
    assert factor == pytest.approx(float(np.exp(np.median([np.log(reference[n] / raw[n]) for n in raw]))), rel=1e-6)
    for n, v in medians.items():
        assert v == pytest.approx(reference[n], rel=0.08), n
    assert _update_intensities(run, {"normalization": PERCENTILE}, lesion, norm, base)[1:] == (1.0, {})
