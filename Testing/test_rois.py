"""ROI name matching: synonyms, strictness, ambiguity and the user's mapping."""
import json

import pytest

from DoseDiffLib.config import ModelConfig
from DoseDiffLib.errors import DoseDiffError
from DoseDiffLib.rois import canonical_name, match_rois, read_mapping

ROIS = ModelConfig().conditions.rois


@pytest.mark.parametrize("name,expected", [
    ("PTV_70", "PTV70"), ("PTV 70Gy", "PTV70"), ("ptv70", "PTV70"), ("PTV7000", "PTV70"),
    ("PTV_56", "PTV56"), ("PTV 63 Gy", "PTV63"), ("Parotid_L", "LeftParotid"), ("L Parotid", "LeftParotid"),
    ("PAROTID RT", "RightParotid"), ("Spinal Cord", "SpinalCord"), ("Cord", "SpinalCord"),
    ("Brain_Stem", "Brainstem"), ("Oesophagus", "Esophagus"), ("Bone_Mandible", "Mandible"),
    ("External", "BODY"), ("BODY", "BODY"),
])
def test_synonyms(name, expected):
    assert canonical_name(name, ROIS) == expected


@pytest.mark.parametrize("name", ["SpinalCord_PRV5", "Cord PRV", "PTV66", "PTV_70_eval", "z_Parotid_L",
                                  "Parotids", "Ring_PTV70", "Brainstem+3mm", "CTV70"])
def test_helpers_and_other_levels_are_not_matched(name):
    assert canonical_name(name, ROIS) is None


def test_ambiguity_is_an_error_that_names_the_candidates():
    with pytest.raises(DoseDiffError, match="Parotid_L, L Parotid"):
        match_rois(["Parotid_L", "L Parotid", "PTV70"], ROIS)


def test_mapping_overrides_and_can_ignore(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"PTV70": "PTV_High", "SpinalCord": None, "LeftParotid": "Parotid_L"}))
    m = match_rois(["PTV_High", "Cord", "Parotid_L", "L Parotid"], ROIS, read_mapping(f))
    assert m == {"PTV70": "PTV_High", "LeftParotid": "Parotid_L"}


def test_mapping_errors_are_clear(tmp_path):
    with pytest.raises(DoseDiffError, match="not a model ROI"):
        match_rois(["a"], ROIS, {"Liver": "a"})
    with pytest.raises(DoseDiffError, match="no such structure"):
        match_rois(["a"], ROIS, {"PTV70": "b"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DoseDiffError, match="Cannot read ROI mapping"):
        read_mapping(bad)
