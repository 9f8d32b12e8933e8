"""A clinic's DICOM cohorts: found, prepared into the training cache, fine-tuned on, and QA'd.

Cohorts are made two ways: with the project's own writers (synthetic CT, RTSTRUCT,
RTPLAN, and the library's RTDOSE writer) and with plastimatch from real OpenKBP
validation patients; the latter must prepare into the same cache as their CSVs.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from DoseDiffLib.cohort import cache_cohort, find_cases
from DoseDiffLib.config import ModelConfig
from DoseDiffLib.dicomrt import read_dicom, write_rtdose
from DoseDiffLib.prepare import prepare

from conftest import REPO, SHARED
from dicom_synth import openkbp_as_dicom, square, write_ct, write_rtplan, write_rtstruct

needs_plastimatch = pytest.mark.skipif(shutil.which("plastimatch") is None, reason="plastimatch not installed")
BUNDLED = REPO / "Resources" / "Models" / "dosediff-openkbp.json"
RENAMED = {"PTV70": "PTV_High", "PTV63": "PTV_Mid", "PTV56": "PTV_Low", "LeftParotid": "Parotid_L",
           "RightParotid": "Parotid_R", "SpinalCord": "Cord"}


def dosediff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DoseDiffLib.cli", *map(str, args)], capture_output=True, text=True)


def synthetic_patient(folder: Path, prefix: str, names: dict[str, str], dose_gy: float | None,
                      plan: dict[str, float] | None = None) -> None:
    """A 20-slice CT with square structures; an RTDOSE from the library's writer unless dose_gy is None."""
    hu = np.full((20, 64, 64), -1000, np.int16)
    hu[:, 8:56, 8:56] = 0
    z = np.arange(20) * 3.0 - 30.0
    work = folder.parent / f".{prefix}work"
    study, frame, _ = write_ct(work, hu, "HFS", spacing=(2.0, 2.0), slice_z=z, origin=(-64.0, -64.0), prefix=prefix)
    shapes = {"BODY": (0.0, 0.0, 47.0), "PTV70": (-10.0, 0.0, 12.0), "LeftParotid": (25.0, -20.0, 6.0),
              "SpinalCord": (0.0, 30.0, 4.0)}
    rois = {names.get(k, k): [square(cx, cy, zz, half) for zz in z[4:16]] for k, (cx, cy, half) in shapes.items()}
    write_rtstruct(work, study, frame, rois, prefix=prefix)
    if plan:
        numbers = {n: i for i, n in enumerate(rois, start=1)}
        write_rtplan(work, study, frame, {numbers[n]: gy for n, gy in plan.items()}, prefix=prefix)
    if dose_gy is not None:
        case = read_dicom(work)
        zz, yy, xx = np.indices(case.ct.array.shape)
        dose = dose_gy * np.exp(-((xx - 27) ** 2 + (yy - 32) ** 2) / 400.0 - (zz - 10) ** 2 / 60.0)
        write_rtdose(case.ct.with_array(dose.astype(np.float32)), case.ct_datasets, work / "dose")
        for f in (work / "dose").iterdir():
            f.rename(work / f"{prefix}{f.name}")
        (work / "dose").rmdir()
    folder.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
        f.rename(folder / f.name)
    work.rmdir()


