import sqlite3

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from db import store
from db.schema import Cell, Experiment, WellProfile
from db.session import make_engine, session_scope
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.profiling.importers import (
    ImportOptions,
    import_profiles,
    merge_compartments,
    read_source,
    standardize,
)
from pipeline.profiling.profiles import normalize_profiles
from pipeline.views.export import hit_tables, iter_cell_tables, read_well_profiles
from tests.conftest import shared_data

CP_RAW = "profiles/cellprofiler_singlecell_raw"


def pycytominer_wells(*, n_plates=2, rng=0):
    """Per-well profiles as pycytominer writes them: 16 DMSO + 8 compounds x 2."""
    generator = np.random.default_rng(rng)
    rows = []
    for p in range(n_plates):
        for i in range(32):
            compound = "DMSO" if i < 16 else f"BRD-{(i - 16) // 2}"
            rows.append(
                {
                    "Metadata_Plate": f"SQ{p}",
                    "Metadata_Well": f"{'ABCD'[i // 8]}{i % 8 + 1:02d}",
                    "Metadata_broad_sample": compound,
                    "Metadata_mmoles_per_liter": 0.0 if compound == "DMSO" else 10.0,
                    "Metadata_control_type": "negcon" if compound == "DMSO" else None,
                    "Metadata_moa": None if compound == "DMSO" else f"moa{i % 3}",
                    "Metadata_Count_Cells": 500 + i,
                }
            )
    meta = pd.DataFrame(rows)
    features = generator.normal(size=(len(meta), 12))
    features[meta["Metadata_broad_sample"] == "BRD-0"] += 4.0
    names = [f"Cells_AreaShape_F{i}" for i in range(6)] + [
        f"Nuclei_Intensity_F{i}" for i in range(6)
    ]
    return pd.concat([meta, pd.DataFrame(features, columns=names)], axis=1)


def test_per_well_table_imports_once_and_calls_hits(db_url, tmp_path):
    table = pycytominer_wells()
    path = tmp_path / "plates_normalized.csv.gz"
    table.to_csv(path, index=False)
    engine = make_engine(db_url)
    summary = import_profiles(engine, path)
    assert summary["level"] == "wells" and summary["n_wells"] == 64
    assert summary["n_features"] == 12 and not summary["resumed"]
    again = import_profiles(engine, path)  # a rerun resumes, never duplicates
    assert again["resumed"] and again["run_id"] == summary["run_id"]
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(WellProfile)) == 64
    profiles = read_well_profiles(engine, *store.resolve_run(engine))
    assert len(profiles) == 64 and profiles["Metadata_CellCount"].min() == 500
    assert set(profiles["Metadata_Role"]) == {"negative_control", "treatment"}
    assert profiles["Metadata_MoA"].notna().sum() == 32
    np.testing.assert_allclose(
        profiles.sort_values(["Metadata_Plate", "Metadata_Well"])[
            "Cells_AreaShape_F0"
        ].to_numpy(),
        table["Cells_AreaShape_F0"].to_numpy(),
        rtol=1e-6,
    )
    hits, _ = hit_tables(normalize_profiles(profiles))
    called = hits.set_index("Metadata_Compound")
    assert called.loc["BRD-0", "is_hit"] and called["is_hit"].sum() <= 2
    # the other compounds are noise: none is similar enough to be listed
    assert called.loc["BRD-0", "nearest_compounds"] == ""
    with pytest.raises(ValueError, match="per-well profiles"):
        next(iter_cell_tables(engine, *store.resolve_run(engine)))


