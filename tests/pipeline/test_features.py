from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import regionprops

from pipeline.cells.segment import segment_field
from pipeline.config import MeasureConfig
from pipeline.measure.features import (
    HARALICK_NAMES,
    check_labels,
    feature_names,
    glcm,
    haralick,
    measure_cells,
    quantize,
    zernike_indices,
)
from tests.conftest import make_field, shared_data


def _two_cells():
    """Two touching cells with an elliptic nucleus each, and a textured image."""
    nuclei = np.zeros((60, 100), np.int32)
    nuclei[ellipse(30, 25, 6, 10, shape=nuclei.shape)] = 1
    nuclei[disk((30, 72), 7, shape=nuclei.shape)] = 2
    cells = np.zeros_like(nuclei)
    cells[8:52, 5:50] = 1
    cells[8:52, 50:95] = 2
    cells[nuclei > 0] = nuclei[nuclei > 0]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 50, (2, 60, 100)).astype(np.uint16)
    image[0][nuclei > 0] += 1000
    image[1][cells > 0] += 300
    return image, nuclei, cells


def test_feature_names_follow_cellprofiler_and_count():
    names = feature_names(["DNA", "Actin", "Mito"])
    assert len(names) == len(set(names)) >= 300
    for expected in (
        "Nuclei_AreaShape_Area",
        "Cells_AreaShape_Zernike_9_9",
        "Cytoplasm_Intensity_MeanIntensityEdge_Mito",
        "Cells_Texture_InfoMeas2_Actin_5",
        "Cells_RadialDistribution_FracAtD_DNA_1of4",
        "Cells_Granularity_8_Mito",
        "Cells_Neighbors_NumberOfNeighbors_Adjacent",
        "Nuclei_Ratio_NucleusCellArea",
    ):
        assert expected in names
    assert len(feature_names(["DNA"])) >= 100
    assert len(feature_names(["DNA", "CELL"])) >= 378  # CellProfiler's peer pipeline


def test_measure_cells_shapes_and_intensities_match_references():
    image, nuclei, cells = _two_cells()
    table, features = measure_cells(image, nuclei, cells, channel_names=["DNA", "Act"])
    assert list(features.columns) == feature_names(["DNA", "Act"])
    assert features.dtypes.eq(np.float32).all()
    assert table["object_number"].tolist() == [1, 2]
    for k, region in enumerate(regionprops(nuclei), start=0):
        row = features.iloc[k]
        assert row["Nuclei_AreaShape_Area"] == region.area
        assert row["Nuclei_AreaShape_Eccentricity"] == pytest.approx(
            region.eccentricity, abs=0.02
        )
        assert row["Nuclei_AreaShape_MajorAxisLength"] == pytest.approx(
            region.axis_major_length, rel=0.02
        )
        assert row["Nuclei_AreaShape_Perimeter"] == pytest.approx(
            region.perimeter, rel=0.12
        )
        assert row["Nuclei_AreaShape_Solidity"] == pytest.approx(
            region.solidity, abs=0.06
        )
        np.testing.assert_allclose(
            row[[f"Nuclei_AreaShape_HuMoment_{i}" for i in range(4)]].astype(float),
            region.moments_hu[:4],
            rtol=0.05,
            atol=1e-6,
        )
        pixels = image[0][nuclei == k + 1].astype(float)
        assert row["Nuclei_Intensity_MeanIntensity_DNA"] == pytest.approx(pixels.mean())
        assert row["Nuclei_Intensity_StdIntensity_DNA"] == pytest.approx(
            pixels.std(), rel=1e-4
        )
        assert row["Nuclei_Intensity_MinIntensity_DNA"] == pixels.min()
        assert row["Nuclei_Intensity_MaxIntensity_DNA"] == pixels.max()
        assert row["Nuclei_Intensity_MedianIntensity_DNA"] == np.quantile(
            pixels, 0.5, method="lower"
        )
        assert row["Nuclei_Intensity_IntegratedIntensity_DNA"] == pytest.approx(
            pixels.sum(), rel=1e-5
        )
        assert row["Nuclei_AreaShape_Zernike_0_0"] == pytest.approx(1 / np.pi)
    cyto_area = features["Cytoplasm_AreaShape_Area"]
    np.testing.assert_allclose(
        cyto_area, features["Cells_AreaShape_Area"] - features["Nuclei_AreaShape_Area"]
    )
    assert features["Cells_Neighbors_NumberOfNeighbors_Adjacent"].tolist() == [1, 1]
    assert features["Nuclei_Neighbors_FirstClosestDistance"].iloc[0] == pytest.approx(
        47, abs=1
    )
    fractions = features.filter(like="Cells_RadialDistribution_FracAtD_Act").sum(axis=1)
    np.testing.assert_allclose(fractions, 1, rtol=1e-5)
    assert (
        features.isna().sum().sum()
        == features["Nuclei_Neighbors_SecondClosestDistance"].isna().sum()
    )  # only the second neighbour is missing with two cells


