"""Run-level checks of illumination correction, QC flags, crops and `segment`."""

import shutil

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from db import store
from db.session import make_engine
from pipeline.cells.stored import iter_field_crops
from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.errors import InputError
from pipeline.images.demo import CHANNELS
from pipeline.run import progress_line, run_experiment, segment_files
from pipeline.views.export import read_well_profiles


def _config(**sections):
    return config_from_dict(
        {
            "input": {
                "layout": "imagexpress",
                "channels": CHANNELS,
                "cytoplasm_channel": "Actin",
            },
            "execution": {"n_workers": 2, "processes": False},
        }
        | sections
    )


@pytest.fixture(scope="module")
def blurred_run(demo_plate, tmp_path_factory):
    """The demo plate with well B05 blurred (out of focus), run into SQLite."""
    root = tmp_path_factory.mktemp("blurred")
    images = root / "images"
    shutil.copytree(demo_plate["images"], images)
    for path in images.rglob("*_B05_s1_w*.tif"):
        plane = tifffile.imread(path)
        blurred = ndi.gaussian_filter(plane.astype(np.float32), 4)
        tifffile.imwrite(path, blurred.astype(plane.dtype))
    url = f"sqlite:///{root}/t.db"
    summary = run_experiment(
        images, demo_plate["platemap"], config=_config(), db_url=url
    )
    return url, summary


def test_blurred_field_is_flagged_and_left_out_of_profiles(blurred_run):
    url, summary = blurred_run
    engine = make_engine(url, create=False)
    qc = store.read_field_qc(engine, summary.run_id)
    flagged = qc[qc["qc_flags"] != ""]
    assert flagged["Metadata_Well"].tolist() == ["B05"]
    assert flagged["qc_flags"].iloc[0] == "blurred"
    profiles = read_well_profiles(engine, summary.run_id, summary.experiment_id)
    assert "B05" not in set(profiles["Metadata_Well"])
    assert len(profiles) == 95
    everything = read_well_profiles(
        engine, summary.run_id, summary.experiment_id, include_flagged=True
    )
    assert "B05" in set(everything["Metadata_Well"]) and len(everything) == 96


def test_illumination_function_is_stored_per_plate(blurred_run):
    url, summary = blurred_run
    engine = make_engine(url, create=False)
    functions = store.read_illumination(engine, summary.run_id, list(CHANNELS))
    assert len(functions) == 1
    (function,) = functions.values()
    assert function.shape[0] == 3
    # the demo plate's planted vignetting (edges at 0.65 of the centre) is recovered
    assert function.max() / function.min() > 1.15


def test_illumination_can_be_switched_off(demo_plate, sqlite_url):
    summary = run_experiment(
        demo_plate["images"],
        demo_plate["platemap"],
        config=_config(illumination={"enabled": False}),
        db_url=sqlite_url,
    )
    engine = make_engine(sqlite_url, create=False)
    assert store.read_illumination(engine, summary.run_id, list(CHANNELS)) == {}


def test_iter_field_crops_streams_the_stored_cells(blurred_run):
    url, summary = blurred_run
    engine = make_engine(url, create=False)
    qc = store.read_field_qc(engine, summary.run_id)
    seen = 0
    for crops in iter_field_crops(engine, summary.run_id, size=32, with_masks=True):
        expected = qc.loc[qc["field_id"] == crops.field_id, "n_cells"].item()
        assert len(crops.object_numbers) == expected
        assert crops.crops.shape == (expected, 3, 32, 32)
        assert crops.crops.dtype == np.float32
        assert crops.masks.shape == (expected, 32, 32)
        assert crops.masks[:, 16, 16].mean() > 0.9  # centred on their own cell
        seen += 1
        if seen == 5:
            break
    assert seen == 5
    fast = iter_field_crops(engine, summary.run_id, size=32)  # stored centroids only
    first = next(fast)
    with_masks = next(
        iter_field_crops(engine, summary.run_id, size=32, with_masks=True)
    )
    assert first.masks is None
    np.testing.assert_array_equal(first.crops, with_masks.crops)
    wells = [c.well for c in iter_field_crops(engine, summary.run_id, size=16)]
    assert "B05" not in wells and len(wells) == 95


def test_segment_files_and_cli(demo_plate, tmp_path, capsys):
    folder = demo_plate["images"] / "DEMO-P1"
    nuclei = sorted(folder.glob("*_C0[1-3]_s1_w1.tif"))
    cytoplasm = [p.with_name(p.name.replace("_w1", "_w2")) for p in nuclei]
    table = segment_files(nuclei, tmp_path / "masks", cytoplasm=cytoplasm)
    assert len(table) == 3 and (table["n_nuclei"] > 0).all()
    labels = tifffile.imread(table["nuclei_labels"].iloc[0])
    cells = tifffile.imread(table["cells_labels"].iloc[0])
    assert labels.dtype == np.uint16 and labels.max() == table["n_nuclei"].iloc[0]
    assert (cells[labels > 0] == labels[labels > 0]).all()
    code = main(
        ["segment", *map(str, nuclei), "--out-dir", str(tmp_path / "cli"),
         "--nucleus-diameter", "14"]
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(
        f"{p.stem}_nuclei.tif" for p in nuclei
    )
    assert "nuclei ->" in capsys.readouterr().out


def test_segment_files_rejects_bad_input(demo_plate, tmp_path, capsys):
    folder = demo_plate["images"] / "DEMO-P1"
    image = next(folder.glob("*_s1_w1.tif"))
    with pytest.raises(InputError, match="no such file"):
        segment_files([image, tmp_path / "missing.tif"], tmp_path / "out")
    with pytest.raises(InputError, match="1 cytoplasm files"):
        segment_files([image, image], tmp_path / "out", cytoplasm=[image])
    with pytest.raises(InputError, match="several images have this name"):
        segment_files([image, image], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    code = main(["segment", str(broken), "--out-dir", str(tmp_path / "out2")])
    assert code == 2
    assert "broken.tif" in capsys.readouterr().err


def test_progress_line_gives_rate_and_time_left_and_rejects_bad_counts():
    assert progress_line(120, 960, 60.0) == (
        "120/960 fields (12.5 %), 2.0 fields/s, about 7 min left"
    )
    assert progress_line(0, 10, 0.0).endswith("starting")
    with pytest.raises(ValueError, match="0 <= done <= total"):
        progress_line(11, 10, 1.0)
    with pytest.raises(ValueError, match="total >= 1"):
        progress_line(0, 0, 1.0)
