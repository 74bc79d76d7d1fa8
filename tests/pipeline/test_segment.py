import importlib.util
from dataclasses import asdict, fields

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.draw import disk
from skimage.io import imread
from skimage.transform import resize

from pipeline.cells.segeval import average_precision, match_counts
from pipeline.cells.segment import (
    check_segmenter,
    segment_cells,
    segment_field,
    segment_nuclei,
    segmenter_weights_sha256,
)
from pipeline.config import SegmentConfig
from pipeline.errors import InputError
from pipeline.images.planes import (
    _block_mean,
    _log_on_grid,
    check_plane,
    estimate_nucleus_diameter,
    fill_holes,
    pixel_noise_sd,
    resize_linear,
    square_opening,
)
from tests.conftest import make_field, shared_data


def test_segment_field_finds_planted_nuclei():
    image, centres = make_field(n_cells=6)
    nuclei, cells = segment_field(image[0])
    assert nuclei.dtype == np.int32 and nuclei.max() == 6
    for y, x in centres:
        assert nuclei[y, x] > 0
        assert cells[y, x] == nuclei[y, x]
    assert (cells > 0).sum() > (nuclei > 0).sum()


def test_segment_nuclei_splits_touching_nuclei():
    image = np.full((64, 64), 100, np.uint16)
    yy, xx = np.mgrid[:64, :64]
    image[
        ((yy - 32) ** 2 + (xx - 24) ** 2 < 64) | ((yy - 32) ** 2 + (xx - 38) ** 2 < 64)
    ] = 1000
    assert segment_nuclei(image, nucleus_diameter_px=16).max() == 2
    assert (
        segment_nuclei(
            image, nucleus_diameter_px=16, declump_min_distance_diameters=0
        ).max()
        == 1
    )


@pytest.mark.parametrize("radius", [4, 8, 16])
def test_estimate_nucleus_diameter_scales_with_the_nuclei(radius):
    image = np.full((256, 256), 10.0)
    for y in range(3 * radius, 256 - 3 * radius, 4 * radius):
        for x in range(3 * radius, 256 - 3 * radius, 4 * radius):
            image[disk((y, x), radius, shape=image.shape)] = 100
    assert estimate_nucleus_diameter(image) == pytest.approx(2 * radius, rel=0.35)


def test_estimate_nucleus_diameter_sees_packed_nuclei_on_a_bright_band():
    # Like an embryo's cortex: small nuclei packed on a band 5x wider than they
    # are. The strongest LoG response is the band's; the nuclei's comes first.
    rng = np.random.default_rng(0)
    image = np.full((256, 256), 10.0)
    image[100:150] = 60
    for x in range(8, 250, 10):
        for y in range(106, 146, 10):
            image[disk((y, x), 4, shape=image.shape)] += 50
    image = ndi.gaussian_filter(image, 1) + rng.normal(0, 1, image.shape)
    assert estimate_nucleus_diameter(image) == pytest.approx(8, rel=0.35)


def test_segment_nuclei_cuts_each_nucleus_at_its_own_brightness():
    # A nucleus at 45% of its neighbours' brightness is found whole, not cut at
    # a threshold set by the bright ones.
    rng = np.random.default_rng(0)
    image = np.full((128, 128), 10.0)
    for center, value in [((30, 30), 1000), ((30, 90), 1000), ((90, 30), 1000)]:
        image[disk(center, 10, shape=image.shape)] = value
    image[disk((90, 90), 10, shape=image.shape)] = 450
    image = ndi.gaussian_filter(image, 1.5) + rng.normal(0, 2, image.shape)
    labels = segment_nuclei(image)
    areas = np.bincount(labels.ravel())[1:]
    assert len(areas) == 4
    assert areas[labels[90, 90] - 1] == pytest.approx(
        areas[labels[30, 30] - 1], rel=0.05
    )


