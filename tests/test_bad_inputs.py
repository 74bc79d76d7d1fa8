"""A corpus of bad inputs: each gets its exit code and message, and nothing is written.

Every case runs `phenoscreen` as a user would and checks three things: the exit code
(2: bad input), a message that names the file, key or column and the fix, and that
nothing was written (the row count of every table of the store is unchanged, a
foreign file is byte-identical, no output file appears).
"""

import hashlib
import os
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from tests.pipeline.test_hit_designs import make_screen

DEMO_CHANNELS = "DNA=w1,Actin=w2,Mito=w3"


def row_counts(path: Path) -> dict[str, int] | None:
    """Rows of every table of a SQLite file (None when there is no file)."""
    if not path.exists():
        return None
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
        tables = [
            n
            for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        return {
            t: db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables
        }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expect(args, rc, message, capsys):
    """Run the CLI, check exit code and that `message` is in what it printed."""
    assert main([str(a) for a in args]) == rc
    captured = capsys.readouterr()
    assert message in captured.err + captured.out, captured.err


@pytest.fixture
def screen_store(tmp_path):
    """A store with one imported screen (a compound named like a formula)."""
    table = make_screen(n_doses=1, n_compounds=12)
    table["Metadata_Compound"] = table["Metadata_Compound"].replace(
        "cmpd_5", '=HYPERLINK("http://evil","x")'
    )
    path = tmp_path / "screen.csv"
    table.rename(columns={"Metadata_CellCount": "Metadata_Count_Cells"}).to_csv(
        path, index=False
    )
    db = tmp_path / "screen.db"
    assert main(["import-profiles", str(path), "--db", f"sqlite:///{db}"]) == 0
    return db


@pytest.fixture
def foreign_db(tmp_path):
    path = tmp_path / "other_program.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE patients (id INTEGER, name TEXT)")
        db.execute("INSERT INTO patients VALUES (1, 'x')")
    return path


# --- stores ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [["hits"], ["status"], ["qc"]])
def test_a_foreign_sqlite_file_is_refused_and_left_untouched(
    foreign_db, command, capsys
):
    before = digest(foreign_db)
    expect([*command, "--db", f"sqlite:///{foreign_db}"], 2,
           "tables of another program (patients)", capsys)  # fmt: skip
    assert digest(foreign_db) == before
    assert sorted(os.listdir(foreign_db.parent)) == ["other_program.db"]


def test_importing_into_a_foreign_sqlite_file_writes_nothing(
    foreign_db, tmp_path, capsys
):
    make_screen().to_csv(tmp_path / "s.csv", index=False)
    before = digest(foreign_db)
    expect(["import-profiles", tmp_path / "s.csv", "--db", f"sqlite:///{foreign_db}"],
           2, "no PhenoScreen store; nothing was added", capsys)  # fmt: skip
    assert digest(foreign_db) == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "notes.db").write_text("plain text " * 50) and d / "notes.db",
         "is not a SQLite database"),
        (lambda d: (d / "afile").write_text("x") and d / "afile" / "s.db",
         "which is a file; choose a path in a folder"),
        (lambda d: d, "is a folder; name a .db file"),
    ],
    ids=["text file", "parent is a file", "folder"],
)  # fmt: skip
def test_a_bad_sqlite_path_is_refused(tmp_path, make, message, capsys):
    make_screen().to_csv(tmp_path / "s.csv", index=False)
    target = make(tmp_path)
    expect(["import-profiles", tmp_path / "s.csv", "--db", f"sqlite:///{target}"],
           2, message, capsys)  # fmt: skip


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://user@localhost/screens", "no driver for 'mysql' is installed"),
        (
            "postgresql+psycopg://postgres:secret@127.0.0.1:1/x",
            "db 'postgresql+psycopg://postgres:***@127.0.0.1:1/x' cannot be opened as "
            "a database",
        ),
        (
            "postgresql+nodriver://postgres:secret@127.0.0.1:1/x",
            "db URL 'postgresql+nodriver://postgres:***@127.0.0.1:1/x': no driver",
        ),
        ("not a url", "is not a database URL"),
        (
            "postgresql+psycopg://postgres:secret@127.0.0.1:notaport/x",
            "db URL 'postgresql+psycopg://postgres:***@127.0.0.1:notaport/x' is not a "
            "database URL (invalid literal for int()",
        ),
        (
            "postgresql+psycopg://postgres@127.0.0.1:1/x?password=secret",
            "db 'postgresql+psycopg://postgres@127.0.0.1:1/x?password=***' cannot be",
        ),
    ],
)
def test_a_store_that_cannot_be_opened_exits_2_with_the_fix(url, message, capsys):
    assert main(["status", "--db", url]) == 2
    printed = "".join(capsys.readouterr())
    assert message in printed and "secret" not in printed, printed


