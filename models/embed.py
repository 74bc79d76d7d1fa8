"""Single-cell embeddings from an ImageNet-pretrained timm backbone.

Crops are streamed field by field from a run (`pipeline.run.iter_field_crops`),
scaled per plate and channel between robust percentiles fitted on the plate's
negative-control cells (not ImageNet statistics), embedded in batches by a
DataLoader under ``torch.inference_mode`` (CUDA with bfloat16 autocast, pinned
memory and channels_last when present; CPU otherwise) and written to the store per
field, one transaction each, as a feature set that records the model, the weights'
source and hash and the preprocessing. A rerun skips fields already embedded.

Two ways to feed C-channel microscopy to an RGB network (``strategy``):

- ``stem``: one pass with a ``C``-channel stem adapted by timm from the RGB weights;
- ``rgb``: each channel replicated to RGB and embedded on its own, the C vectors
  concatenated (pure ImageNet features, C times the compute).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain
from queue import Queue
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from sqlalchemy import Engine
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from db import store
from models.backbones import (
    DEFAULT_MODEL,
    OFFLINE_NORMALIZATION,
    create_backbone,
    load_checkpoint,
)
from pipeline.errors import InputError
from pipeline.export import aggregate_run
from pipeline.run import FieldCrops, iter_field_crops

logger = logging.getLogger(__name__)

STRATEGIES = ("stem", "rgb")
#: Fields are embedded together until they fill this many batches.
GROUP_BATCHES = 4
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """How cells are embedded (saved with the feature set).

    Attributes
    ----------
    model_name : str
        A timm model name.
    weights : str
        ``auto``, ``package``, ``hub`` or a checkpoint path (`create_backbone`).
    strategy : str
        ``stem`` or ``rgb`` (see the module docstring).
    crop_size : int or None
        Crop side in pixels; None: four median nucleus diameters.
    batch_size : int
    percentiles : tuple of float
        Low and high percentiles of control-cell pixels that map to 0 and 1.
    max_control_fields : int
        Negative-control fields per plate used to fit the percentiles.
    checkpoint : str or None
        A fine-tuned checkpoint (`models.train.save_checkpoint`) to embed with
        instead of `model_name` and `weights`.
    pca_dim : int or None
        Also store the embedding reduced to this many principal components fitted
        on negative-control cells (`fit_control_pca`), as ``<feature set>_pca<k>``.
    """

    model_name: str = DEFAULT_MODEL
    weights: str = "auto"
    strategy: str = "stem"
    crop_size: int | None = None
    batch_size: int = 64
    percentiles: tuple[float, float] = (1.0, 99.9)
    max_control_fields: int = 20
    checkpoint: str | None = None
    pca_dim: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint and self.strategy != "stem":
            raise ValueError(
                "a fine-tuned checkpoint has a C-channel stem; use strategy 'stem'."
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy {self.strategy!r} is unknown; choose one of {STRATEGIES}."
            )
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(
                f"percentiles {self.percentiles} must rise within [0, 100]."
            )
        if self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"pca_dim = {self.pca_dim} must be >= 1.")
        if self.batch_size < 1 or self.max_control_fields < 1:
            raise ValueError("batch_size and max_control_fields must be >= 1.")


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
    ranges[:, 1] = np.maximum(ranges[:, 1], ranges[:, 0] + 1e-6)
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
    low = ranges[None, :, 0, None, None]
    high = ranges[None, :, 1, None, None]
    scaled = np.clip((crops.astype(np.float32) - low) / (high - low), 0, 1)
    mean, std = OFFLINE_NORMALIZATION
    return ((scaled - mean) / std).astype(np.float32)


def make_embedder(
    model: torch.nn.Module, strategy: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return batch (B, C, S, S) -> features: stem (one pass) or rgb (per channel).

    Raises
    ------
    ValueError
        If `strategy` is unknown.
    """
    if strategy == "stem":
        return model
    if strategy == "rgb":

        def per_channel(batch: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [model(batch[:, [c, c, c]]) for c in range(batch.shape[1])], dim=1
            )

        return per_channel
    raise ValueError(f"strategy {strategy!r} is unknown; choose one of {STRATEGIES}.")


