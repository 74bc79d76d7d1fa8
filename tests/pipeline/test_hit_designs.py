"""Hit calling across screen designs, against planted truth, and on real imports."""

import numpy as np
import pandas as pd
import pytest

from db.session import make_engine
from db.store import resolve_run
from pipeline.calls.doseresponse import FLAGS
from pipeline.calls.hits import DOSE_COLUMNS, HIT_COLUMNS
from pipeline.cli import main
from pipeline.images.platemap import PLATE_FORMATS
from pipeline.profiling.profiles import normalize_to_controls
from pipeline.views.export import hit_tables, plate_qc_table, read_hit_tables
from tests.conftest import shared_data

#: Compounds with a planted phenotype (at the upper half of their doses).
ACTIVE = ("cmpd_0", "cmpd_1")
#: A compound that only kills cells (no profile change beyond fewer cells).
TOXIC = "cmpd_2"
N_FEATURES = 30


def make_screen(
    *,
    plate_format: int = 96,
    n_plates: int = 1,
    n_compounds: int = 8,
    n_doses: int = 4,
    wells_per_dose: int = 1,
    concentrations: bool = True,
    shift: float = 2.5,
    rng: int = 0,
) -> pd.DataFrame:
    """Raw well profiles of a synthetic screen with planted actives.

    DMSO fills the first and last columns of every plate, 4 positive-control wells
    follow, then compounds (`ACTIVE` move along one direction at their upper half
    of doses; `TOXIC` halves its cell count at its top dose). Each dose has
    `wells_per_dose` wells on every plate.
    """
    generator = np.random.default_rng(rng)
    n_rows, n_cols = PLATE_FORMATS[plate_format]
    direction = generator.normal(size=N_FEATURES)
    direction *= shift * np.sqrt(N_FEATURES) / np.linalg.norm(direction)
    doses = [10.0 * 10.0**-k for k in range(n_doses)]  # descending
    layout = [("positive_control", "STS", 1.0)] * 4 + [
        ("treatment", f"cmpd_{c}", dose)
        for c in range(n_compounds)
        for dose in doses
        for _ in range(wells_per_dose)
    ]
    edge = [f"{_row(r)}{c:02d}" for r in range(n_rows) for c in (1, n_cols)]
    inner = [f"{_row(r)}{c:02d}" for c in range(2, n_cols) for r in range(n_rows)]
    if len(layout) > len(inner):
        raise ValueError(f"{len(layout)} wells do not fit a {plate_format}-well plate")
    rows, values = [], []
    for p in range(n_plates):
        offset = generator.normal(0, 2, N_FEATURES)  # plate effect
        for well in edge:
            rows.append((f"P{p}", well, "DMSO", np.nan, "negative_control", 500))
            values.append(offset + generator.normal(size=N_FEATURES))
        for well, (role, name, dose) in zip(inner, layout, strict=False):
            moved = name in ACTIVE and dose >= doses[(n_doses - 1) // 2]
            value = offset + generator.normal(size=N_FEATURES)
            if role == "positive_control":
                value += 1.5 * direction[::-1]
            elif moved:
                value += direction
            toxic = name == TOXIC and dose == doses[0]
            rows.append((f"P{p}", well, name, dose, role, 200 if toxic else 500))
            values.append(value)
    meta = pd.DataFrame(
        rows,
        columns=["Metadata_Plate", "Metadata_Well", "Metadata_Compound",
                 "Metadata_Concentration", "Metadata_Role", "Metadata_CellCount"],
    )  # fmt: skip
    meta["Metadata_CellCount"] += generator.integers(-20, 20, len(meta))
    if not concentrations:
        meta["Metadata_Concentration"] = np.nan
    features = pd.DataFrame(values, columns=[f"f{i}" for i in range(N_FEATURES)])
    return pd.concat([meta, features], axis=1)


def _row(index: int) -> str:
    """Row letters of 96/384/1536-well plates: A..Z, then AA..AF."""
    return chr(65 + index) if index < 26 else "A" + chr(65 + index - 26)


#: name: (make_screen arguments, the test expected for treatment doses)
DESIGNS = {
    "96-well, 1 plate, one well per dose": ({"n_doses": 8}, "distance"),
    "96-well, duplicate plates": ({"n_plates": 2}, "distance"),
    "96-well, triplicate plates": ({"n_plates": 3}, "mAP"),
    "96-well, triplicate wells, 1 plate": (
        {"wells_per_dose": 3, "n_compounds": 5},
        "distance",
    ),
    "384-well, 2 doses, 4 wells, no floor problem": (
        {"plate_format": 384, "n_doses": 2, "wells_per_dose": 4, "n_compounds": 10},
        "mAP",
    ),
    "384-well, no concentrations, 4 wells": (
        {
            "plate_format": 384,
            "n_doses": 1,
            "wells_per_dose": 4,
            "n_compounds": 40,
            "concentrations": False,
        },
        "mAP",
    ),  # fmt: skip
    "384-well single-concentration primary screen": (
        {"plate_format": 384, "n_doses": 1, "n_compounds": 300},
        "distance",
    ),
    "1536-well single-concentration primary screen": (
        {"plate_format": 1536, "n_doses": 1, "n_compounds": 1200},
        "distance",
    ),
}


@pytest.mark.parametrize("design", list(DESIGNS))
def test_hits_match_the_planted_truth_in_every_design(design):
    arguments, expected_test = DESIGNS[design]
    normalized = normalize_to_controls(make_screen(**arguments))
    hits, doses = hit_tables(normalized)
    assert set(HIT_COLUMNS) <= set(hits) and set(DOSE_COLUMNS) <= set(doses)
    called = hits.set_index("Metadata_Compound")
    assert called.loc[list(ACTIVE), "is_hit"].all(), design
    assert not called.drop(index=list(ACTIVE))["is_hit"].any(), design
    # a hit always has an active dose, and only hits have active doses
    assert (called.loc[called["is_hit"], "n_active_doses"] >= 1).all()
    treated = doses[doses["Metadata_Role"] == "treatment"]
    assert set(treated.loc[treated["is_active"], "Metadata_Compound"]) <= set(ACTIVE)
    assert (treated["test"] == expected_test).all(), design
    assert (treated["is_active"] == (treated["q_value"] < 0.05)).all()
    assert called.loc[TOXIC, "is_toxic"]
    assert not called.drop(index=TOXIC)["is_toxic"].any()
    # an EC50 is only given for fits that pass their checks
    assert hits["ec50_flag"].isin(FLAGS).all()
    assert hits.loc[hits["ec50_flag"] != "ok", "ec50"].isna().all()
    assert (hits["fdr"] == 0.05).all() and (hits["toxicity_threshold"] == 0.5).all()
    qc = plate_qc_table(normalized)
    assert qc["z_prime_activity"].notna().all()
    assert qc["edge_wells"].eq("all wells").all()  # DMSO only in the edge columns
    assert qc["edge_to_inner_cell_count"].notna().all()


def test_dose_series_hits_have_their_active_doses_at_the_top():
    normalized = normalize_to_controls(make_screen(n_plates=3, n_doses=6))
    _, doses = hit_tables(normalized)
    active = doses[doses["is_active"] & (doses["Metadata_Role"] == "treatment")]
    # planted at the top 3 of 6 doses (1e-2 uM and up); no lower dose is active
    assert (active["Metadata_Concentration"] >= 0.01).all()
    assert len(active) >= 4


def test_fdr_and_toxicity_threshold_change_the_calls():
    normalized = normalize_to_controls(make_screen(n_doses=8))
    from pipeline.config import HitsConfig

    strict, _ = hit_tables(normalized, HitsConfig(toxicity_threshold=0.3))
    assert not strict["is_toxic"].any()  # 200 of 500 cells: above 30 %
    loose, _ = hit_tables(normalized, HitsConfig(fdr=0.5))
    assert loose["is_hit"].sum() >= 2 and (loose["fdr"] == 0.5).all()


def _write_import(table: pd.DataFrame, path) -> str:
    table.rename(columns={"Metadata_CellCount": "Metadata_Count_Cells"}).to_csv(
        path, index=False
    )
    return str(path)


@pytest.mark.parametrize(
    "arguments",
    [
        {"n_doses": 1, "concentrations": False, "wells_per_dose": 2},
        {"n_doses": 1, "n_compounds": 60},
        {"n_doses": 8},
    ],
    ids=["no concentrations", "single concentration", "one well per dose"],
)
def test_cli_hits_qc_and_export_work_for_imported_designs(tmp_path, capsys, arguments):
    path = _write_import(make_screen(**arguments), tmp_path / "screen.csv")
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["import-profiles", path, "--db", url]) == 0
    assert (
        main(["hits", "--db", url, "--fdr", "0.1", "--toxicity-threshold", "0.3"]) == 0
    )
    out = capsys.readouterr().out
    assert "q < 0.1" in out and "2 of" in out
    assert main(["qc", "--db", url]) == 0
    assert "edge effects" in capsys.readouterr().out
    hits_csv = tmp_path / "hits.csv"
    assert main(["export", "--db", url, "--table", "hits", "--out", str(hits_csv),
                 "--fdr", "0.1"]) == 0  # fmt: skip
    exported = pd.read_csv(hits_csv)
    assert (exported["fdr"] == 0.1).all()
    assert (exported["Metadata_RunID"] == 1).all()  # provenance on every row
    assert exported["Metadata_AnalysisKey"].nunique() == 1
    assert (exported["Metadata_FeatureSet"] == "imported").all()
    assert main(["hits", "--db", url, "--fdr", "2"]) == 2
    assert "hits.fdr = 2.0 must lie in (0, 1)" in capsys.readouterr().err
    assert set(exported.loc[exported["is_hit"], "Metadata_Compound"]) == set(ACTIVE)


