"""DICOM RT: read what plastimatch writes, write what dciodvfy and plastimatch accept."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from DoseDiffLib.dicomrt import SERIES_DESCRIPTION, read_dicom, write_rtdose
from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.volume import Volume, read_volume, write_volume

needs_plastimatch = pytest.mark.skipif(shutil.which("plastimatch") is None, reason="plastimatch not installed")
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Images and masks on a grid with non-square pixels, and a DICOM export by plastimatch."""
    if shutil.which("plastimatch") is None:
        pytest.skip("plastimatch not installed")
    root = tmp_path_factory.mktemp("dicom")
    ct, masks = head_and_neck(shape=(30, 100, 90), spacing=(2.0, 2.5, 3.0))
    ct = ct.with_array(np.round(ct.array).astype(np.int16))
    write_volume(ct, root / "ct.nrrd")
    (root / "masks").mkdir()
    for k, v in masks.items():
        write_volume(v, root / "masks" / f"{k}.nrrd")
    z, y, x = np.indices(ct.array.shape)
    dose = (60 * np.exp(-((x - 30) ** 2 + (y - 45) ** 2 + (z - 12) ** 2) / 300.0)).astype(np.float32)
    write_volume(ct.with_array(dose), root / "dose.nrrd")
    subprocess.run(["plastimatch", "convert", "--input", str(root / "ct.nrrd"), "--input-prefix", str(root / "masks"),
                    "--input-dose-img", str(root / "dose.nrrd"), "--output-dicom", str(root / "dicom")],
                   check=True, capture_output=True)
    return root, ct, masks, ct.with_array(dose)


@needs_plastimatch
def test_reads_plastimatch_export(source):
    root, ct, masks, dose = source
    case = read_dicom(root / "dicom")
    assert case.ct.grid.close_to(ct.grid)
    np.testing.assert_array_equal(case.ct.array, ct.array)
    for name, m in masks.items():
        assert dice(case.structures[name].array, m.array) >= 0.97, name
    scale = float(dose.array.max()) / 2 ** 31  # plastimatch writes 32-bit
    assert np.abs(case.reference_dose.array - dose.array).max() <= max(scale, 1e-4)


@needs_plastimatch
@needs_dciodvfy
def test_written_rtdose_passes_dciodvfy_and_round_trips(source, tmp_path):
    root, ct, _, dose = source
    case = read_dicom(root / "dicom")
    path = write_rtdose(dose, case.ct_datasets, tmp_path / "out", model_name="test")
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
    ds = pydicom.dcmread(path)
    ct0 = case.ct_datasets[0]
    assert ds.StudyInstanceUID == ct0.StudyInstanceUID and ds.FrameOfReferenceUID == ct0.FrameOfReferenceUID
    assert ds.PatientID == ct0.PatientID and ds.SeriesDescription == SERIES_DESCRIPTION
    assert ds.DoseUnits == "GY" and ds.DoseSummationType == "PLAN" and ds.DoseType == "PHYSICAL"
    assert float(ds.GridFrameOffsetVector[0]) == 0.0
    assert {r.ReferencedSOPInstanceUID for r in ds.ReferencedImageSequence} == \
        {h.SOPInstanceUID for h in case.ct_datasets}
    step = float(ds.DoseGridScaling)
    back = ds.pixel_array * step
    np.testing.assert_allclose(back, dose.array, atol=step / 2 + 1e-6)
    # plastimatch reads it back to the same dose and geometry
    subprocess.run(["plastimatch", "convert", "--input", str(path), "--output-dose-img", str(tmp_path / "b.nrrd")],
                   check=True, capture_output=True)
    pm = read_volume(tmp_path / "b.nrrd")
    assert pm.grid.close_to(dose.grid)
    np.testing.assert_allclose(pm.array, dose.array, atol=step / 2 + 1e-4)
    # new UIDs each time, and never a silent overwrite
    with pytest.raises(DoseDiffError, match="already holds an RTDOSE"):
        write_rtdose(dose, case.ct_datasets, tmp_path / "out")
    again = write_rtdose(dose, case.ct_datasets, tmp_path / "out2")
    assert pydicom.dcmread(again).SOPInstanceUID != ds.SOPInstanceUID


