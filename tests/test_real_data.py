"""End-to-end runs on real screening images from ../shared/data."""

import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi

from db.session import make_engine
from db.store import resolve_run
from pipeline.cells.segeval import match_counts
from pipeline.cells.segment import segment_field
from pipeline.config import config_from_dict
from pipeline.run import run_experiment
from pipeline.views.export import read_well_profiles
from tests.conftest import shared_data

NF1 = "fields/cellpainting_fovs_cytodataframe/NF1_cellpainting_data_shrunken"
NF1_PATTERN = r"(?P<well>[A-H]\d{1,2})_01_(?P<channel>\d)_(?P<site>\d)_\w+_001\.tif"
JUMP = "fields/cellpainting_fovs_cytodataframe/JUMP_plate_BR00117006/images"


def threads(input_section):
    return config_from_dict(
        {"input": input_section, "execution": {"n_workers": 2, "processes": False}}
    )


def test_run_real_nf1_fields_with_user_regex(tmp_path):
    """5 real Cell Painting fields (3 channels, 904x1224): NF1 genotype wells, not
    compounds; B07 stands in as the reference (negative control) well."""
    root = shared_data(NF1)
    platemap = tmp_path / "nf1.csv"
    pd.DataFrame(
        {
            "well": ["B07", "D06", "D07", "F07", "H12"],
            "compound": ["reference", "g1", "g2", "g3", "g4"],
            "concentration": [0, 1, 1, 1, 1],
            "role": ["negative_control"] + ["treatment"] * 4,
        }
    ).to_csv(platemap, index=False)
    url = f"sqlite:///{tmp_path}/nf1.db"
    config = threads(
        {"pattern": NF1_PATTERN, "channels": {"DNA": "1", "GFP": "2", "RFP": "3"}}
    )
    summary = run_experiment(
        root / "Plate_2_images", platemap, config=config, db_url=url
    )
    assert (summary.n_fields, summary.n_failed) == (5, 0)
    engine = make_engine(url)
    wells = read_well_profiles(engine, *resolve_run(engine))
    assert len(wells) == 5
    assert wells["Metadata_CellCount"].between(15, 80).all()
    assert (wells["Cells_Intensity_MeanIntensity_RFP"] > 0).all()


@pytest.mark.parametrize("method", ["classical", "unet"])
def test_nuclei_agree_with_cellprofiler_masks_on_nf1(method):
    """CellProfiler's NF1 masks leave out nuclei touching the border: so do we here.
    Then the counts agree within 10% and 90% of its nuclei match ours at IoU > 0.5."""
    root = shared_data(NF1)
    for mask_path in sorted((root / "Plate_2_masks").glob("*_MaskNuclei.tiff")):
        reference, n_reference = ndi.label(tifffile.imread(mask_path) > 0)
        name = mask_path.name.replace("_MaskNuclei.tiff", ".tif")
        nuclei, _ = segment_field(
            tifffile.imread(root / "Plate_2_images" / name),
            method=method,
            exclude_border_nuclei=True,
        )
        assert abs(int(nuclei.max()) - n_reference) <= 0.1 * n_reference, name
        tp = match_counts(reference, nuclei, (0.5,))["tp"].item()
        assert tp >= 0.9 * n_reference, name


def test_run_real_jump_phenix_field(tmp_path):
    """One real JUMP CPJUMP1 field (Opera Phenix names, LZW, 1080x1080)."""
    root = shared_data(JUMP)
    platemap = tmp_path / "jump.csv"
    platemap.write_text(
        "plate,well,compound,concentration,role\norig,A01,ORF ccsbBroad304_00900,0,negcon\n"
    )
    url = f"sqlite:///{tmp_path}/jump.db"
    config = threads(
        {"layout": "phenix", "channels": {"AGP": "ch2", "RNA": "ch3", "DNA": "ch5"}}
    )
    summary = run_experiment(root, platemap, config=config, db_url=url)
    assert summary.n_failed == 0
    assert 100 <= summary.n_cells <= 400
