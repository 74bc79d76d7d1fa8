from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.images.platemap import (
    check_platemap_against_fields,
    expand_platemap,
    format_well,
    infer_plate_format,
    normalize_well,
    parse_well,
    read_platemap,
    with_well_positions,
)
from tests.conftest import shared_data


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "platemap.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("A01", (0, 0)),
        ("a1", (0, 0)),
        ("P24", (15, 23)),
        ("Z01", (25, 0)),
        ("AA01", (26, 0)),
        ("AF48", (31, 47)),
        ("H012", (7, 11)),
    ],
)
def test_parse_well(name, expected):
    assert parse_well(name) == expected


@pytest.mark.parametrize(
    "name", ["", "A", "01", "A00", "A49", "AG01", "1A", "A-1", "ABC1"]
)
def test_parse_well_rejects_non_wells(name):
    with pytest.raises(ValueError, match="well"):
        parse_well(name)


def test_format_well_roundtrip_all_1536():
    names = [format_well(r, c) for r in range(32) for c in range(48)]
    assert names[0] == "A01" and names[-1] == "AF48" and len(set(names)) == 1536
    assert all(format_well(*parse_well(n)) == n for n in names)


def test_with_well_positions_adds_zero_based_rows_and_columns():
    wells = pd.DataFrame({"Metadata_Well": ["A01", "P24", "AF48"], "x": [1, 2, 3]})
    out = with_well_positions(wells)
    assert out["row_index"].tolist() == [0, 15, 31]
    assert out["column_index"].tolist() == [0, 23, 47]
    assert out["x"].tolist() == [1, 2, 3] and "row_index" not in wells


def test_with_well_positions_rejects_missing_column_and_bad_names():
    with pytest.raises(ValueError, match="Metadata_Well"):
        with_well_positions(pd.DataFrame({"well": ["A01"]}))
    with pytest.raises(ValueError, match="not a well name"):
        with_well_positions(pd.DataFrame({"Metadata_Well": ["A01", "Q-7"]}))


def test_format_well_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        format_well(32, 0)


def test_normalize_well():
    assert normalize_well(" b7 ") == "B07"


def test_normalize_well_rejects():
    with pytest.raises(ValueError, match="not a well name"):
        normalize_well("well1")


def test_infer_plate_format():
    assert infer_plate_format(pd.Series(["A01", "H12"])) == 96
    assert infer_plate_format(pd.Series(["A01", "P24"])) == 384
    assert infer_plate_format(pd.Series(["A13"])) == 384
    assert infer_plate_format(pd.Series(["AF48"])) == 1536


def test_infer_plate_format_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        infer_plate_format(pd.Series([], dtype=str))


def test_read_platemap_happy(tmp_path):
    path = write(
        tmp_path,
        "Well,Compound,Concentration_uM,Role,MoA,SMILES,supplier\n"
        "A1,DMSO,,negcon,,,\n"
        "A02,aspirin,10,treatment,COX inhibitor,CC(=O)Oc1ccccc1C(=O)O,Sigma\n"
        "a3,staurosporine,1.5,poscon,kinase inhibitor,,\n",
    )
    platemap = read_platemap(path)
    assert list(platemap["Metadata_Well"]) == ["A01", "A02", "A03"]
    assert list(platemap["Metadata_Role"]) == [
        "negative_control",
        "treatment",
        "positive_control",
    ]
    assert platemap["Metadata_Concentration"].isna().tolist() == [True, False, False]
    assert platemap.loc[1, "Metadata_Concentration"] == 10.0
    assert set(platemap["Metadata_ConcentrationUnit"]) == {"uM"}
    assert platemap.loc[1, "Metadata_MoA"] == "COX inhibitor"
    assert platemap.loc[1, "Metadata_supplier"] == "Sigma"
    assert platemap["Metadata_Plate"].isna().all()


