from dataclasses import replace

import numpy as np
import pytest
import tifffile
import torch
from skimage.draw import disk
from skimage.io import imread

from models.segmenter import (
    DEFAULT_WEIGHTS,
    NucleiUNet,
    UNetSpec,
    drop_faint_objects,
    fold_batch_norms,
    label_targets,
    labels_for_spec,
    labels_from_maps,
    load_segmenter,
    normalize_intensity,
    predict_field_maps,
    predict_maps,
    save_segmenter,
    segment_nuclei_unet,
    segmenter_sha256,
    tile_side,
    uses_bfloat16,
)
from pipeline.cells.segeval import average_precision, match_counts
from pipeline.cells.segment import check_segmenter, segment_field
from pipeline.errors import InputError
from tests.conftest import shared_data


def _touching_discs(shape=(64, 80)):
    labels = np.zeros(shape, np.int32)
    labels[disk((32, 28), 12, shape=shape)] = 1
    labels[disk((32, 50), 12, shape=shape)] = 2  # overlaps disc 1: they touch
    return labels


def test_spec_rejects_bad_settings():
    assert UNetSpec().multiple == 8
    with pytest.raises(ValueError, match="widths"):
        UNetSpec(widths=())
    with pytest.raises(ValueError, match="target_diameter_px"):
        UNetSpec(target_diameter_px=1)
    with pytest.raises(ValueError, match="seed_height"):
        UNetSpec(seed_height=1.5)


def test_unet_maps_any_size_to_two_logit_maps():
    model = NucleiUNet((4, 8, 16)).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 40, 56))
        odd = model(torch.zeros(1, 1, 37, 50))  # sizes that do not halve evenly
    assert out.shape == (2, 2, 40, 56) and odd.shape == (1, 2, 37, 50)
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 3, 32, 32))  # one input channel (the nuclear stain)


def test_normalize_intensity_maps_percentiles_and_rejects():
    plane = np.arange(1000, dtype=np.uint16).reshape(25, 40)
    out = normalize_intensity(plane, 0, 100)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert not normalize_intensity(np.full((5, 5), 7)).any()
    with pytest.raises(ValueError, match="shape"):
        normalize_intensity(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="percentiles"):
        normalize_intensity(plane, 50, 10)


def test_label_targets_peak_at_centres_and_vanish_between_nuclei():
    labels = _touching_discs()
    foreground, distance = label_targets(labels)
    assert (foreground == (labels > 0)).all()
    assert distance[labels == 0].max() == 0
    for k in (1, 2):
        assert distance[labels == k].max() == pytest.approx(1.0)
    assert distance[32, 28] == pytest.approx(1.0, abs=0.1)
    contact = (labels == 1) & np.roll(labels == 2, -1, axis=1)
    assert distance[contact].max() == 0  # touching nuclei are edges of each other
    with pytest.raises(ValueError, match="integer"):
        label_targets(labels.astype(float))
    with pytest.raises(ValueError, match=">= 0"):
        label_targets(-labels)


def test_labels_from_maps_recovers_touching_nuclei():
    labels = _touching_discs()
    foreground, distance = label_targets(labels)
    found = labels_from_maps(foreground, distance, min_area_px=20)
    assert found.dtype == np.int32 and found.max() == 2
    ap = average_precision(match_counts(labels, found))
    assert ap.loc[0.9] == 1.0
    # a foreground blob without a seed is kept as its own object; a speck is dropped
    foreground[5:15, 5:15] = 1
    foreground[60, 2] = 1
    assert labels_from_maps(foreground, distance, min_area_px=20).max() == 3
    with pytest.raises(ValueError, match="one shape"):
        labels_from_maps(foreground, distance[:-1])
    with pytest.raises(ValueError, match="seed_height"):
        labels_from_maps(foreground, distance, seed_height=0)


def test_seeds_need_a_dip_of_seed_height_between_touching_nuclei():
    yy, xx = np.mgrid[:40, :80].astype(np.float32)
    foreground = ((yy - 20) ** 2 / 15**2 + (xx - 40) ** 2 / 35**2 <= 1) * 1.0
    bumps = [a * np.exp(-((yy - 20) ** 2 + (xx - x) ** 2) / 200)
             for a, x in ((1.0, 25), (0.6, 55))]  # fmt: skip
    distance = np.maximum(*bumps)  # the lower peak rises 0.28 above the saddle
    assert labels_from_maps(foreground, distance, seed_height=0.2).max() == 2
    assert labels_from_maps(foreground, distance, seed_height=0.35).max() == 1
    assert labels_from_maps(foreground, distance, smooth_px=1.0).max() == 2


