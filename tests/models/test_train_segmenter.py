import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.draw import disk
from skimage.io import imsave

from models.segmenter import (
    NucleiUNet,
    UNetSpec,
    label_targets,
    load_segmenter,
    median_diameter,
    save_segmenter,
)
from models.train_segmenter import (
    SegmenterTrainConfig,
    calibrate_postprocessing,
    pair_images_and_masks,
    read_pair,
    recalibrate_segmenter,
    sample_batch,
    score_maps,
    train_segmenter,
)
from pipeline.cli import main
from pipeline.errors import InputError


def _blobs(shape, radius, seed):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for k in range(1, 9):
        y, x = (
            rng.integers(radius, shape[0] - radius),
            rng.integers(radius, shape[1] - radius),
        )
        rr, cc = disk((y, x), radius, shape=shape)
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = k
    image = (labels > 0) * 180 + rng.normal(20, 5, shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


@pytest.fixture
def annotated(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for k in range(5):
        image, labels = _blobs((96, 112), 6 + k, k)
        imsave(images / f"img{k}.png", image, check_contrast=False)
        tifffile.imwrite(
            masks / (f"img{k}_masks.tif" if k % 2 else f"img{k}.tif"), labels
        )
    return images, masks


def test_config_rejects_bad_settings():
    assert SegmenterTrainConfig().spec().multiple == 16
    with pytest.raises(InputError, match="crop_px"):
        SegmenterTrainConfig(crop_px=100)
    with pytest.raises(InputError, match="val_fraction"):
        SegmenterTrainConfig(val_fraction=1)
    with pytest.raises(InputError, match="epochs"):
        SegmenterTrainConfig(epochs=0)


def test_pairs_images_with_masks_by_name(annotated, tmp_path):
    images, masks = annotated
    pairs = pair_images_and_masks(images, masks)
    assert list(pairs["name"]) == [f"img{k}" for k in range(5)]
    assert pairs.loc[1, "mask"].name == "img1_masks.tif"
    (masks / "img0.tif").unlink()
    with pytest.raises(InputError, match="img0.png"):
        pair_images_and_masks(images, masks)
    with pytest.raises(InputError, match="not a folder"):
        pair_images_and_masks(tmp_path / "none", masks)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        pair_images_and_masks(tmp_path / "empty", masks)


def test_read_pair_checks_image_and_mask(annotated, tmp_path):
    images, masks = annotated
    image, labels = read_pair(images / "img0.png", masks / "img0.tif")
    assert image.shape == labels.shape == (96, 112) and labels.max() > 0
    grey = np.repeat(image[..., None], 4, axis=2)
    imsave(tmp_path / "rgba.png", grey, check_contrast=False)
    assert read_pair(tmp_path / "rgba.png", masks / "img0.tif")[0].shape == (96, 112)
    colour = grey.copy()
    colour[0, 0, 1] += 1
    imsave(tmp_path / "colour.png", colour, check_contrast=False)
    with pytest.raises(InputError, match="colour"):
        read_pair(tmp_path / "colour.png", masks / "img0.tif")
    tifffile.imwrite(tmp_path / "float.tif", labels.astype(np.float32))
    with pytest.raises(InputError, match="integer label"):
        read_pair(images / "img0.png", tmp_path / "float.tif")
    tifffile.imwrite(tmp_path / "small.tif", labels[:10])
    with pytest.raises(InputError, match="shape"):
        read_pair(images / "img0.png", tmp_path / "small.tif")


def test_median_diameter_of_discs():
    labels = np.zeros((100, 100), np.int32)
    labels[disk((30, 30), 10)] = 1
    labels[disk((70, 70), 10)] = 2
    assert median_diameter(labels) == pytest.approx(20, rel=0.05)
    with pytest.raises(ValueError, match="no object"):
        median_diameter(np.zeros((5, 5), np.int32))


def test_sample_batch_draws_aligned_augmented_crops():
    _, labels = _blobs((40, 50), 8, 0)  # smaller than the crop: padded
    foreground, distance = label_targets(labels)
    stack = np.stack([foreground, foreground, distance]).astype(np.float32)
    config = SegmenterTrainConfig(batch_size=6, crop_px=64)
    images, targets = sample_batch([stack], config, np.random.default_rng(0))
    assert images.shape == (6, 1, 64, 64) and targets.shape == (6, 2, 64, 64)
    assert set(np.unique(targets[:, 0].numpy())) <= {0.0, 1.0}
    assert targets[:, 1].min() >= 0 and targets[:, 1].max() <= 1
    # image and foreground went through the same crop, zoom, flip and rotation
    bright = images[:, 0].numpy() > images[:, 0].numpy().mean(
        axis=(1, 2), keepdims=True
    )
    assert (bright == (targets[:, 0].numpy() > 0)).mean() > 0.9
    with pytest.raises(ValueError, match="no training images"):
        sample_batch([], config, np.random.default_rng(0))


def test_calibration_picks_thresholds_from_the_grid():
    _, labels = _blobs((96, 112), 8, 3)
    maps = [label_targets(labels)]
    spec, grid = calibrate_postprocessing(maps, [labels], UNetSpec())
    assert len(grid) == 15 and grid["AP@0.5"].max() == 1.0
    assert score_maps(maps, [labels], spec).loc[0.5] == 1.0


def test_recalibration_rechooses_post_processing_on_the_held_out_images(
    annotated, tmp_path
):
    images, masks = annotated
    spec = UNetSpec(widths=(4, 8), seed_height=0.3, fg_threshold=0.6)
    weights = save_segmenter(tmp_path / "w.pt", NucleiUNet((4, 8)).eval(), spec,
                             {"val_images": ["img0", "img1"], "val": {"AP@0.5": 0.1}})  # fmt: skip
    summary = recalibrate_segmenter(weights, images, masks, tmp_path / "r.pt")
    _, new_spec, info = load_segmenter(tmp_path / "r.pt")
    assert info["val"] == summary["val"] and info["val"]["images"] == 2
    assert info["val_before_recalibration"] == {"AP@0.5": 0.1}
    assert (
        info["val_images"] == ["img0", "img1"]
        and len(info["threshold_grid"]["AP@0.5"]) == 15
    )
    assert new_spec.widths == spec.widths and new_spec.seed_height in (
        0.1,
        0.15,
        0.2,
        0.25,
        0.3,
    )
    unnamed = save_segmenter(tmp_path / "u.pt", NucleiUNet((4, 8)), spec, {})
    with pytest.raises(InputError, match="names no held-out images"):
        recalibrate_segmenter(unnamed, images, masks, tmp_path / "x.pt")
    elsewhere = save_segmenter(tmp_path / "e.pt", NucleiUNet((4, 8)), spec,
                               {"val_images": ["other"]})  # fmt: skip
    with pytest.raises(InputError, match="other"):
        recalibrate_segmenter(elsewhere, images, masks, tmp_path / "x.pt")


@pytest.mark.slow
def test_train_segmenter_end_to_end_and_cli(annotated, tmp_path):
    images, masks = annotated
    config = SegmenterTrainConfig(epochs=2, steps_per_epoch=3, batch_size=2, crop_px=64,
                                  widths=(8, 16, 32), val_fraction=0.4)  # fmt: skip
    summary = train_segmenter(images, masks, tmp_path / "seg.pt", config)
    assert summary["best_epoch"] in (1, 2) and 0 <= summary["val"]["AP@0.5"] <= 1
    _, spec, info = load_segmenter(tmp_path / "seg.pt")
    assert spec.widths == (8, 16, 32) and len(info["val_images"]) == 2
    assert not set(info["val_images"]) & set(info["train_images"])
    log = pd.read_csv(tmp_path / "seg.pt.log.csv")
    assert list(log["epoch"]) == [1, 2] and log["train_loss"].notna().all()
    out = tmp_path / "cli.pt"
    assert main(["train-segmenter", "--images", str(images), "--masks", str(masks),
                 "--epochs", "1", "--steps-per-epoch", "2", "--crop-px", "64",
                 "--lr", "0.001", "--out", str(out)]) == 0  # fmt: skip
    adapted = load_segmenter(out)
    assert adapted[2]["train_config"]["epochs"] == 1 and adapted[2]["init"] is None
    assert adapted[2]["train_config"]["crop_px"] == 64
    assert adapted[2]["train_config"]["lr"] == 0.001
    tuned = tmp_path / "tuned.pt"
    assert main(["train-segmenter", "--images", str(images), "--masks", str(masks),
                 "--epochs", "1", "--steps-per-epoch", "1", "--init", str(out),
                 "--out", str(tuned)]) == 0  # fmt: skip
    assert load_segmenter(tuned)[2]["init"]["sha256"] == adapted[2]["sha256"]
    tifffile.imwrite(
        tmp_path / "img0.tif", read_pair(images / "img0.png", masks / "img0.tif")[0]
    )
    assert main(["segment", str(tmp_path / "img0.tif"), "--out-dir", str(tmp_path / "o"),
                 "--segmenter", "unet", "--segmenter-weights", str(out)]) == 0  # fmt: skip
    assert (tmp_path / "o" / "img0_nuclei.tif").is_file()
    empty = tmp_path / "nomasks"
    empty.mkdir()
    assert (
        main(["train-segmenter", "--images", str(images), "--masks", str(empty)]) == 2
    )