def test_zernike_magnitudes_are_rotation_invariant():
    image, nuclei, cells = _two_cells()
    rotated = [np.rot90(a, axes=(-2, -1)).copy() for a in (image, nuclei, cells)]
    options = MeasureConfig(texture_scales=(), granularity_scales=0)
    _, original = measure_cells(
        image, nuclei, cells, channel_names=["a", "b"], options=options
    )
    _, turned = measure_cells(*rotated, channel_names=["a", "b"], options=options)
    zernike = [c for c in original.columns if "Zernike" in c or "HuMoment" in c]
    np.testing.assert_allclose(original[zernike], turned[zernike], rtol=1e-4, atol=1e-6)
    assert len(zernike_indices(9)) == 30


def test_texture_matches_scikit_image_glcm():
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 8, (40, 40)).astype(np.int32)
    grey[:, 20:] = np.minimum(grey[:, 20:] + 3, 7)  # some structure
    labels = np.ones((40, 40), np.int64)
    # at distance 1 scikit-image's offsets equal ours (CellProfiler's: (0, d), (d, d),
    # (d, 0), (d, -d)); at larger d it rounds diagonals to the Euclidean distance
    ours = glcm(labels, grey[None], 1, 8, 1)[0, 0]  # (4, 8, 8)
    reference = graycomatrix(
        grey.astype(np.uint8), [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], 8,
        symmetric=True, normed=True,
    )[:, :, 0, :]  # fmt: skip
    for d in range(4):
        np.testing.assert_allclose(ours[d], reference[:, :, d], atol=1e-12)
    features = haralick(ours)
    expected = {
        "AngularSecondMoment": graycoprops(reference[:, :, None], "ASM")[0],
        "Contrast": graycoprops(reference[:, :, None], "contrast")[0],
        "Correlation": graycoprops(reference[:, :, None], "correlation")[0],
    }
    for name, values in expected.items():
        j = HARALICK_NAMES.index(name)
        np.testing.assert_allclose(features[:, j], values, rtol=1e-6)


def test_quantize_and_glcm_reject():
    with pytest.raises(ValueError, match="levels"):
        quantize(np.zeros((4, 4)), np.ones((4, 4), bool), 1)
    with pytest.raises(ValueError, match="shapes differ"):
        quantize(np.zeros((4, 4)), np.ones((4, 5), bool), 8)
    with pytest.raises(ValueError, match="texture scale"):
        glcm(np.ones((4, 4), int), np.zeros((1, 4, 4), int), 1, 8, 0)
    with pytest.raises(ValueError, match=r"\(C, Y, X\)"):
        glcm(np.ones((4, 4), int), np.zeros((4, 4), int), 1, 8, 1)
    for grey in (np.full((1, 4, 4), 8), np.full((1, 4, 4), -1), np.ones((1, 4, 4))):
        with pytest.raises(ValueError, match="integer levels 0..7"):
            glcm(np.ones((4, 4), int), grey, 1, 8, 1)


