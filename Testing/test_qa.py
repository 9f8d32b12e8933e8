"""Plan QA: organ figures and flags against hand-computed cases."""
import numpy as np
import pytest

from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.qa import Thresholds, compare_plan, flagged_organs, organ_metrics


def ramp_organ(voxels: int = 1000):
    """An organ of `voxels` voxels whose doses are 0, 1, ..., voxels-1 Gy (in a 1-D 'volume')."""
    dose = np.arange(voxels, dtype=np.float64)
    return dose, np.ones(voxels, bool)


def test_organ_figures_by_hand():
    dose, mask = ramp_organ()
    # 1 mm3 voxels: 1 cc; D0.1cc = the 100 hottest voxels' minimum = the 90th percentile; no D2cc under 4 cc
    small = organ_metrics(dose, mask, 1.0)
    assert small == pytest.approx({"Dmean": 499.5, "D0.1cc": np.percentile(dose, 90)})
    assert small["D0.1cc"] == pytest.approx(899.1)
    # 8 mm3 voxels: 8 cc; D0.1cc over 12.5 -> 12 voxels (98.8th percentile), D2cc over 250 voxels (75th)
    large = organ_metrics(dose, mask, 8.0)
    assert large["D2cc"] == pytest.approx(749.25)
    assert large["D0.1cc"] == pytest.approx(np.percentile(dose, 100 - 12 / 1000 * 100))
    assert organ_metrics(dose, np.zeros_like(mask), 1.0) == {}


def test_a_metric_is_flagged_only_above_both_thresholds():
    predicted = np.full(1000, 20.0)
    organs = {"SpinalCord": ("Cord", np.ones(1000, bool))}
    t = Thresholds(gy=3.0, percent=10.0)
    for plan_gy, flagged in ((22.5, False),    # +2.5 Gy, 12.5 %: under the Gy threshold
                             (23.5, True),     # +3.5 Gy, 17.5 %
                             (19.0, False)):   # below the prediction
        rows = compare_plan("c", np.full(1000, plan_gy), predicted, organs, 1.0, t)
        assert {r["metric"] for r in rows} == {"Dmean", "D0.1cc"}
        assert all(r["flagged"] is flagged for r in rows)
        assert all(r["excess_gy"] == pytest.approx(plan_gy - 20.0) for r in rows)
        assert all(r["excess_percent"] == pytest.approx(100 * (plan_gy - 20.0) / 20.0, abs=0.05) for r in rows)
    # 35 Gy above a 40 Gy prediction is 87.5 %: flagged at 10 %, not at 100 %
    plan, pred = np.full(1000, 75.0), np.full(1000, 40.0)
    assert all(r["flagged"] for r in compare_plan("c", plan, pred, organs, 1.0, Thresholds(3.0, 10.0)))
    assert not any(r["flagged"] for r in compare_plan("c", plan, pred, organs, 1.0, Thresholds(3.0, 100.0)))


def test_per_cent_excess_of_a_near_zero_prediction_uses_the_floor():
    """0.2 Gy predicted, 4 Gy planned: 380 % of 1 Gy (the floor), not 1900 % of 0.2 Gy."""
    rows = compare_plan("c", np.full(10, 4.0), np.full(10, 0.2), {"Larynx": ("Lx", np.ones(10, bool))}, 1.0)
    assert rows[0]["excess_percent"] == pytest.approx(380.0)


def test_flagged_organs_one_row_each_largest_excess_first():
    rows = [
        {"case": "a", "organ": "Larynx", "excess_gy": 4.0, "flagged": True},
        {"case": "a", "organ": "Larynx", "excess_gy": 6.0, "flagged": True},
        {"case": "a", "organ": "Mandible", "excess_gy": 9.0, "flagged": False},
        {"case": "b", "organ": "SpinalCord", "excess_gy": 5.0, "flagged": True},
    ]
    got = flagged_organs(rows)
    assert [(r["case"], r["organ"], r["excess_gy"]) for r in got] == [("a", "Larynx", 6.0), ("b", "SpinalCord", 5.0)]


@pytest.mark.parametrize("gy, percent", [(-1.0, 10.0), (3.0, float("nan")), (float("inf"), 10.0)])
def test_impossible_thresholds_are_refused(gy, percent):
    with pytest.raises(DoseDiffError, match="non-negative"):
        Thresholds(gy, percent).check()