def test_too_few_controls_exit_2_with_the_fix(tmp_path, capsys):
    screen = make_screen(n_plates=2)
    dmso = screen.index[
        (screen["Metadata_Plate"] == "P1")
        & (screen["Metadata_Role"] == "negative_control")
    ]
    path = _write_import(screen.drop(index=dmso[1:]), tmp_path / "screen.csv")
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["import-profiles", path, "--db", url]) == 0
    assert main(["hits", "--db", url]) == 2
    error = capsys.readouterr().err
    assert "at least 2 negative_control wells" in error
    assert "you have 1 on plate 'P1'" in error


def test_single_well_doses_need_four_controls_in_all():
    screen = make_screen(n_doses=8)
    dmso = screen.index[screen["Metadata_Role"] == "negative_control"]
    normalized = normalize_to_controls(screen.drop(index=dmso[3:]))
    with pytest.raises(
        ValueError, match="at least 4 negative-control wells.*you have 3"
    ):
        hit_tables(normalized)


@pytest.mark.parametrize(
    ("folder", "name", "n_wells", "test"),
    [
        ("jump_moa_cpg0002_plate_BR00117060a10x",
         "BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz", 4, "mAP"),
        ("lincs_cpg0004_plate_SQ00015054",
         "SQ00015054_normalized_feature_select.csv.gz", 1, "distance"),
    ],
    ids=["jump_moa", "lincs"],
)  # fmt: skip
def test_real_imports_go_through_hits_and_qc(tmp_path, folder, name, n_wells, test):
    """JUMP-MOA: 4 replicate wells per compound, no concentrations; LINCS: one
    well per dose. Each plate has 24 DMSO wells."""
    path = shared_data(f"profiles/{folder}/{name}")
    engine = make_engine(f"sqlite:///{tmp_path}/s.db")
    options = ["--negative-control", "DMSO"] if folder.startswith("lincs") else []
    assert main(["import-profiles", str(path), "--db", str(engine.url), *options]) == 0
    hits, doses = read_hit_tables(engine, *resolve_run(engine))
    assert len(hits) >= 50 and (hits.loc[hits["is_hit"], "n_active_doses"] >= 1).all()
    treated = doses[doses["Metadata_Role"] == "treatment"]
    typical = treated["n_wells"] == n_wells
    assert typical.mean() > 0.9 and (treated.loc[typical, "test"] == test).all()
    assert 0.1 < hits["is_hit"].mean() < 0.9
    assert main(["qc", "--db", str(engine.url)]) == 0
