"""OpenKBP metrics against hand-computed cases."""
import numpy as np
import pytest

from DoseDiffLib.metrics import dose_score, dvh_errors, dvh_metrics, dvh_score


def test_dose_score_divides_by_mask_voxels_and_penalises_dose_outside():
    ref = np.zeros((2, 2, 2))
    pred = np.zeros((2, 2, 2))
    mask = np.zeros((2, 2, 2), bool)
    mask[0, 0, :] = True          # 2 voxels
    ref[0, 0, 0] = 10.0
    pred[0, 0, 0] = 7.0           # |diff| 3 inside
    pred[1, 1, 1] = 4.0           # 4 Gy outside the mask still counts
    assert dose_score(ref, pred, mask) == pytest.approx((3 + 4) / 2)


def test_dvh_metrics_hand_computed():
    dose = np.arange(1, 101, dtype=float).reshape(1, 10, 10)  # 1..100 Gy
    ptv = np.ones_like(dose, bool)
    oar = np.zeros_like(dose, bool)
    oar[0, :2, :] = True  # doses 1..20
    # 2 x 2 x 2.5 mm voxels = 10 mm3: 0.1 cc = 10 voxels
    m = dvh_metrics(dose, {"PTV70": ptv, "SpinalCord": oar}, voxel_volume_mm3=10.0)
    assert m[("PTV70", "D_99")] == pytest.approx(np.percentile(np.arange(1, 101), 1))  # 1.99
    assert m[("PTV70", "D_99")] == pytest.approx(1.99)
    assert m[("PTV70", "D_95")] == pytest.approx(5.95)
    assert m[("PTV70", "D_1")] == pytest.approx(99.01)
    assert m[("SpinalCord", "mean")] == pytest.approx(10.5)
    # percentile at 100 - 10/20*100 = 50 % of doses 1..20 -> 10.5
    assert m[("SpinalCord", "D_0.1_cc")] == pytest.approx(10.5)
    assert ("PTV56", "D_99") not in m and ("Larynx", "mean") not in m  # missing ROIs: no cell


def test_tiny_roi_uses_at_least_one_voxel():
    dose = np.array([[[5.0, 9.0, 7.0]]])
    roi = np.ones_like(dose, bool)
    m = dvh_metrics(dose, {"Larynx": roi}, voxel_volume_mm3=500.0)  # 0.1 cc < 1 voxel -> n = 1
    assert m[("Larynx", "D_0.1_cc")] == pytest.approx(np.percentile([5, 9, 7], 100 - 100 / 3))


def test_dvh_score_pools_cells_not_patients():
    a = {("PTV70", "D_99"): 1.0, ("PTV70", "D_95"): 3.0}
    b = {("SpinalCord", "mean"): 8.0}
    # pooled over 3 cells: (1 + 3 + 8) / 3 = 4, not the mean of patient means (2 + 8) / 2 = 5
    assert dvh_score([a, b]) == pytest.approx(4.0)
    assert dvh_errors({("x", "y"): 5.0}, {("x", "y"): 7.5}) == {("x", "y"): 2.5}
