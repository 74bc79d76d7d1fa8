import json

import numpy as np
import pytest
import tifffile

from pipeline.demo import (
    COMPOUNDS,
    DOSES_UM,
    demo_platemap,
    effect_size,
    write_demo_plate,
)
from pipeline.platemap import read_platemap


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