@pytest.mark.parametrize("step", [1, 2])
def test_log_on_grid_is_the_subsampled_laplacian_of_gaussian(step):
    plane = np.random.default_rng(0).normal(size=(61, 80)).astype(np.float32)
    expected = -(2.5**2) * ndi.gaussian_laplace(plane, 2.5)[::step, ::step]
    np.testing.assert_allclose(
        _log_on_grid(plane, 2.5, step), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("factor", [1, 2, 3, 16])
def test_block_mean_is_numpys_block_mean(factor):
    """Means of whole blocks (the partial last row and column of blocks dropped),
    numpy's to float32 rounding."""
    plane = np.random.default_rng(factor).random((101, 67)).astype(np.float32) * 4e4
    height, width = 101 // factor, 67 // factor
    expected = (
        plane[: height * factor, : width * factor]
        .astype(np.float64)
        .reshape(height, factor, width, factor)
        .mean(axis=(1, 3))
    )
    means = _block_mean(plane, factor)
    assert means.dtype == np.float32 and means.shape == (height, width)
    np.testing.assert_allclose(means, expected, rtol=1e-6)


def test_resize_linear_is_scikit_images_resize():
    """skimage.transform.resize(order=1, preserve_range=True) to float32 rounding:
    growing, shrinking (anti-aliased) and both at once, from and to one pixel."""
    rng = np.random.default_rng(0)
    shapes = [((1, 1), (5, 3)), ((7, 1), (1, 4)), ((40, 30), (40, 30))]
    shapes += [(tuple(rng.integers(1, 60, 2)), tuple(rng.integers(1, 90, 2)))
               for _ in range(60)]  # fmt: skip
    for old, new in shapes:
        plane = (rng.random(old) * 3000).astype(np.float32)
        resized = resize_linear(plane, new)
        assert resized.dtype == np.float32 and resized.shape == new
        expected = resize(plane, new, order=1, preserve_range=True)
        np.testing.assert_allclose(resized, expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize(
    ("plane", "shape", "match"),
    [
        (np.zeros((4, 4, 2)), (2, 2), "expected a non-empty"),
        (np.zeros((0, 4)), (2, 2), "expected a non-empty"),
        (np.zeros((4, 4)), (0, 2), "two positive sizes"),
        (np.zeros((4, 4)), (2,), "two positive sizes"),
    ],
)
def test_resize_linear_rejects(plane, shape, match):
    with pytest.raises(ValueError, match=match):
        resize_linear(plane, shape)


def test_estimate_nucleus_diameter_constant_plane():
    assert estimate_nucleus_diameter(np.zeros((16, 16))) == 4.0


@pytest.mark.parametrize(
    "plane",
    [
        np.random.default_rng(0).normal(100, 5, (128, 128)).astype(np.uint16),
        np.zeros((64, 64), np.uint16),
        np.full((64, 64), 65535, np.uint16),
        np.zeros((1, 1), np.uint8),
        np.zeros((0, 0), np.float32),
    ],
    ids=["noise", "black", "saturated", "one-pixel", "empty"],
)
def test_segment_field_degenerate_fields_find_nothing(plane):
    nuclei, cells = segment_field(plane)
    assert nuclei.shape == plane.shape and nuclei.max(initial=0) == 0
    assert cells.max(initial=0) == 0


def test_segment_field_single_cell():
    image, _ = make_field(n_cells=1)
    nuclei, cells = segment_field(image[0], image[1])
    assert nuclei.max() == 1 and cells.max() == 1


@pytest.mark.parametrize(
    ("plane", "match"),
    [
        (np.zeros((2, 8, 8)), r"expected one \(Y, X\) plane"),
        (np.full((8, 8), np.nan), "NaN"),
        (np.zeros((8, 8), bool), "dtype bool"),
    ],
)
def test_segment_field_rejects(plane, match):
    with pytest.raises(ValueError, match=match):
        segment_field(plane)


def test_segment_nuclei_rejects_bad_options():
    with pytest.raises(ValueError, match="seed_fraction 0 must be in"):
        segment_nuclei(np.zeros((8, 8)), seed_fraction=0)
    with pytest.raises(ValueError, match="edge_fraction 1 in"):
        segment_nuclei(np.zeros((8, 8)), edge_fraction=1)
    with pytest.raises(ValueError, match="nucleus_diameter_px must be > 0"):
        segment_nuclei(np.zeros((8, 8)), nucleus_diameter_px=-3)


def test_segment_nuclei_exclude_border():
    image = np.full((64, 64), 10, np.uint16)
    image[disk((32, 32), 6, shape=image.shape)] = 500
    image[disk((2, 30), 6, shape=image.shape)] = 500
    kept = segment_nuclei(image, nucleus_diameter_px=12, exclude_border_nuclei=True)
    assert kept.max() == 1 and kept[32, 32] == 1
    assert segment_nuclei(image, nucleus_diameter_px=12).max() == 2


def test_segment_cells_propagates_over_cytoplasm_and_splits_at_the_valley():
    nuclei = np.zeros((40, 80), np.int32)
    nuclei[disk((20, 20), 4)] = 1
    nuclei[disk((20, 60), 4)] = 2
    cytoplasm = np.full((40, 80), 5.0)
    cytoplasm[5:35, 5:38] = 100  # cell 1
    cytoplasm[5:35, 42:75] = 100  # cell 2, a dim valley at x 38..41
    cells = segment_cells(nuclei, cytoplasm)
    assert cells[20, 10] == 1 and cells[20, 70] == 2
    assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all()
    assert cells[0, 0] == 0  # background stays out
    assert set(np.unique(cells[:, 30:37])) == {0, 1}
    assert set(np.unique(cells[:, 43:50])) == {0, 2}


def test_segment_cells_ring_without_cytoplasm():
    nuclei = np.zeros((40, 40), np.int32)
    nuclei[disk((20, 20), 4)] = 1
    cells = segment_cells(nuclei, ring_width_px=3)
    assert (cells > 0).sum() == pytest.approx(np.pi * 7**2, rel=0.2)
    default = segment_cells(nuclei)  # half the nucleus diameter
    assert (default > 0).sum() > (nuclei > 0).sum()


def test_segment_cells_rejects_shape_mismatch():
    nuclei = np.zeros((8, 8), np.int32)
    nuclei[4, 4] = 1
    with pytest.raises(ValueError, match="shapes differ"):
        segment_cells(nuclei, np.zeros((8, 9)))


def test_unknown_or_missing_segmenters_are_clear_errors():
    with pytest.raises(InputError, match="unknown segmenter 'otsu'; choose one of"):
        check_segmenter("otsu")
    for method in ("cellpose", "stardist"):
        if importlib.util.find_spec(method) is None:  # not installed here
            with pytest.raises(InputError, match=f"pip install {method}"):
                segment_field(np.zeros((8, 8)), method=method)


def test_segment_config_matches_segment_field_keywords():
    import inspect

    from pipeline.cells.segment import DEFAULT_SEGMENTER
    from pipeline.cli import build_parser

    image, _ = make_field(n_cells=2)
    options = asdict(SegmentConfig())
    nuclei, _ = segment_field(image[0], **options)
    assert nuclei.max() == 2
    # one default segmenter everywhere: config, segment_field and the CLI
    assert SegmentConfig().method == DEFAULT_SEGMENTER == "unet"
    assert inspect.signature(segment_field).parameters["method"].default == "unet"
    args = build_parser().parse_args(["segment", "x.tif", "--out-dir", "o"])
    assert args.method == DEFAULT_SEGMENTER
    assert {f.name for f in fields(SegmentConfig)} <= set(
        segment_field.__code__.co_varnames
    )


def test_segment_real_stardist_sample():
    folder = shared_data("segmentation/stardist_pkg_sample")
    truth = tifffile.imread(folder / "mask2d.tif")
    nuclei, _ = segment_field(tifffile.imread(folder / "img2d.tif"))
    ap = average_precision(match_counts(truth, nuclei))
    assert ap.loc[0.5] >= 0.7


def test_segment_real_dsb2018_images_without_tuning():
    """A regression guard on every 10th real DSB2018 image (the benchmark reports all)."""
    folder = shared_data("segmentation/dsb2018_dev")
    meta = pd.read_csv(folder / "metadata.csv")
    sample = meta.iloc[::10]
    counts = []
    for row in sample.itertuples(index=False):
        image = imread(folder / row.image_file)
        nuclei = segment_nuclei(image)
        counts.append(match_counts(tifffile.imread(folder / row.label_file), nuclei))
    assert average_precision(pd.concat(counts)).loc[0.5] >= 0.72


def test_segment_demo_ground_truth_counts(demo_plate):
    masks = demo_plate["truth"].parent / "masks"
    images = demo_plate["images"] / "DEMO-P1"
    errors = []
    for mask_path in sorted(masks.glob("*_nuclei.tif"))[:24]:
        stem = mask_path.name.removesuffix("_nuclei.tif")
        nuclei, _ = segment_field(tifffile.imread(images / f"{stem}_w1.tif"))
        errors.append(abs(int(nuclei.max()) - int(tifffile.imread(mask_path).max())))
    assert np.mean(errors) <= 1.0


def test_pixel_noise_sd_ignores_smooth_objects():
    rng = np.random.default_rng(0)
    plane = rng.normal(0, 4, (200, 200))
    plane[50:150, 50:150] += 1000  # a flat bright object barely changes the estimate
    assert pixel_noise_sd(plane) == pytest.approx(4, rel=0.1)
    assert pixel_noise_sd(np.ones((5, 1))) == pixel_noise_sd(np.ones((0, 5))) == 0
    with pytest.raises(ValueError, match="shape"):
        pixel_noise_sd(np.zeros((2, 2, 2)))


@pytest.mark.parametrize(("sd", "rel"), [(0.3, 0.4), (0.5, 0.2), (1.5, 0.05)])
def test_pixel_noise_sd_measures_noise_below_a_grey_level(sd, rel):
    # 8-bit images: most neighbours are equal, and the plain median would say 0
    rng = np.random.default_rng(0)
    plane = np.round(10 + rng.normal(0, sd, (256, 256)))
    assert pixel_noise_sd(plane.astype(np.uint8)) == pytest.approx(sd, rel=rel)
    # integer-valued floats with a huge step: counted without a huge histogram
    plane[100:150, 100:150] += 1e12
    assert pixel_noise_sd(plane) == pytest.approx(sd, rel=rel)


def test_pixel_noise_sd_counts_integers_as_sorting_does(monkeypatch):
    """Integer-valued planes are counted (`_integer_mad`): the same float as the
    sorted computation, which planes with a wider range of differences use."""
    from pipeline.images import planes

    rng = np.random.default_rng(5)
    cases = [rng.integers(0, 3, (9, 14)), rng.integers(0, 65535, (20, 7))]
    cases += [rng.poisson(rng.uniform(0.1, 50), (int(h), int(w))).astype(np.uint8)
              for h, w in rng.integers(2, 30, (40, 2))]  # fmt: skip
    cases.append(np.array([[0, 1e19, 2e19]]))  # equal steps past 2**52: sorted
    counted = [pixel_noise_sd(plane) for plane in cases]
    monkeypatch.setattr(planes, "_MAX_COUNTED_RANGE", 0)  # every plane sorted
    assert [pixel_noise_sd(plane) for plane in cases] == counted


@pytest.mark.parametrize("method", ["classical", "unet"])
def test_an_empty_8_bit_field_has_no_nuclei(method):
    # noise of a third of a grey level used to be measured as 0: thousands of
    # noise blobs passed the noise-based thresholds
    plane = np.round(10 + np.random.default_rng(1).normal(0, 0.3, (256, 256)))
    nuclei, _ = segment_field(plane.astype(np.uint8), method=method)
    assert nuclei.max() == 0


def test_check_plane_rejects_what_no_segmenter_can_use():
    assert check_plane(np.ones((3, 4), np.uint16), "p").dtype == np.float32
    with pytest.raises(ValueError, match="my plane has shape"):
        check_plane(np.ones((2, 3, 4)), "my plane")
    with pytest.raises(ValueError, match="dtype"):
        check_plane(np.ones((3, 4), bool), "p")
    with pytest.raises(ValueError, match="NaN"):
        check_plane(np.full((3, 4), np.nan), "p")


def test_square_opening_equals_scipy_grey_opening():
    """OpenCV's erosion and dilation give scipy's values exactly: odd and even
    squares, the borders, planes narrower than the square, float32 and integers."""
    rng = np.random.default_rng(0)
    for shape in [(40, 57), (12, 9), (3, 30)]:
        plane = rng.gamma(2.0, 100.0, shape).astype(np.float32)
        for size in [1, 2, 3, 4, 5, 10, 19]:
            opened = square_opening(plane, size)
            assert opened.dtype == np.float32
            np.testing.assert_array_equal(
                opened, ndi.grey_opening(plane, size=(size, size))
            )
    assert square_opening(np.ones((0, 5), np.float32), 3).shape == (0, 5)
    counts = rng.integers(0, 4000, (20, 25)).astype(np.uint16)
    np.testing.assert_array_equal(
        square_opening(counts, 4), ndi.grey_opening(counts, size=(4, 4))
    )


def test_opencv_runs_one_thread_once_phenoscreen_is_imported():
    """Fields run in parallel, one per worker and core: no nested OpenCV threads."""
    import cv2

    assert cv2.getNumThreads() == 1


def test_square_opening_rejects():
    with pytest.raises(ValueError, match="2-D numeric"):
        square_opening(np.ones((2, 3, 4)), 3)
    with pytest.raises(ValueError, match="2-D numeric"):
        square_opening(np.ones((3, 4), bool), 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        square_opening(np.ones((3, 4)), 0)


def test_fill_holes_equals_scipy():
    """Holes are background not 4-connected to the border (one touching the outside
    only diagonally is a hole); random masks as scipy."""
    square = np.zeros((7, 7), bool)
    square[1:6, 1:6] = True
    square[1, 1] = False  # a notch, open to the outside
    square[2, 2] = square[4, 4] = False  # holes; (2, 2) meets the notch diagonally
    filled = fill_holes(square)
    assert filled[2, 2] and filled[4, 4] and not filled[1, 1] and not filled[0, 0]
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):
        mask = rng.random((37, 53)) < density
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))


def test_fill_holes_rejects():
    with pytest.raises(ValueError, match="2-D boolean"):
        fill_holes(np.ones((3, 4), np.uint8))
    with pytest.raises(ValueError, match="2-D boolean"):
        fill_holes(np.ones((2, 3, 4), bool))


def test_segmenter_weights_sha256_names_the_weights(tmp_path):
    assert segmenter_weights_sha256("classical") is None
    assert len(segmenter_weights_sha256("unet")) == 64
    with pytest.raises(InputError, match="not found"):
        segmenter_weights_sha256("unet", str(tmp_path / "none.pt"))


def test_every_segmenter_named_in_the_config_is_implemented():
    from pipeline.cells import segment
    from pipeline.config import SEGMENTERS

    assert set(SEGMENTERS) == {"classical", *segment._LEARNED}
    with pytest.raises(ValueError, match="unknown segmenter 'otsu'"):
        segment.check_segmenter("otsu")
