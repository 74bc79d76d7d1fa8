"""Single-cell embeddings from an ImageNet-pretrained timm backbone.

The recipe (`pipeline.config.EmbedConfig`, saved with the feature set) follows
what made CNN profiles match or beat CellProfiler features in the literature
(Moshkov et al. 2024; DeepProfiler) and on our checks (README, "Deep profiles"):

- a box of ``crop_size`` pixels around each nucleus at the image's resolution
  (default four nucleus diameters), resized to ``input_size`` (64) for the
  network, so cells of any pixel size meet the same receptive fields;
- intensities scaled per plate and channel to [-1, 1] between percentiles of the
  plate's negative-control cells (``scaling = "plate"``), or per crop;
- channels fed one at a time as grey images replicated to RGB, the C vectors
  concatenated (``strategy = "rgb"``), or through one C-channel stem (``stem``);
- features of an intermediate stage (``layer = "blocks.3"``: EfficientNet's
  ``blocks[3]``, via timm's ``forward_intermediates``, which stops there) or the
  final layer, averaged over the crop's own cell (``pool = "cell"``, its mask
  shrunk to the feature map's grid) or over the whole crop;
- cells aggregated into wells by their median (``aggregate``).

Crops are streamed field by field from a run (`pipeline.cells.stored.iter_field_crops`),
embedded in batches by a DataLoader under ``torch.inference_mode`` (CUDA with
bfloat16 autocast, pinned memory and channels_last when present; CPU otherwise, in
float32; ``embed.precision`` chooses the arithmetic on either)
and written to the store a field or a group of fields per transaction
(`db.store.FieldBatches`), as a feature set that
records the model, the weights' source and hash and the recipe. A rerun skips
fields already embedded. When the run has classical features, a ``combined``
feature set (classical + this embedding, each block normalized on its own by the
profile recipe) is registered too.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from functools import partial
from itertools import chain
from queue import Queue
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from sqlalchemy import Engine
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual torch alias
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from db import store
from db.session import retry_lost_connection
from models.backbones import (
    OFFLINE_NORMALIZATION,
    create_backbone,
    load_checkpoint,
    on_device,
)
from pipeline.cells.stored import FieldCrops, iter_field_crops
from pipeline.config import (
    EMBED_POOLS,
    EMBED_STRATEGIES,
    EmbedConfig,
    embed_batch_size,
    network_precision,
)
from pipeline.errors import InputError
from pipeline.views.export import COMBINED_KIND, aggregate_run

__all__ = ["EmbedConfig", "embed_run"]

logger = logging.getLogger(__name__)

#: Fields are embedded together until they fill this many batches.
GROUP_BATCHES = 4
T = TypeVar("T")


def fit_channel_ranges(
    crops: np.ndarray, masks: np.ndarray, percentiles: tuple[float, float]
) -> np.ndarray:
    """Robust intensity range of each channel over the pixels of the cells.

    Parameters
    ----------
    crops : ndarray of shape (N, C, S, S)
    masks : ndarray of shape (N, S, S), bool
    percentiles : (low, high)

    Returns
    -------
    ndarray of shape (C, 2), float32
        Low and high value per channel (high > low).

    Raises
    ------
    ValueError
        If there is no cell pixel or the shapes disagree.
    """
    if crops.ndim != 4 or masks.shape != (crops.shape[0], *crops.shape[2:]):
        raise ValueError(
            f"crops {crops.shape} and masks {masks.shape} must be (N, C, S, S) and "
            "(N, S, S)."
        )
    if not masks.any():
        raise ValueError("no cell pixels to fit the channel ranges on.")
    pixels = np.moveaxis(crops, 1, 0)[:, masks]  # (C, pixels)
    ranges = np.percentile(pixels, percentiles, axis=1).T.astype(np.float32)
    # a constant channel still gets high > low, also where 1e-6 is below float32's
    # resolution at `low` (raw counts of a few thousand)
    ranges[:, 1] = np.maximum(ranges[:, 1], np.nextafter(ranges[:, 0], np.inf))
    return ranges


def normalize_crops(crops: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Scale crops to [0, 1] per channel, then to the network's input scale.

    Parameters
    ----------
    crops : ndarray of shape (N, C, S, S)
    ranges : ndarray of shape (C, 2)
        From `fit_channel_ranges`.

    Returns
    -------
    ndarray of shape (N, C, S, S), float32
        ``(clip((x - low) / (high - low), 0, 1) - 0.5) / 0.5``.

    Raises
    ------
    ValueError
        If the channel counts differ.
    """
    if crops.ndim != 4 or ranges.shape != (crops.shape[1], 2):
        raise ValueError(
            f"ranges {ranges.shape} must be (C, 2) for crops {crops.shape}."
        )
    mean, std = OFFLINE_NORMALIZATION
    low = ranges[:, 0].astype(np.float64)
    span = ranges[:, 1].astype(np.float64) - low
    # in place: subtract, one gain, one shift, a clip (it commutes with them: std > 0)
    gain = np.divide(1, span * std, out=np.zeros_like(span), where=span > 0)
    out = crops.astype(np.float32, copy=True)
    out -= low.astype(np.float32)[None, :, None, None]
    out *= gain.astype(np.float32)[None, :, None, None]
    out -= np.float32(mean / std)
    return np.clip(out, -mean / std, (1 - mean) / std, out=out)