def test_negative_and_nan_doses_are_clipped_not_wrapped(tmp_path):
    from DoseDiffLib.dicomrt import rtdose_dataset

    ct_header = pydicom.Dataset()
    for k, v in dict(SOPClassUID="1.2.840.10008.5.1.4.1.1.2", SOPInstanceUID="1.2.3", StudyInstanceUID="1.2",
                     FrameOfReferenceUID="1.2.4", PatientID="p", PatientName="x").items():
        setattr(ct_header, k, v)
    arr = np.array([[[-5.0, np.nan], [10.0, 20.0]]], np.float32)
    ds = rtdose_dataset(Volume(arr, (1, 1, 1)), [ct_header])
    vals = np.frombuffer(ds.PixelData, np.uint16).reshape(arr.shape) * float(ds.DoseGridScaling)
    np.testing.assert_allclose(vals, [[[0, 0], [10, 20]]], atol=1e-3)


def _edit(folder: Path, pattern: str, fn) -> None:
    for f in folder.glob(pattern):
        ds = pydicom.dcmread(f)
        fn(ds)
        ds.save_as(f)


@needs_plastimatch
def test_bad_dicom_folders(source, tmp_path):
    root, *_ = source
    base = tmp_path / "d"
    # a missing slice
    shutil.copytree(root / "dicom", base)
    sorted(base.glob("image*"))[10].unlink()
    with pytest.raises(DoseDiffError, match="missing slice"):
        read_dicom(base)
    # two series in one folder
    shutil.rmtree(base)
    shutil.copytree(root / "dicom", base)
    for f in list(base.glob("image*"))[:3]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(base / f"second_{f.name}")
    with pytest.raises(DoseDiffError, match="holds 2 CT series.*--series-uid"):
        read_dicom(base)
    # RTSTRUCT in another frame of reference
    shutil.rmtree(base)
    shutil.copytree(root / "dicom", base)

    def other_for(ds):
        for r in ds.ReferencedFrameOfReferenceSequence:
            r.FrameOfReferenceUID = "1.2.999"
        for r in ds.StructureSetROISequence:
            r.ReferencedFrameOfReferenceUID = "1.2.999"
    _edit(base, "rtss*", other_for)
    with pytest.raises(DoseDiffError, match="another frame of reference"):
        read_dicom(base)
    # relative dose units; non-DICOM files mixed in are ignored with a warning
    shutil.rmtree(base)
    shutil.copytree(root / "dicom", base)
    (base / "notes.txt").write_text("not dicom")

    def relative(ds):
        ds.DoseUnits = "RELATIVE"
    _edit(base, "dose*", relative)
    with pytest.raises(DoseDiffError, match="RELATIVE units"):
        read_dicom(base)
    # a truncated file is one clear error
    shutil.rmtree(base)
    shutil.copytree(root / "dicom", base)
    f = sorted(base.glob("image*"))[0]
    f.write_bytes(f.read_bytes()[:400])
    with pytest.raises(DoseDiffError, match="damaged DICOM|Cannot decode"):
        read_dicom(base)