def test_a_missing_store_is_not_created_by_reading_commands(tmp_path, capsys):
    expect(["hits", "--db", f"sqlite:///{tmp_path}/none.db"], 2, "no such file", capsys)
    assert not (tmp_path / "none.db").exists()


# --- run configs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[qc]\nfocus_mad = "5"\n', "[qc] focus_mad = '5' must be a number"),
        ('[illumination]\nenabled = "yes"\n', "enabled = 'yes' must be true or false"),
        ("[execution]\nn_workers = 2.5\n", "n_workers = 2.5 must be a whole number"),
        ('[segment]\nmethod = 3\n', "method = 3 must be text"),
        ("[qc]\nfocus = 5\n", "[qc] has unknown key 'focus'; valid:"),
        ("[colour]\nx = 1\n", "unknown section [colour]; valid:"),
        ("[qc\n", "is not valid TOML"),
        ("[hits]\nfdr = 1.5\n", "hits.fdr = 1.5 must lie in (0, 1)"),
        ('[hits]\ncell_count_control = "Nope"\n', "cell_count_control = 'Nope' is not a"),
        ('[embed]\nlayer = "fc"\n', "embed.layer = 'fc' must be 'pooled' or 'blocks.K'"),
        ("[input]\nplate_format = 100\n", "input: plate_format = 100; choose one of"),
    ],
)  # fmt: skip
def test_a_bad_run_config_is_refused_before_anything_is_written(
    demo_plate, tmp_path, toml, message, capsys
):
    config = tmp_path / "run.toml"
    config.write_text(toml)
    db = tmp_path / "s.db"
    expect(["run", demo_plate["images"], "--platemap", demo_plate["platemap"],
            "--layout", "imagexpress", "--channels", DEMO_CHANNELS,
            "--config", config, "--db", f"sqlite:///{db}"], 2, message, capsys)  # fmt: skip
    assert row_counts(db) is None  # the store was not even created


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop(columns="role"), "role"),
        (lambda t: t.assign(role=t["role"].replace("treatment", "sample")),
         "'sample' is not one of"),
        (lambda t: t.assign(well=t["well"].replace("B02", "Z99")), "Z99"),
        (lambda t: pd.concat([t, t.iloc[[5]]]), "appears more than once"),
        (lambda t: t.assign(role=t["role"].replace("negative_control", "treatment")),
         "has no negative_control wells"),
        (lambda t: t.assign(concentration_uM=t["concentration_uM"].where(
            t["role"] != "treatment", -1)), "is negative"),
    ],
    ids=["no role column", "unknown role", "bad well", "duplicate well", "no DMSO",
         "negative concentration"],
)  # fmt: skip
def test_a_bad_plate_map_is_refused_before_anything_is_written(
    demo_plate, tmp_path, change, message, capsys
):
    platemap = pd.read_csv(demo_plate["platemap"])
    bad = tmp_path / "platemap.csv"
    change(platemap).to_csv(bad, index=False)
    db = tmp_path / "s.db"
    expect(["run", demo_plate["images"], "--platemap", bad, "--layout", "imagexpress",
            "--channels", DEMO_CHANNELS, "--db", f"sqlite:///{db}"], 2, message,
           capsys)  # fmt: skip
    assert row_counts(db) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--channels", "DNA"], "DNA"),
        (["--channels", DEMO_CHANNELS, "--nuclei-channel", "Hoechst"], "Hoechst"),
        (["--channels", DEMO_CHANNELS, "--config", "missing.toml"], "missing.toml"),
    ],
    ids=["malformed channels", "unknown nuclei channel", "missing config"],
)
def test_bad_run_flags_are_refused(demo_plate, tmp_path, flags, message, capsys):
    db = tmp_path / "s.db"
    expect(["run", demo_plate["images"], "--platemap", demo_plate["platemap"],
            "--layout", "imagexpress", *flags, "--db", f"sqlite:///{db}"], 2,
           message, capsys)  # fmt: skip
    assert row_counts(db) is None


