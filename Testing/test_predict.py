"""Prediction: geometry of the output, determinism, and every bad input named clearly."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DoseDiffLib.config import POSSIBLE_DOSE
from DoseDiffLib.errors import Cancelled, DoseDiffError
from DoseDiffLib.modelcard import load_model
from DoseDiffLib.predict import predict_case, prepare_case
from DoseDiffLib.volume import Grid, Volume, resample_mask


@pytest.fixture(scope="module")
def model(test_card):
    return load_model(test_card)


def run(model, ct, masks, **kw):
    net, cfg, _ = model
    inputs = prepare_case(ct, masks, cfg, kw.pop("mapping", None))
    return inputs, predict_case(inputs, net, cfg, **{"steps": 2, "seed": 3, **kw})


def test_dose_is_on_the_ct_grid_in_gy_and_zero_outside_the_body(model, phantom):
    ct, masks = phantom
    _, pred = run(model, ct, masks)
    assert pred.dose.grid == ct.grid
    d = pred.dose.array
    assert np.isfinite(d).all() and d.min() >= 0 and d.max() <= 80
    assert not d[masks["BODY"].array == 0].any()
    assert d[masks["BODY"].array == 1].any()
    assert pred.info["seed"] == 3 and pred.info["matched_rois"]["PTV70"] == "PTV70"


def test_same_seed_same_dose_and_batch_size_does_not_matter(model, phantom):
    ct, masks = phantom
    _, a = run(model, ct, masks, batch_size=1)
    _, b = run(model, ct, masks, batch_size=7)
    _, c = run(model, ct, masks, seed=4)
    np.testing.assert_allclose(a.dose.array, b.dose.array, atol=1e-2)  # float rounding of other batch shapes
    assert np.abs(a.dose.array - c.dose.array).max() > 1e-3


def flip(v: Volume) -> Volume:
    return Volume.from_sitk(sitk.Flip(v.to_sitk(), [True, True, False]))


def test_flipped_input_gives_the_same_physical_dose_on_the_input_geometry(model, phantom):
    ct, masks = phantom
    _, ref = run(model, ct, masks)
    _, got = run(model, flip(ct), {k: flip(v) for k, v in masks.items()})
    assert got.dose.grid == flip(ct).grid
    np.testing.assert_allclose(flip(got.dose).array, ref.dose.array, atol=1e-3)


def test_structures_on_another_grid_are_resampled_with_a_warning(model, phantom):
    ct, masks = phantom
    g = ct.grid
    fine = Grid((g.shape[0], g.shape[1] * 2, g.shape[2] * 2), (g.spacing[0] / 2, g.spacing[1] / 2, g.spacing[2]),
                (g.origin[0] - g.spacing[0] / 4, g.origin[1] - g.spacing[1] / 4, g.origin[2]))
    moved = dict(masks)
    moved["PTV70"] = resample_mask(masks["PTV70"], fine)
    inputs, _ = run(model, ct, moved)
    assert any("another grid" in w and "PTV70" in w for w in inputs.warnings)


def test_structure_outside_the_ct_is_an_error(model, phantom):
    ct, masks = phantom
    far = masks["Larynx"]
    moved = dict(masks, Larynx=Volume(far.array, far.spacing, (far.origin[0] + 1000, *far.origin[1:])))
    with pytest.raises(DoseDiffError, match="entirely outside the CT"):
        run(model, ct, moved)


def test_empty_and_missing_organs_warn_and_become_zero_channels(model, phantom):
    ct, masks = phantom
    m = dict(masks)
    m["Larynx"] = m["Larynx"].with_array(np.zeros_like(m["Larynx"].array))
    del m["Mandible"]
    inputs, _ = run(model, ct, m)
    assert any("'Larynx' (Larynx) is empty" in w for w in inputs.warnings)
    assert any(w.startswith("Mandible not found") for w in inputs.warnings)
    assert "Mandible" not in inputs.masks and "Larynx" not in inputs.masks


def test_no_target_and_missing_required_target(model, phantom):
    ct, masks = phantom
    no_ptv = {k: v for k, v in masks.items() if not k.startswith("PTV")}
    with pytest.raises(DoseDiffError, match="No target found"):
        run(model, ct, no_ptv)
    only56 = {k: v for k, v in masks.items() if k != "PTV70"}
    with pytest.raises(DoseDiffError, match="requires PTV70"):
        run(model, ct, only56)


def test_ct_not_in_hu_and_nan_voxels(model, phantom):
    ct, masks = phantom
    raw = ct.with_array(np.clip(ct.array + 1024, 0, 4095).astype(np.float32))
    with pytest.raises(DoseDiffError, match="not in Hounsfield units"):
        run(model, raw, masks)
    bad = ct.array.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(DoseDiffError, match="NaN"):
        run(model, ct.with_array(bad), masks)


def test_body_is_thresholded_when_no_body_structure(model, phantom):
    ct, masks = phantom
    m = {k: v for k, v in masks.items() if k != "BODY"}
    inputs, pred = run(model, ct, m)
    assert any("thresholded" in w for w in inputs.warnings)
    body = masks["BODY"].array.astype(bool)
    agree = (inputs.body_on_ct.astype(bool) == body).mean()
    assert agree > 0.97
    assert not pred.dose.array[~inputs.body_on_ct.astype(bool)].any()


def test_samples_give_a_standard_deviation_map(model, phantom):
    ct, masks = phantom
    _, pred = run(model, ct, masks, samples=2, with_std=True)
    assert pred.std is not None and pred.std.grid == ct.grid
    assert pred.std.array.min() >= 0 and pred.std.array.max() > 0


def test_progress_reports_and_can_cancel(model, phantom):
    ct, masks = phantom
    seen = []
    _, _ = run(model, ct, masks, progress=lambda d, t, m: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and seen[0][0] == 1
    with pytest.raises(Cancelled):
        run(model, ct, masks, progress=lambda d, t, m: False)


def test_channels_last_inference_matches_the_plain_layout():
    """The memory-layout optimisation changes no number beyond float rounding."""
    from DoseDiffLib.config import ModelConfig
    from DoseDiffLib.mmfnet import MMFNet

    torch.manual_seed(0)
    cfg = ModelConfig.preset("test")
    net = MMFNet(cfg.net).eval()
    for p in net.parameters():  # undo the zero init so every layer matters
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    s = cfg.net.image_size
    args = (torch.randn(3, 1, s, s), torch.tensor([1, 400, 900]), torch.randn(3, 1, s, s),
            torch.randn(3, cfg.net.cond_channels, s, s))
    with torch.inference_mode():
        plain = net(*args)
        net.to(memory_format=torch.channels_last)
        fast = net(*args[:3], args[3].to(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)


def test_slices_far_from_every_target_are_skipped_without_changing_the_rest(model):
    from DoseDiffLib import predict as P
    from DoseDiffLib.phantom import head_and_neck

    net, cfg, _ = model
    ct, masks = head_and_neck(shape=(120, 64, 64), spacing=(3.2, 3.2, 3.0))  # 36 cm long body
    inputs = prepare_case(ct, masks, cfg)
    stack = P.slice_stack(inputs.ct, inputs.masks, cfg)
    kept = stack.slices[P.dose_rows(stack, cfg, inputs.ct.spacing[2])]
    assert 0 < len(kept) < 120
    full_margin = P.TARGET_SLAB_MARGIN_MM
    try:
        P.TARGET_SLAB_MARGIN_MM = 1e9
        everything = predict_case(inputs, net, cfg, steps=2, seed=1)
    finally:
        P.TARGET_SLAB_MARGIN_MM = full_margin
    skipped = predict_case(inputs, net, cfg, steps=2, seed=1)
    on_kept = np.zeros(120, bool)
    on_kept[kept] = True
    np.testing.assert_allclose(skipped.dose.array[on_kept], everything.dose.array[on_kept], atol=1e-2)
    assert not skipped.dose.array[~on_kept].any()


def test_the_default_sampler_comes_from_the_model_card(model, phantom):
    from dataclasses import replace

    net, cfg, _ = model
    ct, masks = phantom
    regression = replace(cfg, diffusion=replace(cfg.diffusion, sampler="regression"))
    inputs = prepare_case(ct, masks, regression)
    by_default = predict_case(inputs, net, regression, steps=None, seed=4)
    explicit = predict_case(inputs, net, cfg, sampler="regression", steps=None, seed=4)
    assert by_default.info["sampler"] == "regression" and by_default.info["steps"] == 1
    np.testing.assert_array_equal(by_default.dose.array, explicit.dose.array)
    ddim = predict_case(inputs, net, regression, sampler="ddim", samples=1, flip=False, steps=None, seed=4)
    assert ddim.info["steps"] == 8 and ddim.info["timestep_spacing"] == "leading"
    assert not np.array_equal(ddim.dose.array, by_default.dose.array)


def test_the_prediction_depends_on_every_kind_of_input(model, phantom):
    """A wrong channel order, normalisation or parotid label must change the dose."""
    from dataclasses import replace

    net, cfg, _ = model
    ct, masks = phantom
    base = run(model, ct, masks)[1].dose.array
    swapped = dict(masks, RightParotid=masks["LeftParotid"], LeftParotid=masks["RightParotid"])
    assert np.abs(run(model, ct, swapped)[1].dose.array - base).max() > 0.05
    other_window = replace(cfg, norm=replace(cfg.norm, ct_max_hu=cfg.norm.ct_max_hu + 500))
    changed = predict_case(prepare_case(ct, masks, other_window), net, other_window, steps=2, seed=3)
    assert np.abs(changed.dose.array - base).max() > 0.05
    without_cord = {k: v for k, v in masks.items() if k != "SpinalCord"}
    assert np.abs(run(model, ct, without_cord)[1].dose.array - base).max() > 0.05


def test_mirror_averaging_differs_from_one_view_and_reports_itself(model, phantom):
    ct, masks = phantom
    one = run(model, ct, masks, flip=False)[1]
    both = run(model, ct, masks, flip=True)[1]
    assert both.info["flip"] and not one.info["flip"]
    assert np.abs(both.dose.array - one.dose.array).max() > 0.01