def test_read_platemap_reads_a_batch_per_plate(tmp_path):
    path = write(
        tmp_path,
        "plate,well,compound,concentration,role,batch\n"
        "P1,A01,DMSO,,negcon,week1\nP2,A01,DMSO,,negcon,week2\n",
    )
    assert list(read_platemap(path)["Metadata_Batch"]) == ["week1", "week2"]
    path = write(
        tmp_path,
        "plate,well,compound,concentration,role,batch\n"
        "P1,A01,DMSO,,negcon,week1\nP1,A02,DMSO,,negcon,week2\n",
    )
    with pytest.raises(InputError, match="plate P1 is in batches week1, week2"):
        read_platemap(path)
    path = write(
        tmp_path,
        "well,compound,concentration,role,batch\n"
        "A01,DMSO,,negcon,week1\nA02,DMSO,,negcon,\n",
    )  # no plate column: one layout for every plate, so one batch
    with pytest.raises(InputError, match=r"the plates are in batches week1, \(blank\)"):
        read_platemap(path)


def test_read_platemap_unit_column(tmp_path):
    path = write(
        tmp_path,
        "plate,well,compound,concentration,concentration_unit,role\n"
        "P1,A01,DMSO,0.1,%,negative_control\nP1,A02,x,100,nM,treatment\n",
    )
    platemap = read_platemap(path)
    assert list(platemap["Metadata_ConcentrationUnit"]) == ["%", "nM"]
    assert list(platemap["Metadata_Plate"]) == ["P1", "P1"]


def test_read_platemap_rejects_every_problem_at_once(tmp_path):
    path = write(
        tmp_path,
        "plate,well,compound,concentration,role\n"
        "P1,A01,DMSO,0,negative_control\n"
        "P1,Z99,x,1,treatment\n"
        "P1,A02,y,ten,treatment\n"
        "P1,A02,y,1,treatment\n"
        "P1,A03,z,,treatment\n"
        "P1,A04,w,1,sample\n"
        "P2,A01,x,1,treatment\n",
    )
    with pytest.raises(InputError) as info:
        read_platemap(path)
    message = str(info.value)
    for expected in [
        "line 3: column 'well'",  # Z99
        "'ten' is not a number",
        "well A02 appears more than once (lines 4, 5)",
        "line 6: column 'concentration' is empty for a treatment",
        "'sample' is not one of",
        "plate 'P2' has no negative_control wells",
    ]:
        assert expected in message, expected
    assert len(info.value.problems) == 6
    assert str(path) in message


def test_read_platemap_rejects_missing_columns(tmp_path):
    path = write(tmp_path, "well,compound\nA01,DMSO\n")
    with pytest.raises(InputError, match="missing column.*concentration"):
        read_platemap(path)


def test_read_platemap_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--platemap"):
        read_platemap(tmp_path / "nope.csv")


def test_read_platemap_real_bbbc022_annotations(tmp_path):
    meta = pd.read_csv(
        shared_data("fields/bbbc022_plate20585_hoechst_nfme/metadata.csv")
    )
    wells = meta.drop_duplicates("well")
    csv = pd.DataFrame(
        {
            "plate": wells["plate"].astype(str),
            "well": wells["well"],
            "compound": wells["compound_name"],
            "concentration_mM": wells["cpd_mmol_conc"],
            "role": "treatment",
            "smiles": wells["cpd_smiles"],
        }
    )
    csv.loc[len(csv)] = ["20585", "H12", "DMSO", 0.0, "negative_control", ""]
    path = tmp_path / "bbbc022.csv"
    csv.to_csv(path, index=False)
    platemap = read_platemap(path)
    assert set(platemap["Metadata_ConcentrationUnit"]) == {"mM"}
    row = platemap.set_index("Metadata_Well").loc["E08"]
    assert row["Metadata_Compound"] == "Harmalol hydrochloride dihydrate"
    assert row["Metadata_SMILES"].startswith("CC1=NCCc2")


def _fields(pairs):
    return pd.DataFrame(
        [
            {"Metadata_Plate": p, "Metadata_Well": w, "Metadata_Site": 1}
            for p, w in pairs
        ]
    )


def _platemap(rows):
    return pd.DataFrame(
        [
            {
                "Metadata_Plate": p,
                "Metadata_Well": w,
                "Metadata_Compound": c,
                "Metadata_Role": r,
            }
            for p, w, c, r in rows
        ]
    )


