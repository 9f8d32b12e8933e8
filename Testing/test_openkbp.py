"""OpenKBP reading: orientation proven on a real patient, and the submission CSV."""
import numpy as np
import pytest

from DoseDiffLib import openkbp
from DoseDiffLib.volume import Volume


def test_axis_conversion_round_trip_and_direction():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # (y, x, -z) file order
    ours = openkbp.from_openkbp_axes(a)
    assert ours.shape == (4, 2, 3)
    assert ours[0, 0, 0] == a[0, 0, 3]  # first of our slices (most inferior) is the file's last
    np.testing.assert_array_equal(openkbp.to_openkbp_axes(ours), a)


def centroid_mm(v: Volume) -> np.ndarray:
    k, j, i = np.nonzero(v.array)
    return v.grid.physical(np.stack([i, j, k], 1).mean(0))[0]


@pytest.fixture(scope="module")
def patient(openkbp_patient):
    return openkbp.read_patient(openkbp_patient)


def test_real_patient_is_in_lps_orientation(patient):
    p = patient
    assert p.ct.array.shape == (128, 128, 128)
    assert p.ct.spacing == pytest.approx((5.422, 5.422, 3.0))
    cord, larynx = centroid_mm(p.masks["SpinalCord"]), centroid_mm(p.masks["Larynx"])
    left, right = centroid_mm(p.masks["LeftParotid"]), centroid_mm(p.masks["RightParotid"])
    stem, eso = centroid_mm(p.masks["Brainstem"]), centroid_mm(p.masks["Esophagus"])
    assert cord[1] > larynx[1] + 20          # cord posterior (+y) of the larynx
    assert left[0] > right[0] + 50           # left parotid at +x (patient's left)
    assert stem[2] > eso[2] + 50             # brainstem superior (+z) of the oesophagus
    ptv = p.masks["PTV70"].array.astype(bool)
    assert p.possible_dose.array[ptv].all()  # target inside the possible-dose region
    assert np.median(p.ct.array[ptv]) > -200  # in tissue, not air (HU, offset removed)
    assert p.ct.array.min() >= -1024 and p.ct.array[0, 0, 0] == -1024
    assert p.dose.array[ptv].mean() == pytest.approx(70, abs=5)


def test_dose_csv_round_trip_matches_the_original_file(patient, openkbp_patient, tmp_path):
    path = openkbp.write_dose_csv(patient.dose, tmp_path / "pt_201.csv")
    assert path.read_text().splitlines()[0] == ",data"
    ours = openkbp._read_sparse(path, True)
    original = openkbp._read_sparse(openkbp_patient / "dose.csv", True)
    np.testing.assert_allclose(ours, original, atol=1e-4)