def test_an_import_keeps_the_profile_recipe_and_hit_settings_of_a_config(
    tmp_path, capsys
):
    from pipeline.views.export import hit_settings, profile_recipe, read_profiles

    path = tmp_path / "wells.csv"
    pycytominer_wells().to_csv(path, index=False)
    config = tmp_path / "recipe.toml"
    config.write_text('[profile]\nwhiten = "controls"\nwhiten_scope = "plate"\n'
                      "[hits]\nfdr = 0.1\n")  # fmt: skip
    url = f"sqlite:///{tmp_path}/s.db"
    assert (
        main(["import-profiles", str(path), "--db", url, "--config", str(config)]) == 0
    )
    engine = make_engine(url)
    run_id, experiment_id = store.resolve_run(engine)
    recipe = profile_recipe(engine, run_id)
    assert (recipe.whiten, recipe.whiten_scope) == ("controls", "plate")
    assert hit_settings(engine, run_id).fdr == 0.1
    raw, normalized = read_profiles(engine, run_id, experiment_id)
    pd.testing.assert_frame_equal(normalized, normalize_profiles(raw, recipe))
    config.write_text("[profile]\nwhiten_scope = 'weekly'\n")
    assert (
        main(["import-profiles", str(path), "--db", url, "--config", str(config)]) == 2
    )
    assert "whiten_scope = 'weekly' is unknown" in capsys.readouterr().err


def test_bad_tables_list_every_problem_and_write_nothing(tmp_path):
    table = pycytominer_wells(n_plates=1)
    table.loc[3, "Metadata_Well"] = "Z99x"
    table.loc[20, "Metadata_control_type"] = "weird"
    table["Cells_Text"] = "abc"
    path = tmp_path / "bad.csv"
    table.to_csv(path, index=False)
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["import-profiles", str(path), "--db", url]) == 2
    with pytest.raises(InputError) as error:
        import_profiles(make_engine(url), path)
    message = str(error.value)
    assert "3 problems" in message and "'Z99x'" in message
    assert "'weird'" in message and "Cells_Text" in message
    with session_scope(make_engine(url)) as session:
        assert session.scalar(select(func.count()).select_from(Experiment)) == 0
    no_role = pycytominer_wells(n_plates=1).drop(columns="Metadata_control_type")
    no_role.to_parquet(tmp_path / "no_role.parquet")
    with pytest.raises(InputError, match="--negative-control COMPOUND"):
        import_profiles(make_engine(url), tmp_path / "no_role.parquet")
    with pytest.raises(InputError, match="matches no row"):
        import_profiles(
            make_engine(url),
            tmp_path / "no_role.parquet",
            ImportOptions(negative_control="dmso"),
        )
    summary = import_profiles(
        make_engine(url),
        tmp_path / "no_role.parquet",
        ImportOptions(negative_control="DMSO"),
    )
    assert summary["n_wells"] == 32
    no_plate = pycytominer_wells(n_plates=1).drop(columns="Metadata_Plate")
    with pytest.raises(InputError, match="no plate column"):
        standardize(no_plate, ImportOptions(), source="x.csv")
    with pytest.raises(InputError, match="format"):
        read_source(path, ImportOptions(format="excel"))
    with pytest.raises(FileNotFoundError):
        read_source(tmp_path / "absent.csv", ImportOptions())


def test_sqlite_table_and_level_options(tmp_path):
    table = pycytominer_wells(n_plates=1)
    path = tmp_path / "profiles.sqlite"
    with sqlite3.connect(path) as connection:
        table.to_sql("profiles", connection, index=False)
        table.to_sql("other", connection, index=False)
    with pytest.raises(InputError, match="--table"):
        read_source(path, ImportOptions())
    raw = read_source(path, ImportOptions(table="profiles"))
    cells = standardize(raw, ImportOptions(level="cells"), source=str(path))
    assert (
        cells.level == "cells" and (cells.metadata["Metadata_ObjectNumber"] == 1).all()
    )
    doubled = pd.concat([raw, raw], ignore_index=True)
    with pytest.raises(InputError, match="several rows"):
        standardize(doubled, ImportOptions(level="wells"), source=str(path))
    assert standardize(doubled, ImportOptions(), source=str(path)).level == "cells"


