import numpy as np
import pandas as pd
import pytest

from pipeline.cells.segeval import average_precision, match_counts, pairwise_iou


def _labels():
    true = np.zeros((10, 10), np.int32)
    true[0:4, 0:4] = 1  # 16 px
    true[6:10, 6:10] = 2  # 16 px
    pred = np.zeros((10, 10), np.int32)
    pred[0:4, 0:3] = 1  # IoU 12/16 = 0.75 with true 1
    pred[6:8, 6:10] = 2  # IoU 8/16 = 0.5 with true 2 (not > 0.5)
    pred[0:2, 8:10] = 3  # false positive
    return true, pred


def test_pairwise_iou():
    true, pred = _labels()
    t, p, iou = pairwise_iou(true, pred)
    found = dict(zip(zip(t.tolist(), p.tolist(), strict=True), iou, strict=True))
    assert found == {(1, 1): pytest.approx(0.75), (2, 2): pytest.approx(0.5)}


def test_match_counts_and_average_precision():
    true, pred = _labels()
    counts = match_counts(true, pred, thresholds=(0.5, 0.7, 0.8))
    assert counts["tp"].tolist() == [1, 1, 0]
    assert counts["n_true"].tolist() == [2] * 3 and counts["n_pred"].tolist() == [3] * 3
    ap = average_precision(pd.concat([counts, counts]))
    assert ap.loc[0.5] == pytest.approx(2 / (4 + 6 - 2))
    assert ap.loc[0.8] == 0


def test_average_precision_of_empty_images_is_perfect():
    empty = np.zeros((4, 4), np.int32)
    assert average_precision(match_counts(empty, empty)).eq(1.0).all()


def test_segeval_rejects():
    with pytest.raises(ValueError, match="shapes differ"):
        pairwise_iou(np.zeros((2, 2), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match=">= 0"):
        pairwise_iou(-np.ones((2, 2), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=r"\[0.5, 1\]"):
        match_counts(np.zeros((2, 2), int), np.zeros((2, 2), int), thresholds=(0.3,))
    with pytest.raises(ValueError, match="lacks columns"):
        average_precision(pd.DataFrame({"tp": [1]}))
