"""Train the learned nuclei segmenter on annotated images (``phenoscreen train-segmenter``).

Images and instance masks are paired by file name. Every training image is rescaled
once so that its median nucleus (from the masks) has the network's target diameter;
each step then draws random crops with augmentation: a further random zoom
(log-uniform, so the network tolerates errors of the diameter estimate used at
inference), flips, 90-degree rotations, gamma, gain, offset and noise. A part of the
images (``val_fraction``, at least one) is held out: after each epoch they are
segmented end to end exactly as at inference (diameter estimated from the image,
full-size tiled prediction) and scored by AP at IoU 0.5; the best epoch's weights
are kept. Finally the post-processing settings (foreground threshold, seed height)
are chosen on the same held-out images (`recalibrate_segmenter` repeats that for
trained weights). AdamW with a one-cycle schedule; bfloat16 mixed precision on CUDA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import torch
from skimage.io import imread
from skimage.transform import resize
from torch.nn import functional as F
from tqdm.auto import tqdm

from models.segmenter import (
    NucleiUNet,
    UNetSpec,
    label_targets,
    labels_for_spec,
    load_segmenter,
    median_diameter,
    normalize_intensity,
    predict_field_maps,
    save_segmenter,
)
from pipeline.cells.segeval import average_precision, match_counts
from pipeline.errors import InputError
from pipeline.images.planes import estimate_nucleus_diameter

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MASK_TAGS = ("", "_masks", "_mask", "_labels", "_label", "_nuclei")


@dataclass(frozen=True, kw_only=True)
class SegmenterTrainConfig:
    """How the segmenter is trained (saved with the weights).

    Attributes
    ----------
    epochs : int
    steps_per_epoch : int
        Optimizer steps per epoch (a batch each).
    batch_size : int
    crop_px : int
        Side of the training crops at network scale (a multiple of 16).
    lr, weight_decay : float
        AdamW peak learning rate (one-cycle schedule) and weight decay.
    zoom_range : float
        Crops are zoomed by a factor drawn log-uniformly in [1/zoom_range, zoom_range].
    val_fraction : float
        Share of the images held out for checkpoint selection (at least one image).
    seed : int
    widths : tuple of int
        U-Net channels per level.
    target_diameter_px : float
        Nucleus diameter at network scale.
    """

    epochs: int = 40
    steps_per_epoch: int = 100
    batch_size: int = 8
    crop_px: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    zoom_range: float = 1.4
    val_fraction: float = 0.2
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    target_diameter_px: float = 20.0

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"train-segmenter: {name} must be >= 1.")
        spec = self.spec()
        if self.crop_px < spec.multiple or self.crop_px % spec.multiple:
            raise InputError(
                f"train-segmenter: crop_px {self.crop_px} must be a positive multiple "
                f"of {spec.multiple}."
            )
        if not 0 < self.val_fraction < 1:
            raise InputError("train-segmenter: val_fraction must lie in (0, 1).")
        if self.zoom_range < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise InputError(
                "train-segmenter: zoom_range must be >= 1, lr > 0, weight_decay >= 0."
            )

    def spec(self) -> UNetSpec:
        """Return the network spec these settings train."""
        return UNetSpec(
            widths=tuple(self.widths), target_diameter_px=self.target_diameter_px
        )


def pair_images_and_masks(images: str | Path, masks: str | Path) -> pd.DataFrame:
    """Pair image files with their instance-mask files by name.

    A mask matches an image when its stem is the image stem, optionally followed by
    ``_masks``, ``_mask``, ``_labels``, ``_label`` or ``_nuclei``.

    Parameters
    ----------
    images, masks : str or Path
        Folders of images (png, tif, jpg) and of integer label images (png, tif).

    Returns
    -------
    DataFrame
        Columns ``name``, ``image``, ``mask`` (paths), sorted by name.

    Raises
    ------
    InputError
        If a folder is missing, holds no images, or an image has no mask.
    """
    images, masks = Path(images), Path(masks)
    for folder, what in ((images, "--images"), (masks, "--masks")):
        if not folder.is_dir():
            raise InputError(f"{what} {folder} is not a folder.")
    image_files = sorted(
        p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not image_files:
        raise InputError(
            f"--images {images} holds no {'/'.join(IMAGE_SUFFIXES)} files."
        )
    mask_files = {
        p.stem: p for p in masks.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    }
    rows, missing = [], []
    for image in image_files:
        found = [
            mask_files[image.stem + tag]
            for tag in MASK_TAGS
            if image.stem + tag in mask_files
        ]
        if found:
            rows.append({"name": image.stem, "image": image, "mask": found[0]})
        else:
            missing.append(image.name)
    if missing:
        raise InputError(
            f"{len(missing)} image(s) in {images} have no mask in {masks} (e.g. "
            f"{', '.join(missing[:3])}); name masks like the image, optionally with "
            "_masks or _labels before the extension."
        )
    return pd.DataFrame(rows)


def read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one image as a (Y, X) plane and its (Y, X) integer labels.

    Grey images stored as RGB(A) with equal colour channels are reduced to one plane.

    Raises
    ------
    InputError
        Naming the file, if the image is not one grey plane, the mask is not
        integer labels, or their shapes differ.
    """
    image = (
        tifffile.imread(image_path)
        if image_path.suffix.lower() in (".tif", ".tiff")
        else imread(image_path)
    )
    mask = (
        tifffile.imread(mask_path)
        if mask_path.suffix.lower() in (".tif", ".tiff")
        else imread(mask_path)
    )
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        colour = image[..., :3]
        if not (colour == colour[..., :1]).all():
            raise InputError(
                f"{image_path} is a colour image; give the nuclear stain as one grey plane."
            )
        image = colour[..., 0]
    if image.ndim != 2:
        raise InputError(
            f"{image_path} has shape {image.shape}; expected one (Y, X) plane."
        )
    if mask.ndim != 2 or mask.dtype.kind not in "iu":
        raise InputError(
            f"{mask_path} must be a 2-D integer label image (0 = background, "
            f"1..N = nuclei); got {mask.dtype} {mask.shape}."
        )
    if mask.shape != image.shape:
        raise InputError(
            f"{mask_path} has shape {mask.shape} but its image {image.shape}."
        )
    return image, mask.astype(np.int32)