@needs_plastimatch
def test_cli_predict_from_dicom_to_rtdose_and_evaluate_against_the_plan(source, test_card, tmp_path):
    from DoseDiffLib.cli import main

    root, ct, _, dose = source
    out = tmp_path / "rt"
    assert main(["predict", "--dicom", str(root / "dicom"), "--out-dicom", str(out), "--model", str(test_card),
                 "--steps", "1", "--seed", "0"]) == 0
    rtdose = next(out.glob("RTDOSE_*.dcm"))
    ds = pydicom.dcmread(rtdose)
    assert (int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)) == ct.array.shape
    assert main(["predict", "--dicom", str(root / "dicom"), "--out-dicom", str(out), "--model", str(test_card)]) == 2
    # the clinical plan against itself: zero dose score; the prediction: a real number
    assert main(["evaluate", "--dicom", str(root / "dicom"), "--prediction", str(root / "dose.nrrd"),
                 "--out", str(tmp_path / "self"), "--no-gamma"]) == 0
    import json
    rep = json.loads((tmp_path / "self" / "metrics.json").read_text())
    assert rep["overall"]["dose_score"] < 1e-3
    assert main(["evaluate", "--dicom", str(root / "dicom"), "--prediction", str(rtdose),
                 "--out", str(tmp_path / "pred"), "--no-gamma"]) == 0
    rep = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert rep["overall"]["dose_score"] > 0.1


def test_pydicom_bundled_rt_files():
    from pydicom.data import get_testdata_file

    from DoseDiffLib.dicomrt import _read, read_rtdose, rtstruct_contours

    ss = _read(Path(get_testdata_file("rtstruct.dcm")), headers_only=False)  # has no preamble
    contours = rtstruct_contours(ss)
    assert contours and all(isinstance(k, str) for k in contours)
    assert any(len(v) > 0 and v[0].shape[1] == 3 for v in contours.values())
    with pytest.raises(DoseDiffError, match="RELATIVE units"):  # its dose grid is relative
        read_rtdose(get_testdata_file("rtdose.dcm"))
    with pytest.raises(DoseDiffError, match="not an RTDOSE"):
        read_rtdose(get_testdata_file("rtplan.dcm"))


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_patient_orientations_keep_anatomy_in_place(position, tmp_path):
    from dicom_synth import square, write_ct, write_rtstruct

    rows, cols, n = 60, 50, 12
    hu = np.full((n, rows, cols), -1000.0)
    hu[:, 10:50, 8:42] = 40.0
    r, c, s = 20, 35, 4
    hu[s, r, c] = 1500.0  # a marker
    study, frame, zs = write_ct(tmp_path / "d", hu, position, spacing=(1.5, 2.0))
    from dicom_synth import ORIENTATIONS
    iop = np.array(ORIENTATIONS[position], float)
    x0 = -60.0 if iop[0] > 0 else -60.0 + (cols - 1) * 2.0
    y0 = -80.0 if iop[4] > 0 else -80.0 + (rows - 1) * 1.5
    marker = np.array([x0, y0, zs[s]]) + c * 2.0 * iop[:3] + r * 1.5 * iop[3:]
    # edges on voxel boundaries (x centres at even mm, y centres at -80 + 1.5 j): 6 x 8 voxels exactly
    write_rtstruct(tmp_path / "d", study, frame, {"Parotid_L": [square(9.0, -41.75, zs[7], 6.0)]})
    case = read_dicom(tmp_path / "d")
    k, j, i = np.unravel_index(np.argmax(case.ct.array), case.ct.array.shape)
    np.testing.assert_allclose(case.ct.grid.physical([i, j, k])[0], marker, atol=1e-4)
    m = case.structures["Parotid_L"]
    kk, jj, ii = np.nonzero(m.array)
    centre = m.grid.physical(np.stack([ii, jj, kk], 1).mean(0))[0]
    np.testing.assert_allclose(centre, [9.0, -41.75, zs[7]], atol=1e-6)
    assert m.array.sum() * 2.0 * 1.5 == pytest.approx(144.0)  # 12 x 12 mm square on one slice
    # a dose hotspot at the marker survives RTDOSE export in this orientation
    dose = case.ct.with_array(np.where(case.ct.array > 1000, 50.0, 1.0).astype(np.float32))
    path = write_rtdose(dose, case.ct_datasets, tmp_path / "out")
    from DoseDiffLib.dicomrt import read_rtdose
    back = read_rtdose(path)
    k, j, i = np.unravel_index(np.argmax(back.array), back.array.shape)
    np.testing.assert_allclose(back.grid.physical([i, j, k])[0], marker, atol=1e-3)
    if shutil.which("plastimatch"):
        subprocess.run(["plastimatch", "convert", "--input", str(path), "--output-dose-img", str(tmp_path / "p.nrrd")],
                       check=True, capture_output=True)
        pm = read_volume(tmp_path / "p.nrrd")
        k, j, i = np.unravel_index(np.argmax(pm.array), pm.array.shape)
        np.testing.assert_allclose(pm.grid.physical([i, j, k])[0], marker, atol=1e-3)