def minmax_crops(crops: np.ndarray) -> np.ndarray:
    """Scale each crop's channels between their own minimum and maximum to [-1, 1].

    Parameters
    ----------
    crops : ndarray of shape (N, C, S, S)

    Returns
    -------
    ndarray of shape (N, C, S, S), float32
        A constant channel becomes -1 everywhere.

    Raises
    ------
    ValueError
        If `crops` is not 4-D.
    """
    if crops.ndim != 4:
        raise ValueError(f"crops {crops.shape} must be (N, C, S, S).")
    mean, std = OFFLINE_NORMALIZATION
    out = crops.astype(np.float32, copy=True)
    low = out.min(axis=(2, 3), keepdims=True)
    span = out.max(axis=(2, 3), keepdims=True) - low
    gain = np.divide(1, span * std, out=np.zeros_like(span), where=span > 0)
    out -= low
    out *= gain  # a constant channel becomes 0 here, then -mean / std
    out -= np.float32(mean / std)
    return out


def scale_crops(
    crops: np.ndarray, scaling: str, ranges: np.ndarray | None = None
) -> np.ndarray:
    """Scale crops to the network's input range as the recipe says.

    Parameters
    ----------
    crops : ndarray of shape (N, C, S, S)
    scaling : {"crop", "plate"}
        `minmax_crops`, or `normalize_crops` with the plate's `ranges`.
    ranges : ndarray of shape (C, 2), optional
        Needed for ``plate`` (`fit_channel_ranges`).

    Returns
    -------
    ndarray of shape (N, C, S, S), float32

    Raises
    ------
    ValueError
        If `scaling` is unknown, or ``plate`` comes without `ranges`.
    """
    if scaling == "crop":
        return minmax_crops(crops)
    if scaling == "plate":
        if ranges is None:
            raise ValueError("plate scaling needs the plate's channel ranges.")
        return normalize_crops(crops, ranges)
    raise ValueError(f"scaling {scaling!r} is unknown; use 'crop' or 'plate'.")