def test_merge_compartments_links_cytoplasm_to_parents():
    image = pd.DataFrame(
        {
            "ImageNumber": [1],
            "Image_Metadata_Plate": ["P"],
            "Image_Metadata_Well": ["A01"],
        }
    )
    cells = pd.DataFrame(
        {"ImageNumber": 1, "ObjectNumber": [1, 2], "AreaShape_Area": [10, 20]}
    )
    nuclei = pd.DataFrame(
        {"ImageNumber": 1, "ObjectNumber": [1, 2], "AreaShape_Area": [3, 4]}
    )
    cytoplasm = pd.DataFrame(
        {"ImageNumber": 1, "ObjectNumber": [1, 2], "Parent_Cells": [2, 1],
         "Parent_Nuclei": [2, 1], "AreaShape_Area": [17, 8]}
    )  # fmt: skip
    merged = merge_compartments(
        image, {"Cells": cells, "Nuclei": nuclei, "Cytoplasm": cytoplasm}
    )
    assert merged["Metadata_Plate"].tolist() == ["P", "P"]
    assert merged["Cells_AreaShape_Area"].tolist() == [20, 10]
    assert merged["Nuclei_AreaShape_Area"].tolist() == [4, 3]
    assert merged["Cytoplasm_AreaShape_Area"].tolist() == [17, 8]
    with pytest.raises(InputError, match="no Cells, Cytoplasm or Nuclei"):
        merge_compartments(image, {})
    with pytest.raises(InputError, match="ImageNumber"):
        merge_compartments(image, {"Cells": cells.drop(columns="ImageNumber")})


def test_real_cellprofiler_sqlite_and_csv_folders_import_as_cells(tmp_path):
    database = shared_data(f"{CP_RAW}/cellhealth_SQ00014613/test-SQ00014613.sqlite")
    folders = shared_data(f"{CP_RAW}/jump_target2_BR00121431")
    platemap = tmp_path / "platemap.csv"
    platemap.write_text(
        "plate,well,compound,concentration,role\n"
        "SQ00014613,A01,DMSO,,negative_control\nSQ00014613,O18,X,1,treatment\n"
        "BR00121431,A01,DMSO,,negative_control\nBR00121431,A02,X,1,treatment\n"
    )
    engine = make_engine(f"sqlite:///{tmp_path}/s.db")
    summary = import_profiles(engine, database, ImportOptions(platemap=str(platemap)))
    assert summary["level"] == "cells" and summary["n_profiles"] == 12
    assert summary["n_features"] > 1500  # Cells + Cytoplasm + Nuclei measurements
    cells = pd.concat(iter_cell_tables(engine, *store.resolve_run(engine)))
    assert len(cells) == 12 and cells["Metadata_Compound"].nunique() == 2
    assert any(c.startswith("Cytoplasm_") for c in cells.columns)
    assert not any(
        "_Parent_" in c or c.endswith("ObjectNumber") for c in cells.columns[8:]
    )
    summary = import_profiles(engine, folders, ImportOptions(platemap=str(platemap)))
    assert summary["level"] == "cells" and summary["n_wells"] == 2
    assert summary["n_profiles"] > 50
    with session_scope(engine) as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(Cell)
                .where(Cell.run_id == summary["run_id"])
            )
            == summary["n_profiles"]
        )
    unmapped = tmp_path / "partial.csv"
    unmapped.write_text(
        "plate,well,compound,concentration,role\nBR00121431,A01,DMSO,,negative_control\n"
    )
    with pytest.raises(InputError, match="no plate-map row"):
        import_profiles(engine, folders, ImportOptions(platemap=str(unmapped)))


def test_real_deepprofiler_npz_folder_imports_with_its_metadata(tmp_path):
    folder = shared_data(
        "profiles/deepprofiler_bbbc021_npz_sample/outputs/results/features"
    )
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["import-profiles", str(folder), "--db", url]) == 2  # no controls named
    assert (
        main(
            ["import-profiles", str(folder), "--db", url, "--negative-control", "DMSO"]
        )
        == 0
    )
    engine = make_engine(url)
    profiles = read_well_profiles(engine, *store.resolve_run(engine))
    assert len(profiles) == 6 and profiles.filter(like="DeepProfiler_").shape[1] == 50
    assert set(profiles["Metadata_Plate"]) == {"Week1_22123", "Week1_22141"}
    assert (profiles["Metadata_FieldCount"] == 2).all()  # sites s1, s2
    assert "DMSO" in set(profiles["Metadata_Compound"])


