"""OpenKBP metrics against hand-computed cases."""
import json

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
    assert m[("PTV70", "D99")] == pytest.approx(np.percentile(np.arange(1, 101), 1))  # 1.99
    assert m[("PTV70", "D99")] == pytest.approx(1.99)
    assert m[("PTV70", "D95")] == pytest.approx(5.95)
    assert m[("PTV70", "D1")] == pytest.approx(99.01)
    assert m[("SpinalCord", "Dmean")] == pytest.approx(10.5)
    # percentile at 100 - 10/20*100 = 50 % of doses 1..20 -> 10.5
    assert m[("SpinalCord", "D0.1cc")] == pytest.approx(10.5)
    assert ("PTV56", "D99") not in m and ("Larynx", "Dmean") not in m  # missing ROIs: no cell


def test_tiny_roi_uses_at_least_one_voxel():
    dose = np.array([[[5.0, 9.0, 7.0]]])
    roi = np.ones_like(dose, bool)
    m = dvh_metrics(dose, {"Larynx": roi}, voxel_volume_mm3=500.0)  # 0.1 cc < 1 voxel -> n = 1
    assert m[("Larynx", "D0.1cc")] == pytest.approx(np.percentile([5, 9, 7], 100 - 100 / 3))


def test_dvh_score_pools_cells_not_patients():
    a = {("PTV70", "D99"): 1.0, ("PTV70", "D95"): 3.0}
    b = {("SpinalCord", "Dmean"): 8.0}
    # pooled over 3 cells: (1 + 3 + 8) / 3 = 4, not the mean of patient means (2 + 8) / 2 = 5
    assert dvh_score([a, b]) == pytest.approx(4.0)
    assert dvh_errors({("x", "y"): 5.0}, {("x", "y"): 7.5}) == {("x", "y"): 2.5}


