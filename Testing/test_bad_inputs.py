"""The catalogue of bad inputs (issue 12): each one ends in exactly one line on stderr,
exit code 2, and leaves every file under the test folder exactly as it was.

Cases are grouped by the issue's classes; CLASS_OF counts them. Where a check must run
before any computation, `no_compute` makes prediction and scoring fail loudly, so the
expected message can only come from the early check.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

import bad_inputs as B
from DoseDiffLib.cli import main
from DoseDiffLib.errors import DoseDiffError
from test_train import make_cache

CASES: dict[str, tuple[str, object]] = {}


def case(cls: str):
    """Register a builder: (root, card, monkeypatch) -> (argv, expected message regex)."""
    def register(fn):
        CASES[fn.__name__] = (cls, fn)
        return fn
    return register


@pytest.fixture()
def no_compute(monkeypatch):
    """Prediction and scoring raise: a refusal that should come first cannot come after them."""
    import DoseDiffLib.evaluate as ev
    import DoseDiffLib.predict as pr

    def boom(*_a, **_k):
        raise AssertionError("computation started before the inputs were checked")
    monkeypatch.setattr(pr, "predict_case", boom)
    monkeypatch.setattr(ev, "evaluate_patient", boom)


def predict(root: Path, card: Path, *extra: str) -> list[str]:
    ct, seg = B.image_case(root)
    return ["predict", "--ct", str(ct), "--structures", str(seg), "--model", str(card), *extra]


def _evaluate_openkbp(root: Path, *extra: str, change=None) -> list[str]:
    """evaluate on one OpenKBP patient whose prediction is its plan dose (changed by `change`)."""
    B.openkbp_patient(root / "val" / "pt_1")
    B.openkbp_prediction(root / "val" / "pt_1", root / "preds" / "pt_1.csv", change)
    return ["evaluate", "--openkbp", str(root / "val"), "--predictions", str(root / "preds"),
            "--out", str(root / "rep"), *extra]


def _evaluate_dicom(root: Path, prediction: Path) -> list[str]:
    return ["evaluate", "--dicom", str(root / "dcm"), "--prediction", str(prediction), "--out", str(root / "rep")]


# --- tracebacks: known problems named at the boundary --------------------------------

@case("traceback")
def openkbp_folder_missing(root, card, _m):
    return ["predict", "--openkbp", str(root / "nope"), "--out", str(root / "o.csv")], "OpenKBP folder .* not found"


@case("traceback")
def openkbp_split_empty(root, card, _m):
    (root / "split").mkdir()
    return ["predict", "--openkbp", str(root / "split"), "--out", str(root / "preds")], "holds no OpenKBP patients"


@case("traceback")
def model_is_a_folder(root, card, _m):
    B.copy_card(card, root / "models")
    return predict(root, root / "models", "--out", str(root / "d.nrrd")), "is a folder, not a model card.*test.json"


@case("traceback")
def model_missing(root, card, _m):
    return predict(root, root / "none.json", "--out", str(root / "d.nrrd")), "Model card .* not found"


@case("traceback")
def model_is_an_image(root, card, _m):
    return predict(root, root / "ct.nrrd", "--out", str(root / "d.nrrd")), "ct.nrrd is not a model card"


@case("traceback")
def model_card_not_json(root, card, _m):
    c = B.copy_card(card, root / "m")
    c.write_text("{ not json")
    return predict(root, c, "--out", str(root / "d.nrrd")), "not a readable JSON file"


@case("traceback")
def model_card_a_list(root, card, _m):
    c = B.copy_card(card, root / "m")
    c.write_text("[1, 2]")
    return predict(root, c, "--out", str(root / "d.nrrd")), "not a JSON object"


@case("traceback")
def model_card_without_weights_entry(root, card, _m):
    c = B.copy_card(card, root / "m")
    B.edit_json(c, lambda d: d.pop("weights"))
    return predict(root, c, "--out", str(root / "d.nrrd")), "has no 'weights' entry"


@case("traceback")
def safetensors_header_corrupt(root, card, _m):
    from DoseDiffLib.modelcard import sha256

    c = B.copy_card(card, root / "m")
    w = c.with_suffix(".safetensors")
    w.write_bytes(b"\xff" * 8 + w.read_bytes()[8:])  # header length now absurd; checksum made to match
    B.edit_json(c, lambda d: d["weights"].update(sha256=sha256(w)))
    return predict(root, c, "--out", str(root / "d.nrrd")), "not a valid safetensors file"


@case("traceback")
def safetensors_missing(root, card, _m):
    c = B.copy_card(card, root / "m")
    c.with_suffix(".safetensors").unlink()
    return predict(root, c, "--out", str(root / "d.nrrd")), "named by the card are missing"


@case("traceback")
def model_card_network_unbuildable(root, card, _m):
    c = B.copy_card(card, root / "m")

    def edit(d):
        d["config"]["net"]["channel_mult"] = "abc"
        d["weights"].pop("config_sha256")  # an older card, without the configuration checksum
    B.edit_json(c, edit)
    return predict(root, c, "--out", str(root / "d.nrrd")), "cannot be built|invalid configuration"


@case("traceback")
def ct_is_a_folder(root, card, _m):
    (root / "ctdir").mkdir()
    _, seg = B.image_case(root)
    return (["predict", "--ct", str(root / "ctdir"), "--structures", str(seg), "--model", str(card),
             "--out", str(root / "d.nrrd")], "is a folder, not an image file")


@case("traceback")
def ct_is_text(root, card, _m):
    (root / "ct.nii").write_text("hello")
    _, seg = B.image_case(root)
    return (["predict", "--ct", str(root / "ct.nii"), "--structures", str(seg), "--model", str(card),
             "--out", str(root / "d.nrrd")], "Cannot read .*ct.nii")


@case("traceback")
def structures_missing(root, card, _m):
    ct, _ = B.image_case(root)
    return (["predict", "--ct", str(ct), "--structures", str(root / "none.seg.nrrd"), "--model", str(card),
             "--out", str(root / "d.nrrd")], "File not found: .*none.seg.nrrd")


@case("traceback")
def mapping_not_json(root, card, _m):
    (root / "map.json").write_text("PTV70: x")
    return predict(root, card, "--out", str(root / "d.nrrd"), "--mapping", str(root / "map.json")), \
        "Cannot read ROI mapping file"


@case("traceback")
def truncated_nrrd(root, card, _m):
    argv = predict(root, card, "--out", str(root / "d.nrrd"))
    ct = root / "ct.nrrd"
    ct.write_bytes(ct.read_bytes()[:300])
    return argv, "Cannot read .*unreadable or truncated"


@case("traceback")
def train_cache_missing(root, card, _m):
    return ["train", "--cache", str(root / "nocache"), "--run", str(root / "run")], "not a training cache"


@case("traceback")
def train_cache_index_damaged(root, card, _m):
    (root / "c").mkdir()
    cache = make_cache(root / "c")
    (cache / "index.json").write_text('{"version": 1, "rois"')
    return ["train", "--cache", str(cache), "--run", str(root / "run")], "index .* is damaged"


@case("traceback")
def train_cache_arrays_missing(root, card, _m):
    (root / "c").mkdir()
    cache = make_cache(root / "c")
    (cache / "pt_1_psdm.npy").unlink()
    return ["train", "--cache", str(cache), "--run", str(root / "run")], "misses the arrays of pt_1"


@case("traceback")
def train_cache_other_version(root, card, _m):
    (root / "c").mkdir()
    cache = make_cache(root / "c")
    B.edit_json(cache / "index.json", lambda d: d.update(version=99))
    return ["train", "--cache", str(cache), "--run", str(root / "run")], "version 99"


@case("traceback")
def train_cache_without_train_split(root, card, _m):
    (root / "c").mkdir()
    cache = make_cache(root / "c")
    B.edit_json(cache / "index.json", lambda d: d["splits"].pop("train"))
    return ["train", "--cache", str(cache), "--run", str(root / "run")], "has no 'train' patients"


def _train(root: Path, *sets: str) -> list[str]:
    (root / "c").mkdir()
    cache = make_cache(root / "c")
    return ["train", "--cache", str(cache), "--run", str(root / "run")] + [a for s in sets for a in ("--set", s)]


@case("traceback")
def prepare_split_missing(root, card, _m):
    return ["prepare", "--split", f"train={root / 'none'}", "--cache", str(root / "c")], "OpenKBP folder .* not found"


@case("left behind")
def prepare_split_without_doses(root, card, _m):
    B.openkbp_patient(root / "test" / "pt_9", with_dose=False)
    return ["prepare", "--split", f"test={root / 'test'}", "--cache", str(root / "new" / "cache")], \
        r"1 patient\(s\) have no dose.csv \(pt_9\)"


@case("left behind")
def cohort_fails_at_first_patient(root, card, _m):
    B.openkbp_patient(root / "val" / "pt_1")
    return ["predict", "--openkbp", str(root / "val"), "--model", str(card), "--out", str(root / "preds")], \
        "The model takes 32 px slices"


@case("traceback")
def prepare_split_not_name_folder(root, card, _m):
    return ["prepare", "--split", "train", "--cache", str(root / "c")], "is not NAME=FOLDER"


@case("traceback")
def prepare_split_twice(root, card, _m):
    B.openkbp_patient(root / "s" / "pt_1")
    return ["prepare", "--split", f"a={root / 's'}", "--split", f"a={root / 's'}", "--cache", str(root / "c")], \
        "--split a is given twice"


@case("traceback")
def evaluate_prediction_missing(root, card, _m):
    B.openkbp_patient(root / "val" / "pt_1")
    B.openkbp_patient(root / "val" / "pt_2")
    B.openkbp_prediction(root / "val" / "pt_1", root / "preds" / "pt_1.csv")
    return ["evaluate", "--openkbp", str(root / "val"), "--predictions", str(root / "preds"),
            "--out", str(root / "rep")], r"1 prediction\(s\) missing .*pt_2.csv"


@case("traceback")
def evaluate_reference_without_dose(root, card, _m):
    B.openkbp_patient(root / "val" / "pt_1", with_dose=False)
    (root / "preds").mkdir()
    (root / "preds" / "pt_1.csv").write_text(",data\n")
    return ["evaluate", "--openkbp", str(root / "val"), "--predictions", str(root / "preds"),
            "--out", str(root / "rep")], "without dose.csv: pt_1"


@case("traceback")
def evaluate_openkbp_missing(root, card, _m):
    return ["evaluate", "--openkbp", str(root / "none"), "--predictions", str(root),
            "--out", str(root / "rep")], "OpenKBP folder .* not found"


@case("traceback")
def evaluate_dicom_without_prediction(root, card, _m):
    B.dicom_case(root / "dcm")
    return ["evaluate", "--dicom", str(root / "dcm"), "--out", str(root / "rep")], "--dicom needs --prediction"


def _bad_contour(ds):
    ds.ROIContourSequence[1].ContourSequence[0].ContourData = ["1.0"] * 7


def _edit_dicom(folder: Path, pattern: str, fn) -> None:
    for f in folder.glob(pattern):
        ds = pydicom.dcmread(f)
        fn(ds)
        ds.save_as(f)


@case("traceback")
def evaluate_dicom_malformed_contour(root, card, _m):
    B.dicom_case(root / "dcm")
    pred = B.dicom_prediction(root / "dcm", root / "pred.nrrd")
    _edit_dicom(root / "dcm", "rtstruct.dcm", _bad_contour)
    return _evaluate_dicom(root, pred), "ROI 'PTV70' has a malformed contour"


@case("traceback")
def dicom_rtdose_without_scaling(root, card, _m):
    B.dicom_case(root / "dcm")
    pred = B.dicom_prediction(root / "dcm", root / "pred.nrrd")
    _edit_dicom(root / "dcm", "RTDOSE*", lambda ds: delattr(ds, "DoseGridScaling"))
    return _evaluate_dicom(root, pred), "has no DoseGridScaling"


@case("traceback")
def init_model_unknown_preset(root, card, _m):
    return ["init-model", "--preset", "huge", "--out", str(root / "m.json")], "invalid choice: 'huge'"


@case("traceback")
def unknown_option(root, card, _m):
    return ["predict", "--colour", "red"], "unrecognized arguments|required"


# --- work thrown away: outputs checked before any computation ----------------------


@case("work thrown away")
def out_folder_missing(root, card, _m):
    return predict(root, card, "--out", str(root / "no" / "d.nrrd")), "Output folder .*no does not exist"


@case("work thrown away")
def out_folder_is_a_file(root, card, _m):
    (root / "f").write_text("x")
    return predict(root, card, "--out", str(root / "f" / "d.nrrd")), "is not a folder"


@case("work thrown away")
def out_exists(root, card, _m):
    (root / "d.nrrd").write_text("keep me")
    return predict(root, card, "--out", str(root / "d.nrrd")), "--out .*d.nrrd already exists"


@case("work thrown away")
def out_is_a_folder(root, card, _m):
    (root / "d.nrrd").mkdir()
    return predict(root, card, "--out", str(root / "d.nrrd"), "--overwrite"), "--out .*d.nrrd is a folder"


@case("work thrown away")
def std_out_exists(root, card, _m):
    (root / "sd.nrrd").write_text("keep me")
    return predict(root, card, "--out", str(root / "d.nrrd"), "--samples", "2", "--std-out", str(root / "sd.nrrd")), \
        "--std-out .*sd.nrrd already exists"


@case("work thrown away")
def out_dicom_is_a_file(root, card, _m):
    B.dicom_case(root / "dcm")
    (root / "rt").write_text("x")
    return ["predict", "--dicom", str(root / "dcm"), "--model", str(card), "--out-dicom", str(root / "rt")], \
        "is not a folder"


@case("work thrown away")
def out_dicom_holds_rtdose(root, card, _m):
    B.dicom_case(root / "dcm")
    (root / "rt").mkdir()
    (root / "rt" / "RTDOSE_1.dcm").write_text("x")
    return ["predict", "--dicom", str(root / "dcm"), "--model", str(card), "--out-dicom", str(root / "rt")], \
        "already holds an RTDOSE"


@case("work thrown away")
def evaluate_out_is_a_file(root, card, _m):
    argv = _evaluate_openkbp(root)
    (root / "rep").write_text("x")
    return argv, "rep is not a folder"


@case("work thrown away")
def evaluate_report_exists(root, card, _m):
    argv = _evaluate_openkbp(root)
    (root / "rep").mkdir()
    (root / "rep" / "metrics.json").write_text("{}")
    return argv, "metrics.json already exists"


@case("work thrown away")
def evaluate_dicom_report_exists(root, card, _m):
    B.dicom_case(root / "dcm")
    pred = B.dicom_prediction(root / "dcm", root / "pred.nrrd")
    (root / "rep").mkdir()
    (root / "rep" / "roi_metrics.csv").write_text("x")
    return _evaluate_dicom(root, pred), "roi_metrics.csv already exists"


@case("work thrown away")
def evaluate_update_card_damaged(root, card, _m):
    argv = _evaluate_openkbp(root, "--update-card", str(root / "card.json"))
    (root / "card.json").write_text("{}")
    return argv, "has no 'config' entry"


@case("work thrown away")
def evaluate_update_card_timings_damaged(root, card, _m):
    c = B.copy_card(card, root / "m")
    argv = _evaluate_openkbp(root, "--update-card", str(c))
    (root / "preds" / "timings.json").write_text('{"pt_1": {"seconds": 3}}')
    return argv, "timings.json is damaged"


@case("work thrown away")
def init_model_weights_exist(root, card, _m):
    (root / "m.safetensors").write_text("keep me")
    return ["init-model", "--preset", "test", "--out", str(root / "m.json")], "m.safetensors already exists"


@case("work thrown away")
def init_model_not_json(root, card, _m):
    return ["init-model", "--preset", "test", "--out", str(root / "m.txt")], "unsupported file type"


@case("work thrown away")
def demo_out_is_a_file(root, card, _m):
    (root / "demo").write_text("x")
    return ["demo", "--model", str(card), "--out", str(root / "demo")], "demo is not a folder"


@case("work thrown away")
def cohort_out_is_a_file(root, card, _m):
    B.openkbp_patient(root / "val" / "pt_1")
    (root / "preds").write_text("x")
    return ["predict", "--openkbp", str(root / "val"), "--model", str(card), "--out", str(root / "preds")], \
        "preds is not a folder"


# --- silently wrong before: now refused ------------------------------------------


@case("silently wrong")
def std_out_same_as_out(root, card, _m):
    return predict(root, card, "--out", str(root / "d.nrrd"), "--samples", "2", "--std-out", str(root / "d.nrrd")), \
        "--std-out .* is the same file as --out"


@case("silently wrong")
def out_on_the_ct(root, card, _m):
    return predict(root, card, "--out", str(root / "ct.nrrd"), "--overwrite"), "--out .* is the same file as --ct"


@case("silently wrong")
def zero_voxel_spacing(root, card, _m):
    _, seg = B.image_case(root)
    data = np.full((4, 8, 8), -1000.0)
    ct = B.nrrd_with_header(root / "zero.nrrd", "NRRD0004\ntype: float\ndimension: 3\nsizes: 8 8 4\n"
                            "space: left-posterior-superior\nspace directions: (0,0,0) (0,1,0) (0,0,1)\n"
                            "space origin: (0,0,0)\nendian: little\nencoding: raw\n", data)
    return (["predict", "--ct", str(ct), "--structures", str(seg), "--model", str(card), "--out", str(root / "d.nrrd")],
            "zero or invalid voxel spacing|not three positive numbers")


@case("silently wrong")
def zero_voxel_spacing_mha(root, card, _m):
    _, seg = B.image_case(root)
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementSpacing = 1 0 1\nElementType = MET_FLOAT\n"
              "ElementDataFile = LOCAL")
    ct = B.nrrd_with_header(root / "zero.mha", header, np.zeros((4, 8, 8)))
    return (["predict", "--ct", str(ct), "--structures", str(seg), "--model", str(card), "--out", str(root / "d.nrrd")],
            "zero or invalid voxel spacing|not three positive numbers")


def _nonfinite_ct(root: Path, card: Path, name: str, value: float) -> list[str]:
    ct, seg = B.image_case(root)

    def put(a):
        a[10, 30, 30] = value
        return a
    bad = B.volume_like(ct, root / name, put)
    return ["predict", "--ct", str(bad), "--structures", str(seg), "--model", str(card), "--out", str(root / "d.nrrd")]


@case("silently wrong")
def nifti_with_nan(root, card, _m):
    return _nonfinite_ct(root, card, "ct_nan.nii.gz", math.nan), "ct_nan.nii.gz has 1 NaN or infinite voxels"


@case("silently wrong")
def nifti_with_inf(root, card, _m):
    return _nonfinite_ct(root, card, "ct_inf.nii", math.inf), "ct_inf.nii has 1 NaN or infinite voxels"


@case("silently wrong")
def nrrd_with_nan(root, card, _m):
    return _nonfinite_ct(root, card, "ct_nan.nrrd", math.nan), "has 1 NaN or infinite voxels"


@case("silently wrong")
def ct_one_slice(root, card, _m):
    ct, seg = B.image_case(root)
    one = B.volume_like(ct, root / "one.nrrd", lambda a: a[10:11])
    return (["predict", "--ct", str(one), "--structures", str(seg), "--model", str(card), "--out", str(root / "d.nrrd")],
            "The CT has 1 slice")


@case("silently wrong")
def ct_normalised(root, card, _m):
    ct, seg = B.image_case(root)
    norm = B.volume_like(ct, root / "norm.nrrd", lambda a: (a + 1000) / 2500)
    return (["predict", "--ct", str(norm), "--structures", str(seg), "--model", str(card), "--out", str(root / "d.nrrd")],
            "The CT looks normalised")


@case("silently wrong")
def dicom_one_slice(root, card, _m):
    B.dicom_case(root / "dcm")
    for f in sorted((root / "dcm").glob("ct_*.dcm"))[1:]:
        f.unlink()
    return ["predict", "--dicom", str(root / "dcm"), "--model", str(card), "--out", str(root / "d.nrrd")], \
        "fewer than two slices"


@case("silently wrong")
def structures_with_dicom(root, card, _m):
    B.dicom_case(root / "dcm")
    _, seg = B.image_case(root)
    return ["predict", "--dicom", str(root / "dcm"), "--structures", str(seg), "--model", str(card),
            "--out", str(root / "d.nrrd")], "--structures is used only with --ct"


@case("silently wrong")
def mapping_with_openkbp(root, card, _m):
    p = B.openkbp_patient(root / "pt_1")
    (root / "m.json").write_text("{}")
    return ["predict", "--openkbp", str(p), "--mapping", str(root / "m.json"), "--model", str(card),
            "--out", str(root / "o.csv")], "--mapping is not used with --openkbp"


@case("silently wrong")
def evaluate_negative_prediction(root, card, _m):
    def negative(d):
        d[60, 60, 60] = -3.0
    return _evaluate_openkbp(root, change=negative), "pt_1.csv has 1 negative voxels"


@case("silently wrong")
def evaluate_nan_prediction(root, card, _m):
    def nan(d):
        d[60, 60, 60] = math.nan
    return _evaluate_openkbp(root, change=nan), "pt_1.csv has 1 NaN or infinite voxels"


@case("silently wrong")
def evaluate_dicom_negative_prediction(root, card, _m):
    B.dicom_case(root / "dcm")
    pred = B.dicom_prediction(root / "dcm", root / "pred.nrrd", scale=-1.0)
    return _evaluate_dicom(root, pred), "negative voxels"


def _foreign_rtdose(root: Path, edit) -> Path:
    """The plan RTDOSE, copied out and re-labelled."""
    src = next((root / "dcm").glob("RTDOSE*"))
    ds = pydicom.dcmread(src)
    edit(ds)
    out = root / "pred.dcm"
    ds.save_as(out)
    return out


@case("silently wrong")
def evaluate_rtdose_of_another_patient(root, card, _m):
    B.dicom_case(root / "dcm")
    pred = _foreign_rtdose(root, lambda ds: setattr(ds, "PatientID", "SOMEONE-ELSE"))
    return _evaluate_dicom(root, pred), "for another patient \\('SOMEONE-ELSE'\\)"


@case("silently wrong")
def evaluate_rtdose_of_another_frame(root, card, _m):
    B.dicom_case(root / "dcm")
    pred = _foreign_rtdose(root, lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4"))
    return _evaluate_dicom(root, pred), "for another frame of reference"


@case("silently wrong")
def reference_rtdose_of_another_patient(root, card, _m):
    B.dicom_case(root / "dcm")
    pred = B.dicom_prediction(root / "dcm", root / "pred.nrrd")
    _edit_dicom(root / "dcm", "RTDOSE*", lambda ds: setattr(ds, "PatientID", "SOMEONE-ELSE"))
    return _evaluate_dicom(root, pred), "belongs to patient 'SOMEONE-ELSE'"


@case("silently wrong")
def evaluate_prediction_off_the_patient(root, card, _m):
    from DoseDiffLib.volume import Volume, write_volume

    B.dicom_case(root / "dcm")
    write_volume(Volume(np.ones((5, 5, 5), np.float32), (2.0, 2.0, 2.0), (500.0, 500.0, 500.0)), root / "far.nrrd")
    return ["evaluate", "--dicom", str(root / "dcm"), "--prediction", str(root / "far.nrrd"),
            "--out", str(root / "rep")], "covers only 0% of the body"


@case("silently wrong")
def training_loss_nan(root, card, _m):
    return _train(root, "preset=test", "steps=6", "batch_size=2", "lr=1e30", "val_every=0", "threads=1"), \
        "Training diverged at step"


# --- the card's configuration under its checksum --------------------------------------

def _edited_card(root: Path, card: Path, edit) -> list[str]:
    c = B.copy_card(card, root / "m")
    B.edit_json(c, lambda d: edit(d["config"]))
    return predict(root, c, "--out", str(root / "d.nrrd"))


# --- data lost or written outside the output ------------------------------------------

@case("data lost")
def demo_keeps_users_ct(root, card, _m):
    (root / "demo").mkdir()
    (root / "demo" / "ct.nrrd").write_text("the user's CT")
    return ["demo", "--model", str(card), "--out", str(root / "demo")], "ct.nrrd already exists"


@case("data lost")
def demo_keeps_users_structures(root, card, _m):
    (root / "demo").mkdir()
    (root / "demo" / "structures.seg.nrrd").write_text("the user's structures")
    return ["demo", "--model", str(card), "--out", str(root / "demo")], "structures.seg.nrrd already exists"


@case("data lost")
def demo_keeps_users_openkbp_csv(root, card, _m):
    p = B.openkbp_patient(root / "pt_7")
    (root / "demo").mkdir()
    (root / "demo" / "pt_7.csv").write_text("the user's prediction")
    return ["demo", "--model", str(card), "--openkbp", str(p), "--out", str(root / "demo")], "pt_7.csv already exists"


@case("data lost")
def png_through_a_link(root, card, _m):
    argv = _evaluate_openkbp(root, "--overwrite")
    (root / "elsewhere.png").write_text("not yours")
    (root / "rep").mkdir()
    (root / "rep" / "dvh_pt_1.png").symlink_to(root / "elsewhere.png")
    return argv, "dvh_pt_1.png is a symbolic link"


@case("data lost")
def out_dangling_link(root, card, _m):
    (root / "d.nrrd").symlink_to(root / "outside" / "x.nrrd")
    return predict(root, card, "--out", str(root / "d.nrrd")), "is a symbolic link"


@case("data lost")
def out_link_to_a_file(root, card, _m):
    (root / "precious.nrrd").write_text("keep me")
    (root / "d.nrrd").symlink_to(root / "precious.nrrd")
    return predict(root, card, "--out", str(root / "d.nrrd"), "--overwrite"), "is a symbolic link"


# --- left behind: a failed command leaves nothing ---------------------------------------

@case("left behind")
def evaluate_fails_at_second_patient(root, card, _m):
    for n in (1, 2):
        B.openkbp_patient(root / "val" / f"pt_{n}")
        B.openkbp_prediction(root / "val" / f"pt_{n}", root / "preds" / f"pt_{n}.csv")
    (root / "preds" / "pt_2.csv").write_text(",data\n12,abc\n")  # found damaged only when read
    return ["evaluate", "--openkbp", str(root / "val"), "--predictions", str(root / "preds"),
            "--out", str(root / "deep" / "rep"), "--no-gamma"], "Cannot parse OpenKBP file .*pt_2.csv"


@case("left behind")
def predict_interrupted(root, card, monkeypatch):
    import DoseDiffLib.predict as pr

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pr, "predict_case", interrupted)
    return predict(root, card, "--out", str(root / "d.nrrd")), "Interrupted; the files this run had started were removed"


@case("left behind")
def demo_fails_after_folder_made(root, card, monkeypatch):
    import DoseDiffLib.plots as plots

    def broken(*_a, **_k):
        raise DoseDiffError("plotting failed")
    monkeypatch.setattr(plots, "dose_overlay", broken)
    return ["demo", "--model", str(card), "--out", str(root / "new" / "demo"), "--steps", "1"], "plotting failed"


def _command_raising(monkeypatch, exc: BaseException) -> None:
    import DoseDiffLib.cli as cli

    def fail(_args):
        raise exc
    monkeypatch.setitem(cli.COMMANDS, "init-model", fail)


@case("traceback")
def disk_full(root, card, monkeypatch):
    _command_raising(monkeypatch, OSError(28, "No space left on device", str(root / "m.json")))
    return ["init-model", "--out", str(root / "m.json")], "Cannot access .*m.json: No space left on device"


@case("traceback")
def package_missing(root, card, monkeypatch):
    _command_raising(monkeypatch, ModuleNotFoundError("No module named 'torch'"))
    return ["init-model", "--out", str(root / "m.json")], "A required package is missing .*'torch'.*pip install"


@case("left behind")
def unexpected_error_names_its_trace(root, card, monkeypatch):
    _command_raising(monkeypatch, ZeroDivisionError("division by zero"))
    crash_dir = root.with_name(root.name + "-crash")  # beside the checked folder, not in it
    crash_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(crash_dir))
    return ["init-model", "--out", str(root / "m.json")], \
        r"Unexpected ZeroDivisionError: division by zero \(a bug in DoseDiff; full trace in .*dosediff-crash-"


# --- resuming training ------------------------------------------------------------------

def _resume(root: Path, *changed: str) -> list[str]:
    """A run folder whose checkpoint says how it was started, resumed with other settings."""
    from DoseDiffLib.config import ModelConfig
    from DoseDiffLib.train import TrainConfig

    (root / "run").mkdir()
    tcfg = TrainConfig.from_settings(preset="test")
    torch.save({"train_config": tcfg.recipe(), "model_config": json.dumps(ModelConfig.preset("test").to_dict())},
               root / "run" / "checkpoint.pt")
    return _train(root, "preset=test", *changed)


# --- cases that differ only in their arguments: one row each -----------------------------

def _table(cls: str, build, rows: list[tuple]) -> None:
    """Register one case per row (name, arguments, expected message): build(root, card, *arguments)."""
    for name, args, expected in rows:
        CASES[name] = (cls, lambda root, card, _m, a=args, e=expected: (build(root, card, *a), e))


def _predict_to_nrrd(root: Path, card: Path, *extra: str) -> list[str]:
    return predict(root, card, "--out", str(root / "d.nrrd"), *extra)


def _predict_to(root: Path, card: Path, out: str) -> list[str]:
    return predict(root, card, "--out", str(root / out))


def _openkbp_file(root: Path, card: Path, name: str, text: str) -> list[str]:
    """Predict on an OpenKBP patient whose file `name` holds text."""
    p = B.openkbp_patient(root / "pt_1")
    (p / name).write_text(text)
    return ["predict", "--openkbp", str(p), "--model", str(card), "--out", str(root / "o.csv")]


def _predict_dicom(root: Path, card: Path, pattern: str, edit) -> list[str]:
    """Predict on the DICOM case with the files matching `pattern` edited."""
    B.dicom_case(root / "dcm")
    _edit_dicom(root / "dcm", pattern, edit)
    return ["predict", "--dicom", str(root / "dcm"), "--model", str(card), "--out", str(root / "d.nrrd")]


def _tilt(ds) -> None:
    """Slices step 0.3 mm sideways per mm along z: a 16.7 degree gantry tilt."""
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.3 * (ipp[2] + 30.0), ipp[2]]


def _swap_first_masks(config: dict) -> None:
    masks = config["conditions"]["masks"]
    masks[0], masks[1] = masks[1], masks[0]


_table("traceback", _predict_to_nrrd, [
    ("seed_negative", ("--seed", "-1"), "--seed: .*outside 0..4294967295"),
    ("seed_too_large", ("--seed", str(2 ** 40)), "outside 0..4294967295"),
    ("seed_not_a_number", ("--seed", "abc"), "'abc' is not a whole number"),
    ("steps_zero", ("--steps", "0"), "--steps: .*outside 1..10000"),
    ("steps_beyond_schedule", ("--steps", "5000"), "Steps must be 1 to 1000"),
    ("samples_zero", ("--samples", "0"), "--samples: .*outside"),
    ("batch_size_zero", ("--batch-size", "0"), "--batch-size: .*outside"),
    ("z_smoothing_negative", ("--z-smoothing", "-1"), r"z smoothing must be 0 to 10 mm \(got -1 mm\)"),
    ("z_smoothing_nan", ("--z-smoothing", "nan"), r"z smoothing must be 0 to 10 mm \(got nan mm\)"),
    ("normalise_without_a_level", ("--normalise",), "This model card has no normalisation level"),
])
_table("traceback", lambda root, card, *sets: _train(root, *sets), [
    ("set_value_not_a_number", ("lr=abc",), r"--set lr=.abc. is not a valid float"),
    ("set_steps_negative", ("steps=-5",), r"--set steps=-5 is outside \[1, inf\)"),
    ("set_lr_nan", ("lr=nan",), "is not a finite number"),
    ("set_preset_unknown", ("preset=huge",), "'huge' is not one of paper, small, tiny, test"),
    ("set_without_value", ("steps",), "is not KEY=VALUE"),
    ("set_unknown_key", ("speed=3",), "Unknown training setting 'speed'"),
    ("set_ema_decay_one", ("ema_decay=1",), r"ema_decay=1 is outside \[0, 1\)"),
    ("set_steps_fractional", ("steps=1.5",), "steps='1.5' is not a valid int"),
    ("set_rotation_step_not_a_divisor", ("preset=test", "rotation_step_deg=7"), "rotation_step_deg 7 does not divide"),
    ("set_precision_unknown", ("precision=fp16",), "precision='fp16' is not one of auto, fp32, bf16"),
    ("set_normalise_not_yes_or_no", ("normalise=maybe",), "normalise='maybe' is not a valid bool"),
])
_table("traceback", _openkbp_file, [
    ("openkbp_ct_csv_garbage", ("ct.csv", ",data\nx,y\n"), "Cannot parse OpenKBP file .*ct.csv"),
    ("openkbp_voxel_dimensions_short", ("voxel_dimensions.csv", "3.9\n3.9\n"), "must hold three positive voxel sizes"),
    ("openkbp_voxel_dimensions_zero", ("voxel_dimensions.csv", "3.9\n0\n2.5\n"), "must hold three positive voxel"),
    ("openkbp_index_outside_grid", ("PTV70.csv", ",data\n99999999,1\n"), r"indexes voxels outside the 128\^3"),
])
_table("traceback", _predict_dicom, [
    ("predict_dicom_malformed_contour", ("rtstruct.dcm", _bad_contour), "ROI 'PTV70' has a malformed contour"),
    ("dicom_orientation_malformed", ("ct_003.dcm", lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1])),
     "ImageOrientationPatient is missing or malformed"),
    ("dicom_pixel_data_truncated", ("ct_002.dcm", lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000])),
     r"truncated or does not match its header \(expected 3200 bytes, found 1000\)"),
    ("dicom_pixel_spacing_zero", ("ct_*.dcm", lambda ds: setattr(ds, "PixelSpacing", [0, 2.0])),
     r"PixelSpacing \[0.0, 2.0\] is not positive"),
])
_table("silently wrong", _predict_dicom, [
    ("dicom_gantry_tilt", ("ct_*.dcm", _tilt), "gantry tilt of 16.7 degrees"),
])
_table("work thrown away", _predict_to, [
    ("out_suffix_unknown", ("d.txt",), "--out .*d.txt has an unsupported file type"),
    ("out_detached_header", ("d.nhdr",), "unsupported file type"),
    ("out_csv_without_openkbp", ("d.csv",), "unsupported file type"),
])
_table("work thrown away", _predict_to_nrrd, [
    ("std_out_with_one_sample", ("--std-out", "sd.nrrd", "--samples", "1"), "--std-out needs at least two samples"),
    ("std_out_with_the_one_sample_regression_sampler", ("--std-out", "sd.nrrd", "--sampler", "regression"),
     "--std-out needs at least two samples"),
])
_table("silently wrong", _predict_to_nrrd, [
    ("batch_size_negative", ("--batch-size", "-4"), "--batch-size: -4 is outside"),
    ("series_uid_without_dicom", ("--series-uid", "1.2.3"), "--series-uid is used only"),
])
_table("card checksum", _edited_card, [
    ("card_dose_max_edited", (lambda c: c["norm"].update(dose_max_gy=90.0),), "was edited"),
    ("card_ct_window_edited", (lambda c: c["norm"].update(ct_max_hu=2000.0),), "was edited"),
    ("card_prediction_edited", (lambda c: c["diffusion"].update(prediction="x0"),), "was edited"),
    ("card_timesteps_edited", (lambda c: c["diffusion"].update(timesteps=500),), "was edited"),
    ("card_beta_end_edited", (lambda c: c["diffusion"].update(beta_end=0.03),), "was edited"),
    ("card_channel_order_edited", (_swap_first_masks,), "was edited"),
])
_table("resume", lambda root, card, *changed: _resume(root, *changed), [
    ("resume_with_other_lr", ("lr=0.001",), r"other settings \(lr 0.0001 -> 0.001\)"),
    ("resume_with_other_loss", ("loss=l1",), r"loss 'mse' -> 'l1'"),
    ("resume_with_other_preset", ("preset=tiny",), "preset 'test' -> 'tiny'.*model configuration"),
    ("resume_with_other_augmentation", ("aug_p=0.2",), "aug_p 0.8 -> 0.2"),
])


# --- the runner --------------------------------------------------------------------------

PROGRESS = re.compile(r"(Predicting dose|Evaluating|Patients|Caching patients): ")  # tqdm bars, not messages
ALLOWED_TO_GROW = {"training_loss_nan": "run"}  # a diverged run keeps its log for diagnosis
# cases whose failure comes after (a stand-in of) the computation
COMPUTES = {"demo_fails_after_folder_made", "evaluate_fails_at_second_patient", "training_loss_nan"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, tmp_path, test_card, capsys, monkeypatch, request):
    if name not in COMPUTES:
        request.getfixturevalue("no_compute")
    _, build = CASES[name]
    argv, expected = build(tmp_path, test_card, monkeypatch)
    capsys.readouterr()
    before = B.snapshot(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("warning: ") and not PROGRESS.match(ln)]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(expected, lines[0]), lines[0]
    after = B.snapshot(tmp_path)
    grown = ALLOWED_TO_GROW.get(name)
    if grown:
        after = {k: v for k, v in after.items() if k in before or not (k == grown or k.startswith(grown + "/"))}
        assert not (tmp_path / "run" / "best.json").exists()
    assert after == before


def test_the_catalogue_covers_every_class_with_sixty_cases():
    counts: dict[str, int] = {}
    for cls, _ in CASES.values():
        counts[cls] = counts.get(cls, 0) + 1
    assert set(counts) == {"traceback", "work thrown away", "silently wrong", "card checksum", "data lost",
                           "left behind", "resume"}
    assert sum(counts.values()) >= 60, counts
