"""Golden tests: the bundled model's dose on the embedded phantom, at both named samplers.

The figures were measured with this model (seed 0) when it was bundled; a wrong channel
order, normalisation, parotid label or sampler changes them by far more than the
tolerance, which only has to absorb floating-point differences between processors, and
bf16 rounding (at most 0.05 Gy on these figures when measured).
"""
import numpy as np
import pytest

from DoseDiffLib.metrics import dvh_metrics
from DoseDiffLib.modelcard import load_model
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.predict import predict_case, prepare_case
from DoseDiffLib.registry import resolve

TOLERANCE_GY = 0.3
MEASURED = {  # regression as the card sets it: mirrored, 2.5 mm of z smoothing, plan normalisation
    "regression": {("PTV70", "D95"): 70.42, ("PTV70", "D1"): 72.10, ("PTV56", "D95"): 55.02,
                   ("RightParotid", "Dmean"): 14.66, ("LeftParotid", "Dmean"): 4.42,
                   ("SpinalCord", "D0.1cc"): 22.13, ("Larynx", "Dmean"): 19.13},
    "ddim": {("PTV70", "D95"): 70.29, ("PTV70", "D1"): 72.31, ("PTV56", "D95"): 54.75,
             ("RightParotid", "Dmean"): 15.05, ("LeftParotid", "Dmean"): 4.09,
             ("SpinalCord", "D0.1cc"): 21.99, ("Larynx", "Dmean"): 19.18},
}


@pytest.fixture(scope="module")
def bundled():
    net, cfg, _ = load_model(resolve("dosediff-openkbp"))
    ct, masks = head_and_neck()
    return net, cfg, prepare_case(ct, masks, cfg), {k: v.array for k, v in masks.items()}, float(np.prod(ct.spacing))


@pytest.mark.slow
@pytest.mark.parametrize("sampler,precision", [("regression", "fp32"), ("ddim", "fp32"), ("regression", "bf16")])
def test_the_bundled_model_gives_its_measured_dose_on_the_phantom(bundled, sampler, precision):
    net, cfg, inputs, masks, vox = bundled
    # ddim: the paper's 8 leading steps with one unmirrored sample (the full sampler averages more)
    extra = {"samples": 1, "flip": False} if sampler == "ddim" else {}
    pred = predict_case(inputs, net, cfg, seed=0, sampler=sampler, precision=precision, **extra)
    assert pred.info["steps"] == (1 if sampler == "regression" else 8) and pred.info["precision"] == precision
    assert pred.info["flip"] == (sampler == "regression") and pred.info["z_smoothing_mm"] == 2.5
    assert pred.info["target_mean_gy"] == pytest.approx(71.508)
    got = dvh_metrics(pred.dose.array, masks, vox)
    for key, want in MEASURED[sampler].items():
        assert got[key] == pytest.approx(want, abs=TOLERANCE_GY), key
    # and the physics a planner would check first
    assert abs(got[("PTV70", "D95")] - 70) < 2 and abs(got[("PTV56", "D95")] - 56) < 2
    # the target lies on the right: a swapped parotid pair or mirrored patient gives a ratio below 1
    assert got[("RightParotid", "Dmean")] > 2 * got[("LeftParotid", "Dmean")]


def test_the_bundled_card_names_its_validated_sampler():
    _, cfg, card = load_model(resolve("dosediff-openkbp"))
    assert cfg.diffusion.sampler == "regression" and cfg.diffusion.flip and cfg.diffusion.z_smoothing_mm == 2.5
    # the training plans' median PTV70 mean (README, "Plan normalisation"), and the recipe that recomputes it
    assert cfg.diffusion.target_mean_gy == pytest.approx(71.508) and card["training"]["recipe"]["normalise"] is True
    assert card["ct_channels"] == cfg.conditions.ct_channel_names() == ["CT", "CT@-1", "CT@+1", "CT@-2", "CT@+2"]
    assert card["condition_channels"][-14:] == ["beams:PTV70", "beams:PTV63", "beams:PTV56", "beams attenuated:PTV70",
                                                "beams attenuated:PTV63", "beams attenuated:PTV56"] + [
        f"beams via:{oar}" for oar in ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus",
                                        "Larynx", "Mandible")] + ["mirrored"]
    # the mirrored view is flagged (README, "Model inputs"), and warm starts keep the flips that train it
    assert cfg.conditions.mirror_flag and card["training"]["recipe"]["independent_flip"] is True
    assert cfg.conditions.beam_mu_per_mm == pytest.approx(0.0045)
    assert "/work/" not in str(card["training"]) and "/tmp/" not in str(card["training"])