@pytest.mark.parametrize(
    ("levels", "n"), [(2, 32), (2, 33), (16, 128), (16, 129), (17, 114), (256, 2)]
)
def test_glcm_counts_every_pair_once(levels, n):
    """Counts against a pixel-by-pixel reference, with object counts at the edges
    of the narrow code types (n x levels^2 = 128 / 132, 32,768 / 33,024)."""
    rng = np.random.default_rng(n)
    labels = rng.integers(1, n + 1, (24, 30)) * (rng.random((24, 30)) < 0.9)
    labels[0, : min(n, 30)] = np.arange(1, min(n, 30) + 1)
    grey = rng.integers(0, levels, (2, 24, 30))
    p = glcm(labels, grey, n, levels, 2)
    np.testing.assert_array_equal(p, _glcm_pixel_by_pixel(labels, grey, n, levels, 2))


def _glcm_pixel_by_pixel(labels, grey, n, levels, scale):
    height, width = labels.shape
    expected = np.zeros((len(grey), n, 4, levels, levels))
    directions = [(0, scale), (scale, scale), (scale, 0), (scale, -scale)]
    for d, (dy, dx) in enumerate(directions):
        for y, x in np.argwhere(labels > 0):
            yy, xx = y + dy, x + dx
            if 0 <= yy < height and 0 <= xx < width and labels[yy, xx] == labels[y, x]:
                for c in range(len(grey)):
                    expected[
                        c, labels[y, x] - 1, d, grey[c, y, x], grey[c, yy, xx]
                    ] += 1
    expected = expected + expected.swapaxes(-1, -2)
    total = expected.sum(axis=(-2, -1), keepdims=True)
    return np.divide(expected, total, out=np.zeros_like(expected), where=total > 0)


@pytest.mark.parametrize("scale", [1, 2, 6, 7, 8, 9])
def test_glcm_pairs_do_not_wrap_around_rows(scale):
    """Objects touching both the left and the right border: pixels at the end of a
    row do not pair with the start of a later row; scales as wide or high as the
    image give no pairs in those directions."""
    labels = np.zeros((8, 7), np.int32)
    labels[1:4] = 1  # full rows
    labels[5, 0], labels[5, 6], labels[6, 6], labels[7, 0] = 2, 2, 2, 2
    labels[6, 0:3] = 3
    grey = np.random.default_rng(scale).integers(0, 4, (2, 8, 7))
    np.testing.assert_array_equal(
        glcm(labels, grey, 3, 4, scale),
        _glcm_pixel_by_pixel(labels, grey, 3, 4, scale),
    )


@pytest.mark.parametrize("levels", [2, 8, 256])
def test_object_grey_levels_are_quantize_at_object_pixels(levels):
    """Texture quantizes only the objects' pixels: `quantize`'s levels there, 0
    elsewhere; no objects give all zeros."""
    from pipeline.measure import features

    rng = np.random.default_rng(levels)
    planes = rng.gamma(2.0, 100.0, (2, 30, 40)).astype(np.float32)
    labels = np.zeros((30, 40), np.int32)
    labels[3:12, 5:20], labels[15:28, 22:39] = 1, 2
    grey = features._object_grey_levels(planes, features._objects(labels, 2), levels)
    inside = labels > 0
    for plane, levels_of_plane in zip(planes, grey, strict=True):
        expected = quantize(plane, inside, levels)
        np.testing.assert_array_equal(levels_of_plane[inside], expected[inside])
        assert not levels_of_plane[~inside].any()
    empty = features._objects(np.zeros((30, 40), np.int32), 0)
    assert not features._object_grey_levels(planes, empty, levels).any()