def test_mixed_files_of_two_patients_are_two_cases_and_the_one_without_dose_is_reported(tmp_path):
    cohort = tmp_path / "cohort"
    synthetic_patient(cohort, "a_", {"PTV70": "PTV_66", "LeftParotid": "Parotid_L"}, 66.0)
    synthetic_patient(cohort, "b_", {}, None)
    cases, _ = find_cases(cohort)
    assert len(cases) == 2 and len({c.key for c in cases}) == 2
    assert all(c.key.startswith("dcm_") and len(c.key) == 14 for c in cases)
    assert sorted(len(c.files) for c in cases) == [21, 22]  # 20 CT + RTSTRUCT (+ RTDOSE)
    rows = cache_cohort(cohort, tmp_path / "cache", ModelConfig(), validation_fraction=0.0)
    by_status = {r["status"]: r for r in rows}
    assert by_status["skipped"]["reason"].startswith("no RTDOSE")
    used = by_status["used"]
    assert used["targets"] == "PTV_66 66 Gy -> PTV70; doses scaled x1.061 into the model and back"
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    (entry,) = index["splits"]["train"]
    assert entry["pid"] == used["case"] and entry["source"] == "dicom" and entry["prescriptions_gy"] == [66.0]
    dose = np.load(tmp_path / "cache" / f"{entry['pid']}_dose.npy").astype(np.float32)
    assert ModelConfig().norm.gy(dose).max() == pytest.approx(70.0 * 0.999, abs=0.6)  # 66 Gy peak scaled to ~70
    with open(tmp_path / "cache" / "cohort_report.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2


def test_sub_folders_and_the_rtplan_prescription(tmp_path):
    cohort = tmp_path / "cohort"
    synthetic_patient(cohort / "one", "", {"PTV70": "PTV_High"}, 60.0, plan={"PTV_High": 60.0})
    case = read_dicom(cohort / "one")
    assert case.prescriptions == {"PTV_High": 60.0}  # the organ constraint is not a prescription
    cases, _ = find_cases(cohort)
    assert [c.where for c in cases] == ["one"]
    rows = cache_cohort(cohort, tmp_path / "cache", ModelConfig())
    assert "PTV_High 60 Gy -> PTV70" in rows[0]["targets"]
    again = cache_cohort(cohort, tmp_path / "cache", ModelConfig())  # resumable: nothing read twice
    assert again[0]["reason"] == "cached earlier"


def test_a_prescription_naming_no_structure_is_refused_before_any_case_is_read(tmp_path):
    cohort = tmp_path / "cohort"
    synthetic_patient(cohort, "a_", {}, 70.0)
    res = dosediff("prepare", "--dicom-cohort", cohort, "--cache", tmp_path / "cache", "--prescription", "PTV_Hihg=66")
    assert res.returncode == 2 and "no structure set of the cohort holds" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "cache").exists()
    res = dosediff("prepare", "--dicom-cohort", cohort, "--cache", tmp_path / "cache", "--prescription", "PTV70")
    assert res.returncode == 2 and "NAME=GY" in res.stderr
    res = dosediff("prepare", "--dicom-cohort", cohort, "--cache", tmp_path / "c", "--validation-fraction", "1.5")
    assert res.returncode == 2 and "--validation-fraction" in res.stderr


def test_other_names_need_the_mapping_file_for_organs(tmp_path):
    cohort = tmp_path / "cohort"
    synthetic_patient(cohort, "a_", {"LeftParotid": "Gl_Parotis_li", "SpinalCord": "Myelon_x"}, 70.0)
    (tmp_path / "map.json").write_text(json.dumps({"LeftParotid": "Gl_Parotis_li", "SpinalCord": "Myelon_x"}))
    plain = cache_cohort(cohort, tmp_path / "c1", ModelConfig())
    mapped = cache_cohort(cohort, tmp_path / "c2", ModelConfig(),
                          mapping=json.loads((tmp_path / "map.json").read_text()))
    assert "LeftParotid" not in plain[0]["organs"] and "LeftParotid not found" in plain[0]["warnings"]
    assert mapped[0]["organs"].split() == ["BODY", "LeftParotid", "SpinalCord"]


@pytest.fixture(scope="module")
def validation_patients(tmp_path_factory) -> Path:
    """pt_201..pt_203 of the OpenKBP validation split (or DOSEDIFF_OPENKBP)."""
    import os

    env = os.environ.get("DOSEDIFF_OPENKBP")
    if env and all((Path(env) / f"pt_{n}").exists() for n in (201, 202, 203)):
        return Path(env)
    archive = SHARED / "validation-pats.tar.xz"
    if not archive.exists():
        pytest.skip(f"OpenKBP data not found at {archive}")
    out = tmp_path_factory.mktemp("openkbp3")
    with tarfile.open(archive, "r:xz") as tar:
        wanted = [m for m in tar.getmembers() if any(f"/pt_{n}/" in m.name + "/" for n in (201, 202, 203))]
        tar.extractall(out, members=wanted, filter="data")
    return next(out.rglob("pt_201")).parent