@pytest.mark.parametrize("seed", range(6))
def test_h_maxima_in_a_mosaic_equal_those_object_by_object(seed):
    """Packed into one mosaic, each object's h-maxima are those of its own box
    padded with zeros: blobs touching (diagonally too) and at the border, blobs
    lower than the height, heights below and above their relief, values in the
    millions and below zero, no objects."""
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima

    from models.segmenter import _h_maxima_in

    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(20, 150, 2))
    values = ndi.gaussian_filter(rng.random(shape), rng.uniform(1, 4))
    values = (values - values.min()) / np.ptp(values)
    mask = values > rng.uniform(0.3, 0.7)
    scale, offset = [(1.0, 0.0), (1e6, 2e6), (1.0, -0.6)][seed % 3]
    values = (values * scale + offset).astype(np.float32)
    objects, _ = ndi.label(mask)
    found = 0
    for height in np.array([0.02, 0.05, 0.2, 0.5]) * scale:
        expected = np.zeros(shape, bool)
        for k, box in enumerate(ndi.find_objects(objects), 1):
            own = objects[box] == k
            alone = np.pad(np.where(own, values[box], 0), 1)
            expected[box] |= h_maxima(alone, height)[1:-1, 1:-1].astype(bool) & own
        found += int(expected.sum())
        np.testing.assert_array_equal(_h_maxima_in(values, mask, height), expected)
    assert found
    assert not _h_maxima_in(values, np.zeros(shape, bool), 0.05).any()


def test_h_maxima_in_a_mosaic_do_not_leak_between_boxes():
    """An object whose peak is a hair above the height keeps the maxima it has
    alone (float32 rounding near 0.5) beside a tall one: the gap between boxes
    carries nothing from one to the other (a zero gap would drop a maximum)."""
    from models.segmenter import _h_maxima_in

    plane = np.zeros((5, 12), np.float32)
    plane[2, 1:4] = [np.float32(0.50000006), 0.1, np.float32(0.49999997)]
    plane[1:4, 8:11] = 1.0
    expected = np.zeros(plane.shape, bool)
    expected[2, [1, 3]] = True  # h_maxima of the small object alone
    expected[1:4, 8:11] = True
    np.testing.assert_array_equal(_h_maxima_in(plane, plane > 0, 0.5), expected)


def test_shelf_pack_places_rectangles_apart_inside_the_mosaic():
    from models.segmenter import _shelf_pack

    shapes = [tuple(s) for s in np.random.default_rng(1).integers(1, 30, (50, 2))]
    corners, (height, width) = _shelf_pack(shapes + [(3, 90)])
    taken = np.zeros((height + 1, width + 1), int)
    for (y, x), (h, w) in zip(corners, shapes + [(3, 90)], strict=True):
        assert y + h <= height and x + w <= width
        taken[y : y + h + 1, x : x + w + 1] += 1  # with the gap below and right
    assert taken.max() == 1 and taken[:height, :width].sum() >= 0.5 * height * width


def test_labels_for_spec_scales_maps_to_the_plane_and_area_by_the_diameter():
    labels = _touching_discs()  # discs of 24 px
    foreground, distance = label_targets(labels)
    spec = UNetSpec(min_area_fraction=0.5, target_diameter_px=24)
    same = labels_for_spec(foreground, distance, spec, labels.shape)
    assert same.max() == 2
    # maps at half the plane's size: labels come back at the plane's size
    small = [m[::2, ::2] for m in (foreground, distance)]
    spec_small = replace(spec, target_diameter_px=12)
    big = labels_for_spec(*small, spec_small, labels.shape)
    assert big.shape == labels.shape and big.max() == 2
    assert average_precision(match_counts(labels, big)).loc[0.75] == 1.0
    # maps at twice the plane's size (small nuclei): seeds survive the shrinking
    large = [np.kron(m, np.ones((2, 2), np.float32)) for m in (foreground, distance)]
    assert labels_for_spec(*large, replace(spec, target_diameter_px=48),
                           labels.shape).max() == 2  # fmt: skip
    # nuclei a quarter of the expected area are dropped
    assert labels_for_spec(foreground, distance, replace(spec, target_diameter_px=60),
                           labels.shape).max() == 0  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        labels_for_spec(foreground, distance, spec, (0, 5))


