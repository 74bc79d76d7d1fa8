import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from distributed import LocalCluster
from sqlalchemy import func, select

from db import store
from db.schema import Cell, FieldResult, Run
from db.session import make_engine, session_scope
from pipeline.config import config_from_dict, with_overrides
from pipeline.errors import InputError, PipelineError
from pipeline.images.demo import CHANNELS
from pipeline.run import prepare_run, run_experiment


def demo_config(**execution):
    return config_from_dict(
        {
            "input": {"layout": "imagexpress", "channels": CHANNELS},
            "execution": {"n_workers": 2, "processes": False} | execution,
        }
    )


def counts(url):
    with session_scope(make_engine(url, create=False)) as session:
        return (
            session.scalar(select(func.count()).select_from(Cell)),
            session.scalar(select(func.count()).select_from(FieldResult)),
        )


@pytest.fixture
def plate_copy(demo_plate, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(demo_plate["images"], images)
    return images, demo_plate["platemap"]


def test_run_experiment_then_rerun_skips_everything(demo_plate, db_url):
    summary = run_experiment(
        demo_plate["images"],
        demo_plate["platemap"],
        config=demo_config(),
        db_url=db_url,
    )
    assert summary.status == "complete"
    assert (summary.n_fields, summary.n_processed, summary.n_failed) == (96, 96, 0)
    assert summary.n_cells > 96 * 4
    assert counts(db_url) == (summary.n_cells, 96)
    engine = make_engine(db_url)  # masks of every field; well aggregates cached
    masks = store.read_field_masks(engine, summary.run_id, range(1, 97))
    assert len(masks) == 96
    assert sum(int(cells.max()) for _, cells in masks.values()) == summary.n_cells
    aggregates = store.read_well_aggregates(
        engine, summary.run_id, "classical", include_flagged=False
    )
    assert aggregates["Metadata_CellCount"].sum() == summary.n_cells
    again = run_experiment(
        demo_plate["images"],
        demo_plate["platemap"],
        config=demo_config(),
        db_url=db_url,
    )
    assert again.run_id == summary.run_id
    assert (again.n_processed, again.n_skipped, again.n_cells) == (0, 96, 0)
    assert counts(db_url) == (summary.n_cells, 96)
    with session_scope(make_engine(db_url)) as session:
        run = session.scalar(select(Run))
        assert run.status == "complete"
        assert "[input.channels]" in run.config_toml and 'DNA = "w1"' in run.config_toml
        assert run.versions["numpy"] and run.timings["fields_per_s"] >= 0
        assert run.versions["opencv"] == cv2.__version__
        assert run.versions["unet_precision"] == "cpu float32"


def test_provenance_records_the_unet_precision_the_run_uses():
    from pipeline.config import SegmentConfig
    from pipeline.run import package_versions

    assert package_versions(SegmentConfig())["unet_precision"] == "cpu float32"
    chosen = SegmentConfig(precision="bfloat16")
    assert package_versions(chosen)["unet_precision"] == "cpu bfloat16"
    gpu = SegmentConfig(device="cuda")
    assert package_versions(gpu)["unet_precision"] == "cuda bfloat16"
    assert "unet_precision" not in package_versions(SegmentConfig(method="classical"))


def test_run_records_and_skips_a_corrupt_field(plate_copy, sqlite_url):
    images, platemap = plate_copy
    bad = images / "DEMO-P1" / "DEMO-P1_C05_s1_w2.tif"
    original = bad.read_bytes()
    bad.write_bytes(original[:300])
    summary = run_experiment(images, platemap, config=demo_config(), db_url=sqlite_url)
    assert summary.status == "complete" and summary.n_failed == 1
    with session_scope(make_engine(sqlite_url)) as session:
        error = session.scalar(
            select(FieldResult.error).where(FieldResult.status == "failed")
        )
        assert "DEMO-P1_C05_s1_w2.tif: cannot read the TIFF" in error
        assert "skipped" in session.scalar(select(Run.message))
    bad.write_bytes(original)  # the user fixes the file and reruns
    again = run_experiment(images, platemap, config=demo_config(), db_url=sqlite_url)
    assert (again.n_processed, again.n_failed, again.n_skipped) == (1, 0, 95)
    with session_scope(make_engine(sqlite_url)) as session:
        assert (
            session.scalar(select(func.count()).where(FieldResult.status == "failed"))
            == 0
        )


def test_run_fails_when_too_many_fields_fail(plate_copy, sqlite_url):
    images, platemap = plate_copy
    for path in sorted((images / "DEMO-P1").glob("*_w3.tif"))[:10]:
        path.write_bytes(b"not a tiff")
    with pytest.raises(
        PipelineError, match=r"10 of 96 fields failed \(10.4% > max_failed"
    ):
        run_experiment(images, platemap, config=demo_config(), db_url=sqlite_url)
    with session_scope(make_engine(sqlite_url)) as session:
        assert session.scalar(select(Run.status)) == "failed"


def test_bad_input_writes_nothing(plate_copy, tmp_path):
    images, platemap = plate_copy
    table = pd.read_csv(platemap)
    table[table["well"] != "D04"].to_csv(tmp_path / "short.csv", index=False)
    for path in (images / "DEMO-P1").glob("DEMO-P1_H11_s1_w2.tif"):
        path.unlink()
    url = f"sqlite:///{tmp_path}/never.db"
    with pytest.raises(InputError) as info:
        run_experiment(images, tmp_path / "short.csv", config=demo_config(), db_url=url)
    message = str(info.value)
    assert "well H11 site 1: no file for channel Actin" in message
    assert not (tmp_path / "never.db").exists()


def test_prepare_run_rejects_unmapped_and_multichannel_tokens(demo_plate):
    no_channels = config_from_dict({"input": {"layout": "imagexpress"}})
    with pytest.raises(InputError, match="no channel map"):
        prepare_run(demo_plate["images"], demo_plate["platemap"], config=no_channels)
    multi = config_from_dict(
        {"input": {"layout": "multichannel", "channels": {"DNA": "w1"}}}
    )
    with pytest.raises(InputError, match="token is the 0-based channel index"):
        prepare_run(demo_plate["images"], demo_plate["platemap"], config=multi)
    unknown_control = with_overrides(demo_config(), hits={"cell_count_control": "Nope"})
    with pytest.raises(InputError, match="cell_count_control = 'Nope' is not a"):
        prepare_run(
            demo_plate["images"], demo_plate["platemap"], config=unknown_control
        )


@pytest.mark.slow
def test_run_on_dask_with_two_worker_processes(demo_plate, sqlite_url):
    threaded = run_experiment(
        demo_plate["images"],
        demo_plate["platemap"],
        config=demo_config(),
        db_url=sqlite_url,
        experiment_name="threads",
    )
    processes = run_experiment(
        demo_plate["images"],
        demo_plate["platemap"],
        config=demo_config(processes=True),
        db_url=sqlite_url,
        experiment_name="processes",
    )
    assert processes.n_processed == 96 and processes.n_cells == threaded.n_cells


@pytest.mark.slow
@pytest.mark.postgres
def test_run_on_an_existing_dask_scheduler_with_postgres_and_embedding(
    demo_plate, postgres_url, monkeypatch
):
    """The cluster recipe end to end: worker processes analyse the fields, the run
    process writes them to PostgreSQL, then embeds every stored cell (the `[embed]`
    section) into the same store."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        config = demo_config(scheduler=cluster.scheduler_address)
        summary = run_experiment(
            demo_plate["images"],
            demo_plate["platemap"],
            config=with_overrides(config, embed={"enabled": True}),
            db_url=postgres_url,
        )
    assert summary.n_processed == 96 and summary.n_cells > 0
    assert summary.embedding["n_cells"] == summary.n_cells
    engine = make_engine(postgres_url, create=False)
    name, kind = store.resolve_feature_set(engine, summary.run_id, "deep")
    assert kind == "embedding" and name == summary.embedding["feature_set"]
    fields = list(store.iter_field_vectors(engine, summary.run_id, name))
    assert sum(len(numbers) for _, numbers, _ in fields) == summary.n_cells
    assert all(np.isfinite(vectors).all() for _, _, vectors in fields)


def test_unreachable_scheduler_is_an_input_error_before_any_write(demo_plate, tmp_path):
    url = f"sqlite:///{tmp_path}/never.db"
    config = demo_config(scheduler="tcp://127.0.0.1:9")
    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        run_experiment(
            demo_plate["images"], demo_plate["platemap"], config=config, db_url=url
        )
    assert not (tmp_path / "never.db").exists()


def test_multichannel_files_give_the_same_cells_as_per_channel_files(
    demo_plate, tmp_path
):
    """One OME-TIFF per field (channels stacked) == one TIFF per channel."""
    wells = [f"A{c:02d}" for c in range(1, 13)]
    table = pd.read_csv(demo_plate["platemap"])
    table = table[table["well"].isin(wells)]
    table.to_csv(tmp_path / "row_a.csv", index=False)
    per_channel, multi = tmp_path / "per_channel" / "DEMO-P1", tmp_path / "multi"
    per_channel.mkdir(parents=True)
    multi.mkdir()
    source = demo_plate["images"] / "DEMO-P1"
    for well in wells:
        planes = []
        for token in CHANNELS.values():
            name = f"DEMO-P1_{well}_s1_{token}.tif"
            shutil.copy(source / name, per_channel / name)
            planes.append(tifffile.imread(source / name))
        tifffile.imwrite(
            multi / f"DEMO-P1_{well}_s1.ome.tif",
            np.stack(planes),
            metadata={"axes": "CYX"},
        )
    first = run_experiment(
        per_channel.parent,
        tmp_path / "row_a.csv",
        config=demo_config(),
        db_url=f"sqlite:///{tmp_path}/a.db",
    )
    config = config_from_dict(
        {
            "input": {
                "layout": "multichannel",
                "channels": {"DNA": "0", "Actin": "1", "Mito": "2"},
            },
            "execution": {"n_workers": 2, "processes": False},
        }
    )
    second = run_experiment(
        multi,
        tmp_path / "row_a.csv",
        config=config,
        db_url=f"sqlite:///{tmp_path}/b.db",
    )
    assert second.n_fields == first.n_fields == 12
    assert second.n_cells == first.n_cells > 0


def test_plate_map_and_file_problems_are_reported_together(plate_copy, tmp_path):
    images, platemap = plate_copy
    table = pd.read_csv(platemap)
    table["concentration_uM"] = table["concentration_uM"].astype(object)
    table.loc[5, "concentration_uM"] = "1 uM"
    table.to_csv(tmp_path / "bad.csv", index=False)
    (images / "DEMO-P1" / "DEMO-P1_B02_s1_w3.tif").unlink()
    with pytest.raises(InputError) as info:
        prepare_run(images, tmp_path / "bad.csv", config=demo_config())
    message = str(info.value)
    assert "2 problems found" in message
    assert (
        "bad.csv: line 7: column 'concentration_uM': '1 uM' is not a number" in message
    )
    assert "well B02 site 1: no file for channel Mito" in message


@pytest.mark.slow
def test_run_with_the_learned_segmenter(demo_plate, demo_run, sqlite_url):
    """`[segment] method = "unet"`: the shipped weights segment the demo plate into
    as many cells as the classical segmenter finds, and the run records which weights."""
    from models.segmenter import load_segmenter

    config = config_from_dict(
        {
            "input": {"layout": "imagexpress", "channels": CHANNELS},
            "segment": {"method": "unet"},
            "execution": {"n_workers": 2, "processes": False},
        }
    )
    summary = run_experiment(
        demo_plate["images"], demo_plate["platemap"], config=config, db_url=sqlite_url
    )
    classical = demo_run[1]
    assert summary.status == "complete" and summary.n_failed == 0
    assert abs(summary.n_cells - classical.n_cells) <= 0.1 * classical.n_cells
    sha = load_segmenter()[2]["sha256"]
    with session_scope(make_engine(sqlite_url)) as session:
        run = session.scalar(select(Run))
        assert run.segmenter == f"unet {sha[:16]}"
        assert 'method = "unet"' in run.config_toml
