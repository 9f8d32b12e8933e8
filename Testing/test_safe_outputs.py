"""What is accepted but must be handled right: warnings for implausible structures, the
dose on an oblique CT's own grid, the card checksum's scope, sanitised names, and no
temporary file left by an interrupted or killed run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

import bad_inputs as B
from DoseDiffLib.cli import DEFAULT_MODEL, main
from DoseDiffLib.config import ModelConfig
from DoseDiffLib.modelcard import config_sha256, load_model
from DoseDiffLib.predict import prepare_case
from DoseDiffLib.volume import Volume, atomic_write, read_volume, safe_name, write_segmentation, write_volume

REPO = Path(__file__).resolve().parents[1]


def _ptv_in_air(ct, masks):
    masks["PTV70"] = masks["PTV70"].with_array(np.zeros_like(masks["PTV70"].array))
    masks["PTV70"].array[10:14, 2:8, 2:8] = 1
    return ct, masks


def _body_fills_image(ct, masks):
    masks["BODY"] = masks["BODY"].with_array(np.ones_like(masks["BODY"].array))
    return ct, masks


def _ptv_fills_ct(ct, masks):
    masks["PTV70"] = masks["PTV70"].with_array(np.ones_like(masks["PTV70"].array))
    return ct, masks


def _organ_copies_ptv(ct, masks):
    masks["Larynx"] = masks["PTV70"].with_array(masks["PTV70"].array.copy())
    return ct, masks


@pytest.mark.parametrize("change, warning", [
    (_ptv_in_air, "PTV70 lies mostly in air"),
    (_body_fills_image, "The body contour fills 100% of the image"),
    (_ptv_fills_ct, "PTV70 fills 100% of the CT"),
    (_organ_copies_ptv, "Larynx is identical to PTV70"),
])
def test_implausible_structures_are_warned_about(phantom, change, warning):
    cfg = ModelConfig.preset("test")
    assert not [w for w in prepare_case(*phantom, cfg).warnings if warning.split()[1] in w and "PTV70" in w]
    ct, masks = change(*phantom)
    warnings = prepare_case(ct, masks, cfg).warnings
    assert any(warning in w for w in warnings), warnings


def _rotated_about_z(vol: Volume, degrees: float) -> Volume:
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return Volume(vol.array, vol.spacing, vol.origin, tuple(rot.ravel()))


@pytest.mark.parametrize("degrees", [10.0, 180.0])
def test_dose_is_written_on_the_cts_own_grid(phantom, test_card, tmp_path, degrees):
    """An oblique (10 degrees) or rotated (180 degrees: a flipped, axis-aligned grid) CT gets its dose on its grid."""
    ct, masks = phantom
    ct = _rotated_about_z(ct, degrees)
    masks = {k: _rotated_about_z(m, degrees) for k, m in masks.items()}
    write_segmentation(masks, tmp_path / "s.seg.nrrd")
    write_volume(ct, tmp_path / "ct.nrrd")
    assert main(["predict", "--ct", str(tmp_path / "ct.nrrd"), "--structures", str(tmp_path / "s.seg.nrrd"),
                 "--model", str(test_card), "--out", str(tmp_path / "dose.nrrd"), "--steps", "1", "--seed", "0"]) == 0
    dose = read_volume(tmp_path / "dose.nrrd", reorient=False)
    assert dose.grid.close_to(ct.grid)
    assert np.allclose(dose.direction, ct.direction, atol=1e-6)
    near_body = ndimage.binary_dilation(masks["BODY"].array > 0, iterations=1)
    assert dose.array[~near_body].max() == 0 and dose.array.max() > 0


def test_sampler_settings_may_change_without_breaking_the_checksum(test_card, tmp_path):
    card = B.copy_card(test_card, tmp_path)
    B.edit_json(card, lambda d: d["config"]["diffusion"].update(sampler="regression", flip=True, z_smoothing_mm=2.5))
    _, cfg, _ = load_model(card)
    assert (cfg.diffusion.sampler, cfg.diffusion.flip, cfg.diffusion.z_smoothing_mm) == ("regression", True, 2.5)


def test_cards_without_the_configuration_checksum_still_load(test_card, tmp_path):
    card = B.copy_card(test_card, tmp_path)
    B.edit_json(card, lambda d: d["weights"].pop("config_sha256"))
    load_model(card)


def test_the_bundled_card_carries_its_configuration_checksum():
    from DoseDiffLib.registry import resolve

    card = json.loads(resolve(DEFAULT_MODEL).read_text())
    assert card["weights"]["config_sha256"] == config_sha256(card["config"])
    _, cfg, _ = load_model(resolve(DEFAULT_MODEL))
    assert cfg.net.image_size == 128


@pytest.mark.parametrize("text, name", [("../../etc/passwd", "etc_passwd"), (".hidden", "hidden"),
                                        ("a/b\\c:d", "a_b_c_d"), ("", "unnamed"), ("..", "unnamed"),
                                        ("PT 001", "PT_001")])
def test_names_from_input_data_stay_plain_file_names(text, name):
    assert safe_name(text) == name


def test_evaluate_keeps_a_hostile_patient_id_inside_the_report(tmp_path):
    folder = B.dicom_case(tmp_path / "dcm")
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.PatientID = "../../escaped"
        ds.save_as(f)
    pred = B.dicom_prediction(folder, tmp_path / "pred.nrrd")
    assert main(["evaluate", "--dicom", str(folder), "--prediction", str(pred), "--out", str(tmp_path / "rep"),
                 "--no-gamma"]) == 0
    assert (tmp_path / "rep" / "dvh_escaped.png").is_file()
    assert not list(tmp_path.parent.glob("*escaped*")) and not list(tmp_path.glob("*escaped*"))


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import DoseDiffLib.cli as cli
    from DoseDiffLib.volume import atomic_write, make_folder

    def slow(args):
        make_folder(args.out.parent)
        def writer(p):
            p.write_text("half")
            print("writing", flush=True)
            time.sleep(60)
        atomic_write(args.out, writer)
    cli.COMMANDS["init-model"] = slow
    sys.exit(cli.main(["init-model", "--out", sys.argv[1]]))
""")