@needs_plastimatch
def test_openkbp_patients_as_dicom_prepare_into_the_same_cache_as_their_csvs(validation_patients, tmp_path):
    one = tmp_path / "csv" / "pt_201"
    one.parent.mkdir()
    one.symlink_to(validation_patients / "pt_201")
    prepare({"train": one.parent}, tmp_path / "from_csv", ModelConfig())
    openkbp_as_dicom(validation_patients / "pt_201", tmp_path / "cohort" / "p1", "P1")
    cache_cohort(tmp_path / "cohort", tmp_path / "from_dicom", ModelConfig(), validation_fraction=0.0)
    a = json.loads((tmp_path / "from_csv" / "index.json").read_text())["splits"]["train"][0]
    b = json.loads((tmp_path / "from_dicom" / "index.json").read_text())["splits"]["train"][0]
    assert a["slices"] == b["slices"] and a["spacing"] == pytest.approx(b["spacing"])
    # the cache holds float16: one step near 1 is 0.0005 (0.02 Gy of dose); contours and the
    # 16-bit RTDOSE may flip a rounding, never more
    for kind, tol in (("ct", 1e-3), ("dose", 1e-3), ("psdm", 1e-3)):
        x = np.load(tmp_path / "from_csv" / f"{a['pid']}_{kind}.npy").astype(np.float32)
        y = np.load(tmp_path / "from_dicom" / f"{b['pid']}_{kind}.npy").astype(np.float32)
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= tol, kind


@needs_plastimatch
@pytest.mark.slow
def test_a_dicom_cohort_prepares_fine_tunes_and_runs_qa_end_to_end(validation_patients, tmp_path):
    from DoseDiffLib.openkbp import read_patient

    cohort = tmp_path / "cohort"
    openkbp_as_dicom(validation_patients / "pt_201", cohort / "alpha", "A1")
    openkbp_as_dicom(validation_patients / "pt_202", cohort / "bravo", "B2", names=RENAMED)
    openkbp_as_dicom(validation_patients / "pt_203", cohort / "charlie", "C3", with_dose=False)
    cache, run = tmp_path / "cache", tmp_path / "run"
    res = dosediff("prepare", "--dicom-cohort", cohort, "--cache", cache, "--prescription", "PTV_High=70",
                   "--prescription", "PTV_Mid=63", "--prescription", "PTV_Low=56")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(cache / "cohort_report.csv")))
    assert [(r["where"], r["status"]) for r in rows] == [("alpha", "used"), ("bravo", "used"), ("charlie", "skipped")]
    assert {r["split"] for r in rows[:2]} == {"train", "validation"}
    assert "no RTDOSE" in rows[2]["reason"]

    res = dosediff("train", "--cache", cache, "--run", run, "--set", f"init={BUNDLED}", "--set", "steps=2",
                   "--set", "batch_size=2", "--set", "val_every=2", "--set", "val_patients=1", "--set", "threads=1")
    assert res.returncode == 0, res.stderr
    card_text = (run / "best.json").read_text()
    card = json.loads(card_text)
    assert card["training"]["data"]["dicom_patients"] == 2
    assert card["training"]["data"]["prescriptions_gy"] == [[70.0, 63.0, 56.0]]
    assert "2 DICOM plans" in card["training_data"] and "OpenKBP" in card["training_data"]
    for secret in ("A1", "B2", "alpha", "bravo", "Test^"):
        assert secret not in card_text

    # the second plan over-doses its left parotid by 15 Gy: QA must flag it, first
    plan = read_patient(validation_patients / "pt_202")
    hot = plan.dose.array + 15.0 * plan.masks["LeftParotid"].array
    export = tmp_path / "hot"
    (export / "pt_202").mkdir(parents=True)
    for f in (validation_patients / "pt_202").iterdir():
        (export / "pt_202" / f.name).symlink_to(f)
    (export / "pt_202" / "dose.csv").unlink()
    from DoseDiffLib.openkbp import write_dose_csv

    write_dose_csv(plan.dose.with_array(hot.astype(np.float32)), export / "pt_202" / "dose.csv")
    shutil.rmtree(cohort / "bravo")
    openkbp_as_dicom(export / "pt_202", cohort / "bravo", "B2", names=RENAMED)
    res = dosediff("qa", "--dicom-cohort", cohort, "--out", tmp_path / "qa", "--prescription", "PTV_High=70",
                   "--prescription", "PTV_Mid=63", "--prescription", "PTV_Low=56", "--model", BUNDLED)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "qa" / "qa.json").read_text())
    first = summary["flagged_organs"][0]
    assert (first["organ"], first["structure"]) == ("LeftParotid", "Parotid_L")
    assert first["excess_gy"] > 10
    assert [c["status"] for c in summary["cases"]] == ["checked", "checked", "skipped"]
    page = (tmp_path / "qa" / "summary.html").read_text()
    assert "Parotid_L" in page and (tmp_path / "qa" / first_png(summary)).is_file()
    qa_rows = list(csv.DictReader(open(tmp_path / "qa" / "qa.csv")))
    assert qa_rows[0]["flagged"] == "True" and {r["metric"] for r in qa_rows} >= {"Dmean", "D0.1cc", "D2cc"}
    res = dosediff("qa", "--dicom-cohort", cohort, "--out", tmp_path / "qa", "--model", BUNDLED)
    assert res.returncode == 2 and "--overwrite" in res.stderr