def test_measure_cells_zero_and_one_cell():
    image = np.zeros((1, 16, 16), np.uint16)
    labels = np.zeros((16, 16), np.int32)
    table, features = measure_cells(image, labels, labels, channel_names=["DNA"])
    assert len(table) == 0 and list(features.columns) == feature_names(["DNA"])
    labels[4:9, 4:9] = 1
    image[0, 4:9, 4:9] = 7
    table, features = measure_cells(image, labels, labels, channel_names=["DNA"])
    assert len(table) == 1
    assert features["Nuclei_AreaShape_Area"].iloc[0] == 25
    assert np.isnan(features["Nuclei_Neighbors_FirstClosestDistance"].iloc[0])


def test_measure_cells_on_a_one_pixel_high_image():
    image = np.ones((1, 1, 16), np.float32)
    labels = np.zeros((1, 16), np.int32)
    labels[0, 2:6], labels[0, 9:14] = 1, 2
    _, features = measure_cells(image, labels, labels, channel_names=["DNA"])
    assert features["Nuclei_AreaShape_Area"].tolist() == [4, 5]


def test_measure_cells_one_pixel_and_line_objects():
    image = np.ones((1, 12, 12), np.float32)
    labels = np.zeros((12, 12), np.int32)
    labels[2, 2] = 1
    labels[6, 1:10] = 2
    _, features = measure_cells(image, labels, labels, channel_names=["DNA"])
    assert features["Nuclei_AreaShape_Area"].tolist() == [1, 9]
    assert np.isfinite(features["Nuclei_AreaShape_Solidity"]).all()


@pytest.mark.parametrize(
    ("shape", "names", "match"),
    [
        ((2, 8, 8), ["DNA"], "channel_names has 1 names"),
        ((2, 8, 9), ["a", "b"], "must match image"),
        ((8, 8), ["a"], r"expected \(C, Y, X\)"),
    ],
)
def test_measure_cells_rejects(shape, names, match):
    labels = np.zeros((8, 8), np.int32)
    with pytest.raises(ValueError, match=match):
        measure_cells(np.zeros(shape), labels, labels, channel_names=names)


def test_check_labels_rejects():
    labels = np.zeros((8, 8), np.int32)
    labels[1, 1], labels[5, 5] = 1, 3
    with pytest.raises(ValueError, match="without gaps"):
        check_labels(np.zeros((1, 8, 8)), labels, labels)
    nuclei = (labels > 0).astype(np.int32)
    with pytest.raises(ValueError, match="without a nucleus"):
        check_labels(np.zeros((1, 8, 8)), nuclei, labels)
    with pytest.raises(ValueError, match=">= 0"):
        check_labels(np.zeros((1, 8, 8)), -nuclei, nuclei)


def test_feature_names_rejects_duplicates():
    with pytest.raises(ValueError, match="unique"):
        feature_names(["DNA", "DNA"])


def test_measure_cells_segmented_synthetic_field():
    image, centres = make_field(n_cells=4, n_channels=2)
    nuclei, cells = segment_field(image[0], image[1])
    table, features = measure_cells(
        image, nuclei, cells, channel_names=["DNA", "Actin"]
    )
    assert len(table) == 4
    assert (features["Cells_AreaShape_Area"] > features["Nuclei_AreaShape_Area"]).all()


def test_measure_cells_real_jump_field_is_finite():
    folder = shared_data(
        "fields/cellpainting_fovs_cytodataframe/JUMP_plate_BR00117006/images/orig"
    )
    import tifffile

    image = np.stack(
        [tifffile.imread(folder / f"r01c01f01p01-ch{c}sk1fk1fl1.tiff") for c in (5, 2)]
    )
    nuclei, cells = segment_field(image[0], image[1])
    table, features = measure_cells(image, nuclei, cells, channel_names=["DNA", "AGP"])
    assert len(table) > 50
    finite = np.isfinite(features.to_numpy()).mean(axis=0)
    frame = pd.Series(finite, index=features.columns)
    assert (frame > 0.95).mean() > 0.98, frame[frame <= 0.95]


