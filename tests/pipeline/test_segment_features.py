import numpy as np
import pytest
import tifffile

from pipeline.features import feature_names, measure_cells
from pipeline.qc import measure_field_qc
from pipeline.segment import segment_field
from tests.conftest import make_field, shared_data


def test_segment_field_finds_planted_nuclei():
    image, centres = make_field(n_cells=6)
    nuclei, cells = segment_field(image[0])
    assert nuclei.dtype == np.int32 and nuclei.max() == 6
    for y, x in centres:
        assert nuclei[y, x] > 0
        assert cells[y, x] == nuclei[y, x]
    assert (cells > 0).sum() > (nuclei > 0).sum()


def test_segment_field_splits_touching_nuclei():
    image = np.full((64, 64), 100, np.uint16)
    yy, xx = np.mgrid[:64, :64]
    image[
        ((yy - 32) ** 2 + (xx - 24) ** 2 < 64) | ((yy - 32) ** 2 + (xx - 38) ** 2 < 64)
    ] = 1000
    nuclei, _ = segment_field(image)
    assert nuclei.max() == 2


def test_segment_field_empty_field_finds_nothing():
    noise = np.random.default_rng(0).normal(100, 5, (128, 128)).astype(np.uint16)
    nuclei, cells = segment_field(noise)
    assert nuclei.max() == 0 and cells.max() == 0


def test_segment_field_constant_image():
    nuclei, _ = segment_field(np.zeros((32, 32), np.uint16))
    assert nuclei.max() == 0


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((2, 8, 8)), r"expected one \(Y, X\) plane"),
        (np.full((8, 8), np.nan), "NaN"),
    ],
)
def test_segment_field_rejects(image, match):
    with pytest.raises(ValueError, match=match):
        segment_field(image)


def test_segment_field_real_stardist_sample_count():
    folder = shared_data("segmentation/stardist_pkg_sample")
    image = tifffile.imread(folder / "img2d.tif")
    truth = tifffile.imread(folder / "mask2d.tif")
    nuclei, _ = segment_field(image)
    n_true = len(np.unique(truth)) - 1
    assert 0.7 * n_true <= nuclei.max() <= 1.3 * n_true


def test_segment_field_demo_ground_truth_counts(demo_plate):
    masks = demo_plate["truth"].parent / "masks"
    images = demo_plate["images"] / "DEMO-P1"
    errors = []
    for mask_path in sorted(masks.glob("*_nuclei.tif"))[:24]:
        stem = mask_path.name.removesuffix("_nuclei.tif")
        nuclei, _ = segment_field(tifffile.imread(images / f"{stem}_w1.tif"))
        errors.append(abs(int(nuclei.max()) - int(tifffile.imread(mask_path).max())))
    assert np.mean(errors) <= 1.0


def test_measure_cells_names_and_values():
    image, centres = make_field(n_cells=4, n_channels=2)
    nuclei, cells = segment_field(image[0])
    table, features = measure_cells(
        image, nuclei, cells, channel_names=["DNA", "Actin"]
    )
    assert list(features.columns) == feature_names(["DNA", "Actin"])
    assert len(features.columns) >= 40
    assert list(table["object_number"]) == [1, 2, 3, 4]
    assert features.dtypes.eq(np.float32).all()
    area = features["Nuclei_AreaShape_Area"].to_numpy()
    np.testing.assert_allclose(area, np.bincount(nuclei.ravel())[1:])
    np.testing.assert_allclose(table["area_px"], area)
    mean = features["Nuclei_Intensity_MeanIntensity_DNA"].to_numpy()
    for k in range(1, 5):
        assert mean[k - 1] == pytest.approx(image[0][nuclei == k].mean(), rel=1e-5)
        assert features["Nuclei_Intensity_MedianIntensity_DNA"].iloc[
            k - 1
        ] == pytest.approx(np.quantile(image[0][nuclei == k], 0.5, method="lower"))
    np.testing.assert_allclose(
        features["Nuclei_Intensity_IntegratedIntensity_DNA"], mean * area, rtol=1e-5
    )
    assert (features["Cells_AreaShape_Area"] > features["Nuclei_AreaShape_Area"]).all()


def test_measure_cells_no_cells():
    image = np.zeros((1, 16, 16), np.uint16)
    labels = np.zeros((16, 16), np.int32)
    table, features = measure_cells(image, labels, labels, channel_names=["DNA"])
    assert len(table) == 0 and list(features.columns) == feature_names(["DNA"])


@pytest.mark.parametrize(
    ("shape", "names", "match"),
    [
        ((2, 8, 8), ["DNA"], "channel_names has 1 names"),
        ((2, 8, 9), ["a", "b"], "must match image"),
    ],
)
def test_measure_cells_rejects(shape, names, match):
    labels = np.zeros((8, 8), np.int32)
    with pytest.raises(ValueError, match=match):
        measure_cells(np.zeros(shape), labels, labels, channel_names=names)


def test_measure_cells_rejects_gapped_labels():
    labels = np.zeros((8, 8), np.int32)
    labels[1, 1], labels[5, 5] = 1, 3
    with pytest.raises(ValueError, match="without gaps"):
        measure_cells(np.zeros((1, 8, 8)), labels, labels, channel_names=["DNA"])


def test_feature_names_rejects_duplicates():
    with pytest.raises(ValueError, match="unique"):
        feature_names(["DNA", "DNA"])


def test_measure_field_qc():
    image = np.zeros((2, 10, 10), np.uint16)
    image[1, :5] = 65535
    qc = measure_field_qc(image, channel_names=["DNA", "Actin"], n_cells=3)
    assert qc["n_cells"] == 3
    assert qc["saturated_frac_Actin"] == 0.5 and qc["saturated_frac_DNA"] == 0.0


def test_measure_field_qc_rejects_name_mismatch():
    with pytest.raises(ValueError, match="one name per channel"):
        measure_field_qc(np.zeros((2, 4, 4)), channel_names=["DNA"], n_cells=0)