def first_png(summary: dict) -> str:
    r = summary["flagged_organs"][0]
    return f"dvh/{r['case']}_{r['organ']}.png"


@pytest.mark.parametrize("args, message", [
    (["qa", "--dicom-cohort", "{missing}", "--out", "{out}"], "DICOM cohort folder"),
    (["qa", "--dicom-cohort", "{empty}", "--out", "{out}"], "No DICOM files under"),
    (["qa", "--dicom-cohort", "{empty}", "--out", "{out}", "--threshold-gy", "-1"], "non-negative"),
    (["prepare", "--dicom-cohort", "{empty}", "--cache", "{out}", "--split", "train={empty}"], "on its own"),
    (["prepare", "--split", "train={empty}", "--cache", "{out}", "--prescription", "PTV=60"], "--dicom-cohort"),
    (["predict", "--openkbp", "{empty}", "--out", "{out}/x.csv", "--prescription", "PTV=60"], "--openkbp"),
])
def test_bad_cohort_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "out": tmp_path / "out"}
    res = dosediff(*[a.format(**names) for a in args])
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("drawn", ["train", "validation"])
def test_a_cohort_always_has_a_patient_to_train_on_and_one_to_validate(tmp_path, drawn):
    """The per-patient draw can put every patient on one side; the ends of the draw then move across."""
    from DoseDiffLib.cohort import _ensure_both_splits

    entries = [{"pid": f"dcm_{k:010x}", "source": "dicom"} for k in (5, 900, 40)]
    index = {"splits": {drawn: list(entries)}}
    moved = _ensure_both_splits(index, 0.2, tmp_path)
    other = "validation" if drawn == "train" else "train"
    want = entries[0]["pid"] if other == "validation" else entries[1]["pid"]  # lowest draw validates, highest trains
    assert moved == {want: other}
    assert [e["pid"] for e in index["splits"][other]] == [want] and len(index["splits"][drawn]) == 2
    assert json.loads((tmp_path / "index.json").read_text())["splits"][other] == index["splits"][other]
    assert _ensure_both_splits(index, 0.2, tmp_path) == {}            # both sides held: nothing moves
    assert _ensure_both_splits({"splits": {drawn: entries[:1]}}, 0.2, tmp_path) == {}  # one patient: no split