def test_a_plate_map_well_outside_the_plate_is_named_not_dropped(
    demo_plate, tmp_path, capsys
):
    platemap = pd.read_csv(demo_plate["platemap"])
    extra = platemap.iloc[[0]].assign(well="I13", role="treatment", compound="Typo")
    bad = tmp_path / "platemap.csv"
    pd.concat([platemap, extra]).to_csv(bad, index=False)
    db = tmp_path / "s.db"
    expect(["run", demo_plate["images"], "--platemap", bad, "--layout", "imagexpress",
            "--channels", DEMO_CHANNELS, "--allow-unimaged-wells",
            "--db", f"sqlite:///{db}"], 2,
           "plate-map well I13 lies outside the 96-well plate", capsys)  # fmt: skip
    assert row_counts(db) is None


def test_a_declared_plate_format_reaches_validation(demo_plate, tmp_path, capsys):
    from pipeline.cli import _run_config, build_parser

    platemap = pd.read_csv(demo_plate["platemap"])
    extra = platemap.iloc[[0]].assign(well="P24", role="treatment", compound="Far")
    bad = tmp_path / "platemap.csv"
    pd.concat([platemap, extra]).to_csv(bad, index=False)
    db = tmp_path / "s.db"
    expect(["run", demo_plate["images"], "--platemap", bad, "--layout", "imagexpress",
            "--channels", DEMO_CHANNELS, "--plate-format", "96", "--allow-unimaged-wells",
            "--db", f"sqlite:///{db}"], 2,
           "plate-map well P24 lies outside the 96-well plate declared", capsys)  # fmt: skip
    assert row_counts(db) is None
    args = build_parser().parse_args(["run", "x", "--platemap", "p.csv",
                                      "--plate-format", "1536"])  # fmt: skip
    assert _run_config(args).input.plate_format == 1536


def test_a_missing_image_folder_is_refused(demo_plate, tmp_path, capsys):
    expect(["run", tmp_path / "nowhere", "--platemap", demo_plate["platemap"],
            "--layout", "imagexpress", "--channels", DEMO_CHANNELS,
            "--db", f"sqlite:///{tmp_path}/s.db"], 2, "nowhere", capsys)  # fmt: skip
    assert row_counts(tmp_path / "s.db") is None


# --- imported profiles ------------------------------------------------------------


def _import(tmp_path, table: pd.DataFrame, capsys, message, *flags):
    path = tmp_path / "profiles.csv"
    table.to_csv(path, index=False)
    db = tmp_path / "s.db"
    expect(["import-profiles", path, "--db", f"sqlite:///{db}", *flags], 2,
           message, capsys)  # fmt: skip
    assert not any((row_counts(db) or {}).values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.iloc[:0], "holds no rows"),
        (lambda t: t.assign(f3=t["f3"].astype(str) + "um"), "hold text"),
        (lambda t: t.assign(Metadata_Well="Z99"), "Z99"),
        (lambda t: t.drop(columns="Metadata_Plate"), "plate"),
        (lambda t: t.assign(Metadata_Role=t["Metadata_Role"].replace(
            "negative_control", "treatment")), "no negative-control rows"),
        (lambda t: t.assign(Metadata_Role="weird"), "'weird'"),
        (lambda t: t.assign(Metadata_Concentration="ten"), "ten"),
        (lambda t: t.assign(Metadata_Concentration=-1.0), "negative or infinite"),
        (lambda t: t.assign(f0=t["f0"].astype(object).where(t.index != 3, "abc")),
         "'abc' in 'f0' (row 5)"),
        (lambda t: t[[c for c in t.columns if c.startswith("Metadata_")]],
         "no feature column"),
    ],
    ids=["header only", "text feature", "bad well", "no plate", "no controls",
         "unknown role", "text concentration", "negative concentration",
         "text in one row", "no features"],
)  # fmt: skip
def test_a_bad_profile_table_is_refused_and_nothing_written(
    tmp_path, change, message, capsys
):
    _import(tmp_path, change(make_screen()), capsys, message)


def test_a_missing_profile_file_is_refused(tmp_path, capsys):
    expect(["import-profiles", tmp_path / "none.csv", "--db",
            f"sqlite:///{tmp_path}/s.db"], 2, "none.csv", capsys)  # fmt: skip


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_deepprofiler_file_is_refused_without_running_code(tmp_path, capsys):
    folder = tmp_path / "features" / "Plate1"
    folder.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    payload = _RunsCode()
    payload.marker = marker
    np.savez(folder / "A01_s1.npz", features=np.zeros((3, 4), np.float32),
             locations=np.zeros((3, 2)),
             metadata=np.array({"Metadata_Plate": payload}, dtype=object))  # fmt: skip
    db = tmp_path / "s.db"
    expect(["import-profiles", tmp_path / "features", "--db", f"sqlite:///{db}",
            "--format", "deepprofiler"], 2, "does not load: a crafted file could run code",
           capsys)  # fmt: skip
    assert not marker.exists()
    assert not any((row_counts(db) or {}).values())


