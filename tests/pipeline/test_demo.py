import json

import numpy as np
import pytest
import tifffile

from pipeline.images.demo import (
    COMPOUNDS,
    DOSES_UM,
    demo_platemap,
    effect_size,
    write_demo_plate,
)
from pipeline.images.platemap import read_platemap


def test_demo_plate_files_platemap_and_truth(demo_plate):
    platemap = read_platemap(demo_plate["platemap"])
    assert len(platemap) == 96
    counts = platemap["Metadata_Role"].value_counts()
    assert counts["negative_control"] == 16 and counts["positive_control"] == 8
    files = sorted((demo_plate["images"] / "DEMO-P1").glob("*.tif"))
    assert len(files) == 96 * 3
    image = tifffile.imread(files[0])
    assert image.dtype == np.uint16 and image.max() < 4096 and image.shape == (128, 128)
    truth = json.loads(demo_plate["truth"].read_text())
    actives = {c["compound"] for c in truth["compounds"] if c["is_active"]}
    assert actives == {
        "Weakamide",  # 16% of its full effect at the top dose: weak but real
        "Nucleomax",
        "Condensin-7",
        "Elongatin",
        "Mitoglow",
        "Speckletin",
        "Toxicol",
    }
    assert len(list((demo_plate["truth"].parent / "masks").glob("*_nuclei.tif"))) == 96


def test_demo_cell_loss_is_visible_in_truth(demo_plate):
    truth = json.loads(demo_plate["truth"].read_text())
    counts = {t["well"]: t["n_cells"] for t in truth["true_cell_counts"]}
    toxicol_column = 1 + [c.name for c in COMPOUNDS].index("Toxicol") + 1
    top_dose, dmso = (
        counts[f"A{toxicol_column:02d}"],
        np.mean([counts[f"{r}01"] for r in "ABCDEFGH"]),
    )
    assert top_dose < 0.5 * dmso


def test_effect_size_is_a_monotone_hill_curve():
    compound = COMPOUNDS[0]
    effects = [effect_size(compound, dose) for dose in sorted(DOSES_UM)]
    assert all(a < b for a, b in zip(effects, effects[1:], strict=False))
    assert effect_size(compound, compound.ec50_um) == pytest.approx(0.5)
    assert effect_size(COMPOUNDS[-1], 10.0) == 0.0


def test_demo_platemap_rejects_no_plates():
    with pytest.raises(ValueError, match="empty"):
        demo_platemap([])


def test_write_demo_plate_rejects_bad_size(tmp_path):
    with pytest.raises(ValueError, match="field_size_px"):
        write_demo_plate(tmp_path, field_size_px=10)


def test_demo_platemap_interleaves_the_96_layout_on_larger_plates():
    small = demo_platemap(["P"])
    for plate_format, k in ((384, 2), (1536, 4)):
        large = demo_platemap(["P"], plate_format=plate_format)
        assert len(large) == plate_format
        per_dose = large.groupby(["compound", "concentration_uM"]).size()
        assert (per_dose == per_dose.iloc[0]).all() or "DMSO" in per_dose
        treated = large[large["role"] == "treatment"]
        assert (treated.groupby(["compound", "concentration_uM"]).size() == k * k).all()
        assert set(
            map(tuple, small[["compound", "concentration_uM"]].to_numpy())
        ) == set(map(tuple, large[["compound", "concentration_uM"]].to_numpy()))
    quadrant = demo_platemap(["P"], plate_format=384).set_index("well")
    assert quadrant.loc["A01", "compound"] == quadrant.loc["B02", "compound"] == "DMSO"
    assert (
        quadrant.loc["A03", "concentration_uM"]
        == quadrant.loc["B04", "concentration_uM"]
    )
    with pytest.raises(ValueError, match="plate_format = 100"):
        demo_platemap(["P"], plate_format=100)


@pytest.mark.slow
def test_a_384_well_five_channel_demo_plate_runs(tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "plate"
    assert main(["demo-data", str(out), "--plates", "1", "--fields-per-well", "1",
                 "--field-size", "64", "--cells-per-field", "3", "--plate-format", "384",
                 "--n-channels", "5"]) == 0  # fmt: skip
    assert len(list((out / "images" / "DEMO-P1").glob("*_w5.tif"))) == 384
    config = tmp_path / "threads.toml"
    config.write_text("[execution]\nn_workers = 2\nprocesses = false\n")
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["run", str(out / "images"), "--platemap", str(out / "platemap.csv"),
                 "--layout", "imagexpress", "--channels",
                 "DNA=w1,Actin=w2,Mito=w3,ER=w4,RNA=w5", "--config", str(config),
                 "--db", url]) == 0  # fmt: skip
    assert "384 fields (384 processed" in capsys.readouterr().out
    assert main(["qc", "--db", url]) == 0
    assert "DEMO-P1" in capsys.readouterr().out


def test_a_demo_field_at_jump_density_segments_to_its_true_count():
    """A 1080 px field of ~200 nuclei of ~20 px, as a JUMP Cell Painting field."""
    from pipeline.cells.segment import segment_field
    from pipeline.images.demo import cell_params, render_field, vignetting

    rng = np.random.default_rng(0)
    image, nuclei, _ = render_field(
        cell_params("none", 0.0, rng, 200), shape=(1080, 1080),
        illumination=vignetting((1080, 1080), rng), nucleus_radius_px=10.0,
        rng=rng, n_channels=5,
    )  # fmt: skip
    assert image.shape == (5, 1080, 1080) and image.dtype == np.uint16
    assert 170 <= nuclei.max() <= 230
    found, _ = segment_field(image[0], image[1])
    assert abs(int(found.max()) - int(nuclei.max())) <= 0.1 * nuclei.max()


def test_write_demo_plate_rejects_bad_channels_and_nucleus_size(tmp_path):
    with pytest.raises(ValueError, match="n_channels = 4"):
        write_demo_plate(tmp_path, n_channels=4)
    with pytest.raises(ValueError, match="nucleus_diameter_px = 100"):
        write_demo_plate(tmp_path, field_size_px=128, nucleus_diameter_px=100)


def test_cell_params_and_vignetting_reject_bad_input():
    from pipeline.images.demo import EFFECTS, cell_params, vignetting

    rng = np.random.default_rng(0)
    assert cell_params("cell_loss", 1.0, rng, 0)["n_cells"] == 0
    assert {d.effect for d in COMPOUNDS} <= set(EFFECTS)
    with pytest.raises(ValueError, match="effect 'glow' is unknown"):
        cell_params("glow", 0.5, rng, 10)
    with pytest.raises(ValueError, match="strength 1.5"):
        cell_params("none", 1.5, rng, 10)
    with pytest.raises(ValueError, match="n_max -1"):
        cell_params("none", 0.5, rng, -1)
    field = vignetting((40, 60), rng)
    assert field.shape == (40, 60) and 0.6 < field.min() < field.max() <= 1.0
    with pytest.raises(ValueError, match="shape"):
        vignetting((0, 5), rng)