def embed_array(
    embedder: Callable[[torch.Tensor], torch.Tensor],
    crops: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Embed normalized crops in batches through a DataLoader.

    Returns
    -------
    ndarray of shape (N, D), float32
    """
    if not len(crops):
        return np.zeros((0, 0), dtype=np.float32)
    cuda = device.type == "cuda"
    loader = DataLoader(
        TensorDataset(torch.from_numpy(crops)),
        batch_size=batch_size,
        pin_memory=cuda,
    )
    out = []
    with torch.inference_mode():
        for (batch,) in loader:
            batch = batch.to(device, non_blocking=cuda).contiguous(
                memory_format=torch.channels_last
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out.append(embedder(batch).float().cpu())
    return torch.cat(out).numpy()


def _embed_and_write(
    writes: _Writer,
    run_id: int,
    embedder: Callable[[torch.Tensor], torch.Tensor],
    fields: list[tuple[FieldCrops, np.ndarray]],
    feature_set_id: int,
    width: int,
    batch_size: int,
    device: torch.device,
) -> int:
    """Embed fields' crops together; queue each field's write (one transaction).

    Returns the batch size that fitted on the device.
    """
    vectors, batch_size = embed_with_backoff(
        embedder,
        np.concatenate([crops for _, crops in fields]),
        batch_size=batch_size,
        device=device,
    )
    offsets = np.cumsum([0] + [len(crops) for _, crops in fields])
    for (field, _), lo, hi in zip(fields, offsets[:-1], offsets[1:], strict=True):
        writes.submit(
            store.write_field_vectors,
            run_id=run_id,
            field_id=field.field_id,
            feature_set_id=feature_set_id,
            object_numbers=field.object_numbers,
            vectors=vectors[lo:hi].reshape(hi - lo, width),
        )
    return batch_size


class _Writer:
    """Store writes on one background thread, so they overlap the forward pass.

    At most `depth` writes wait; `close` waits for all and raises the first error.
    """

    def __init__(self, engine: Engine, depth: int = 16) -> None:
        self._engine, self._depth = engine, depth
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[Future] = deque()

    def submit(self, write: Callable[..., None], **kwargs: object) -> None:
        self._pending.append(self._pool.submit(write, self._engine, **kwargs))
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
    embedder: Callable[[torch.Tensor], torch.Tensor],
    crops: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, int]:
    """`embed_array`, halving the batch and going on when the GPU runs out of memory.

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
                embedder, crops, batch_size=batch_size, device=device
            ), batch_size
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


def fit_control_pca(
    engine: Engine,
    run_id: int,
    feature_set: str,
    n_components: int,
    *,
    max_cells: int = 50_000,
    rng: int = 0,
) -> dict[str, object]:
    """Fit PCA on a feature set's negative-control cells and store the projection.

    The components are fitted on up to `max_cells` negative-control cells (all
    plates), so the axes describe DMSO variation and treatments are expressed in
    them; they are stored with the new feature set ``<feature_set>_pca<k>`` (its
    config holds ``components``, ``mean`` and ``explained_variance_ratio``), and
    every cell's projection is written field by field (one transaction each; a
    rerun skips fields already projected).

    Returns
    -------
    dict
        ``feature_set``, ``n_fields``, ``n_control_cells``,
        ``explained_variance``.

    Raises
    ------
    ValueError
        If there are fewer control cells than `n_components` + 1.
    """
    from sklearn.decomposition import PCA

    run_id, experiment_id = store.resolve_run(engine, run_id)
    wells = store.read_wells(engine, experiment_id)
    controls = set(wells.loc[wells["Metadata_Role"] == "negative_control", "well_id"])
    parts = [
        features[cells["well_id"].isin(controls).to_numpy()]
        for _, cells, features in store.iter_plate_cells(engine, run_id, feature_set)
    ]
    control = pd.concat(parts).to_numpy(np.float32) if parts else np.zeros((0, 0))
    if len(control) <= n_components:
        raise ValueError(
            f"{len(control)} negative-control cells cannot fit {n_components} "
            "principal components; lower pca_dim."
        )
    generator = np.random.default_rng(rng)
    if len(control) > max_cells:
        control = control[generator.choice(len(control), max_cells, replace=False)]
    pca = PCA(n_components=n_components, random_state=rng).fit(control)
    name = f"{feature_set}_pca{n_components}"
    feature_set_id = store.ensure_feature_set(
        engine,
        run_id=run_id,
        name=name,
        kind="embedding",
        feature_names=[f"{name}_{k:03d}" for k in range(n_components)],
        config={
            "source": feature_set,
            "fitted_on": f"{len(control)} negative-control cells",
            "components": pca.components_.tolist(),
            "mean": pca.mean_.tolist(),
            "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
        },
    )
    done = store.embedded_field_ids(engine, run_id, feature_set_id)
    n_fields = 0
    for field_id, numbers, vectors in store.iter_field_vectors(
        engine, run_id, feature_set
    ):
        if field_id in done:
            continue
        store.write_field_vectors(
            engine,
            run_id=run_id,
            field_id=field_id,
            feature_set_id=feature_set_id,
            object_numbers=numbers,
            vectors=pca.transform(vectors),
        )
        n_fields += 1
    return {
        "feature_set": name,
        "n_fields": n_fields,
        "n_control_cells": len(control),
        "explained_variance": float(pca.explained_variance_ratio_.sum()),
    }


