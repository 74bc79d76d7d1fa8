import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from pipeline.cells.crops import crop_cells, default_crop_size
from pipeline.config import QCConfig
from pipeline.images.illumination import correct, downsample, illumination_function
from pipeline.images.qc import flag_fields, measure_field_qc, power_log_log_slope
from tests.conftest import make_field


def _vignetting(shape):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2) / (shape[0] / 2) ** 2
    return 1.0 - 0.4 * np.clip(r2, 0, 1.5) / 1.5


def test_illumination_function_recovers_planted_vignetting():
    shape = (128, 160)
    truth = _vignetting(shape)
    small = []
    for k in range(30):
        image, _ = make_field(n_cells=5, shape=shape, n_channels=2, rng=k)
        small.append(downsample(image * truth, 32))
    function = illumination_function(np.stack(small), smoothing_frac=0.1)
    assert function.shape == (2, 25, 32)
    np.testing.assert_allclose(np.median(function, axis=(1, 2)), 1.0, rtol=1e-5)
    expected = downsample(truth[None], 32)[0]
    for plane in function:
        assert np.corrcoef(plane.ravel(), expected.ravel())[0, 1] > 0.95
    image, _ = make_field(n_cells=5, shape=shape, n_channels=2, rng=99)
    raw = (image * truth).astype(np.float32)
    corrected = correct(raw, function)

    def edge_to_centre(plane):  # of the noise floor (background pixels)
        background = plane < 300
        left = plane[:, :20][background[:, :20]].mean()
        return left / plane[:, 70:90][background[:, 70:90]].mean()

    assert edge_to_centre(raw[0]) < 0.8
    assert edge_to_centre(corrected[0]) == pytest.approx(1.0, abs=0.08)


def test_illumination_rejects():
    with pytest.raises(ValueError, match=r"expected \(C, Y, X\)"):
        downsample(np.zeros((4, 4)), 2)
    with pytest.raises(ValueError, match="size_px"):
        downsample(np.zeros((1, 4, 4)), 0)
    with pytest.raises(ValueError, match=r"F>=1"):
        illumination_function(np.zeros((0, 1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        illumination_function(np.full((2, 1, 4, 4), np.nan))
    with pytest.raises(ValueError, match="same C"):
        correct(np.zeros((2, 8, 8)), np.ones((3, 4, 4)))


def test_power_log_log_slope_drops_when_blurred():
    image, _ = make_field(n_cells=8, shape=(256, 256), n_channels=1)
    sharp = power_log_log_slope(image[0])
    blurred = power_log_log_slope(ndi.gaussian_filter(image[0].astype(float), 3))
    assert blurred < sharp - 1
    assert np.isnan(power_log_log_slope(np.zeros((16, 16))))
    assert np.isnan(power_log_log_slope(np.ones((2, 2))))
    with pytest.raises(ValueError, match=r"expected \(Y, X\)"):
        power_log_log_slope(np.zeros((2, 4, 4)))


def test_measure_field_qc():
    image = np.zeros((2, 10, 10), np.uint16)
    image[1, :5] = 65535
    qc = measure_field_qc(image, channel_names=["DNA", "Actin"], n_cells=3)
    assert qc["n_cells"] == 3
    assert qc["saturated_frac_Actin"] == 0.5 and qc["saturated_frac_DNA"] == 0.0
    assert {"focus_DNA", "median_Actin", "p99_DNA"} <= set(qc)
    with pytest.raises(ValueError, match="one name per channel"):
        measure_field_qc(np.zeros((2, 4, 4)), channel_names=["DNA"], n_cells=0)


def _qc_table():
    rng = np.random.default_rng(0)
    rows = []
    for plate in ("P1", "P2"):
        for _ in range(20):
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "n_cells": 30,
                    "focus_DNA": -2.0 + rng.normal(0, 0.05),
                    "saturated_frac_DNA": 0.0,
                    "median_DNA": 100 + rng.normal(0, 2),
                }
            )
    table = pd.DataFrame(rows)
    table.loc[3, "focus_DNA"] = -3.5  # blurred
    table.loc[25, "saturated_frac_DNA"] = 0.2
    table.loc[30, "n_cells"] = 2
    table.loc[31, "median_DNA"] = 400
    return table


def test_flag_fields_against_each_plate():
    flags = flag_fields(_qc_table(), channel_names=["DNA"], nuclei_channel="DNA")
    assert flags[3] == "blurred" and flags[25] == "saturated_DNA"
    assert (flags.drop([3, 25]) == "").all()
    strict = flag_fields(
        _qc_table(),
        channel_names=["DNA"],
        nuclei_channel="DNA",
        config=QCConfig(min_cells=5, intensity_mad=6, focus_mad=0),
    )
    assert strict[30] == "few_cells" and strict[31] == "intensity_DNA"
    assert strict[3] == ""


def test_flag_fields_rejects_missing_columns():
    with pytest.raises(ValueError, match="focus_DNA"):
        flag_fields(
            _qc_table().drop(columns="focus_DNA"),
            channel_names=["DNA"],
            nuclei_channel="DNA",
        )


def test_crop_cells_pads_and_masks():
    image = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30)
    labels = np.zeros((20, 30), np.int32)
    labels[8:12, 10:14] = 1
    labels[0:3, 0:3] = 2
    crops, masks = crop_cells(
        image,
        np.array([[10.0, 12.0], [1.0, 1.0]]),
        8,
        cell_labels=labels,
        object_numbers=np.array([1, 2]),
    )
    assert crops.shape == (2, 2, 8, 8) and crops.dtype == np.uint16
    np.testing.assert_array_equal(crops[0, 1], image[1, 6:14, 8:16])
    assert crops[1, 0, :3, :3].sum() == 0  # zero padding outside the field
    np.testing.assert_array_equal(crops[1, 0, 3:, 3:], image[0, 0:5, 0:5])
    assert masks[0].sum() == 16 and masks[1].sum() == 9
    assert masks[0, 4, 4] and not masks[0, 0, 0]
    plain, none = crop_cells(image, np.zeros((0, 2)), 8)
    assert plain.shape == (0, 2, 8, 8) and none is None


def test_crop_cells_rejects():
    image = np.zeros((1, 8, 8))
    with pytest.raises(ValueError, match="crop size"):
        crop_cells(image, np.zeros((1, 2)), 0)
    with pytest.raises(ValueError, match="both cell_labels and object_numbers"):
        crop_cells(image, np.zeros((1, 2)), 4, cell_labels=np.zeros((8, 8), int))
    with pytest.raises(ValueError, match=r"expected \(C, Y, X\)"):
        crop_cells(np.zeros((8, 8)), np.zeros((1, 2)), 4)
    with pytest.raises(ValueError, match="object numbers"):
        crop_cells(
            image,
            np.zeros((2, 2)),
            4,
            cell_labels=np.zeros((8, 8), int),
            object_numbers=np.array([1]),
        )


def test_default_crop_size():
    assert default_crop_size(np.array([np.pi * 8**2] * 3)) == 64
    assert default_crop_size(np.array([])) == 64
    assert default_crop_size(np.array([1.0])) == 16
    with pytest.raises(ValueError, match=">= 0"):
        default_crop_size(np.array([-1.0]))