def _start_slow_writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_terminated_run_removes_its_temporary_and_its_folders(tmp_path):
    proc = _start_slow_writer(tmp_path / "new" / "m.json")
    assert list((tmp_path / "new").iterdir())  # the temporary exists while writing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines() == ["error: Interrupted; the files this run had started were removed "
                                        "(finished work of a cohort prediction, prepare or train is kept)."]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_temporary_is_removed_by_the_next_write(tmp_path):
    (tmp_path / "new").mkdir()
    proc = _start_slow_writer(tmp_path / "new" / "m.json")
    proc.send_signal(signal.SIGKILL)  # cannot be caught: the temporary stays behind
    proc.communicate(timeout=60)
    left = [p.name for p in (tmp_path / "new").iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.json.") and "dosediff-tmp" in left[0]
    mine = tmp_path / "new" / f".m.json.{os.getpid()}.x.dosediff-tmp.json"  # a live writer's: kept
    mine.write_text("in progress")
    atomic_write(tmp_path / "new" / "other.json", lambda p: p.write_text("{}"))  # any write into the folder
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(["other.json", mine.name])


@pytest.mark.parametrize("keep_files", [False, True])
def test_a_failed_block_removes_what_it_created(tmp_path, keep_files):
    """One-result commands lose everything they started; resumable ones keep finished files."""
    from DoseDiffLib.errors import DoseDiffError
    from DoseDiffLib.volume import all_or_nothing, make_folder

    (tmp_path / "old.txt").write_text("the user's")
    with pytest.raises(DoseDiffError), all_or_nothing(keep_files=keep_files):
        make_folder(tmp_path / "a" / "done")
        make_folder(tmp_path / "a" / "empty")
        atomic_write(tmp_path / "a" / "done" / "pt_1.csv", lambda p: p.write_text("finished"))
        atomic_write(tmp_path / "old.txt", lambda p: p.write_text("replaced"), overwrite=True)
        raise DoseDiffError("the second patient failed")
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == (["a", "a/done", "a/done/pt_1.csv", "old.txt"] if keep_files else ["old.txt"])
    assert (tmp_path / "old.txt").read_text() == "replaced"  # asked to overwrite: not restored, not deleted


def test_an_unexpected_error_leaves_its_full_trace_where_the_line_says(tmp_path, monkeypatch, capsys):
    import re
    import tempfile

    import DoseDiffLib.cli as cli

    def crash(_args):
        return {}["missing"]
    monkeypatch.setitem(cli.COMMANDS, "init-model", crash)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["init-model", "--out", str(tmp_path / "m.json")]) == 2
    line = capsys.readouterr().err.strip()
    path = Path(re.search(r"full trace in (\S+);", line).group(1))
    assert path.parent == tmp_path and "Traceback" in path.read_text() and "KeyError: 'missing'" in path.read_text()