def test_object_sums_add_in_the_order_of_bincount():
    """The sparse per-object sums equal `np.bincount` to the last bit, with weights
    whose sum depends on the order of the additions and a label without pixels."""
    from pipeline.measure import features

    labels = np.array([[1, 1, 0, 3], [1, 3, 3, 1]], dtype=np.int32)  # no label 2
    objects = features._objects(labels, 3)
    weights = np.array([1e16, 1.0, -1e16, 3.0, 1.0, -1.0, 1.0])  # per object pixel
    sums = features._object_sums(objects, [weights, weights[::-1].copy()])
    for k, w in enumerate([weights, weights[::-1]]):
        np.testing.assert_array_equal(sums[:, k], features._sums(objects.lab, 3, w))
    assert (
        sums[1, 0] == 0.0 and sums[0, 0] == features._sums(objects.lab, 3, weights)[0]
    )


def test_distance_inside_equals_scipy_edt():
    """Distances to the nearest pixel outside the own object, objects touching each
    other and the image border: scipy's values to the last bit, call after call."""
    from pipeline.measure import features

    noise = ndi.gaussian_filter(np.random.default_rng(0).normal(size=(60, 80)), 3)
    labels, _ = ndi.label(noise > 0)  # blobs: distances such as sqrt(2), sqrt(5)
    labels[:20, :25] = labels.max() + 1  # at the corner, touching others
    edge = features._edge_mask(labels)
    expected = ndi.distance_transform_edt(edge ^ (labels > 0)) + (labels > 0)
    assert (expected != np.round(expected)).any()
    for _ in range(5):  # OpenCV's float32 distances vary in their last bit
        distance = features._distance_inside(labels, edge)
        np.testing.assert_array_equal(distance, expected)
    assert distance[labels == 0].max() == 0 and distance[edge].min() == 1
    big = np.ones((2100, 2100), np.int32)  # distances past 1,024 px: scipy's
    edge = features._edge_mask(big)
    np.testing.assert_array_equal(
        features._distance_inside(big, edge),
        ndi.distance_transform_edt(edge ^ (big > 0)) + 1,
    )
    lines = np.zeros((1, 9), np.int32)  # objects all edge; an empty image
    lines[0, 2:5] = 1
    assert features._distance_inside(lines, features._edge_mask(lines)).max() == 1
    empty = np.zeros((0, 4), np.int32)
    assert features._distance_inside(empty, features._edge_mask(empty)).shape == (0, 4)