def _prepare_training_image(
    image: np.ndarray, labels: np.ndarray, target: float
) -> np.ndarray:
    """Stack (normalized image, foreground, distance) rescaled to the target diameter."""
    scale = target / median_diameter(labels)
    shape = tuple(max(1, round(n * scale)) for n in labels.shape)
    plane = normalize_intensity(image)
    if shape != labels.shape:
        plane = resize(
            plane, shape, order=1, anti_aliasing=scale < 1, preserve_range=True
        )
        labels = resize(
            labels, shape, order=0, anti_aliasing=False, preserve_range=True
        ).astype(np.int32)
    foreground, distance = label_targets(labels)
    return np.stack([plane, foreground, distance]).astype(np.float32)


def sample_batch(
    stacks: Sequence[np.ndarray], config: SegmenterTrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one augmented batch of crops.

    Parameters
    ----------
    stacks : sequence of ndarray of shape (3, Y, X)
        Per image: normalized image, foreground and distance targets, at network scale.
    config : SegmenterTrainConfig
    rng : numpy Generator

    Returns
    -------
    images : Tensor of shape (B, 1, crop, crop)
    targets : Tensor of shape (B, 2, crop, crop)

    Raises
    ------
    ValueError
        If `stacks` is empty.
    """
    if not stacks:
        raise ValueError("no training images.")
    weights = np.array([np.sqrt(s.shape[1] * s.shape[2]) for s in stacks])
    crop = config.crop_px
    out = np.empty((config.batch_size, 3, crop, crop), np.float32)
    for b, index in enumerate(
        rng.choice(len(stacks), config.batch_size, p=weights / weights.sum())
    ):
        stack = stacks[index]
        zoom = float(np.exp(rng.uniform(-1, 1) * np.log(config.zoom_range)))
        side = max(2, round(crop / zoom))
        pad_y, pad_x = max(0, side - stack.shape[1]), max(0, side - stack.shape[2])
        if pad_y or pad_x:
            stack = np.pad(stack, ((0, 0), (0, pad_y), (0, pad_x)), mode="symmetric")
        y = rng.integers(0, stack.shape[1] - side + 1)
        x = rng.integers(0, stack.shape[2] - side + 1)
        window = torch.from_numpy(
            np.ascontiguousarray(stack[:, y : y + side, x : x + side])
        )
        window = F.interpolate(window[None], size=(crop, crop), mode="bilinear")[
            0
        ].numpy()
        window = np.rot90(window, rng.integers(4), axes=(1, 2))
        if rng.random() < 0.5:
            window = window[:, :, ::-1]
        out[b] = window
    out[:, 1] = out[:, 1] > 0.5  # foreground back to {0, 1} after interpolation
    images = np.clip(out[:, :1], 0, None)
    gamma = np.exp(rng.uniform(-0.4, 0.4, (config.batch_size, 1, 1, 1)))
    gain = rng.uniform(0.6, 1.4, (config.batch_size, 1, 1, 1))
    offset = rng.uniform(-0.1, 0.1, (config.batch_size, 1, 1, 1))
    noise = rng.normal(0, 1, images.shape) * rng.uniform(
        0, 0.05, (config.batch_size, 1, 1, 1)
    )
    images = (images**gamma) * gain + offset + noise
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(
        out[:, 1:].copy()
    )


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on the foreground and the (soft) distance map, summed."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def _predict_all(
    model: NucleiUNet,
    spec: UNetSpec,
    images: Sequence[np.ndarray],
    diameters: Sequence[float],
    device: torch.device,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Predict the maps of whole images as at inference (the held-out images)."""
    return [
        predict_field_maps(model, spec, image, diameter, device=device)
        for image, diameter in zip(images, diameters, strict=True)
    ]


def score_maps(
    maps: Sequence[tuple[np.ndarray, np.ndarray]],
    truths: Sequence[np.ndarray],
    spec: UNetSpec,
) -> pd.Series:
    """Pooled AP(t) of the segmentation the maps give with `spec`'s post-processing.

    `maps` are at the network's scale (`predict_field_maps`), `truths` the images'
    instance labels.
    """
    counts = [
        match_counts(truth, labels_for_spec(foreground, distance, spec, truth.shape))
        for (foreground, distance), truth in zip(maps, truths, strict=True)
    ]
    return average_precision(pd.concat(counts))


def calibrate_postprocessing(
    maps: Sequence[tuple[np.ndarray, np.ndarray]],
    truths: Sequence[np.ndarray],
    spec: UNetSpec,
) -> tuple[UNetSpec, pd.DataFrame]:
    """Choose the foreground threshold and seed height that maximize AP@0.5, then mAP.

    Returns
    -------
    spec : UNetSpec
        `spec` with the best settings.
    grid : DataFrame
        ``fg_threshold``, ``seed_height``, ``AP@0.5``, ``mAP`` of every candidate.
    """
    rows = []
    for fg in (0.4, 0.5, 0.6):
        for seed in (0.1, 0.15, 0.2, 0.25, 0.3):
            ap = score_maps(
                maps,
                truths,
                replace(spec, fg_threshold=fg, seed_height=seed),
            )
            rows.append(
                {
                    "fg_threshold": fg,
                    "seed_height": seed,
                    "AP@0.5": float(ap.loc[0.5]),
                    "mAP": float(ap.mean()),
                }
            )
    grid = pd.DataFrame(rows)
    best = grid.sort_values(["AP@0.5", "mAP"], ascending=False).iloc[0]
    return replace(
        spec,
        fg_threshold=float(best["fg_threshold"]),
        seed_height=float(best["seed_height"]),
    ), grid


def _calibrate_and_score(
    maps: Sequence[tuple[np.ndarray, np.ndarray]],
    truths: Sequence[np.ndarray],
    spec: UNetSpec,
) -> tuple[UNetSpec, pd.DataFrame, dict[str, float]]:
    """Calibrate the post-processing on held-out images; their AP with the result."""
    spec, grid = calibrate_postprocessing(maps, truths, spec)
    ap = score_maps(maps, truths, spec)
    val = {
        "AP@0.5": round(float(ap.loc[0.5]), 4),
        "AP@0.75": round(float(ap.loc[0.75]), 4),
        "mAP@0.5:0.95": round(float(ap.mean()), 4),
        "images": len(truths),
    }
    return spec, grid, val


def train_segmenter(
    images: str | Path,
    masks: str | Path,
    out: str | Path,
    config: SegmenterTrainConfig | None = None,
    *,
    device: str | None = None,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Train the nuclei U-Net and save the best weights (by validation AP@0.5).

    Parameters
    ----------
    images, masks : str or Path
        Folders of nuclear-stain images and their instance masks (`pair_images_and_masks`).
    out : str or Path
        Weights file to write (`models.segmenter.save_segmenter`); a training log
        ``<out>.log.csv`` is written next to it after every epoch.
    config : SegmenterTrainConfig, optional
    device : str, optional
        ``cuda`` when available, else ``cpu``, by default.
    init : str or Path, optional
        Start from these segmenter weights (``"shipped"``: the shipped ones) instead
        of random weights, e.g. to adapt the shipped segmenter to your images; its
        widths and target diameter replace the config's.

    Returns
    -------
    dict
        ``out``, ``best_epoch``, ``val`` (AP figures), ``spec``, ``seconds``.

    Raises
    ------
    InputError
        If the folders are unusable, there are fewer than two annotated images, or
        a file is not an image/label pair.
    """
    config = config or SegmenterTrainConfig()
    out = Path(out)
    pairs = pair_images_and_masks(images, masks)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = [read_pair(row.image, row.mask) for row in pairs.itertuples()]
    keep = [i for i, (_, labels) in enumerate(data) if labels.any()]
    if len(keep) < 2:
        raise InputError(
            f"train-segmenter needs at least two annotated images with nuclei; {masks} "
            f"gives {len(keep)}."
        )
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    order = rng.permutation(keep)
    n_val = max(1, round(config.val_fraction * len(order)))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    if init is not None:  # the network decides its shape and scale
        model, init_spec, init_info = load_segmenter(
            None if init == "shipped" else init
        )
        config = replace(
            config,
            widths=init_spec.widths,
            target_diameter_px=init_spec.target_diameter_px,
        )
    spec = config.spec()
    if init is None:
        model = NucleiUNet(spec.widths)
    stacks = [
        _prepare_training_image(*data[i], spec.target_diameter_px) for i in train_idx
    ]
    val_images = [data[i][0].astype(np.float32) for i in val_idx]
    val_truths = [data[i][1] for i in val_idx]
    val_diameters = [estimate_nucleus_diameter(image) for image in val_images]
    torch_device = torch.device(
        device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    model = model.to(torch_device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * config.steps_per_epoch
    )
    use_amp = torch_device.type == "cuda"

    log, best_ap, best_state, best_epoch = [], -1.0, None, 0
    start = time.perf_counter()
    logger.info(
        "training on %d images, validating on %d, %s",
        len(train_idx),
        len(val_idx),
        torch_device,
    )
    for epoch in tqdm(
        range(1, config.epochs + 1), desc="train-segmenter", unit="epoch"
    ):
        model.train()
        losses = []
        for _ in range(config.steps_per_epoch):
            batch, targets = sample_batch(stacks, config, rng)
            batch = batch.to(torch_device, non_blocking=True)
            targets = targets.to(torch_device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = segmentation_loss(model(batch), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        maps = _predict_all(model, spec, val_images, val_diameters, torch_device)
        ap = score_maps(maps, val_truths, spec)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_AP@0.5": float(ap.loc[0.5]),
            "val_mAP": float(ap.mean()),
            "lr": float(schedule.get_last_lr()[0]),
            "seconds": round(time.perf_counter() - start, 1),
        }
        log.append(row)
        logger.info("epoch %d: %s", epoch, row)
        if row["val_AP@0.5"] > best_ap:
            best_ap, best_epoch = row["val_AP@0.5"], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        pd.DataFrame(log).to_csv(out.with_name(out.name + ".log.csv"), index=False)
    model.load_state_dict(best_state)
    model.eval()
    maps = _predict_all(model, spec, val_images, val_diameters, torch_device)
    spec, grid, val = _calibrate_and_score(maps, val_truths, spec)
    seconds = round(time.perf_counter() - start, 1)
    config_dict = {**asdict(config), "widths": list(config.widths)}
    save_segmenter(
        out,
        model,
        spec,
        {
            "train_config": config_dict,
            "init": None
            if init is None
            else {"path": init_info["path"], "sha256": init_info["sha256"]},
            "best_epoch": best_epoch,
            "val": val,
            "train_images": [pairs.loc[i, "name"] for i in train_idx],
            "val_images": [pairs.loc[i, "name"] for i in val_idx],
            "log": [{k: float(v) for k, v in row.items()} for row in log],
            "threshold_grid": grid.to_dict("list"),
            "device": torch_device.type,
            "seconds": seconds,
        },
    )
    return {
        "out": str(out),
        "best_epoch": best_epoch,
        "val": val,
        "spec": asdict(spec),
        "seconds": seconds,
    }


def recalibrate_segmenter(
    weights: str | Path,
    images: str | Path,
    masks: str | Path,
    out: str | Path,
    *,
    device: str | None = None,
) -> dict[str, Any]:
    """Choose a trained segmenter's post-processing again on its held-out images.

    The network is unchanged; the foreground threshold and seed height are
    calibrated (`calibrate_postprocessing`) on the images the training held out
    (``val_images`` stored with the weights), found by name in `images`/`masks`.
    Use it when the post-processing changed after the weights were trained.

    Parameters
    ----------
    weights : str or Path
        Weights written by `train_segmenter`.
    images, masks : str or Path
        The folders the weights were trained from (`pair_images_and_masks`).
    out : str or Path
        Weights file to write (may be `weights`); everything stored with the
        weights is kept, ``val`` and ``threshold_grid`` are replaced and
        ``val_before_recalibration`` keeps the previous validation figures.
    device : str, optional

    Returns
    -------
    dict
        ``out``, ``val`` (AP figures on the held-out images), ``spec``.

    Raises
    ------
    InputError
        If the weights name no held-out images, or one is missing from the folders.
    """
    model, old_spec, info = load_segmenter(weights)
    names = info.get("val_images")
    if not names:
        raise InputError(
            f"{weights} names no held-out images (val_images); only weights written "
            "by `phenoscreen train-segmenter` can be recalibrated."
        )
    pairs = pair_images_and_masks(images, masks).set_index("name")
    missing = sorted(set(names) - set(pairs.index))
    if missing:
        raise InputError(
            f"held-out images {missing[:5]} of {weights} are not in {images} / "
            f"{masks}; give the folders the weights were trained from."
        )
    data = [read_pair(pairs.loc[n, "image"], pairs.loc[n, "mask"]) for n in names]
    values = [image.astype(np.float32) for image, _ in data]
    truths = [labels for _, labels in data]
    diameters = [estimate_nucleus_diameter(image) for image in values]
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(target)
    maps = _predict_all(model, old_spec, values, diameters, target)
    spec, grid, val = _calibrate_and_score(maps, truths, old_spec)
    kept = {k: v for k, v in info.items() if k not in ("path", "sha256")}
    save_segmenter(
        out,
        model,
        spec,
        {**kept, "val": val, "threshold_grid": grid.to_dict("list"),
         "val_before_recalibration": info.get("val")},
    )  # fmt: skip
    return {"out": str(out), "val": val, "spec": asdict(spec)}