def block_index(backbone: nn.Module, layer: str) -> int | None:
    """Return timm's ``forward_intermediates`` index of a layer (None: pooled).

    ``blocks.K`` is stage K of the network (EfficientNet / MobileNet ``blocks[K]``),
    index K + 1 of ``forward_intermediates(..., extra_blocks=True)`` (0 is the
    stem).

    Raises
    ------
    InputError
        If the layer is not ``pooled`` or ``blocks.K`` with K a stage of this
        backbone, or the backbone cannot return its stages.
    """
    if layer == "pooled":
        return None
    head, _, index = layer.partition(".")
    forward = getattr(backbone, "forward_intermediates", None)
    blocks = getattr(backbone, "blocks", None)
    if (
        head != "blocks"
        or not index.isdigit()
        or forward is None
        or blocks is None
        or "extra_blocks" not in inspect.signature(forward).parameters
    ):
        raise InputError(
            f"embed.layer = {layer!r}: use 'pooled', or 'blocks.K' with an "
            "EfficientNet / MobileNet backbone (timm models with stages in .blocks)."
        )
    if int(index) >= len(blocks):
        raise InputError(
            f"embed.layer = {layer!r}: this backbone has stages blocks.0 to "
            f"blocks.{len(blocks) - 1}."
        )
    return int(index) + 1


