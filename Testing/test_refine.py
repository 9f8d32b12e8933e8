"""Predict-and-refine: a refiner reads its first stage's dose, and both travel in one card."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from DoseDiffLib.conditions import STACK_ROIS, SliceStack, gather
from DoseDiffLib.config import POSSIBLE_DOSE, ConditionConfig, ModelConfig
from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.mmfnet import MMFNet, TwoStage
from DoseDiffLib.modelcard import load_model, save_model
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.predict import predict_case, prepare_case, stage1_dose
from DoseDiffLib.train import INPUT_CONVS, TrainConfig, train

from test_train import make_cache, saved_random_model

_test = ModelConfig.preset("test")
FIRST = replace(_test.with_conditions(ConditionConfig(context=1)),
                diffusion=replace(_test.diffusion, prediction="x0", sampler="regression"))
REFINER = FIRST.with_stage1(FIRST)


def grown(first: MMFNet) -> MMFNet:
    """The refiner a warm start from `first` begins as: its stage-1 dose inputs weigh zero."""
    net = MMFNet(REFINER.net).eval()
    state = first.state_dict()
    for name in INPUT_CONVS:
        w = state[f"{name}.weight"]
        state[f"{name}.weight"] = torch.zeros_like(net.state_dict()[f"{name}.weight"])
        state[f"{name}.weight"][:, :w.shape[1]] = w
    net.load_state_dict(state)
    return net


def test_the_stage1_dose_follows_the_ct_and_its_context_in_channel_order():
    n, rows = 4, np.array([0, 2])
    ct = np.zeros((n, 8, 8), np.float32)
    ps = np.zeros((n, len(STACK_ROIS), 8, 8), np.float32)
    dose = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((n, 8, 8), np.float32) / 10
    ct_ctx, _, _ = gather(ct, ps, rows, REFINER, dose)
    names = REFINER.conditions.ct_channel_names()
    assert names == ["CT", "CT@-1", "CT@+1", "stage-1 dose", "stage-1 dose@-1", "stage-1 dose@+1"]
    assert ct_ctx.shape == (2, 6, 8, 8) and REFINER.net.ct_channels == 6
    # slice 0's neighbour below is itself (the stack's ends repeat); slice 2 reads 1 and 3
    np.testing.assert_allclose(ct_ctx[:, 3:, 0, 0].numpy(), [[0.0, 0.0, 0.1], [0.2, 0.1, 0.3]])
    with pytest.raises(ValueError, match="none was given"):
        gather(ct, ps, rows, REFINER)


def test_a_refiner_names_its_first_stage_and_only_then_reads_its_dose():
    assert "stage1" not in FIRST.to_dict()   # single-stage cards keep their shape (and checksum)
    assert ModelConfig.from_dict(REFINER.to_dict()) == REFINER
    with pytest.raises(ValueError, match="exactly when"):
        replace(REFINER, stage1=None)
    with pytest.raises(ValueError, match="exactly when"):
        replace(FIRST, stage1=FIRST)
    with pytest.raises(ValueError, match="cannot itself"):
        FIRST.with_stage1(REFINER)


def test_a_refiner_that_ignores_its_stage1_input_reproduces_the_first_stage(tmp_path):
    ct, masks = head_and_neck(shape=(12, 32, 32), spacing=(4.0, 4.0, 3.0))
    first = saved_random_model(FIRST, tmp_path / "first.json", 1)
    alone = predict_case(prepare_case(ct, masks, FIRST), first, FIRST, seed=0).dose.array
    pair = TwoStage(first, grown(first)).eval()
    both = predict_case(prepare_case(ct, masks, REFINER), pair, REFINER, seed=0).dose.array
    np.testing.assert_array_equal(both, alone)
    # once the refiner weighs the stage-1 dose, the first stage's weights change its output
    with torch.no_grad():
        pair.net.enc_ct[0][0].weight[:, 3:].normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    refined = predict_case(prepare_case(ct, masks, REFINER), pair, REFINER, seed=0).dose.array
    assert np.abs(refined - alone).max() > 0.05
    other = TwoStage(saved_random_model(FIRST, tmp_path / "other.json", 3), pair.net).eval()
    assert np.abs(predict_case(prepare_case(ct, masks, REFINER), other, REFINER, seed=0).dose.array
                  - refined).max() > 0.05
    # one card, one weights file, one checksum for both networks
    save_model(pair, REFINER, tmp_path / "pair.json", half=False)
    loaded, cfg, card = load_model(tmp_path / "pair.json")
    assert isinstance(loaded, TwoStage) and cfg == REFINER
    assert card["config"]["stage1"]["conditions"]["context"] == 1
    assert card["ct_channels"][-1] == "stage-1 dose@+1"
    np.testing.assert_array_equal(predict_case(prepare_case(ct, masks, cfg), loaded, cfg, seed=0).dose.array, refined)


def test_a_card_whose_first_stage_was_edited_is_refused(tmp_path):
    pair = TwoStage(saved_random_model(FIRST, tmp_path / "first.json", 1),
                    saved_random_model(REFINER, tmp_path / "refiner.json", 2))
    save_model(pair, REFINER, tmp_path / "pair.json")
    card = json.loads((tmp_path / "pair.json").read_text())
    card["config"]["stage1"]["diffusion"]["flip"] = True   # stage 1's sampler is part of the refiner's input
    (tmp_path / "pair.json").write_text(json.dumps(card))
    with pytest.raises(DoseDiffError, match="was edited"):
        load_model(tmp_path / "pair.json")


def test_the_stage1_dose_is_minus_one_where_no_dose_is_possible_and_beyond_the_rows_read(tmp_path):
    n = 6
    rng = np.random.default_rng(0)
    ps = rng.normal(0, 0.1, (n, len(STACK_ROIS), 32, 32)).astype(np.float32)
    ps[:, STACK_ROIS.index(POSSIBLE_DOSE)] = 0.5
    ps[:, STACK_ROIS.index(POSSIBLE_DOSE), :4] = -0.5
    stack = SliceStack(np.arange(n), rng.uniform(-1, 1, (n, 32, 32)).astype(np.float32), ps)
    dose = stage1_dose(saved_random_model(FIRST, tmp_path / "first.json", 1), FIRST, stack, np.array([2]), (-1, 1), 0, "cpu", None, None)
    assert (dose[[0, 4, 5]] == -1).all() and (dose[:, :4] == -1).all()
    assert (dose[1:4, 4:] != -1).all()


def test_a_refiner_trains_on_its_first_stages_dose_and_exports_both(tmp_path):
    cache = make_cache(tmp_path)
    first = saved_random_model(FIRST, tmp_path / "first.json", 1)
    settings = dict(preset="test", prediction="x0", sampler="regression", context=1, steps=2, batch_size=2,
                    val_every=2, val_patients=1, threads=1, lr=0.0, weight_decay=0.0,
                    stage1=str(tmp_path / "first.json"), init=str(tmp_path / "first.json"))
    tcfg = TrainConfig.from_settings(**settings)
    assert tcfg.model == REFINER
    best = train(cache, tmp_path / "run", tcfg, torch.device("cpu"))
    # the first stage's dose, once per cached patient, as prediction would give it
    saved = sorted(p.name for p in (tmp_path / "run" / "stage1").iterdir())
    assert saved == ["pt_0.npy", "pt_1.npy", "pt_100.npy", "pt_2.npy"]
    from DoseDiffLib.train import SliceCache

    stack = SliceCache(cache, "train").stack(1)
    expect = stage1_dose(first, FIRST, stack, np.arange(len(stack.slices)), (), 0, "cpu", None, None)
    np.testing.assert_allclose(np.load(tmp_path / "run" / "stage1" / "pt_1.npy"), expect, atol=2e-3)
    # lr 0: the exported refiner is the first stage grown by zero weights, exported with it (fp16)
    pair, cfg, card = load_model(best)
    assert isinstance(pair, TwoStage) and cfg == REFINER
    for k, v in grown(first).state_dict().items():
        assert torch.equal(pair.net.state_dict()[k], v.half().float()), k
    for k, v in first.state_dict().items():
        assert torch.equal(pair.stage1.state_dict()[k], v.half().float()), k
    recipe = card["training"]["recipe"]
    assert recipe["stage1"]["name"] == "first" and str(tmp_path) not in best.read_text()
    # a refiner is no first stage: refused by name before any work
    with pytest.raises(DoseDiffError, match="cannot be a first stage"):
        TrainConfig.from_settings(**{**settings, "stage1": str(best)})


def test_stage1_jitter_scales_only_the_stage1_dose_smoothly_and_keeps_zero_dose():
    from DoseDiffLib.train import jitter_stage1

    g = torch.Generator().manual_seed(0)
    b, first, h, w = 64, 3, 64, 64
    ct = torch.rand(b, 2 * first, h, w) * 1.5 - 0.5         # 12.5 % to 50 % of the dose scale
    ct[:, first:, :8] = -1                                  # 0 Gy rows
    assert jitter_stage1(ct, first, 0.0, g) is ct
    out = jitter_stage1(ct, first, 0.1, g)
    assert torch.equal(out[:, :first], ct[:, :first])       # the CT channels are untouched
    assert (out[:, first:, :8] == -1).all()
    ratio = ((out[:, first:, 8:] + 1) / (ct[:, first:, 8:] + 1)).log()
    # one field per slice, shared by its context slices
    assert torch.allclose(ratio[:, 0], ratio[:, 1], atol=1e-4) and torch.allclose(ratio[:, 0], ratio[:, 2], atol=1e-4)
    # its SD is uniform in [0, 0.2] per slice (mean 0.1 on the 4 x 4 grid, a little less once spread)
    sd = ratio[:, 0].flatten(1).std(1)
    assert 0.04 < sd.mean() < 0.12 and sd.max() < 0.35
    # smooth: neighbouring pixels differ far less than the field varies across the slice
    assert (ratio[:, 0, :, 1:] - ratio[:, 0, :, :-1]).abs().mean() < 0.1 * sd.mean()


def test_stage1_jitter_without_a_first_stage_is_refused():
    with pytest.raises(DoseDiffError, match="no first stage"):
        TrainConfig.from_settings(preset="test", stage1_jitter=0.1)


def test_a_refiner_averages_in_its_cards_share_of_the_first_stages_dose(tmp_path):
    ct, masks = head_and_neck(shape=(12, 32, 32), spacing=(4.0, 4.0, 3.0))
    first = saved_random_model(FIRST, tmp_path / "first.json", 1)
    pair = TwoStage(first, saved_random_model(REFINER, tmp_path / "refiner.json", 2)).eval()
    alone = predict_case(prepare_case(ct, masks, FIRST), first, FIRST, seed=0).dose.array
    refined = predict_case(prepare_case(ct, masks, REFINER), pair, REFINER, seed=0).dose.array
    assert np.abs(refined - alone).max() > 0.5
    blend = replace(REFINER, diffusion=replace(REFINER.diffusion, stage1_weight=0.25))
    pred = predict_case(prepare_case(ct, masks, blend), pair, blend, seed=0)
    np.testing.assert_allclose(pred.dose.array, 0.75 * refined + 0.25 * alone, atol=1e-3)
    assert pred.info["stage1_weight"] == 0.25
    # a read-out setting, as flip is: a card may change it without invalidating its weights
    save_model(pair, REFINER, tmp_path / "pair.json")
    card = json.loads((tmp_path / "pair.json").read_text())
    card["config"]["diffusion"]["stage1_weight"] = 0.25
    (tmp_path / "pair.json").write_text(json.dumps(card))
    assert load_model(tmp_path / "pair.json")[1] == blend
    card["config"]["diffusion"]["stage1_weight"] = 2.0      # edited out of range: refused with one line
    (tmp_path / "pair.json").write_text(json.dumps(card))
    with pytest.raises(DoseDiffError, match="invalid configuration.*share in"):
        load_model(tmp_path / "pair.json")
    # a share, and only a refiner has a first stage to weigh
    with pytest.raises(ValueError, match="only a refiner"):
        replace(REFINER, diffusion=replace(REFINER.diffusion, stage1_weight=1.5))
    with pytest.raises(ValueError, match="only a refiner"):
        replace(FIRST, diffusion=replace(FIRST.diffusion, stage1_weight=0.5))