def test_non_uniform_slice_spacing_is_resampled_not_broken(tmp_path):
    from dicom_synth import write_ct

    hu = np.full((6, 20, 20), -1000.0)
    hu[:, 5:15, 5:15] = np.arange(6)[:, None, None] * 100.0
    zs = [0.0, 3.0, 6.0, 8.0, 11.0, 14.0]  # one 2 mm step among 3 mm steps
    write_ct(tmp_path / "d", hu, "HFS", slice_z=zs)
    case = read_dicom(tmp_path / "d")
    assert any("spacing varies" in w for w in case.warnings)
    assert case.ct.spacing[2] == pytest.approx(3.0)
    # values interpolated at the uniform positions 0, 3, ..., 15 -> 14 is the last within range
    centre = case.ct.array[:, 10, 10]
    np.testing.assert_allclose(centre[:3], [0, 100, 200], atol=1e-3)
    assert centre[3] == pytest.approx(300 + 100 * (9 - 8) / 3, abs=1e-3)  # z = 9 between 8 and 11


def test_compressed_ct_decoded_or_named(tmp_path):
    from pydicom.uid import RLELossless

    from dicom_synth import write_ct

    hu = np.full((3, 16, 16), -1000.0)
    hu[:, 4:12, 4:12] = 50.0
    write_ct(tmp_path / "d", hu, "HFS")
    for f in (tmp_path / "d").glob("ct_*.dcm"):
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)  # pydicom encodes and decodes RLE without extra packages
        ds.save_as(f)
    case = read_dicom(tmp_path / "d")
    np.testing.assert_array_equal(case.ct.array, hu)
    # JPEG 2000 needs a plugin this environment does not have: the error names the packages
    for f in (tmp_path / "d").glob("ct_*.dcm"):
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
        ds.save_as(f)
    try:
        import pylibjpeg  # noqa: F401
        pytest.skip("a JPEG 2000 decoder is installed")
    except ImportError:
        pass
    with pytest.raises(DoseDiffError, match="pylibjpeg"):
        read_dicom(tmp_path / "d")


@needs_plastimatch
def test_dvh_metrics_agree_with_dicompyler_core(source):
    pytest.importorskip("dicompylercore")
    import pydicom.dicomio

    if not hasattr(pydicom.dicomio, "read_file"):  # dicompyler-core 0.5.6 predates pydicom 3
        pydicom.dicomio.read_file = pydicom.dcmread
    from dicompylercore import dicomparser, dvhcalc

    root, *_ = source
    ss = str(next((root / "dicom").glob("rtss*")))
    dose = str(next((root / "dicom").glob("dose*")))
    case = read_dicom(root / "dicom")
    prescription = 70.0
    for number, s in dicomparser.DicomParser(ss).GetStructures().items():
        if s["name"] not in ("PTV70", "PTV56", "SpinalCord", "LeftParotid", "Larynx"):
            continue
        theirs = dvhcalc.get_dvh(ss, dose, number)
        m = case.structures[s["name"]].array.astype(bool)
        d = case.reference_dose.array[m]
        assert float(d.mean()) == pytest.approx(theirs.mean, abs=0.01 * prescription), s["name"]
        assert float(np.percentile(d, 5)) == pytest.approx(theirs.D95.value, abs=0.01 * prescription), s["name"]
        assert m.sum() * case.ct.grid.voxel_volume_mm3() / 1000 == pytest.approx(theirs.volume, rel=0.01)