def mask_pool(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average feature maps over each crop's cell.

    The masks are shrunk to the maps' grid by area, so each grid square weighs
    by the share of it the cell covers; a crop whose cell covers no share of any
    square (an empty mask) is averaged over the whole map.

    Parameters
    ----------
    maps : Tensor of shape (B, K, H, W)
    masks : Tensor of shape (B, S, S)
        The crops' own-cell masks (bool or 0-1), at the crops' side S.

    Returns
    -------
    Tensor of shape (B, K)

    Raises
    ------
    ValueError
        If `maps` is not 4-D or the batch sizes differ.
    """
    if maps.ndim != 4 or masks.ndim != 3 or len(maps) != len(masks):
        raise ValueError(
            f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must be "
            "(B, K, H, W) and (B, S, S) with the same B."
        )
    weights = F.adaptive_avg_pool2d(masks[:, None].float(), maps.shape[-2:])
    total = weights.sum(dim=(-2, -1), keepdim=True)
    weights = torch.where(total > 0, weights, torch.ones_like(weights))
    return (maps * weights).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1))


class CellEmbedder(nn.Module):
    """Crops (B, C, S, S) scaled to [-1, 1] -> one vector per crop (B, D).

    Resizes the crops to `input_size`, feeds them by `strategy` and averages the
    feature map of `layer` over each crop's cell or the whole crop by `pool` (see
    the module docstring).

    Parameters
    ----------
    backbone : nn.Module
        A timm model with ``num_classes=0``: 3 input channels for ``rgb``, C for
        ``stem``.
    strategy : {"rgb", "stem"}
    layer : str
        ``pooled`` or ``blocks.K`` (`block_index`).
    input_size : int or None
        Side the crops are resized to; None keeps theirs.
    pool : {"cell", "crop"}
        ``cell``: `mask_pool` over each crop's own cell (`forward` then needs the
        masks); ``crop``: the mean over the whole map.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        strategy: str,
        layer: str,
        input_size: int | None,
        pool: str,
    ) -> None:
        super().__init__()
        if strategy not in EMBED_STRATEGIES:
            raise ValueError(
                f"strategy {strategy!r} is unknown; use one of {EMBED_STRATEGIES}."
            )
        if pool not in EMBED_POOLS:
            raise ValueError(f"pool {pool!r} is unknown; use one of {EMBED_POOLS}.")
        self.backbone = backbone
        self.strategy, self.layer, self.input_size = strategy, layer, input_size
        self.pool = pool
        self._index = block_index(backbone, layer)

    def forward(
        self, crops: torch.Tensor, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed a batch of crops (B, C, S, S), with their cell masks (B, S, S)."""
        if self.pool == "cell" and masks is None:
            raise ValueError("pool = 'cell' needs each crop's cell mask.")
        n, channels, side = crops.shape[0], crops.shape[1], crops.shape[-1]
        if self.input_size and self.input_size != side:
            crops = F.interpolate(
                crops, size=(self.input_size, self.input_size), mode="bilinear",
                align_corners=False, antialias=self.input_size < side,
            )  # fmt: skip
        if self.strategy == "rgb":
            size = crops.shape[-1]
            crops = crops.reshape(n * channels, 1, size, size).expand(-1, 3, -1, -1)
        if self._index is None and self.pool == "crop":
            return self.backbone(crops).reshape(n, -1)
        if self._index is None:
            maps = self.backbone.forward_features(crops)
            if maps.ndim != 4:
                raise InputError(
                    "embed.pool = 'cell' needs a network with a spatial feature "
                    "map (a CNN); use pool = 'crop' with this model."
                )
        else:
            (maps,) = self.backbone.forward_intermediates(
                crops, indices=[self._index], intermediates_only=True,
                stop_early=True, extra_blocks=True,
            )  # fmt: skip
        maps = maps.reshape(n, -1, *maps.shape[-2:])  # rgb: the C passes side by side
        if self.pool == "crop":
            return maps.mean(dim=(-2, -1))
        return mask_pool(maps, masks)

    def pixels_per_crop(self, n_channels: int, side: int) -> int:
        """Return the network input pixels of one crop of `n_channels` x `side` px.

        ``rgb`` passes each channel as one image, ``stem`` the crop as one, at
        `input_size` (or `side` when None).
        """
        images = n_channels if self.strategy == "rgb" else 1
        return images * (self.input_size or side) ** 2

    def width(self, n_channels: int, side: int = 32) -> int:
        """Return the vector length for crops of `n_channels` channels."""
        was_training = self.training
        self.eval()
        parameter = next(self.backbone.parameters())
        with torch.inference_mode():
            probe = torch.zeros(1, n_channels, side, side, device=parameter.device)
            mask = torch.ones(1, side, side, device=parameter.device)
            width = int(self(probe, mask).shape[1])
        self.train(was_training)
        return width


def _stage_order(layer: str) -> float:
    """Depth of a layer name: K for ``blocks.K``, infinity for ``pooled``."""
    return float("inf") if layer == "pooled" else float(layer.partition(".")[2])


def build_embedder(
    config: EmbedConfig, n_channels: int
) -> tuple[CellEmbedder, dict[str, Any]]:
    """Build the embedder of a recipe, from ImageNet weights or a fine-tuned checkpoint.

    A checkpoint (`models.train.save_checkpoint`) brings its own strategy, input
    size, scaling and pooling (``crop`` for checkpoints saved before pooling was
    recorded); the recipe's layer and aggregation still apply, but a layer
    after the one the network was trained at is refused (those stages kept their
    ImageNet weights on top of fine-tuned ones).

    Returns
    -------
    embedder : CellEmbedder
        In eval mode.
    info : dict
        ``name`` (the readable part of the feature set's name; `embed_run`
        appends `recipe_digest`), ``model_name``, ``weights`` (source and
        SHA-256), ``config`` (the recipe as applied, with a checkpoint's
        settings).

    Raises
    ------
    InputError
        If the model, its weights or the checkpoint cannot be loaded, the
        checkpoint was trained on other channels or at an earlier layer, or the
        layer does not exist.
    """
    if config.checkpoint:
        backbone, meta = load_checkpoint(config.checkpoint)
        if meta["in_chans"] != n_channels:
            raise InputError(
                f"checkpoint {config.checkpoint} was trained on {meta['in_chans']} "
                f"channels; this run has {n_channels}. Fine-tune on this run's "
                "channels (phenoscreen train)."
            )
        if _stage_order(config.layer) > _stage_order(meta["layer"]):
            raise InputError(
                f"checkpoint {config.checkpoint} was trained at layer {meta['layer']}; "
                f"the stages up to {config.layer} were not all trained. Embed with "
                f"layer = {meta['layer']!r} (or an earlier stage), or fine-tune with "
                f"phenoscreen train --layer {config.layer}."
            )
        config = replace(
            config, model_name=meta["model_name"], strategy=meta["strategy"],
            input_size=meta["input_size"], scaling=meta["scaling"],
            pool=meta["pool"],
            crop_size=config.crop_size or meta["crop_size"],
        )  # fmt: skip
        tag = f"finetuned_{meta['sha256'][:8]}"
        weights = f"checkpoint:{config.checkpoint} sha256:{meta['sha256']}"
    else:
        backbone, info = create_backbone(
            config.model_name,
            in_chans=3 if config.strategy == "rgb" else n_channels,
            weights=config.weights,
        )
        tag = config.strategy
        weights = f"{info.source} sha256:{info.sha256}"
    embedder = CellEmbedder(
        backbone, strategy=config.strategy, layer=config.layer,
        input_size=config.input_size, pool=config.pool,
    ).eval()  # fmt: skip
    size = f"{config.input_size}px" if config.input_size else "native"
    name = (
        f"{config.model_name}_{tag}_{config.layer}_{config.pool}_{size}_"
        f"{config.scaling}_{config.aggregate}"
    )
    return embedder, {
        "name": name,
        "model_name": config.model_name,
        "weights": weights,
        "config": config,
    }


def embed_array(
    embedder: Callable[..., torch.Tensor],
    crops: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    batch_size: int,
    device: torch.device,
    precision: str | None = None,
) -> np.ndarray:
    """Embed normalized crops in batches through a DataLoader.

    Parameters
    ----------
    embedder : callable
        ``embedder(crops)`` or, with `masks`, ``embedder(crops, masks)``
        (`CellEmbedder`).
    crops : ndarray of shape (N, C, S, S), float32
    masks : ndarray of shape (N, S, S), bool, optional
        Each crop's own-cell mask (for ``pool = "cell"``).
    batch_size : int
        Crops per forward pass.
    device : torch.device
        Where the network runs (it must already be there).
    precision : {"float32", "bfloat16"}, optional
        The network's arithmetic (bfloat16 autocast); None: the device's default
        (`pipeline.config.network_precision`).

    Returns
    -------
    ndarray of shape (N, D), float32

    Raises
    ------
    InputError
        If `precision` is unknown.
    ValueError
        If `masks` do not match the crops.
    """
    if masks is not None and masks.shape != (len(crops), *crops.shape[2:]):
        raise ValueError(
            f"masks {masks.shape} must be (N, S, S) for crops {crops.shape}."
        )
    bfloat16 = (
        network_precision(device.type, precision, setting="embed.precision")
        == "bfloat16"
    )
    if not len(crops):
        return np.zeros((0, 0), dtype=np.float32)
    if isinstance(embedder, nn.Module):
        embedder.eval()  # batch norms use their running statistics
    cuda = device.type == "cuda"
    tensors = [torch.from_numpy(crops)]
    if masks is not None:
        tensors.append(torch.from_numpy(masks))
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, pin_memory=cuda)
    out = []
    with torch.inference_mode():
        for batch, *mask in loader:
            batch = batch.to(device, non_blocking=cuda).contiguous(
                memory_format=torch.channels_last
            )
            mask = [m.to(device, non_blocking=cuda) for m in mask]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
                out.append(embedder(batch, *mask).float().cpu())
    return torch.cat(out).numpy()


def _embed_and_write(
    writes: _Writer,
    batches: store.FieldBatches,
    run_id: int,
    embedder: Callable[..., torch.Tensor],
    fields: list[tuple[FieldCrops, np.ndarray]],
    feature_set_id: int,
    width: int,
    batch_size: int,
    device: torch.device,
    precision: str | None,
) -> int:
    """Embed fields' crops together; queue their writes, grouped by `batches`.

    The fields' cell masks go with the crops when they were read. Returns the
    batch size that fitted on the device.
    """
    with_masks = fields[0][0].masks is not None
    vectors, batch_size = embed_with_backoff(
        embedder,
        np.concatenate([crops for _, crops in fields]),
        np.concatenate([field.masks for field, _ in fields]) if with_masks else None,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    offsets = np.cumsum([0] + [len(crops) for _, crops in fields])
    for (field, _), lo, hi in zip(fields, offsets[:-1], offsets[1:], strict=True):
        item = {
            "field_id": field.field_id,
            "object_numbers": field.object_numbers,
            "vectors": vectors[lo:hi].reshape(hi - lo, width),
        }
        group = batches.add(item, hi - lo, more_ready=True)  # the stream goes on
        _write_vectors(writes, run_id, feature_set_id, group)
    return batch_size


def _write_vectors(
    writes: _Writer, run_id: int, feature_set_id: int, fields: list[dict[str, Any]]
) -> None:
    """Queue one transaction writing `fields`' vectors (none when empty)."""
    if fields:
        writes.submit(
            store.write_fields_vectors,
            what=f"vectors of {len(fields)} field(s) ({fields[0]['field_id']}, ...)",
            run_id=run_id,
            feature_set_id=feature_set_id,
            fields=fields,
        )


class _Writer:
    """Store writes on one background thread, so they overlap the forward pass.

    At most `depth` writes wait besides the one being written (each a group of
    about `db.store.FieldBatches`' 20,000 cells at most, 100 MB of 1,280-d
    vectors); `close` waits for all and raises the first error. Each write is one
    transaction, run again after a lost connection or a deadlock
    (`db.session.retry_lost_connection`).
    """

    def __init__(self, engine: Engine, depth: int = 4) -> None:
        self._engine, self._depth = engine, depth
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[Future] = deque()

    def submit(
        self, write: Callable[..., None], *, what: str, **kwargs: object
    ) -> None:
        """Queue ``write(engine, **kwargs)``; `what` names it in retries and errors."""
        work = partial(write, self._engine, **kwargs)
        self._pending.append(self._pool.submit(retry_lost_connection, work, what=what))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def plate_channel_ranges(
    engine: Engine,
    run_id: int,
    fields: pd.DataFrame,
    wells: pd.DataFrame,
    *,
    size: int,
    config: EmbedConfig,
) -> dict[str, np.ndarray]:
    """Fit each plate's per-channel intensity range on its negative-control cells.

    Parameters
    ----------
    engine : Engine
    run_id : int
    fields : DataFrame
        The run's fields to use (`db.store.read_run_fields`): ``field_id``,
        ``Metadata_Plate``, ``Metadata_Well``.
    wells : DataFrame
        `db.store.read_wells`, for the roles.
    size : int
        Crop side.
    config : EmbedConfig
        Its ``percentiles`` and ``max_control_fields``.

    Returns
    -------
    dict of str to ndarray of shape (C, 2)
        Plate name -> `fit_channel_ranges` of up to ``max_control_fields`` control
        fields (cell pixels only).

    Raises
    ------
    ValueError
        If a plate has no negative-control cells.
    """
    roles = wells.set_index(["Metadata_Plate", "Metadata_Well"])["Metadata_Role"]
    ranges: dict[str, np.ndarray] = {}
    for plate, plate_fields in fields.groupby("Metadata_Plate"):
        is_control = [
            roles.get((plate, well)) == "negative_control"
            for well in plate_fields["Metadata_Well"]
        ]
        controls = plate_fields[is_control].head(config.max_control_fields)
        samples = [
            s
            for s in iter_field_crops(
                engine, run_id, size=size, field_ids=set(controls["field_id"]),
                with_masks=True,
            )
            if len(s.crops)
        ]  # fmt: skip
        if not samples:
            raise ValueError(
                f"plate {plate}: no negative-control cells to fit the intensity "
                "ranges on; check the plate map's negative_control wells."
            )
        ranges[plate] = fit_channel_ranges(
            np.concatenate([s.crops for s in samples]),
            np.concatenate([s.masks for s in samples]),
            config.percentiles,
        )
    return ranges


def embed_with_backoff(
    embedder: Callable[..., torch.Tensor],
    crops: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    batch_size: int,
    device: torch.device,
    precision: str | None = None,
) -> tuple[np.ndarray, int]:
    """`embed_array`, halving the batch and going on when the GPU runs out of memory.

    Parameters
    ----------
    embedder, crops, masks, batch_size, device, precision
        See `embed_array`; `batch_size` is the first one tried.

    Returns
    -------
    vectors : ndarray of shape (N, D), float32
    batch_size : int
        The batch size that fitted (use it for the next call).

    Raises
    ------
    torch.cuda.OutOfMemoryError
        If even a batch of one does not fit.
    """
    while True:
        try:
            return embed_array(
                embedder, crops, masks, batch_size=batch_size, device=device,
                precision=precision,
            ), batch_size  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("out of GPU memory: batch size reduced to %d", batch_size)


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield `items` produced by a background thread, up to `depth` ahead.

    Reading and cropping fields (NumPy, TIFF decoding) release the GIL, so they
    overlap the forward pass. An exception in the producer is raised here; a
    consumer that stops early stops the producer too (it would otherwise wait on
    the full queue for ever, holding its database connection).
    """
    queue: Queue = Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put(exc)
        queue.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="phenoscreen-prefetch")
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on the full queue
            while not queue.empty():
                queue.get_nowait()
            thread.join(timeout=0.1)


def embed_device() -> str:
    """Return the device `embed_run` uses by default: ``cuda`` if present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def embed_run(
    engine: Engine,
    run_id: int | None = None,
    config: EmbedConfig | None = None,
    *,
    device: str | None = None,
) -> dict[str, Any]:
    """Embed every cell of a run's QC-passed fields into a new feature set.

    Parameters
    ----------
    engine : Engine
    run_id : int, optional
        Default: the latest complete run.
    config : EmbedConfig, optional
        The recipe (its ``enabled`` is not read here).
    device : str, optional
        ``cuda`` or ``cpu``; default CUDA when available.

    Returns
    -------
    dict
        ``feature_set``, ``combined_feature_set`` (None without classical
        features), ``n_fields``, ``n_cells``, ``seconds``, ``cells_per_s``,
        ``batch_size`` (crops per forward pass).

    Raises
    ------
    InputError
        If the model or its weights cannot be obtained.
    ValueError
        If the run does not exist or has no negative-control cells on a plate.
    """
    cfg = config or EmbedConfig()
    target = torch.device(device or embed_device())
    run_id, experiment_id = store.resolve_run(engine, run_id)
    fields = store.read_run_fields(engine, run_id)[2]
    wells = store.read_wells(engine, experiment_id)
    fields = fields[fields["qc_flags"] == ""]
    first = next(
        (
            f
            for f in iter_field_crops(engine, run_id, size=cfg.crop_size)
            if len(f.crops)
        ),
        None,
    )
    if first is None:
        raise ValueError(
            f"run {run_id} has no cell in a field that passed QC to embed."
        )
    n_channels = first.crops.shape[1]
    embedder, info = build_embedder(cfg, n_channels)
    cfg = info["config"]
    size = cfg.crop_size or first.crops.shape[-1]
    precision = network_precision(target.type, cfg.precision, setting="embed.precision")
    batch_size = embed_batch_size(
        target.type, cfg.batch_size,
        pixels_per_crop=embedder.pixels_per_crop(n_channels, size),
    )  # fmt: skip
    applied = asdict(replace(cfg, enabled=True)) | {
        "crop_size": size,
        "precision": precision,  # the arithmetic used here, recorded and digested
        "batch_size": batch_size,  # recorded (as first embedded), not digested
    }
    name = f"{info['name']}_{recipe_digest(applied, info['weights'])}"
    embedder = on_device(embedder, target)
    width = embedder.width(n_channels, size)
    feature_set_id = store.ensure_feature_set(
        engine,
        run_id=run_id,
        name=name,
        kind="embedding",
        feature_names=[f"{name}_{k:04d}" for k in range(width)],
        config=applied,
        model_name=cfg.model_name,
        weights=info["weights"],
    )
    done = store.embedded_field_ids(engine, run_id, feature_set_id)
    ranges = (
        plate_channel_ranges(engine, run_id, fields, wells, size=size, config=cfg)
        if cfg.scaling == "plate"
        else {}
    )
    start = time.perf_counter()
    n_cells = n_fields = 0
    todo = set(fields.loc[fields["n_cells"] > 0, "field_id"]) - done
    scaled = (
        (field, scale_crops(field.crops, cfg.scaling, ranges.get(field.plate)))
        for field in iter_field_crops(
            engine, run_id, size=size, field_ids=todo, with_masks=cfg.pool == "cell"
        )
    )
    pending: list[tuple[FieldCrops, np.ndarray]] = []
    progress = tqdm(total=len(todo), unit="field", desc="embed", disable=None)
    writes, batches = _Writer(engine), store.FieldBatches()
    try:
        # reading and writing overlap the forward pass; None flushes the last group
        for item in chain(prefetch(scaled), [None]):
            if item is not None:
                pending.append(item)
                if sum(len(c) for _, c in pending) < GROUP_BATCHES * batch_size:
                    continue
            if pending:
                batch_size = _embed_and_write(
                    writes, batches, run_id, embedder, pending, feature_set_id, width,
                    batch_size, target, precision,
                )  # fmt: skip
                n_cells += sum(len(c) for _, c in pending)
                n_fields += len(pending)
                progress.update(len(pending))
                pending = []
    finally:  # also on an error: the fields embedded so far are kept
        _write_vectors(writes, run_id, feature_set_id, batches.take())
        writes.close()
    progress.close()
    seconds = time.perf_counter() - start
    logger.info(
        "embedded %d cells of %d fields into %s (%s) in %.1f s; %d fields were done",
        n_cells, n_fields, name, info["weights"], seconds, len(done),
    )  # fmt: skip
    aggregate_run(engine, run_id, name, method=cfg.aggregate)
    return {
        "feature_set": name,
        "combined_feature_set": register_combined(engine, run_id, name),
        "n_fields": n_fields,
        "n_cells": n_cells,
        "seconds": seconds,
        "cells_per_s": n_cells / seconds if seconds > 0 else 0.0,
        "batch_size": batch_size,
    }


def recipe_digest(recipe: dict[str, Any], weights: str) -> str:
    """Return 6 hex digits identifying what changes the vectors of a recipe.

    Everything but the batch size (which changes the vectors by float rounding at
    most, `pipeline.config.embed_batch_size`) and the weights' source
    and hash count, so another crop size, percentile or checkpoint makes another
    feature set instead of resuming the old one. ``precision`` counts unless it is
    float32 (or unset), so float32 recipes keep the digest they had before the
    option, and bfloat16 vectors (CUDA's default, or chosen on a CPU) never resume
    or mix with float32 ones.
    """
    payload = {k: v for k, v in recipe.items() if k not in ("batch_size", "enabled")}
    if payload.get("precision") in (None, "float32"):
        payload.pop("precision", None)
    text = json.dumps(payload | {"weights": weights}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def register_combined(engine: Engine, run_id: int, embedding: str) -> str | None:
    """Register ``combined_<embedding>``: the run's classical features + `embedding`.

    It stores no vectors: its well profiles are the two feature sets' well
    profiles, each normalized by the profile recipe on its own and weighted
    equally (`pipeline.views.export.read_profiles`).

    Returns
    -------
    str or None
        Its name; None when the run has no classical features.
    """
    sets = store.read_run_provenance(engine, run_id)["feature_sets"]
    if "classical" not in set(sets["name"]):
        return None
    name = f"combined_{embedding}"[:100]
    store.ensure_feature_set(
        engine, run_id=run_id, name=name, kind=COMBINED_KIND, feature_names=[],
        config={"blocks": ["classical", embedding]},
    )  # fmt: skip
    return name
