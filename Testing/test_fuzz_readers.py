"""Damaged files of every format the readers take: only DoseDiffError may escape.

Each reader gets a valid file with a few bytes replaced (biased towards the characters
headers are made of) and possibly cut short. The examples are derandomised and few,
so the suite stays fast and repeatable in CI; raise FUZZ_EXAMPLES to search longer.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bad_inputs as B
from DoseDiffLib.dicomrt import read_dicom, read_rtdose
from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.openkbp import read_patient
from DoseDiffLib.phantom import head_and_neck
from DoseDiffLib.volume import read_structures, read_volume, write_segmentation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on damaged tags
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HEADER_BYTES = list(b"0123456789 -.:,()\n=e") + list(range(256))


def damage(size: int, start: int = 0, stop: int | None = None):
    """A strategy: (replacements [(offset, byte)], new length or None) for a file of `size` bytes."""
    stop = size if stop is None else min(stop, size)
    edits = st.lists(st.tuples(st.integers(start, stop - 1), st.sampled_from(HEADER_BYTES)), min_size=1, max_size=6)
    return st.tuples(edits, st.one_of(st.none(), st.integers(0, size)))


def apply(data: bytes, change) -> bytes:
    edits, cut = change
    buf = bytearray(data)
    for offset, value in edits:
        buf[offset] = value
    return bytes(buf[:cut] if cut is not None else buf)


def damaged_copy(src: Path, target: Path, name: str, data: bytes) -> Path:
    """A fresh copy of the folder src with its file `name` replaced by data."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(src, target)
    (target / name).write_bytes(data)
    return target


def only_our_error(read, path: Path) -> None:
    try:
        read(path)
    except DoseDiffError:
        pass


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One valid file (or folder) per format."""
    root = tmp_path_factory.mktemp("fuzz")
    ct, masks = head_and_neck(shape=(6, 16, 16), spacing=(3.0, 3.0, 3.0))
    img = ct.to_sitk()
    sitk.WriteImage(img, str(root / "ct.nrrd"), useCompression=False)
    sitk.WriteImage(img, str(root / "ct.nii"), useCompression=False)
    write_segmentation({k: masks[k] for k in ("BODY", "PTV70")}, root / "s.seg.nrrd")
    B.openkbp_patient(root / "pt_1")
    B.dicom_case(root / "dcm")
    return {"nrrd": root / "ct.nrrd", "nifti": root / "ct.nii", "seg": root / "s.seg.nrrd",
            "openkbp": root / "pt_1", "dicom": root / "dcm"}


def _header_length(path: Path) -> int:
    data = path.read_bytes()
    return data.index(b"\n\n") + 2 if b"\n\n" in data else len(data)


@pytest.mark.parametrize("kind", ["nrrd", "nifti"])
def test_damaged_images(files, tmp_path, kind):
    src = files[kind]
    data = src.read_bytes()
    header = _header_length(src) if kind == "nrrd" else 352

    @FUZZ
    @given(change=damage(len(data), 0, header))
    def run(change):
        target = tmp_path / src.name
        target.write_bytes(apply(data, change))
        only_our_error(read_volume, target)
    run()


def test_damaged_segmentations(files, tmp_path):
    src = files["seg"]
    data = src.read_bytes()

    @FUZZ
    @given(change=damage(len(data), 0, _header_length(src)))
    def run(change):
        target = tmp_path / src.name
        target.write_bytes(apply(data, change))
        only_our_error(read_structures, target)
    run()


@pytest.mark.parametrize("name", ["ct.csv", "PTV70.csv", "voxel_dimensions.csv"])
def test_damaged_openkbp_files(files, tmp_path, name):
    src = files["openkbp"]
    data = (src / name).read_bytes()

    @FUZZ
    @given(change=damage(len(data), 0, min(len(data), 400)))
    def run(change):
        only_our_error(read_patient, damaged_copy(src, tmp_path / "pt_1", name, apply(data, change)))
    run()


@pytest.mark.parametrize("pattern", ["ct_003.dcm", "rtstruct.dcm", "RTDOSE*"])
def test_damaged_dicom_headers(files, tmp_path, pattern):
    src = files["dicom"]
    name = next(src.glob(pattern)).name
    data = (src / name).read_bytes()
    pixels = len(data) - 3200 if name.startswith("ct_") else len(data)

    @FUZZ
    @given(change=damage(len(data), 128, min(pixels, 2000)))
    def run(change):
        target = damaged_copy(src, tmp_path / "dcm", name, apply(data, change))
        only_our_error(read_dicom, target)
        if name.startswith("RTDOSE"):
            only_our_error(read_rtdose, target / name)
    run()


def test_the_fuzzed_files_are_valid_before_damage(files):
    """The mutations start from files the readers accept, so a refusal is the damage's doing."""
    assert read_volume(files["nrrd"]).array.shape == (6, 16, 16)
    assert read_volume(files["nifti"]).array.shape == (6, 16, 16)
    assert set(read_structures(files["seg"])) == {"BODY", "PTV70"}
    assert read_patient(files["openkbp"]).dose is not None
    case = read_dicom(files["dicom"])
    assert case.reference_dose is not None and set(case.structures) == {"BODY", "PTV70"}
    assert np.isfinite(case.ct.array).all()
