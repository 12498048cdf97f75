"""One Dice for every stage (TSKDLib.evaluation.metrics): its absent-class rule, and equality with MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from TSKDLib.evaluation import metrics


def _one_slice(pred_k: bool, ref_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pred, ref = torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long)
    if pred_k:
        pred[0, :2, :2] = 1
    if ref_k:
        ref[0, :2, :] = 1
    return pred, ref


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_absent_class_rule(ignore_empty):
    nan = math.nan
    expected = {(True, True): 2 * 4 / (4 + 8), (False, True): 0.0, (False, False): nan,
                (True, False): nan if ignore_empty else 0.0}
    for (pred_k, ref_k), want in expected.items():
        got = float(metrics.dice(*_one_slice(pred_k, ref_k), 1, ignore_empty=ignore_empty)[0, 0])
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want), (pred_k, ref_k)


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_dice_equals_monai_compute_dice(ignore_empty):
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.integers(0, 4, (6, 9, 9)))
    ref = torch.from_numpy(rng.integers(0, 4, (6, 9, 9)))
    ref[2] = 0  # a slice without any class
    pred[3][pred[3] == 2] = 0  # a class only in the reference
    oh = lambda x: torch.nn.functional.one_hot(x, 4).movedim(-1, 1).float()  # noqa: E731
    want = compute_dice(oh(pred), oh(ref), include_background=False, ignore_empty=ignore_empty)
    both_empty = (oh(pred)[:, 1:].amax((2, 3)) == 0) & (oh(ref)[:, 1:].amax((2, 3)) == 0)
    want[both_empty] = math.nan  # TSKD's rule: a class in neither map is not scored
    got = metrics.dice(pred, ref, 3, ignore_empty=ignore_empty)
    assert got.dtype == torch.float32 and got.shape == (6, 3)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_numpy_views_unlabelled_values_and_shapes():
    ref = np.zeros((2, 3, 3), np.int64)
    ref[:, 0] = 1
    pred = ref[:, ::-1].copy()[:, ::-1]  # a negative-stride view
    pred[0, 2] = -1  # unlabelled counts as background
    assert metrics.dice(pred, ref, 1).tolist() == [[1.0], [1.0]]
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice(pred, ref[:1], 1)
    assert metrics.dice(pred, ref, 0).shape == (2, 0)


def test_scores_pool_or_average_slices_and_hd95_scores_false_positives():
    ref = torch.zeros(2, 4, 4, dtype=torch.long)
    ref[0, :2] = 1
    pred = ref.clone()
    pred[1, 3] = 1  # false positive on a slice without the class
    assert metrics.dice_scores(pred, ref, 1, per_slice=True)["per_class"] == [1.0]  # not scored
    pooled = metrics.dice_scores(pred, ref, 1)["per_class"][0]
    assert pooled == pytest.approx(2 * 8 / (12 + 8))
    scores = metrics.dice_hd95(pred[1].numpy(), ref[1].numpy(), 1)
    assert scores[1]["dice"] == 0.0 and math.isnan(scores[1]["hd95"])  # evaluation: it costs
