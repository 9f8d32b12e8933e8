"""Synthetic DICOM CT series and RTSTRUCTs in any patient orientation, for tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"
SS = "1.2.840.10008.5.1.4.1.1.481.3"
# Image orientations (row, column direction cosines) for common patient positions
ORIENTATIONS = {"HFS": (1, 0, 0, 0, 1, 0), "HFP": (-1, 0, 0, 0, -1, 0),
                "FFS": (-1, 0, 0, 0, 1, 0), "FFP": (1, 0, 0, 0, -1, 0)}


def _base(study, frame, modality, sop_class):
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "DD001", "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20260101", "120000", "1"
    ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_ct(folder: Path, hu: np.ndarray, position: str, spacing=(1.5, 2.0), slice_z=None,
             origin=(-60.0, -80.0), prefix: str = "") -> tuple[str, str, list[float]]:
    """hu is (slices, rows, columns) as the scanner stores it; returns study, frame, z positions.

    Slices are written in a shuffled order with SliceLocation deliberately wrong, so only
    ImagePositionPatient can order them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, frame, series = generate_uid(), generate_uid(), generate_uid()
    iop = ORIENTATIONS[position]
    n = len(hu)
    slice_z = list(slice_z if slice_z is not None else np.arange(n) * 3.0 - 30.0)
    rng = np.random.default_rng(0)
    for idx in rng.permutation(n):
        ds = _base(study, frame, "CT", CT)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series, 1, int(idx) + 1
        ds.PatientPosition = position
        ds.ImageOrientationPatient = list(iop)
        rows, cols = hu.shape[1:]
        x0 = origin[0] if iop[0] > 0 else origin[0] + (cols - 1) * spacing[1]
        y0 = origin[1] if iop[4] > 0 else origin[1] + (rows - 1) * spacing[0]
        ds.ImagePositionPatient = [float(x0), float(y0), float(slice_z[idx])]
        ds.SliceLocation = 999.0 - idx  # wrong on purpose
        ds.PixelSpacing = [spacing[0], spacing[1]]  # row spacing, column spacing
        ds.SliceThickness = 3.0
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[idx] + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{prefix}ct_{idx:03d}.dcm", enforce_file_format=True)
    return study, frame, slice_z


def write_rtstruct(folder: Path, study: str, frame: str, rois: dict[str, list[np.ndarray]], prefix: str = "") -> Path:
    """rois: name -> list of (N, 3) LPS contours."""
    ds = _base(study, frame, "RTSTRUCT", SS)
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 2
    ds.StructureSetLabel = "test"
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref])
    roi_items, contour_items = [], []
    for number, (name, polys) in enumerate(rois.items(), start=1):
        r = Dataset()
        r.ROINumber, r.ROIName, r.ReferencedFrameOfReferenceUID, r.ROIGenerationAlgorithm = number, name, frame, "MANUAL"
        roi_items.append(r)
        c = Dataset()
        c.ReferencedROINumber = number
        c.ROIDisplayColor = [255, 0, 0]
        seq = []
        for p in polys:
            ci = Dataset()
            ci.ContourGeometricType = "CLOSED_PLANAR"
            ci.NumberOfContourPoints = len(p)
            ci.ContourData = [f"{v:.4f}" for v in np.asarray(p).ravel()]
            seq.append(ci)
        c.ContourSequence = Sequence(seq)
        contour_items.append(c)
    ds.StructureSetROISequence = Sequence(roi_items)
    ds.ROIContourSequence = Sequence(contour_items)
    path = folder / f"{prefix}rtstruct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rtplan(folder: Path, study: str, frame: str, targets: dict[int, float], prefix: str = "") -> Path:
    """An RTPLAN whose target dose references prescribe Gy to ROI numbers of the structure set."""
    ds = _base(study, frame, "RTPLAN", "1.2.840.10008.5.1.4.1.1.481.5")
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 3
    ds.RTPlanLabel, ds.RTPlanGeometry = "test", "PATIENT"
    refs = []
    for k, (number, gy) in enumerate(targets.items(), start=1):
        r = Dataset()
        r.DoseReferenceNumber, r.DoseReferenceStructureType, r.DoseReferenceType = k, "VOLUME", "TARGET"
        r.ReferencedROINumber, r.TargetPrescriptionDose = number, gy
        refs.append(r)
    organ = Dataset()  # an organ constraint is not a prescription
    organ.DoseReferenceNumber, organ.DoseReferenceStructureType, organ.DoseReferenceType = 99, "VOLUME", "ORGAN_AT_RISK"
    organ.ReferencedROINumber, organ.OrganAtRiskMaximumDose = 1, 26.0
    ds.DoseReferenceSequence = Sequence(refs + [organ])
    path = folder / f"{prefix}rtplan.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def square(cx, cy, z, half):
    return np.array([[cx - half, cy - half, z], [cx + half, cy - half, z], [cx + half, cy + half, z],
                     [cx - half, cy + half, z]])


def openkbp_as_dicom(patient_dir: Path, out: Path, patient_id: str, names: dict[str, str] | None = None,
                     with_dose: bool = True, body_name: str = "BODY") -> Path:
    """An OpenKBP patient exported as a planning system would: CT series, RTSTRUCT, RTDOSE (by plastimatch).

    The possible-dose mask becomes the body contour; names renames structures (OpenKBP
    name -> clinic name), as another clinic would call them.
    """
    import shutil
    import subprocess
    import tempfile

    from DoseDiffLib.openkbp import read_patient
    from DoseDiffLib.volume import write_volume

    p = read_patient(patient_dir, with_dose=True)
    work = Path(tempfile.mkdtemp(prefix="openkbp-nrrd-"))
    (work / "masks").mkdir(parents=True, exist_ok=True)
    write_volume(p.ct.with_array(p.ct.array.astype(np.int16)), work / "ct.nrrd", overwrite=True)
    for roi, m in {**p.masks, body_name: p.possible_dose}.items():
        write_volume(m, work / "masks" / f"{(names or {}).get(roi, roi)}.nrrd", overwrite=True)
    cmd = ["plastimatch", "convert", "--input", str(work / "ct.nrrd"), "--input-prefix", str(work / "masks"),
           "--output-dicom", str(out), "--patient-id", patient_id, "--patient-name", f"Test^{patient_id}"]
    if with_dose:
        write_volume(p.dose, work / "dose.nrrd", overwrite=True)
        cmd[4:4] = ["--input-dose-img", str(work / "dose.nrrd")]
    subprocess.run(cmd, check=True, capture_output=True)
    shutil.rmtree(work)
    return out