def test_expand_platemap_repeats_plateless_map():
    platemap = _platemap([(None, "A01", "DMSO", "negative_control")])
    expanded = expand_platemap(platemap, ["P2", "P1"])
    assert list(expanded["Metadata_Plate"]) == ["P1", "P2"]


def test_expand_platemap_rejects_no_plates():
    with pytest.raises(ValueError, match="no images"):
        expand_platemap(_platemap([(None, "A01", "DMSO", "negative_control")]), [])


def test_check_platemap_against_fields_lists_mismatches():
    platemap = _platemap(
        [
            ("P1", "A01", "DMSO", "negative_control"),
            ("P1", "A02", "x", "treatment"),
            ("P1", "A03", "y", "treatment"),
        ]
    )
    fields = _fields([("P1", "A01"), ("P1", "B05"), ("P3", "A01")])
    with pytest.raises(InputError) as info:
        check_platemap_against_fields(platemap, fields)
    message = str(info.value)
    assert "plate 'P1' well B05 has images but no plate-map row" in message
    assert "2 plate-map well(s) have no images: P1/A02, P1/A03" in message
    assert "plate 'P3' has images but is not in the plate map" in message


def test_check_platemap_against_fields_allows_unimaged_wells():
    platemap = _platemap(
        [(None, "A01", "DMSO", "negative_control"), (None, "A02", "x", "treatment")]
    )
    wells = check_platemap_against_fields(
        platemap, _fields([("P1", "A01")]), allow_unimaged_wells=True
    )
    assert list(wells["Metadata_Well"]) == ["A01"]
    assert list(wells["Metadata_Plate"]) == ["P1"]


def test_check_platemap_against_fields_refuses_wells_outside_the_plate():
    platemap = _platemap(
        [(None, "A01", "DMSO", "negative_control"), (None, "I13", "x", "treatment")]
    )
    with pytest.raises(InputError) as info:  # a typo, not an excluded well
        check_platemap_against_fields(
            platemap, _fields([("P1", "A01"), ("P1", "H12")]), allow_unimaged_wells=True
        )
    message = str(info.value)
    assert (
        "plate-map well I13 lies outside the 96-well plate its images fill" in message
    )
    assert "rows A-H, columns 1-12" in message and "--plate-format" in message
    assert "have no images" not in message


def test_check_platemap_against_fields_takes_a_declared_plate_format():
    platemap = _platemap(
        [(None, "A01", "DMSO", "negative_control"), (None, "I13", "x", "treatment")]
    )
    wells = check_platemap_against_fields(
        platemap, _fields([("P1", "A01")]), allow_unimaged_wells=True, plate_format=384
    )
    assert list(wells["Metadata_Well"]) == ["A01"]
    with pytest.raises(InputError, match="well P24 has images but lies outside the "
                       "declared 96-well plate"):  # fmt: skip
        check_platemap_against_fields(
            _platemap([(None, "A01", "DMSO", "negative_control"),
                       (None, "P24", "x", "treatment")]),
            _fields([("P1", "A01"), ("P1", "P24")]), plate_format=96,
        )  # fmt: skip
    with pytest.raises(ValueError, match="plate_format = 100"):
        check_platemap_against_fields(
            platemap, _fields([("P1", "A01")]), plate_format=100
        )


def test_check_platemap_against_fields_rejects_bad_fields_table():
    with pytest.raises(ValueError, match="lacks columns"):
        check_platemap_against_fields(_platemap([]), pd.DataFrame({"x": [1]}))


def test_check_platemap_against_fields_rejects_plate_without_imaged_controls():
    platemap = _platemap(
        [(None, "A01", "DMSO", "negative_control"), (None, "A02", "x", "treatment")]
    )
    with pytest.raises(
        InputError, match="plate 'P1' has no imaged negative_control well"
    ):
        check_platemap_against_fields(
            platemap, _fields([("P1", "A02")]), allow_unimaged_wells=True
        )
