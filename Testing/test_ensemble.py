"""Ensembles: networks read out on their own inputs and averaged by shares, held in one card."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from DoseDiffLib.cli import _inherited_settings, main
from DoseDiffLib.conditions import slice_stack
from DoseDiffLib.config import NormConfig
from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.mmfnet import Ensemble, MMFNet, TwoStage
from DoseDiffLib.modelcard import load_model, save_ensemble, save_model
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.predict import dose_rows, predict_case, prepare_case, resolve_sampler, sample_dose
from DoseDiffLib.train import TrainConfig, _warm_start

from test_train import saved_random_model

_settings = dict(preset="test", prediction="x0", sampler="regression", context=1, beams=True,
                 flip=True, z_smoothing_mm=2.5)
FIRST = TrainConfig.from_settings(**_settings).model
PARTNER = TrainConfig.from_settings(**_settings, beam_oars=True).model   # other input channels
ENSEMBLE = replace(FIRST, partners=(PARTNER,), diffusion=replace(FIRST.diffusion, partner_weights=(0.3,)))


@pytest.fixture(scope="module")
def case():
    return head_and_neck(shape=(12, 32, 32), spacing=(4.0, 4.0, 3.0))


@pytest.fixture()
def members(tmp_path):
    first = saved_random_model(FIRST, tmp_path / "first.json", 1)
    partner = saved_random_model(PARTNER, tmp_path / "partner.json", 2)
    return first, partner


def test_an_ensemble_weighs_each_networks_dose_read_on_its_own_inputs(case, members):
    first, partner = members
    inputs = prepare_case(*case, ENSEMBLE)
    stack = slice_stack(inputs.ct, inputs.masks, ENSEMBLE)
    rows = dose_rows(stack, ENSEMBLE, inputs.ct.spacing[2])
    _, smp = resolve_sampler(ENSEMBLE)
    assert smp.flip and PARTNER.net.cond_channels > FIRST.net.cond_channels
    a = sample_dose(first, FIRST, stack, rows, smp, seed=3)
    b = sample_dose(partner, PARTNER, stack, rows, smp, seed=3)
    assert np.abs(a - b).max() > 0.01   # two networks that disagree (0.4 Gy)
    both = sample_dose(Ensemble(first, [partner]), ENSEMBLE, stack, rows, smp, seed=3)
    np.testing.assert_allclose(both, 0.7 * a + 0.3 * b, atol=1e-6)
    with pytest.raises(ValueError, match="Ensemble model"):
        sample_dose(first, ENSEMBLE, stack, rows, smp, seed=3)


def test_progress_runs_once_through_all_networks(case, members):
    first, partner = members
    inputs = prepare_case(*case, ENSEMBLE)
    seen = []
    predict_case(inputs, Ensemble(first, [partner]), ENSEMBLE, seed=0, progress=lambda d, n, m: seen.append((d, n, m)))
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and seen[-1][0] == seen[-1][1] and len({n for _, n, _ in seen}) == 1
    assert seen[0][2].startswith("Network 1/2") and seen[-1][2].startswith("Network 2/2")


def test_shares_must_leave_the_first_network_a_share_and_members_must_read_the_same_case():
    with pytest.raises(ValueError, match="each of its 1 partners a share"):
        replace(ENSEMBLE, diffusion=replace(ENSEMBLE.diffusion, partner_weights=()))
    for shares in [(1.0,), (0.0,), (-0.2,)]:
        with pytest.raises(ValueError, match="positive and leave"):
            replace(ENSEMBLE, diffusion=replace(ENSEMBLE.diffusion, partner_weights=shares))
    with pytest.raises(ValueError, match="dose scale"):
        replace(ENSEMBLE, partners=(replace(PARTNER, norm=NormConfig(dose_max_gy=90.0)),))
    no_56 = PARTNER.with_conditions(replace(PARTNER.conditions, ptv_weights=PARTNER.conditions.ptv_weights[:2],
                                            psdms=PARTNER.conditions.psdms[:-1], beam_targets=("PTV70", "PTV63")))
    with pytest.raises(ValueError, match="read the targets"):
        replace(ENSEMBLE, partners=(no_56,))
    with pytest.raises(ValueError, match="not refiners or ensembles"):
        replace(ENSEMBLE, partners=(FIRST.with_stage1(FIRST),))
    # single networks keep their card's shape, an ensemble's round-trips
    assert "partners" not in FIRST.to_dict() and "partner_weights" not in FIRST.to_dict()["diffusion"]
    assert type(ENSEMBLE).from_dict(json.loads(json.dumps(ENSEMBLE.to_dict()))) == ENSEMBLE
    assert ENSEMBLE.alone() == FIRST


def test_one_card_holds_the_ensemble_and_its_shares_may_be_retuned_but_not_its_networks(case, members, tmp_path):
    first, partner = members
    card_path = save_ensemble(tmp_path / "first.json", [(tmp_path / "partner.json", 0.3)], tmp_path / "ens.json")
    loaded, cfg, card = load_model(card_path)
    assert isinstance(loaded, Ensemble) and cfg == ENSEMBLE
    assert [n["share"] for n in card["ensemble"]["networks"]] == [0.7, 0.3]
    assert card["condition_channels"] == FIRST.conditions.channel_names()   # what the first network reads
    direct = predict_case(prepare_case(*case, cfg), Ensemble(first, [partner]), ENSEMBLE, seed=0).dose.array
    np.testing.assert_array_equal(predict_case(prepare_case(*case, cfg), loaded, cfg, seed=0).dose.array, direct)
    # the shares are a read-out setting: another share loads and changes the dose
    edited = json.loads(card_path.read_text())
    edited["config"]["diffusion"]["partner_weights"] = [0.5]
    card_path.write_text(json.dumps(edited))
    loaded, cfg, _ = load_model(card_path)
    half = predict_case(prepare_case(*case, cfg), loaded, cfg, seed=0).dose.array
    assert np.abs(half - direct).max() > 0.01
    # a partner's prediction type is part of what its weights mean
    edited["config"]["partners"][0]["diffusion"]["prediction"] = "epsilon"
    card_path.write_text(json.dumps(edited))
    with pytest.raises(DoseDiffError, match="was edited"):
        load_model(card_path)


def test_the_cli_writes_an_ensemble_and_refuses_what_cannot_be_one(members, tmp_path, capsys):
    first, partner = members
    out = tmp_path / "ens.json"
    args = ["ensemble", "--model", str(tmp_path / "first.json"), "--out", str(out)]
    assert main(args + ["--partner", f"{tmp_path / 'partner.json'}=0.25"]) == 0
    assert "keeps 0.75" in capsys.readouterr().out
    assert load_model(out)[1].diffusion.partner_weights == (0.25,)
    before = out.read_bytes()
    cases = [(["--partner", f"{tmp_path / 'partner.json'}=0.25"], "already exists"),
             (["--partner", f"{tmp_path / 'partner.json'}=1.5", "--overwrite"], "share between 0 and 1"),
             (["--partner", f"{tmp_path / 'partner.json'}=0.6", "--partner", f"{tmp_path / 'first.json'}=0.5",
               "--overwrite"], "cannot form an ensemble"),
             (["--partner", f"{tmp_path / 'pair.json'}=0.3", "--overwrite"], "refiner or an ensemble")]
    save_model(TwoStage(first, MMFNet(FIRST.with_stage1(FIRST).net)), FIRST.with_stage1(FIRST), tmp_path / "pair.json")
    for extra, message in cases:
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert out.read_bytes() == before   # nothing replaced by a refused run


def test_a_warm_start_from_an_ensemble_continues_its_first_network_and_read_out(members, tmp_path):
    first, _ = members
    card_path = save_ensemble(tmp_path / "first.json", [(tmp_path / "partner.json", 0.3)], tmp_path / "ens.json")
    card = json.loads(card_path.read_text())
    inherited = _inherited_settings(card, list(TrainConfig().recipe()) + ["flip", "z_smoothing_mm", "beams"])
    assert inherited["flip"] is True and inherited["z_smoothing_mm"] == 2.5 and inherited["beams"] is True
    mcfg = TrainConfig.from_settings(**_settings).model
    assert (mcfg.diffusion.flip, mcfg.diffusion.z_smoothing_mm) == (True, 2.5)
    net = MMFNet(mcfg.net)
    _warm_start(net, copy.deepcopy(net), mcfg, card_path)
    for (k, a), b in zip(net.state_dict().items(), first.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_card_whose_shares_do_not_match_its_partners_is_refused(members, tmp_path):
    save_ensemble(tmp_path / "first.json", [(tmp_path / "partner.json", 0.3)], tmp_path / "ens.json")
    card = json.loads((tmp_path / "ens.json").read_text())
    card["config"]["diffusion"]["partner_weights"] = [0.3, 0.2]
    (tmp_path / "ens.json").write_text(json.dumps(card))
    with pytest.raises(DoseDiffError, match="invalid configuration"):
        load_model(tmp_path / "ens.json")