def test_an_underdosed_target_has_no_homogeneity_index_and_scoring_goes_on(tmp_path):
    """More than half a PTV at 0 Gy (an untrained model, a wrong mask) makes HI undefined: NaN,
    left out of the cohort's mean, not a ZeroDivisionError ending the evaluation or training."""
    from DoseDiffLib.evaluate import evaluate_patient, summarise, write_report
    from DoseDiffLib.metrics import homogeneity_index

    assert np.isnan(homogeneity_index(np.r_[np.zeros(60), np.full(40, 70.0)]))
    ref = np.zeros((4, 8, 8), np.float32)
    ref[1:3, 2:6, 2:6] = 70.0
    ptv = ref > 0
    zero = evaluate_patient("a", ref, np.zeros_like(ref), {"PTV70": ptv}, np.ones_like(ptv), (2.0, 2.0, 2.0), False)
    good = evaluate_patient("b", ref, ref.copy(), {"PTV70": ptv}, np.ones_like(ptv), (2.0, 2.0, 2.0), False)
    assert np.isnan(zero.scores["HI_PTV70_prediction"]) and good.scores["HI_PTV70_prediction"] == 0.0
    assert summarise([zero, good])["mean_HI_PTV70_prediction"] == 0.0
    write_report([zero, good], tmp_path / "r")
    strict = json.loads((tmp_path / "r" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["patients"]["a"]["HI_PTV70_prediction"] is None


def test_homogeneity_and_paddick_hand_computed():
    from DoseDiffLib.metrics import homogeneity_index, paddick_conformity, volume_at_dose_percent

    d = np.arange(1, 101, dtype=float)  # D2% = 98.02, D98% = 2.98, D50% = 50.5
    assert homogeneity_index(d) == pytest.approx((np.percentile(d, 98) - np.percentile(d, 2)) / np.percentile(d, 50))
    assert volume_at_dose_percent(d, 95.0) == pytest.approx(6.0)
    dose = np.zeros((1, 4, 4))
    dose[0, :2, :] = 70.0          # PIV: 8 voxels
    ptv = np.zeros_like(dose, bool)
    ptv[0, 1:3, :] = True          # TV: 8 voxels, 4 of them covered
    assert paddick_conformity(dose, ptv, 70.0) == pytest.approx(4 ** 2 / (8 * 8))


def test_gamma_identical_and_shifted_doses():
    from DoseDiffLib.metrics import gamma_pass_rate

    z, y, x = np.indices((10, 30, 30))
    ref = 50 * np.exp(-((x - 15.0) ** 2 + (y - 15.0) ** 2) / 40)
    assert gamma_pass_rate(ref, ref, (3.0, 2.0, 2.0)) == 100.0
    # a 1 mm shift passes 3 %/3 mm everywhere; a 6 mm shift does not
    shifted = 50 * np.exp(-((x - 15.5) ** 2 + (y - 15.0) ** 2) / 40)
    assert gamma_pass_rate(ref, shifted, (3.0, 2.0, 2.0), 3, 3) == 100.0
    far = 50 * np.exp(-((x - 18.0) ** 2 + (y - 15.0) ** 2) / 40)
    assert gamma_pass_rate(ref, far, (3.0, 2.0, 2.0), 3, 3) < 80.0


def test_gamma_agrees_with_pymedphys():
    pymedphys = pytest.importorskip("pymedphys")
    pytest.importorskip("numba")
    from DoseDiffLib.metrics import gamma_pass_rate

    rng = np.random.default_rng(0)
    z, y, x = np.indices((20, 30, 30))
    sp = (2.5, 3.9, 3.9)
    ref = 60 * np.exp(-(((x - 15) * 3.9) ** 2 + ((y - 15) * 3.9) ** 2 + ((z - 10) * 2.5) ** 2) / (2 * 25 ** 2))
    ev = 61 * np.exp(-(((x - 15.6) * 3.9) ** 2 + ((y - 15) * 3.9) ** 2 + ((z - 10) * 2.5) ** 2) / (2 * 25 ** 2))
    ev = ev + rng.normal(0, 0.8, ref.shape)
    axes = tuple(np.arange(n) * s for n, s in zip(ref.shape, sp))
    for dp, dta in ((3, 3), (2, 2)):
        g = pymedphys.gamma(axes, ref, axes, ev, dose_percent_threshold=dp, distance_mm_threshold=dta,
                            lower_percent_dose_cutoff=10, interp_fraction=10, max_gamma=1.1)
        theirs = 100 * np.mean(g[~np.isnan(g)] <= 1)
        assert gamma_pass_rate(ref, ev, sp, dp, dta, 10) == pytest.approx(theirs, abs=0.5)


def test_slice_streak_is_the_mean_step_between_neighbouring_slices_inside_the_mask():
    from DoseDiffLib.metrics import slice_streak

    dose = np.zeros((4, 2, 2))
    dose[1] = 2.0          # steps 2, 2, 0 between slices 0|1, 1|2, 2|3
    mask = np.ones((4, 2, 2), bool)
    assert slice_streak(dose, mask) == pytest.approx(4 / 3)
    mask[3] = False        # the 2|3 pair leaves the mask
    assert slice_streak(dose, mask) == pytest.approx(2.0)
    assert slice_streak(np.linspace(0, 9, 10)[:, None, None] * np.ones((10, 3, 3)), np.ones((10, 3, 3))) == 1.0


def test_slice_roughness_ignores_a_steady_gradient_and_measures_slice_noise():
    from DoseDiffLib.metrics import slice_roughness

    ramp = np.linspace(0, 9, 10)[:, None, None] * np.ones((10, 3, 3))
    mask = np.ones((10, 3, 3), bool)
    assert slice_roughness(ramp, mask) == pytest.approx(0.0, abs=1e-12)
    noisy = ramp.copy()
    noisy[1::2] += 1.0      # odd slices 1 Gy high: each inner slice is 1 Gy off its neighbours' mean
    assert slice_roughness(noisy, mask) == pytest.approx(1.0)
    mask[5] = False         # slices 4, 5, 6 have a neighbour or themselves outside the mask
    assert slice_roughness(noisy, mask) == pytest.approx(1.0)
    assert slice_roughness(noisy[:2], mask[:2]) == 0.0


def test_the_dvh_score_cells_are_the_roi_tables_figures_under_the_same_names():
    dose = np.arange(1, 101, dtype=float).reshape(1, 10, 10)
    ptv = np.ones_like(dose, bool)
    oar = np.zeros_like(dose, bool)
    oar[0, :2, :] = True  # doses 1..20: mean 10.5, D0.1cc at the 50th percentile (10 of 20 voxels) 10.5
    from DoseDiffLib.evaluate import roi_metrics

    masks = {"PTV70": ptv, "SpinalCord": oar}
    cells = dvh_metrics(dose, masks, voxel_volume_mm3=10.0)
    table = roi_metrics(dose, masks, voxel_mm3=10.0)
    assert set(cells) == {("SpinalCord", "D0.1cc"), ("SpinalCord", "Dmean"),
                          ("PTV70", "D99"), ("PTV70", "D95"), ("PTV70", "D1")}
    assert all(table[k] == cells[k] for k in cells)
    assert table[("SpinalCord", "D1")] == pytest.approx(19.81) and table[("PTV70", "Dmean")] == pytest.approx(50.5)