def test_real_lincs_and_jump_plates_through_the_cli(tmp_path, capsys):
    lincs = shared_data(
        "profiles/lincs_cpg0004_plate_SQ00015054/SQ00015054_normalized_feature_select.csv.gz"
    )
    jump = shared_data(
        "profiles/jump_moa_cpg0002_plate_BR00117060a10x/"
        "BR00117060a10x_normalized_feature_select_negcon_plate.csv.gz"
    )
    url = f"sqlite:///{tmp_path}/s.db"
    args = ["import-profiles", str(lincs), "--db", url, "--negative-control", "DMSO"]
    assert main(args) == 0
    out = tmp_path / "hits.csv"
    assert main(["hits", "--db", url, "--out", str(out)]) == 0
    hits = pd.read_csv(out)
    assert len(hits) == 58 and 30 <= hits["is_hit"].sum() <= 55
    assert main(["import-profiles", str(jump), "--db", url]) == 0
    capsys.readouterr()
    assert main(["moa", "--db", url, "--reference-column", "moa"]) == 0
    printed = capsys.readouterr().out
    assert "(NSC) 0.056" in printed  # default recipe (0.044 without selection)


def test_moa_predicts_a_new_screen_from_an_imported_reference_run(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    reference = tmp_path / "reference.csv"
    pycytominer_wells().to_csv(reference, index=False)
    screen = pycytominer_wells(rng=1).drop(columns="Metadata_moa")
    screen["Metadata_broad_sample"] = screen["Metadata_broad_sample"].str.replace(
        "BRD", "NEW"
    )
    screen_path = tmp_path / "screen.csv"
    screen.to_csv(screen_path, index=False)
    assert main(["import-profiles", str(reference), "--db", url]) == 0
    assert main(["import-profiles", str(screen_path), "--db", url]) == 0
    capsys.readouterr()
    out = tmp_path / "predictions.csv"
    assert main(["moa", "--db", url, "--run", "2", "--reference-run", "1",
                 "--reference-column", "moa", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "accuracy" not in printed  # nothing of the screen is annotated
    assert "8 unannotated compound-doses" in printed
    predictions = pd.read_csv(out)
    new0 = predictions.set_index("Metadata_Compound").loc["NEW-0"]
    assert new0["neighbor_nsc"] == "BRD-0" and new0["predicted_nsc"] == "moa1"
    assert new0["similarity_nsc"] > 0.5 and "NEW-0" in printed
    assert main(["moa", "--db", url, "--run", "2", "--reference-column", "moa"]) == 2
    assert "--reference-run ID" in capsys.readouterr().err


def test_campaign_prints_plate_trends_and_the_recipe_before_and_after(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    path = tmp_path / "wells.csv"
    table = pycytominer_wells(n_plates=3)
    features = [c for c in table.columns if not c.startswith("Metadata_")]
    table.loc[table["Metadata_Plate"] == "SQ1", features] += 5.0  # a plate effect
    table.to_csv(path, index=False)
    assert main(["import-profiles", str(path), "--db", url]) == 0
    capsys.readouterr()
    out = tmp_path / "trends.csv"
    assert main(["campaign", "--db", url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 plates" in printed and "MoA 1-NN NSC / NSCB" in printed
    assert "one scale, no plate alignment" in printed
    trends = pd.read_csv(out)
    assert list(trends["Metadata_Plate"]) == ["SQ0", "SQ1", "SQ2"]
    assert (trends["dmso_wells"] == 16).all()
    assert trends["dmso_cell_count"].tolist() == [507.5] * 3
    assert main(["campaign", "--db", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert main(["campaign", "--db", url, "--reference-column", "target"]) == 2
    assert "'target' is not among the metadata columns" in capsys.readouterr().err


def test_campaign_leaves_out_moa_accuracy_when_one_compound_is_annotated(
    tmp_path, capsys
):
    table = pycytominer_wells(n_plates=2)
    table.loc[table["Metadata_broad_sample"] != "BRD-0", "Metadata_moa"] = None
    path = tmp_path / "wells.csv"
    table.to_csv(path, index=False)
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["import-profiles", str(path), "--db", url]) == 0
    capsys.readouterr()
    assert main(["campaign", "--db", url]) == 0
    printed = capsys.readouterr().out
    assert "replicate_map" in printed and "nsc" not in printed