def embed_run(
    engine: Engine,
    run_id: int | None = None,
    config: EmbedConfig | None = None,
    *,
    device: str | None = None,
) -> dict[str, float]:
    """Embed every cell of a run's QC-passed fields into a new feature set.

    Parameters
    ----------
    engine : Engine
    run_id : int, optional
        Default: the latest complete run.
    config : EmbedConfig, optional
    device : str, optional
        ``cuda`` or ``cpu``; default CUDA when available.

    Returns
    -------
    dict
        ``feature_set``, ``pca_feature_set`` (None without ``pca_dim``),
        ``n_fields``, ``n_cells``, ``seconds``, ``cells_per_s``.

    Raises
    ------
    InputError
        If the model or its weights cannot be obtained.
    ValueError
        If the run does not exist or has no negative-control cells on a plate.
    """
    cfg = config or EmbedConfig()
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_id, experiment_id = store.resolve_run(engine, run_id)
    fields = store.read_run_fields(engine, run_id)[2]
    wells = store.read_wells(engine, experiment_id)
    fields = fields[fields["qc_flags"] == ""]
    first = next(iter_field_crops(engine, run_id, size=cfg.crop_size), None)
    if first is None:
        raise ValueError(f"run {run_id} has no field that passed QC to embed.")
    n_channels, size = first.crops.shape[1], first.crops.shape[-1]
    if cfg.checkpoint:
        model, meta = load_checkpoint(cfg.checkpoint)
        if meta["in_chans"] != n_channels:
            raise InputError(
                f"checkpoint {cfg.checkpoint} was trained on {meta['in_chans']} "
                f"channels; run {run_id} has {n_channels}. Fine-tune on this run's "
                "channels (phenoscreen train)."
            )
        size = cfg.crop_size or meta["crop_size"]
        model_name = meta["model_name"]
        name = f"{model_name}_finetuned_{meta['sha256'][:8]}"
        weights = f"checkpoint:{cfg.checkpoint} sha256:{meta['sha256']}"
    else:
        model, info = create_backbone(
            cfg.model_name,
            in_chans=n_channels if cfg.strategy == "stem" else 3,
            weights=cfg.weights,
        )
        model_name, name = cfg.model_name, f"{cfg.model_name}_{cfg.strategy}"
        weights = f"{info.source} sha256:{info.sha256}"
    model = model.to(target).to(memory_format=torch.channels_last)
    width = model.num_features * (n_channels if cfg.strategy == "rgb" else 1)
    feature_set_id = store.ensure_feature_set(
        engine,
        run_id=run_id,
        name=name,
        kind="embedding",
        feature_names=[f"{name}_{k:04d}" for k in range(width)],
        config=asdict(cfg) | {"crop_size": size, "normalization": "per plate and "
                              "channel, percentiles of negative-control cells"},
        model_name=model_name,
        weights=weights,
    )  # fmt: skip
    done = store.embedded_field_ids(engine, run_id, feature_set_id)
    embedder = make_embedder(model, cfg.strategy)
    ranges = plate_channel_ranges(engine, run_id, fields, wells, size=size, config=cfg)
    start = time.perf_counter()
    n_cells = n_fields = 0
    batch_size = cfg.batch_size
    todo = set(fields.loc[fields["n_cells"] > 0, "field_id"]) - done
    normalized = (
        (field, normalize_crops(field.crops, ranges[field.plate]))
        for field in iter_field_crops(engine, run_id, size=size, field_ids=todo)
    )
    pending: list[tuple[FieldCrops, np.ndarray]] = []
    progress = tqdm(total=len(todo), unit="field", disable=None)
    writes = _Writer(engine)
    try:
        # reading and writing overlap the forward pass; None flushes the last group
        for item in chain(prefetch(normalized), [None]):
            if item is not None:
                pending.append(item)
                if sum(len(c) for _, c in pending) < GROUP_BATCHES * batch_size:
                    continue
            if pending:
                batch_size = _embed_and_write(
                    writes, run_id, embedder, pending, feature_set_id, width, batch_size,
                    target,
                )  # fmt: skip
                n_cells += sum(len(c) for _, c in pending)
                n_fields += len(pending)
                progress.update(len(pending))
                pending = []
    finally:
        writes.close()
    progress.close()
    seconds = time.perf_counter() - start
    logger.info(
        "embedded %d cells of %d fields with %s (%s, %s) in %.1f s; %d fields were done",
        n_cells, n_fields, model_name, cfg.strategy, weights, seconds, len(done),
    )  # fmt: skip
    reduced = {"feature_set": None}
    if cfg.pca_dim:
        reduced = fit_control_pca(engine, run_id, name, cfg.pca_dim)
        logger.info(
            "%s: %d components keep %.0f %% of the DMSO variance",
            reduced["feature_set"], cfg.pca_dim, 100 * reduced["explained_variance"],
        )  # fmt: skip
    for feature_set in filter(None, (name, reduced["feature_set"])):
        aggregate_run(engine, run_id, feature_set, kind="embedding")
    return {
        "feature_set": name,
        "pca_feature_set": reduced["feature_set"],
        "n_fields": n_fields,
        "n_cells": n_cells,
        "seconds": seconds,
        "cells_per_s": n_cells / seconds if seconds > 0 else 0.0,
    }