def test_a_deepprofiler_file_that_is_not_a_zip_is_refused(tmp_path, capsys):
    folder = tmp_path / "features"
    folder.mkdir()
    (folder / "A01_s1.npz").write_text("not a zip")
    expect(["import-profiles", folder, "--db", f"sqlite:///{tmp_path}/s.db",
            "--format", "deepprofiler"], 2, "A01_s1.npz", capsys)  # fmt: skip


# --- hit calling, QC and exports ------------------------------------------------------


def test_a_plate_with_one_dmso_well_gets_the_fix(tmp_path, capsys):
    screen = make_screen(n_plates=2)
    dmso = screen.index[
        (screen["Metadata_Plate"] == "P1")
        & (screen["Metadata_Role"] == "negative_control")
    ]
    path = tmp_path / "screen.csv"
    screen.drop(index=dmso[1:]).to_csv(path, index=False)
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["import-profiles", str(path), "--db", url]) == 0
    capsys.readouterr()
    for command in (["hits"], ["qc"], ["export", "--table", "hits", "--out",
                                       str(tmp_path / "h.csv")]):  # fmt: skip
        expect([*command, "--db", url], 2, "you have 1 on plate 'P1'", capsys)
    assert not (tmp_path / "h.csv").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hits", "--fdr", "2"], "hits.fdr = 2.0 must lie in (0, 1)"),
        (
            ["hits", "--toxicity-threshold", "-1"],
            "toxicity_threshold = -1.0 must lie in",
        ),
        (["hits", "--feature-set", "nope"], "nope"),
        (["hits", "--run", "99"], "99"),
        (["qc", "--cell-count-control", "Nope"], "'Nope' is not a compound"),
        (["qc", "--feature", "Area"], "is not in the profiles"),
        (["moa", "--reference-column", "target"], "not among the metadata columns"),
    ],
)
def test_bad_analysis_options_exit_2(screen_store, args, message, capsys):
    before = row_counts(screen_store)
    expect([*args, "--db", f"sqlite:///{screen_store}"], 2, message, capsys)
    assert row_counts(screen_store) == before


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("../../escaped.csv", "leads outside the working directory"),
        ("no/such/folder/h.csv", "does not exist; create it first"),
        (".", "is a folder; name a file in it"),
    ],
)
def test_exports_stay_where_they_are_told(
    screen_store, tmp_path, monkeypatch, out, message, capsys
):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    expect(["export", "--table", "hits", "--out", out, "--db",
            f"sqlite:///{screen_store}"], 2, message, capsys)  # fmt: skip
    assert not (tmp_path / "escaped.csv").exists() and not (work / "no").exists()


def test_csv_exports_defuse_formulas(screen_store, tmp_path, capsys):
    out = tmp_path / "hits.csv"
    assert main(["export", "--table", "hits", "--out", str(out), "--db",
                 f"sqlite:///{screen_store}"]) == 0  # fmt: skip
    text = out.read_text()
    assert "'=HYPERLINK" in text and "\n=HYPERLINK" not in text
    assert ",=HYPERLINK" not in text
    parquet = tmp_path / "hits.parquet"
    assert main(["export", "--table", "hits", "--out", str(parquet), "--db",
                 f"sqlite:///{screen_store}"]) == 0  # fmt: skip
    names = pd.read_parquet(parquet)["Metadata_Compound"]
    assert '=HYPERLINK("http://evil","x")' in set(names)  # Parquet keeps values


def test_an_export_never_writes_through_a_planted_temporary_link(
    screen_store, tmp_path, monkeypatch, capsys
):
    work, outside = tmp_path / "work", tmp_path / "outside.csv"
    work.mkdir()
    outside.write_text("precious")
    (work / "hits.csv.tmp").symlink_to(outside)
    monkeypatch.chdir(work)
    assert main(["export", "--table", "hits", "--out", "hits.csv", "--db",
                 f"sqlite:///{screen_store}"]) == 0  # fmt: skip
    assert outside.read_text() == "precious"
    assert not (work / "hits.csv").is_symlink() and (work / "hits.csv").stat().st_size