def test_folded_batch_norms_give_the_same_maps():
    torch.manual_seed(0)
    model = NucleiUNet((4, 8, 16))
    model(torch.rand(4, 1, 32, 32))  # training mode: running statistics move
    model.eval()
    folded = fold_batch_norms(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(1, 1, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(model.train())


def test_bfloat16_is_the_cuda_default_unless_the_run_chooses():
    assert uses_bfloat16("cuda") and not uses_bfloat16("cpu")
    assert uses_bfloat16("cpu", "bfloat16") and not uses_bfloat16("cuda", "float32")
    with pytest.raises(RuntimeError):
        uses_bfloat16("no-such-device")
    with pytest.raises(InputError, match="segment.precision = 'float16' is unknown"):
        uses_bfloat16("cpu", "float16")
    with pytest.raises(InputError, match="segment.precision = 'half' is unknown"):
        segment_nuclei_unet(np.zeros((16, 16)), precision="half")  # even on no nuclei


def test_the_runs_precision_reaches_the_network_on_every_path(monkeypatch, tmp_path):
    from dataclasses import asdict

    import models.segmenter as segmenter
    from pipeline.cli import main
    from pipeline.config import SegmentConfig
    from pipeline.run import segment_image

    plane = np.zeros((96, 96), np.uint16)
    for y, x in [(30, 30), (30, 66), (66, 48)]:
        plane[disk((y, x), 10, shape=plane.shape)] = 1000
    asked = []

    def spy(device, precision=None):
        asked.append((str(device), precision))
        return uses_bfloat16(device, precision)

    monkeypatch.setattr(segmenter, "uses_bfloat16", spy)
    segment_field(plane, method="unet", precision="bfloat16")
    assert asked[-1] == ("cpu", "bfloat16")
    options = asdict(SegmentConfig(precision="bfloat16"))  # as Dask workers get it
    segment_image(plane[None], channel_names=["DNA"], nuclei_channel="DNA",
                  cytoplasm_channel=None, segment=options)  # fmt: skip
    assert asked[-1] == ("cpu", "bfloat16")
    tifffile.imwrite(tmp_path / "f.tif", plane)
    assert main(["segment", str(tmp_path / "f.tif"), "--out-dir", str(tmp_path / "o"),
                 "--segmenter-precision", "bfloat16"]) == 0  # fmt: skip
    assert asked[-1] == ("cpu", "bfloat16")
    segment_field(plane, method="unet")
    assert asked[-1] == ("cpu", None)
    model, spec, _ = load_segmenter()  # and bfloat16 arithmetic is really used
    image = normalize_intensity(plane.astype(np.float32))
    exact, fast = (
        predict_maps(model, image, multiple=spec.multiple, precision=precision)[0]
        for precision in ("float32", "bfloat16")
    )
    assert 0 < np.abs(fast - exact).max() < 0.1


def test_bfloat16_on_the_cpu_segments_a_real_field_like_float32():
    data = shared_data("fields/cellpainting_fovs_cytodataframe")
    path = data / "JUMP_plate_BR00117006/images/orig/r01c01f01p01-ch5sk1fk1fl1.tiff"
    plane = tifffile.imread(path)[:540, :540]
    exact = segment_nuclei_unet(plane)
    fast = segment_nuclei_unet(plane, precision="bfloat16")
    assert exact.max() > 30 and abs(int(fast.max()) - int(exact.max())) <= 2
    assert average_precision(match_counts(exact, fast)).loc[0.75] > 0.95


def test_drop_faint_objects_keeps_real_nuclei_only():
    rng = np.random.default_rng(0)
    labels = _touching_discs()
    labels[5:9, 5:9] = 3  # a "nucleus" found in the noise
    plane = rng.normal(100, 10, labels.shape) + 500 * np.isin(labels, [1, 2])
    kept = drop_faint_objects(labels, plane)
    assert kept.max() == 2 and (kept > 0).sum() == np.isin(labels, [1, 2]).sum()
    assert drop_faint_objects(labels, plane, min_snr=-np.inf, min_z=-np.inf).max() == 3
    # a dim but large nucleus stays; a small blob as bright (in SDs) goes
    dim = np.zeros((80, 80), np.int32)
    dim[disk((25, 25), 12, shape=dim.shape)] = 1  # ~450 px
    dim[60:63, 60:63] = 2  # 9 px
    faint = rng.normal(100, 10, dim.shape) + 40 * (dim > 0)  # 4 SDs above
    assert np.unique(drop_faint_objects(dim, faint)).tolist() == [0, 1]
    assert not drop_faint_objects(np.zeros((4, 4), np.int32), np.ones((4, 4))).any()
    with pytest.raises(ValueError, match="shapes differ"):
        drop_faint_objects(labels, plane[:-1])


def test_tiled_prediction_matches_whole_image():
    torch.manual_seed(0)
    model = NucleiUNet((4, 8)).eval()
    image = np.random.default_rng(0).random((150, 170)).astype(np.float32)
    whole = predict_maps(model, image, multiple=2, tile_px=256)
    tiled = predict_maps(model, image, multiple=2, tile_px=64, overlap_px=24)
    assert whole[0].shape == image.shape and tiled[1].shape == image.shape
    assert np.abs(whole[0] - tiled[0]).max() < 0.02
    flipped = predict_maps(model, image, multiple=2, tile_px=256, flips=True)
    assert flipped[0].shape == image.shape
    with pytest.raises(ValueError, match="multiple"):
        predict_maps(model, image, multiple=8, tile_px=100)
    with pytest.raises(ValueError, match="overlap"):
        predict_maps(model, image, multiple=2, tile_px=64, overlap_px=32)


def test_tile_side_covers_the_axis_with_as_few_and_small_tiles_as_it_can():
    assert tile_side(1000, 1024, 64, 8) == 1000  # one tile: the whole axis
    assert tile_side(1080, 1024, 64, 8) == 576  # two tiles, not two of 1024
    for length in range(136, 5000, 8):
        side = tile_side(length, 1024, 64, 8)
        n_tiles = 1 if length <= 1024 else -(-(length - 64) // (1024 - 64))
        assert side % 8 == 0 and 128 < side <= min(length, 1024)
        assert n_tiles * side - (n_tiles - 1) * 64 >= length  # covered
    for bad in [(1080, 100, 64, 8), (1080, 128, 64, 8), (1080, 256, -1, 8),
                (1080, 1024, 64, 0)]:  # fmt: skip
        with pytest.raises(ValueError, match="tile_px"):
            tile_side(*bad)
    for length in (0, 1081):
        with pytest.raises(ValueError, match="length"):
            tile_side(length, 1024, 64, 8)


def test_predict_field_maps_rescales_and_rejects():
    model = NucleiUNet((4, 8)).eval()
    plane = np.random.default_rng(1).random((60, 90)).astype(np.float32)
    spec = UNetSpec(widths=(4, 8), target_diameter_px=10)
    foreground, distance = predict_field_maps(model, spec, plane, 30)  # shrunk 3x
    assert foreground.shape == distance.shape == (20, 30)  # the network's scale
    with pytest.raises(ValueError, match="diameter"):
        predict_field_maps(model, spec, plane, 0)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = NucleiUNet((4, 8)).eval()
    spec = UNetSpec(widths=(4, 8), seed_height=0.15)
    path = save_segmenter(
        tmp_path / "w" / "seg.pt", model, spec, {"val": {"AP@0.5": 0.9}}
    )
    loaded, loaded_spec, info = load_segmenter(path)
    assert loaded_spec == spec and info["val"] == {"AP@0.5": 0.9}
    assert info["sha256"] == load_segmenter(path)[2]["sha256"]
    half = {
        k: v.half() if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    assert info["sha256"] == segmenter_sha256(half, spec)
    # other post-processing settings make another segmenter
    assert segmenter_sha256(half, replace(spec, seed_height=0.3)) != info["sha256"]
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="reserved|keys"):
        save_segmenter(tmp_path / "x.pt", model, spec, {"spec": 1})


def test_load_rejects_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_segmenter(tmp_path / "nothing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="corrupt"):
        load_segmenter(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match="not PhenoScreen segmenter weights"):
        load_segmenter(foreign)
    with pytest.raises(InputError, match="not found"):
        check_segmenter("unet", str(tmp_path / "nothing.pt"))
    with pytest.raises(InputError, match="unet"):
        check_segmenter("classical", str(corrupt))


def test_weights_saved_with_a_seed_threshold_load_with_the_default_seed_height(
    tmp_path,
):
    model = NucleiUNet((4, 8)).eval()
    path = save_segmenter(tmp_path / "old.pt", model, UNetSpec(widths=(4, 8)), {})
    payload = torch.load(path, weights_only=True)
    payload["spec"] = {**payload["spec"], "seed_threshold": 0.4}
    del payload["spec"]["seed_height"]
    torch.save(payload, path)  # as train-segmenter wrote them before h-maxima seeds
    assert load_segmenter(path)[1].seed_height == UNetSpec().seed_height


def test_shipped_weights_are_small_and_documented():
    assert DEFAULT_WEIGHTS.stat().st_size <= 5 * 2**20
    _, spec, info = load_segmenter()
    assert info["train_config"]["seed"] == 0 and info["val"]["AP@0.5"] > 0.8
    card = (DEFAULT_WEIGHTS.parent / "MODEL_CARD.md").read_text()
    for needed in ("CC0", "train_default_segmenter.py", "AP@0.5", info["sha256"][:12]):
        assert needed in card


def test_unet_segments_synthetic_nuclei_at_two_magnifications():
    rng = np.random.default_rng(0)
    for radius, shape in ((7, (160, 200)), (16, (360, 420))):
        truth = np.zeros(shape, np.int32)
        centres = [(y, x) for y in range(2 * radius + 4, shape[0] - 2 * radius, 3 * radius)
                   for x in range(2 * radius + 4, shape[1] - 2 * radius, 3 * radius)]  # fmt: skip
        for k, (y, x) in enumerate(centres, 1):
            truth[disk((y, x), radius, shape=shape)] = k
        plane = (truth > 0) * 800.0 + rng.normal(100, 10, shape)
        found = segment_nuclei_unet(plane.astype(np.uint16))
        assert found.dtype == np.int32 and found.shape == shape
        ap = average_precision(match_counts(truth, found))
        assert ap.loc[0.5] > 0.9, (radius, ap.loc[0.5])
    assert not segment_nuclei_unet(np.zeros((50, 50), np.uint16)).any()
    noise = rng.normal(100, 10, (128, 128))  # an empty well: no nuclei in the noise
    assert not segment_nuclei_unet(noise).any()
    for seed in range(5):  # empty wells after illumination correction: float noise
        gain = np.linspace(0.8, 1.2, 128)[None, :] * np.ones((128, 1))
        field = np.random.default_rng(seed).normal(100, 11, (128, 128)) / gain
        assert not segment_nuclei_unet(field.astype(np.float32)).any(), seed
    with pytest.raises(ValueError, match="NaN"):
        segment_nuclei_unet(np.full((20, 20), np.nan))
    with pytest.raises(ValueError, match="plane"):
        segment_nuclei_unet(np.zeros((2, 20, 20)))


def test_unet_segmenter_through_segment_field_and_cli(tmp_path):
    plane = np.zeros((128, 128), np.uint16)
    for y, x in [(30, 30), (30, 90), (90, 60)]:
        plane[disk((y, x), 12, shape=plane.shape)] = 1000
    nuclei, cells = segment_field(plane, method="unet", ring_width_px=4)
    assert (
        nuclei.max() == 3
        and (cells >= nuclei).all()
        and (cells > 0).sum() > (nuclei > 0).sum()
    )
    from pipeline.cli import main

    tifffile.imwrite(tmp_path / "f.tif", plane)
    assert main(["segment", str(tmp_path / "f.tif"), "--out-dir", str(tmp_path / "o"),
                 "--segmenter", "unet"]) == 0  # fmt: skip
    assert tifffile.imread(tmp_path / "o" / "f_nuclei.tif").max() == 3
    missing = str(tmp_path / "no.pt")
    assert main(["segment", str(tmp_path / "f.tif"), "--out-dir", str(tmp_path / "o"),
                 "--segmenter", "unet", "--segmenter-weights", missing]) == 2  # fmt: skip
    refused = ["segment", str(tmp_path / "f.tif"), "--out-dir", str(tmp_path / "c"),
               "--segmenter", "classical", "--segmenter-precision", "bfloat16"]  # fmt: skip
    assert main(refused) == 2
    assert not (tmp_path / "c").exists()  # refused before anything is written
    with pytest.raises(InputError, match='segment.precision is for method = "unet"'):
        segment_field(plane, method="classical", precision="bfloat16")
    with pytest.raises(InputError, match="device 'cuda' runs the \"unet\" segmenter"):
        segment_field(plane, method="classical", device="cuda")  # not ignored
    with pytest.raises(InputError, match="segment.precision = 'fp8' is unknown"):
        check_segmenter("unet", precision="fp8")


@pytest.mark.slow
def test_shipped_unet_on_real_dsb_images():
    data = shared_data("segmentation/dsb2018_dev")
    import pandas as pd

    meta = pd.read_csv(data / "metadata.csv").groupby("size").head(2).head(6)
    counts = []
    for row in meta.itertuples():
        truth = tifffile.imread(data / row.label_file)
        counts.append(
            match_counts(truth, segment_nuclei_unet(imread(data / row.image_file)))
        )
    assert average_precision(pd.concat(counts)).loc[0.5] > 0.7
