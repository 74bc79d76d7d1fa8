"""The phenoscreen command line, end to end, including kill -9 and resume."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from sqlalchemy import create_engine, func, select

from db.schema import Cell, FieldResult
from db.session import make_engine, session_scope
from db.store import resolve_run
from pipeline.cli import main
from pipeline.views.export import iter_cell_tables

THREADS = "[execution]\nn_workers = 2\nprocesses = false\n"


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "threads.toml"
    path.write_text(THREADS)
    return path


def run_args(demo_plate, url, config_file):
    return [
        "run",
        str(demo_plate["images"]),
        "--platemap",
        str(demo_plate["platemap"]),
        "--layout",
        "imagexpress",
        "--channels",
        "DNA=w1,Actin=w2,Mito=w3",
        "--db",
        url,
        "--config",
        str(config_file),
    ]


def test_cli_run_status_hits_export(demo_plate, tmp_path, config_file, capsys):
    url = f"sqlite:///{tmp_path}/cli.db"
    assert main([*run_args(demo_plate, url, config_file), "--fdr", "0.1"]) == 0
    assert (
        "96 fields (96 processed, 0 already done, 0 failed)" in capsys.readouterr().out
    )
    assert main(["status", "--db", url]) == 0
    status = capsys.readouterr().out
    assert "complete" in status and "images" in status
    assert (
        main(["hits", "--db", url, "--top", "5", "--out", str(tmp_path / "hits.csv")])
        == 0
    )
    out = capsys.readouterr().out
    assert "most_similar" in out and "rows written" in out
    hits = pd.read_csv(tmp_path / "hits.csv")
    assert (hits["fdr"] == 0.1).all()  # the run's --fdr, stored in its [hits]
    assert list(hits["rank"]) == list(range(1, 10))
    assert "DMSO" not in set(hits["Metadata_Compound"]) and "is_hit" in hits.columns
    assert main(["map", "--db", url]) == 0
    mapped = capsys.readouterr().out
    assert "compound_dose: " in mapped and "well: 9" in mapped  # ~95 wells with cells
    assert "cell: " in mapped  # a sample of single cells
    assert main(["qc", "--db", url, "--feature", "Nuclei_AreaShape_Area"]) == 0
    printed = capsys.readouterr().out
    assert "z_prime_activity" in printed and "z_prime_Nuclei_AreaShape_Area" in printed
    assert main(["qc", "--db", url, "--feature", "NucleiArea"]) == 2
    assert "similar" in capsys.readouterr().err
    moa_out = tmp_path / "moa.csv"
    assert (
        main(["moa", "--db", url, "--reference-column", "moa", "--out", str(moa_out)])
        == 0
    )
    assert "same compound left out (NSC)" in capsys.readouterr().out
    assert {"predicted_nsc", "is_correct_nsc"} <= set(pd.read_csv(moa_out).columns)
    assert main(["moa", "--db", url, "--reference-column", "target"]) == 2
    assert "'target' is not among the metadata columns" in capsys.readouterr().err
    for table in ("cells", "wells", "compounds", "hits"):
        for fmt in ("csv", "parquet"):
            out_path = tmp_path / f"{table}.{fmt}"
            assert (
                main(
                    [
                        "export",
                        "--db",
                        url,
                        "--table",
                        table,
                        "--format",
                        fmt,
                        "--out",
                        str(out_path),
                    ]
                )
                == 0
            )
            frame = pd.read_csv(out_path) if fmt == "csv" else pd.read_parquet(out_path)
            assert not list(tmp_path.glob("*.tmp"))
            assert "Metadata_Compound" in frame.columns
            if table != "hits":
                assert any(c.startswith("Nuclei_AreaShape_Area") for c in frame.columns)
            if table == "cells":
                assert {
                    "Metadata_Plate",
                    "Metadata_Well",
                    "Metadata_Site",
                    "Metadata_ObjectNumber",
                    "Metadata_Role",
                } <= set(frame.columns)
                assert len(frame) > 96 * 4
            if table == "wells":
                assert len(frame) == 96 and "Metadata_CellCount" in frame.columns
                assert frame["Metadata_FieldCount"].eq(1).all()


def test_cli_bad_platemap_exits_2_and_writes_nothing(
    demo_plate, tmp_path, config_file, capsys
):
    bad = tmp_path / "bad.csv"
    table = pd.read_csv(demo_plate["platemap"])
    table["concentration_uM"] = table["concentration_uM"].astype(object)
    table.loc[3, "concentration_uM"] = "lots"
    table.loc[4, "role"] = "control"
    table.to_csv(bad, index=False)
    args = run_args(demo_plate, f"sqlite:///{tmp_path}/x.db", config_file)
    args[args.index("--platemap") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 problems found" in err and "'lots' is not a number" in err
    assert "'control' is not one of" in err and "nothing was written" in err
    assert not (tmp_path / "x.db").exists()


def test_cli_unknown_nuclei_channel_exits_2(demo_plate, tmp_path, config_file, capsys):
    args = run_args(demo_plate, f"sqlite:///{tmp_path}/x.db", config_file)
    assert main([*args, "--nuclei-channel", "Hoechst"]) == 2
    assert (
        "nuclei_channel 'Hoechst' is not among the channels" in capsys.readouterr().err
    )


def test_cli_run_with_embed_makes_deep_and_combined_profiles(
    demo_plate, tmp_path, capsys
):
    config = tmp_path / "embed.toml"
    config.write_text(
        THREADS + '[embed]\nlayer = "blocks.2"\ninput_size = 0\ncrop_size = 32\n'
    )
    url = f"sqlite:///{tmp_path}/embed.db"
    args = run_args(demo_plate, url, config)
    assert main([*args, "--embed", "--nuclei-channel", "DNA"]) == 0
    out = capsys.readouterr().out
    name = "tf_efficientnet_lite0_rgb_blocks.2_cell_native_plate_median_"
    assert f"cells into {name}" in out
    for feature_set in ("classical", "deep", "combined"):
        assert f"{feature_set}: " in out and "compounds are hits" in out
    for command in ("hits", "qc", "map"):
        assert main([command, "--db", url, "--feature-set", "deep"]) == 0
    assert f"phenotype map of feature set {name}" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(THREADS + '[embed]\nlayer = "blocks.12"\n')
    fresh = f"sqlite:///{tmp_path}/bad.db"
    assert main([*run_args(demo_plate, fresh, bad), "--embed"]) == 2
    assert "blocks.0 to blocks.6" in capsys.readouterr().err  # before any write
    assert not (tmp_path / "bad.db").exists()


def test_cli_status_and_export_reject_missing_store(tmp_path, capsys):
    assert main(["status", "--db", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "--db",
                f"sqlite:///{tmp_path}/none.db",
                "--table",
                "cells",
                "--out",
                str(tmp_path / "c.csv"),
            ]
        )
        == 2
    )


def test_cli_demo_data(tmp_path, capsys):
    assert (
        main(
            [
                "demo-data",
                str(tmp_path / "d"),
                "--plates",
                "1",
                "--fields-per-well",
                "1",
                "--field-size",
                "64",
            ]
        )
        == 0
    )
    assert (tmp_path / "d" / "platemap.csv").is_file()
    assert len(list((tmp_path / "d" / "images" / "DEMO-P1").glob("*.tif"))) == 96 * 3


def cell_table(url):
    engine = make_engine(url, create=False)
    run_id, experiment_id = resolve_run(engine)
    cells = pd.concat(
        iter_cell_tables(engine, run_id, experiment_id), ignore_index=True
    )
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]
    return cells.sort_values(keys, ignore_index=True)


def completed(url):
    engine = create_engine(url)
    try:
        with session_scope(engine) as session:
            return session.scalar(select(func.count()).select_from(FieldResult))
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return 0
    finally:
        engine.dispose()


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_equals_uninterrupted_run(
    demo_plate, tmp_path, config_file
):
    reference = f"sqlite:///{tmp_path}/reference.db"
    assert main(run_args(demo_plate, reference, config_file)) == 0

    url = f"sqlite:///{tmp_path}/killed.db"
    processes = tmp_path / "processes.toml"
    processes.write_text("[execution]\nn_workers = 2\nprocesses = true\n")
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        *run_args(demo_plate, url, processes),
    ]
    for kill_after in (5, 40):
        proc = subprocess.Popen(
            command,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while completed(url) < kill_after and proc.poll() is None:
            assert time.monotonic() < deadline, "run made no progress"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its Dask workers
        proc.wait()
        assert kill_after <= completed(url) < 96, "the run was not interrupted mid-way"

    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "already done" in finished.stdout
    with session_scope(make_engine(url)) as session:
        assert session.scalar(select(func.count()).select_from(FieldResult)) == 96
        n_cells = session.scalar(select(func.count()).select_from(Cell))
    expected, resumed = cell_table(reference), cell_table(url)
    assert n_cells == len(expected) == len(resumed)
    pd.testing.assert_frame_equal(resumed, expected)


def test_run_logs_progress_and_names_a_blank_field(demo_plate, tmp_path, config_file):
    """What a user sees on stderr (no terminal): a progress line, the blank field."""
    import shutil

    import numpy as np
    import tifffile

    images = tmp_path / "images"
    shutil.copytree(demo_plate["images"], images)
    blank = sorted(images.rglob("*_B03_s1_w1.tif"))[0]  # the nuclei channel
    tifffile.imwrite(blank, np.zeros_like(tifffile.imread(blank)))
    args = run_args(demo_plate, f"sqlite:///{tmp_path}/blank.db", config_file)
    args[1] = str(images)
    script = (  # a line per field instead of per minute, through the real CLI
        "import sys, pipeline.run; pipeline.run.PROGRESS_EVERY_S = 0.0; "
        "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr  # a blank field is no failure
    assert f"({blank}): no cells found (a blank or unfocused image?)" in finished.stderr
    assert "0/96 fields (0.0 %)" in finished.stderr  # progress lines, not tqdm bars
    assert "fields/s" in finished.stderr and "left" in finished.stderr
