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
    # fp32: bf16 kernels round differently for other batch shapes, and this random network
    # amplifies rounding (test_bf16_... bounds the bundled model's bf16 difference)
    ct, masks = phantom
    _, a = run(model, ct, masks, batch_size=1, precision="fp32")
    _, b = run(model, ct, masks, batch_size=7, precision="fp32")
    _, c = run(model, ct, masks, seed=4, precision="fp32")
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
        everything = predict_case(inputs, net, cfg, steps=2, seed=1, precision="fp32")  # as the test above
    finally:
        P.TARGET_SLAB_MARGIN_MM = full_margin
    skipped = predict_case(inputs, net, cfg, steps=2, seed=1, precision="fp32")
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


# --- slice-noise filter along z ------------------------------------------------------------

def _column(nz: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample of a 1 x 2 pixel column: weight everywhere, no target."""
    return (np.zeros((1, nz, 1, 2), np.float32), np.ones((nz, 1, 2), bool), np.zeros((nz, 1, 2), bool))


@pytest.mark.parametrize("slice_mm", [2.5, 3.0])
def test_z_smoothing_spreads_a_spike_with_a_gaussian_of_the_sd_in_mm(slice_mm):
    from DoseDiffLib.predict import smooth_along_z

    gy, weight, keep = _column()
    gy[0, 20] = 10.0
    out = smooth_along_z(gy, weight, keep, 2.5, slice_mm)[0, :, 0, 0]
    sigma = 2.5 / slice_mm
    k = np.arange(-int(4 * sigma + 0.5), int(4 * sigma + 0.5) + 1)  # scipy truncates at 4 SD
    g = np.exp(-0.5 * (k / sigma) ** 2)
    np.testing.assert_allclose(out[20 + k], 10.0 * g / g.sum(), rtol=1e-5)
    assert abs(out.sum() - 10.0) < 1e-4 and not out[:20 + k[0]].any()


def test_z_smoothing_keeps_a_flat_dose_at_the_edges_of_its_region_and_leaves_targets_alone():
    from DoseDiffLib.predict import smooth_along_z

    gy, weight, keep = _column()
    weight[:10] = weight[30:] = False       # the predicted slab: slices 10..29
    gy[0, 10:30] = 30.0
    keep[15:18, 0, 0] = True
    gy[0, 15:18, 0, 0] = 70.0               # a target at 70 Gy in one column
    out = smooth_along_z(gy, weight, keep, 3.0, 2.5)
    np.testing.assert_array_equal(out[0, 15:18, 0, 0], 70.0)
    np.testing.assert_allclose(out[0, 10:30, 0, 1], 30.0, rtol=1e-6)  # a plain filter would fall at 10 and 29
    assert not out[0, :10].any() and not out[0, 30:].any()
    assert out[0, 14, 0, 0] > 30.5 and out[0, 19, 0, 0] > 30.5      # the target's dose spreads into its neighbours
    np.testing.assert_array_equal(smooth_along_z(gy, weight, keep, 0.0, 2.5), gy)


def test_the_cards_mirror_averaging_applies_to_every_sampler_unless_turned_off(model):
    from dataclasses import replace

    from DoseDiffLib.predict import resolve_sampler

    _, cfg, _ = model
    mirrored = replace(cfg, diffusion=replace(cfg.diffusion, flip=True))
    assert not resolve_sampler(cfg, "regression")[1].flip and resolve_sampler(cfg, "ddim")[1].flip
    assert resolve_sampler(mirrored, "regression")[1].flip and resolve_sampler(mirrored, "ddim")[1].flip
    assert not resolve_sampler(mirrored, "regression", flip=False)[1].flip
    assert resolve_sampler(mirrored, "regression")[1].steps == 1


def test_z_smoothing_comes_from_the_card_can_be_overridden_and_spares_the_targets(model, phantom):
    from dataclasses import replace

    from DoseDiffLib.predict import resolve_sampler

    net, cfg, _ = model
    ct, masks = phantom
    smoothed_cfg = replace(cfg, diffusion=replace(cfg.diffusion, z_smoothing_mm=3.0))
    assert resolve_sampler(smoothed_cfg)[1].z_smoothing_mm == 3.0
    assert resolve_sampler(smoothed_cfg, z_smoothing_mm=0.0)[1].z_smoothing_mm == 0.0
    for bad in (-0.5, 10.5, float("nan")):
        with pytest.raises(DoseDiffError, match="z smoothing must be 0 to 10 mm"):
            resolve_sampler(cfg, z_smoothing_mm=bad)
    inputs = prepare_case(ct, masks, smoothed_cfg)
    plain = predict_case(inputs, net, smoothed_cfg, steps=2, seed=3, z_smoothing_mm=0.0)
    smooth = predict_case(inputs, net, smoothed_cfg, steps=2, seed=3)
    assert smooth.info["z_smoothing_mm"] == 3.0 and plain.info["z_smoothing_mm"] == 0.0
    targets = np.zeros(ct.array.shape, bool)
    for name in ("PTV70", "PTV63", "PTV56"):
        if name in masks:
            targets |= masks[name].array > 0
    # the model grid is 7.2 mm here: CT voxels within 3 pixels (9.6 mm) of a target's edge interpolate
    # between target and non-target model pixels
    from scipy import ndimage

    inner = ndimage.binary_erosion(targets, np.ones((1, 7, 7), bool))
    assert inner.sum() > 100
    np.testing.assert_array_equal(smooth.dose.array[inner], plain.dose.array[inner])
    assert np.abs(smooth.dose.array - plain.dose.array)[~targets].max() > 0.01
    assert not smooth.dose.array[masks["BODY"].array == 0].any()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_on_cuda_and_on_cpus_that_have_it_fp32_elsewhere(monkeypatch, native):
    from DoseDiffLib import runtime

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert runtime.network_dtype(cpu) == (torch.bfloat16 if native else torch.float32)
    assert runtime.network_dtype(cuda) == torch.bfloat16 and runtime.network_dtype(mps) == torch.float32
    for device in (cpu, cuda, mps):
        assert runtime.network_dtype(device, "fp32") == torch.float32
    assert runtime.network_dtype(cpu, "bf16") == torch.bfloat16  # asked for: slower without native bf16
    for device, bad in ((mps, "bf16"), (cpu, "fp16"), (cpu, "half")):
        with pytest.raises(DoseDiffError, match="precision|MPS"):
            runtime.network_dtype(device, bad)


def test_precision_reaches_the_network_and_is_reported(model, phantom, monkeypatch):
    from DoseDiffLib import runtime

    ct, masks = phantom
    _, fp32 = run(model, ct, masks, precision="fp32")
    _, bf16 = run(model, ct, masks, precision="bf16")
    assert (fp32.info["precision"], bf16.info["precision"]) == ("fp32", "bf16")
    assert np.abs(fp32.dose.array - bf16.dose.array).max() > 1e-3  # bf16 rounding changed the dose
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: False)
    _, auto = run(model, ct, masks)
    assert auto.info["precision"] == "fp32"
    np.testing.assert_array_equal(auto.dose.array, fp32.dose.array)
    with pytest.raises(DoseDiffError, match="Unknown precision"):
        run(model, ct, masks, precision="fp64")


def test_cpu_batches_hold_4_slices_in_fp32_and_16_in_bf16_memory_permitting(monkeypatch):
    from DoseDiffLib import runtime
    from DoseDiffLib.config import ModelConfig

    net, cpu = ModelConfig.preset("tiny").net, torch.device("cpu")
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda _d: 8 << 30)
    assert runtime.batch_size_for(net, cpu) == 4 and runtime.batch_size_for(net, cpu, dtype=torch.bfloat16) == 16
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda _d: 6 * runtime.activation_bytes_per_slice(net))
    assert runtime.batch_size_for(net, cpu, dtype=torch.bfloat16) == 3  # half the free memory


def test_plan_normalisation_scales_each_sample_to_the_level_and_keeps_its_shape():
    from DoseDiffLib.normalisation import plan_factors, scale_to_level, target_means, training_level

    gy = np.zeros((2, 1, 2, 3), np.float32)
    gy[0, 0] = [[70, 68, 10], [0, 5, 2]]     # target mean 69 Gy
    gy[1, 0] = [[75, 73, 20], [1, 6, 3]]     # target mean 74 Gy
    target = np.zeros((1, 2, 3), bool)
    target[0, 0, :2] = True
    out, factors = scale_to_level(gy, target, 71.5)
    np.testing.assert_allclose(factors, [71.5 / 69, 71.5 / 74], rtol=1e-6)
    np.testing.assert_allclose(out[:, target].mean(axis=1), [71.5, 71.5], rtol=1e-6)
    np.testing.assert_allclose(out[0], gy[0] * 71.5 / 69, rtol=1e-6)   # one factor per sample, everywhere
    with pytest.raises(DoseDiffError, match="primary target is empty"):
        scale_to_level(gy, np.zeros_like(target), 71.5)
    with pytest.raises(DoseDiffError, match="dose in the primary target is zero"):
        scale_to_level(np.zeros_like(gy), target, 71.5)
    # the median of the plans' target means; a plan without the target does not count
    plans = [(np.array([70.0, 72.0, 0.0]), np.array([True, True, False])),
             (np.array([73.0, 9.0]), np.array([True, False])),
             (np.array([60.0, 74.0]), np.array([True, True])),
             (np.array([50.0]), np.array([False]))]
    means = target_means(plans)
    np.testing.assert_array_equal(means, [71.0, 73.0, 67.0, np.nan])
    assert training_level(means) == 71.0     # median of 71, 73 and 67
    # training targets: each plan scaled onto the level, one without the target left as it is
    np.testing.assert_allclose(plan_factors(means, 71.0), [1.0, 71 / 73, 71 / 67, 1.0])
    with pytest.raises(DoseDiffError, match="No training plan contains"):
        training_level(target_means(plans[3:]))


def test_plan_normalisation_comes_from_the_card_scales_the_whole_dose_and_warns_when_it_does_real_work(
        model, phantom):
    from dataclasses import replace

    from DoseDiffLib.predict import resolve_sampler

    net, cfg, _ = model
    ct, masks = phantom
    assert resolve_sampler(cfg)[1].target_mean_gy == 0.0
    with pytest.raises(DoseDiffError, match="no normalisation level"):
        resolve_sampler(cfg, normalise=True)
    inputs = prepare_case(ct, masks, cfg)
    plain = predict_case(inputs, net, cfg, steps=2, seed=3)
    assert plain.info["normalisation_factors"] == [1.0] and plain.info["target_mean_gy"] == 0.0
    # the raw prediction's mean in PTV70 on the model grid, from the same samples
    from DoseDiffLib.predict import dose_rows, samples_in_gy, sample_dose, slice_stack

    stack = slice_stack(inputs.ct, inputs.masks, cfg)
    rows = dose_rows(stack, cfg, inputs.ct.spacing[2])
    _, smp = resolve_sampler(cfg, steps=2)
    x = np.full((1,) + inputs.ct.array.shape, -1.0, np.float32)
    x[:, stack.slices[rows]] = sample_dose(net, cfg, stack, rows, smp, seed=3)
    raw_gy, _ = samples_in_gy(x, inputs, cfg, smp, stack.slices[rows])
    raw = float(raw_gy[0][inputs.masks["PTV70"].array > 0].mean())
    for ratio, warned in ((1.02, False), (1.2, True)):
        level_cfg = replace(cfg, diffusion=replace(cfg.diffusion, target_mean_gy=raw * ratio))
        assert resolve_sampler(level_cfg)[1].target_mean_gy == pytest.approx(raw * ratio)
        assert resolve_sampler(level_cfg, normalise=False)[1].target_mean_gy == 0.0
        gy, factors = samples_in_gy(x, inputs, level_cfg, resolve_sampler(level_cfg, steps=2)[1],
                                    stack.slices[rows])
        assert factors == [pytest.approx(ratio, rel=1e-5)]
        assert gy[0][inputs.masks["PTV70"].array > 0].mean() == pytest.approx(raw * ratio, rel=1e-5)
        scaled = predict_case(inputs, net, level_cfg, steps=2, seed=3)
        assert scaled.info["normalisation_factors"] == [pytest.approx(ratio, abs=1e-4)]
        # resampling to the CT grid is linear, so the whole dose carries the one factor
        np.testing.assert_allclose(scaled.dose.array, plain.dose.array * ratio, rtol=1e-4, atol=1e-4)
        notes = [w for w in scaled.info["warnings"] if "normalised" in w]
        assert bool(notes) == warned
        if warned:
            assert f"PTV70 at {raw:.1f} Gy, -17 % from the {raw * ratio:.1f} Gy" in notes[0]
        unscaled = predict_case(inputs, net, level_cfg, steps=2, seed=3, normalise=False)
        np.testing.assert_array_equal(unscaled.dose.array, plain.dose.array)
    # a plan prescribed 35 Gy is seen by the model at twice its dose: the level follows the prescription
    level_cfg = replace(cfg, diffusion=replace(cfg.diffusion, target_mean_gy=raw * 1.1))
    from DoseDiffLib.prescription import PrescriptionMap

    half = replace(inputs, prescription=PrescriptionMap({"PTV60": 35.0}, {"PTV70": ["PTV60"]}, 2.0))
    gy, factors = samples_in_gy(x, half, level_cfg, resolve_sampler(level_cfg)[1], stack.slices[rows])
    assert gy[0][inputs.masks["PTV70"].array > 0].mean() == pytest.approx(raw * 1.1 / 2.0, rel=1e-5)
    assert factors == [pytest.approx(1.1, rel=1e-5)]


def test_a_primary_target_lost_on_the_model_grid_is_refused_before_any_sampling(model, phantom, monkeypatch):
    from dataclasses import replace

    import DoseDiffLib.predict as predict

    net, cfg, _ = model
    ct, masks = phantom
    level_cfg = replace(cfg, diffusion=replace(cfg.diffusion, target_mean_gy=71.5))
    inputs = prepare_case(ct, masks, level_cfg)
    lost = replace(inputs, masks={**inputs.masks, "PTV70": inputs.masks["PTV70"].with_array(
        np.zeros_like(inputs.masks["PTV70"].array))})

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(predict, "sample_dose", no_sampling)
    with pytest.raises(DoseDiffError, match="primary target is empty on the model grid"):
        predict_case(lost, net, level_cfg, steps=2, seed=3)


def test_the_mirrored_view_tells_a_flagged_network_it_is_mirrored(phantom):
    """Training marks mirrored slices with the flag; prediction's mirrored view must too, and
    the patient's own view must not."""
    from DoseDiffLib.mmfnet import MMFNet
    from DoseDiffLib.train import TrainConfig

    cfg = TrainConfig.from_settings(preset="test", prediction="x0", sampler="regression", flip=True,
                                    mirror_flag=True).model
    seen = []

    class Spy(MMFNet):
        def forward(self, x, t, ct, cond):
            seen.append(cond[:, -1].float().unique().tolist())
            return super().forward(x, t, ct, cond)

    torch.manual_seed(0)
    ct, masks = phantom
    inputs = prepare_case(ct, masks, cfg)
    predict_case(inputs, Spy(cfg.net).eval(), cfg, seed=1, batch_size=64)
    assert seen == [[0.0], [1.0]]                       # one batch: the patient, then its mirror image
    seen.clear()
    predict_case(inputs, Spy(cfg.net).eval(), cfg, seed=1, batch_size=64, flip=False)
    assert seen == [[0.0]]