def test_hull_area_and_feret_equal_qhull_and_pdist():
    """OpenCV's hull against scipy's Qhull and all pairwise distances, on blobs
    touching each other and the border, a line, a diagonal, a single pixel and an
    absent object."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    from pipeline.measure import features

    noise = ndi.gaussian_filter(np.random.default_rng(1).normal(size=(90, 120)), 3)
    labels, n = ndi.label(noise > 0.02)
    labels[85, 2:30] = n + 1  # a line
    labels[np.arange(60, 70), np.arange(100, 110)] = n + 2  # a diagonal
    labels[2, 118] = n + 3  # one pixel
    labels[labels == 3] = 0  # an absent object: NaN
    n = int(labels.max())
    objects = features._objects(labels, n)
    hull_area, feret = features._hull_features(objects, n)
    edge = features._edge_mask(labels)
    for k in range(1, n + 1):
        points = np.argwhere(edge & (labels == k)).astype(float)
        if k == 3:
            assert not len(points)
            assert np.isnan(hull_area[k - 1]) and np.isnan(feret[k - 1])
            continue
        extent = np.ptp(points, axis=0)
        try:
            area = ConvexHull(points).volume
        except QhullError:  # a line of pixels: Qhull refuses it
            area = 0.0
        assert hull_area[k - 1] == pytest.approx(area + extent.sum() + 1, abs=1e-9)
        assert feret[k - 1] == (pdist(points).max() if len(points) > 1 else 0.0)
    assert feret[n - 3] == pytest.approx(27) and hull_area[n - 3] == 28
    assert feret[n - 2] == pytest.approx(9 * np.sqrt(2)) and hull_area[n - 2] == 19
    assert feret[n - 1] == 0 and hull_area[n - 1] == 1


def test_label_quantiles_and_mad_equal_a_sort_per_label():
    """Quantiles and median absolute deviations equal those of sorting each label's
    float32 values, with ties, negative values and zeros, even and odd counts,
    one-pixel labels and an absent label."""
    from pipeline.measure import features

    rng = np.random.default_rng(3)
    for trial in range(60):
        n = int(rng.integers(2, 12))
        labels = rng.integers(1, n, int(rng.integers(1, 300)))  # label n is absent
        values = (
            rng.integers(-3, 3, len(labels)).astype(np.float32)  # many ties
            if trial % 2
            else rng.normal(size=len(labels)).astype(np.float32)
        )
        values[: trial % 3] = -0.0  # a negative zero among zeros and negatives
        quantiles, mad = features._label_quantiles(values, labels, n, (0, 0.5, 1))
        for k in range(1, n + 1):
            own = np.sort(values[labels == k]).astype(np.float64)
            if not len(own):
                assert np.isnan(mad[k - 1]) and np.isnan(quantiles[k - 1]).all()
                continue
            median = own[(len(own) - 1) // 2]
            deviations = np.sort(np.abs(own - median))
            assert quantiles[k - 1].tolist() == [own[0], median, own[-1]]
            assert mad[k - 1] == deviations[(len(own) - 1) // 2]


def test_label_quantiles_reject_values_a_cast_would_round():
    from pipeline.measure import features

    with pytest.raises(TypeError, match="float32, not float64"):
        features._label_quantiles(np.array([0.1, 0.2]), np.array([1, 1]), 1, (0.5,))


def test_without_cytoplasm_the_other_features_are_unchanged():
    image, nuclei, cells = _two_cells()
    options = MeasureConfig(texture_scales=(3,), granularity_scales=2)
    _, full = measure_cells(image, nuclei, cells, channel_names=["a", "b"],
                            options=options)  # fmt: skip
    lean = replace(options, cytoplasm=False)
    _, short = measure_cells(image, nuclei, cells, channel_names=["a", "b"],
                             options=lean)  # fmt: skip
    assert list(short.columns) == feature_names(["a", "b"], lean)
    assert not short.columns.str.startswith("Cytoplasm_").any()
    assert set(short.columns) == set(full.columns[~full.columns.str.startswith(
        "Cytoplasm_")])  # fmt: skip
    pd.testing.assert_frame_equal(short, full[short.columns])


def test_nan_mean_std_equal_numpy_to_the_bit_without_warnings():
    """The per-thread-safe averages used by texture and radial distribution equal
    `np.nanmean` / `np.nanstd` exactly, including all-NaN slices, and warn nothing."""
    import warnings

    from pipeline.measure import features

    rng = np.random.default_rng(3)
    for shape, axis in [((40, 5, 8), 2), ((2, 30, 4, 13), 2), ((7, 3), 0), ((0, 4), 1)]:
        values = rng.normal(size=shape) * 10 ** rng.uniform(-3, 6, size=shape)
        values[rng.random(shape) < 0.4] = np.nan
        if values.size:  # index 0 of another axis: whole slices without a value
            values[(slice(None),) * (axis == 0) + (0,)] = np.nan
        with warnings.catch_warnings():  # numpy's own warn on the empty slices
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = np.nanmean(values, axis=axis), np.nanstd(values, axis=axis)
        assert np.isnan(expected[0]).any() == bool(values.size)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            found = features._nan_mean_std(values, axis)
        for got, want in zip(found, expected, strict=True):
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)  # NaN where NaN, bit for bit


def test_nan_mean_std_rejects_a_missing_axis():
    from pipeline.measure import features

    with pytest.raises(np.exceptions.AxisError):
        features._nan_mean_std(np.zeros((2, 3)), axis=2)
