"""The command line, end to end, on files."""
import json

import numpy as np
import pytest

from DoseDiffLib import openkbp
from DoseDiffLib.cli import main
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.volume import read_volume, write_segmentation, write_volume


@pytest.fixture()
def case(tmp_path, phantom):
    ct, masks = phantom
    write_volume(ct, tmp_path / "ct.nrrd")
    write_segmentation(masks, tmp_path / "s.seg.nrrd")
    return tmp_path


def test_predict_writes_dose_on_the_ct_geometry(case, test_card, capsys):
    rc = main(["predict", "--ct", str(case / "ct.nrrd"), "--structures", str(case / "s.seg.nrrd"),
               "--model", str(test_card), "--out", str(case / "dose.nrrd"), "--steps", "2", "--seed", "1",
               "--samples", "2", "--std-out", str(case / "std.nrrd"), "--uncalibrated-std"])
    assert rc == 0
    ct, dose = read_volume(case / "ct.nrrd"), read_volume(case / "dose.nrrd")
    assert dose.grid.close_to(ct.grid) and read_volume(case / "std.nrrd").grid.close_to(ct.grid)
    report = json.loads(capsys.readouterr().out)
    assert report["seed"] == 1 and report["samples"] == 2


def test_an_uncalibrated_sd_map_is_refused_before_any_work(case, capsys):
    """The bundled card measured its spread (under half the voxels within a nominal 95 %): no SD map by default."""
    from DoseDiffLib.modelcard import read_card
    from DoseDiffLib.registry import resolve

    measured = read_card(resolve("dosediff-openkbp"))["validation"]["uncertainty"]
    assert measured["calibrated"] is False and measured["voxels_inside_mean_pm_1.96sd"] < 0.6
    rc = main(["predict", "--ct", str(case / "ct.nrrd"), "--structures", str(case / "s.seg.nrrd"),
               "--out", str(case / "dose.nrrd"), "--sampler", "ddim", "--std-out", str(case / "sd.nrrd")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a calibrated uncertainty" in err and f"{measured['voxels_inside_mean_pm_1.96sd']:.0%}" in err and "--uncalibrated-std" in err
    assert not (case / "dose.nrrd").exists() and not (case / "sd.nrrd").exists()


def test_existing_output_is_refused_and_kept(case, test_card, capsys):
    out = case / "dose.nrrd"
    out.write_bytes(b"keep me")
    rc = main(["predict", "--ct", str(case / "ct.nrrd"), "--structures", str(case / "s.seg.nrrd"),
               "--model", str(test_card), "--out", str(out)])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"


def test_bad_input_is_one_clear_line(case, test_card, capsys):
    rc = main(["predict", "--ct", str(case / "nope.nrrd"), "--structures", str(case / "s.seg.nrrd"),
               "--model", str(test_card), "--out", str(case / "d.nrrd")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: File not found") and "Traceback" not in err


def test_init_model_writes_card_and_weights(tmp_path):
    assert main(["init-model", "--preset", "test", "--out", str(tmp_path / "m.json")]) == 0
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["weights"]["file"] == "m.safetensors" and card["config"]["net"]["image_size"] == 32


@pytest.mark.slow
def test_predict_real_openkbp_patient_with_a_random_tiny_model(openkbp_patient, tiny_card, tmp_path):
    out = tmp_path / "pt_201.csv"
    assert main(["predict", "--openkbp", str(openkbp_patient), "--model", str(tiny_card),
                 "--out", str(out), "--steps", "2", "--seed", "0"]) == 0
    dose = openkbp.from_openkbp_axes(openkbp._read_sparse(out, True))
    pdm = openkbp.read_patient(openkbp_patient, with_dose=False).possible_dose.array
    assert dose.shape == (128, 128, 128) and not dose[pdm == 0].any() and dose[pdm == 1].any()


@pytest.mark.slow
def test_predict_clinical_grid_512(tmp_path, tiny_card):
    ct, masks = head_and_neck(shape=(40, 512, 512), spacing=(0.98, 0.98, 3.0))
    write_volume(ct, tmp_path / "ct.nii.gz")
    folder = tmp_path / "masks"
    folder.mkdir()
    for name, m in masks.items():
        write_volume(m, folder / f"{name}.nrrd")
    assert main(["predict", "--ct", str(tmp_path / "ct.nii.gz"), "--structures", str(folder),
                 "--model", str(tiny_card), "--out", str(tmp_path / "dose.mha"), "--steps", "1", "--seed", "0"]) == 0
    dose = read_volume(tmp_path / "dose.mha")
    assert dose.array.shape == (40, 512, 512) and dose.grid.close_to(ct.grid)
    assert not dose.array[masks["BODY"].array == 0].any()
    assert np.isfinite(dose.array).all()


def test_evaluate_reference_against_itself_scores_zero(openkbp_patient, tmp_path):
    preds = tmp_path / "preds"
    preds.mkdir()
    # the clinical dose, written through our own CSV writer, as a "prediction"
    p = openkbp.read_patient(openkbp_patient)
    openkbp.write_dose_csv(p.dose, preds / "pt_201.csv")
    assert main(["evaluate", "--openkbp", str(openkbp_patient), "--predictions", str(preds),
                 "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["overall"]["dose_score"] == pytest.approx(0, abs=1e-4)
    assert report["overall"]["dvh_score"] == pytest.approx(0, abs=1e-4)
    assert report["patients"]["pt_201"]["gamma_3%3mm"] == 100.0
    assert (tmp_path / "report" / "dvh_pt_201.png").exists()
    assert "roi,metric,reference,prediction" in (tmp_path / "report" / "roi_metrics.csv").read_text().splitlines()[0]


def test_demo_on_the_phantom(tmp_path, test_card, capsys):
    rc = main(["demo", "--model", str(test_card), "--out", str(tmp_path / "demo"), "--steps", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "PTV70" in out and "D95" in out and "not a treatment planning system" in out
    for f in ("dose.nrrd", "dvh.png", "dose_overlay.png", "ct.nrrd", "structures.seg.nrrd"):
        assert (tmp_path / "demo" / f).exists()
    assert main(["demo", "--model", str(test_card), "--out", str(tmp_path / "demo")]) == 2  # no silent overwrite


@pytest.mark.slow
def test_cohort_prediction_and_card_update(openkbp_patient, tiny_card, tmp_path):
    import shutil

    card = tmp_path / "m.json"
    shutil.copy(tiny_card, card)
    shutil.copy(tiny_card.with_suffix(".safetensors"), tmp_path / tiny_card.with_suffix(".safetensors").name)
    preds = tmp_path / "preds"
    assert main(["predict", "--openkbp", str(openkbp_patient.parent), "--model", str(card), "--out", str(preds),
                 "--steps", "1"]) == 0
    assert (preds / "pt_201.csv").exists() and "pt_201" in json.loads((preds / "timings.json").read_text())
    assert main(["evaluate", "--openkbp", str(openkbp_patient.parent), "--predictions", str(preds),
                 "--out", str(tmp_path / "rep"), "--no-gamma", "--no-plots", "--update-card", str(card)]) == 0
    rep = json.loads((tmp_path / "rep" / "metrics.json").read_text())["overall"]
    got = json.loads(card.read_text())["validation"]
    assert got["dose_score"] == rep["dose_score"] and got["patients"] == 1
    assert got["seconds_per_volume"]["mean"] > 0
    from DoseDiffLib.modelcard import load_model
    load_model(card)  # weights still match their checksum
