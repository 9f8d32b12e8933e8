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
