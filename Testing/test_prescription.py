"""Prescriptions: a plan's dose levels placed on the model's 70/63/56 Gy and scaled back."""
import numpy as np
import pytest

from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.modelcard import load_model
from DoseDiffLib.predict import predict_case, prepare_case
from DoseDiffLib.prescription import (level_in_name, map_prescriptions, model_structures, parse_prescriptions,
                                      target_levels)


@pytest.mark.parametrize("name, gy", [("PTV_66", 66.0), ("PTV 70Gy", 70.0), ("PTV7000cGy", 70.0),
                                      ("PTVhigh_60", 60.0), ("ptv_54.12", 54.12), ("PTV5400", 54.0)])
def test_the_dose_in_a_target_name(name, gy):
    assert level_in_name(name) == pytest.approx(gy)


@pytest.mark.parametrize("name", ["PTV70_eval", "PTV70-3mm", "PTV_High", "zPTV70", "PTV70 PRV", "PTV_5", "Parotid_L"])
def test_names_without_a_plain_dose_state_none(name):
    assert level_in_name(name) is None


def test_parse_and_refuse_prescription_arguments():
    assert parse_prescriptions(["PTV_High=66", "PTV=Low=54.5"]) == {"PTV_High": 66.0, "PTV=Low": 54.5}
    for bad in ("PTV_High", "=66", "PTV=abc", "PTV=-3", "PTV=nan", "PTV=700"):
        with pytest.raises(DoseDiffError, match="NAME=GY"):
            parse_prescriptions([bad])


def test_levels_come_from_the_user_then_the_plan_then_the_name():
    names = ["PTV_High", "PTV_60", "PTV_54", "Parotid_L", "CTV_70"]
    levels, source = target_levels(names, given={"PTV_High": 66.0}, from_plan={"PTV_60": 59.4, "Parotid_L": 26})
    assert levels == {"PTV_High": 66.0, "PTV_60": 59.4, "PTV_54": 54.0}
    assert source == {"PTV_High": "given", "PTV_60": "RTPLAN", "PTV_54": "name"}
    with pytest.raises(DoseDiffError, match="not a structure"):
        target_levels(names, given={"PTV_Hihg": 66.0})


def test_scaling_onto_the_model_levels_by_hand():
    # 66/60/54 Gy: factor 70/66; 60 -> 63.64 (nearest 63), 54 -> 57.27 (nearest 56)
    pm = map_prescriptions({"PTV_66": 66.0, "PTV_60": 60.0, "PTV_54": 54.0})
    assert pm.scale == pytest.approx(70 / 66)
    assert pm.targets == {"PTV70": ["PTV_66"], "PTV63": ["PTV_60"], "PTV56": ["PTV_54"]}
    assert pm.warnings == ["PTV_54 is prescribed 54 Gy, outside the trained range 56-70 Gy; its dose is "
                           "predicted by scaling a 70 Gy plan by 0.943."]
    assert "scaled x1.061" in pm.describe()


def test_a_level_far_from_every_trained_level_is_a_warning_with_the_numbers():
    pm = map_prescriptions({"PTV_70": 70.0, "PTV_45": 45.0})
    assert pm.targets == {"PTV70": ["PTV_70"], "PTV56": ["PTV_45"]}
    assert any("PTV_45 (45 Gy, 45.0 Gy after scaling) is 11.0 Gy from the nearest trained level (PTV56, 56 Gy)" in w
               for w in pm.warnings)
    assert pm.scale == 1.0


def test_targets_on_one_level_are_united_and_the_matcher_cannot_take_another(phantom):
    ct, masks = phantom
    a = masks["PTV70"].array.copy()
    b = np.zeros_like(a)
    b[:, :5, :5] = 1
    structures = {"PTV_66a": masks["PTV70"], "PTV_66b": ct.with_array(b), "PTV70": masks["PTV56"]}
    pm = map_prescriptions({"PTV_66a": 66.0, "PTV_66b": 66.0}, {})
    out, mapping = model_structures(structures, pm)
    key = mapping["PTV70"]
    assert key == "PTV70 (from PTV_66a + PTV_66b)"
    np.testing.assert_array_equal(out[key].array, (a | b).astype(np.uint8))
    assert mapping["PTV63"] is None and mapping["PTV56"] is None
    assert "PTV_66a" not in out and "PTV70" in out  # the other structure stays, unmapped


def test_a_prescribed_plan_is_predicted_as_the_model_plan_and_scaled_back(test_card, phantom):
    """The network sees the same inputs; only the Gy differ, by exactly 66/70."""
    net, cfg, _ = load_model(test_card)
    ct, masks = phantom
    renamed = {("PTV_High" if k == "PTV70" else "PTV_Low" if k == "PTV56" else k): v for k, v in masks.items()}
    base = predict_case(prepare_case(ct, masks, cfg), net, cfg, seed=1)
    inputs = prepare_case(ct, renamed, cfg, prescriptions={"PTV_High": 66.0, "PTV_Low": 52.8})
    scaled = predict_case(inputs, net, cfg, seed=1)
    assert inputs.scale == pytest.approx(70 / 66)
    assert inputs.matched["PTV70"] == "PTV_High" and inputs.matched["PTV56"] == "PTV_Low"
    np.testing.assert_allclose(scaled.dose.array, base.dose.array * 66 / 70, atol=1e-4)
    assert scaled.info["prescription_scale"] == pytest.approx(70 / 66)
    assert "PTV_High 66 Gy -> PTV70" in scaled.info["prescription"]
    assert base.info["prescription"] == "targets matched by name" and base.info["prescription_scale"] == 1.0


def test_a_target_mapping_and_prescriptions_together_are_refused(test_card, phantom):
    _, cfg, _ = load_model(test_card)
    ct, masks = phantom
    with pytest.raises(DoseDiffError, match="not both"):
        prepare_case(ct, masks, cfg, {"PTV70": "PTV70"}, prescriptions={"PTV70": 66.0})
