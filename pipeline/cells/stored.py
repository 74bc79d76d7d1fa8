"""Cells of a finished run read back from the store and the images, field by field.

`StoredFieldReader` reads a run's fields again as the run saw them (its files,
channels and illumination functions); `iter_field_crops` streams the crops (and
cell masks) of the stored cells of each field, for embedding, fine-tuning and
galleries. Nothing is written to disk.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from db import store
from db.session import retry_lost_connection
from pipeline.cells.crops import crop_cells, default_crop_size
from pipeline.config import config_from_dict
from pipeline.images.io import compile_pattern, load_field, resolve_under

#: Fields whose stored cells `iter_field_crops` reads in one query.
CELL_QUERY_FIELDS = 256
#: What to do when the store stays away while crops are read.
_THEN = "try again: an embedding or a training resumes where it stopped"


@dataclass(frozen=True)
class StoredFieldReader:
    """Reads a run's fields again as the run saw them (files, channels, illumination).

    Attributes
    ----------
    image_root : str
    channel_names : list of str
    channel_indexes : list of int or None
        Per channel, its plane in a multi-channel file (None: one file per channel).
    illumination : dict
        Plate id -> (C, Y', X') illumination function; empty when switched off.
    fields : DataFrame
        The run's completed fields (`db.store.read_run_fields`).
    """

    image_root: str
    channel_names: list[str]
    channel_indexes: list[int | None]
    illumination: dict[int, np.ndarray]
    fields: pd.DataFrame

    @classmethod
    def open(cls, engine: Engine, run_id: int) -> StoredFieldReader:
        """Read a run's config, fields and illumination functions from the store.

        Raises
        ------
        ValueError
            If the run does not exist.
        """
        config_toml, image_root, fields = store.read_run_fields(engine, run_id)
        config = config_from_dict(
            tomllib.loads(config_toml), source=f"run {run_id}", stored=True
        )
        names = list(config.input.channels)
        pattern = compile_pattern(
            layout=config.input.layout, pattern=config.input.pattern
        )
        indexes = (
            [None] * len(names)
            if "channel" in pattern.groupindex
            else [int(t) for t in config.input.channels.values()]
        )
        illumination = store.read_illumination(engine, run_id, names)
        return cls(image_root, names, indexes, illumination, fields)

    def read(self, field: Any) -> np.ndarray:
        """Return a field (a row of `fields`) corrected, (C, Y, X) float32.

        Raises
        ------
        OSError, ValueError
            If a file cannot be read, or its stored name leads outside the image
            root (`pipeline.images.io.resolve_under`).
        """
        paths = [
            str(resolve_under(self.image_root, field.files[name]))
            for name in self.channel_names
        ]
        return load_field(
            paths,
            channel_indexes=self.channel_indexes,
            illumination=self.illumination.get(field.plate_id),
        )[1]


@dataclass(frozen=True)
class FieldCrops:
    """The single-cell crops of one field (see `iter_field_crops`)."""

    field_id: int
    plate: str
    well: str
    site: int
    object_numbers: np.ndarray
    crops: np.ndarray
    masks: np.ndarray | None


def iter_field_crops(
    engine: Engine,
    run_id: int,
    *,
    size: int | None = None,
    include_flagged: bool = False,
    field_ids: set[int] | None = None,
    with_masks: bool = False,
) -> Iterator[FieldCrops]:
    """Stream crops of a run's cells field by field, without writing them to disk.

    Each field is read again and corrected with the run's stored illumination
    functions; crops are centred on the stored nucleus centroids. With
    `with_masks` each crop also gets its own cell's mask from the field's stored
    labels. The cells and masks are read a group of fields at a time, each read
    again after a lost connection (`db.session.retry_lost_connection`).

    Parameters
    ----------
    engine : Engine
    run_id : int
    size : int, optional
        Crop side; default `pipeline.cells.crops.default_crop_size` of the first field
        with cells.
    include_flagged : bool
        Also crop fields flagged by QC.
    field_ids : set of int, optional
        Only these fields.
    with_masks : bool
        Also return the cell masks.

    Yields
    ------
    FieldCrops
        ``crops`` (N, C, size, size) float32 and ``masks`` (N, size, size) bool, or
        None without `with_masks`.

    Raises
    ------
    ValueError
        If the run does not exist.
    """
    reader = StoredFieldReader.open(engine, run_id)
    fields = reader.fields
    if not include_flagged:
        fields = fields[fields["qc_flags"] == ""]
    if field_ids is not None:
        fields = fields[fields["field_id"].isin(field_ids)]
    cells: dict[int, pd.DataFrame] = {}
    labels: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, row in enumerate(fields.itertuples(index=False)):
        if i % CELL_QUERY_FIELDS == 0:  # one query per group of fields
            group = fields["field_id"].iloc[i : i + CELL_QUERY_FIELDS]
            named = f"{len(group)} field(s) ({group.iloc[0]}, ...)"
            cells = retry_lost_connection(
                partial(store.read_field_cells, engine, run_id, group),
                what=f"cells of {named}",
                then=_THEN,
            )
            if with_masks:
                labels = retry_lost_connection(
                    partial(store.read_field_masks, engine, run_id, group),
                    what=f"masks of {named}",
                    then=_THEN,
                )
        image = reader.read(row)
        stored = cells[int(row.field_id)]
        numbers = stored["object_number"].to_numpy()
        if size is None and len(stored):
            size = default_crop_size(stored["area_px"].to_numpy())
        crops, masks = crop_cells(
            image,
            np.column_stack(
                (stored["centroid_y"].to_numpy(), stored["centroid_x"].to_numpy())
            ),
            size or 64,
            cell_labels=labels[int(row.field_id)][1] if with_masks else None,
            object_numbers=numbers if with_masks else None,
        )
        yield FieldCrops(
            field_id=int(row.field_id),
            plate=row.Metadata_Plate,
            well=row.Metadata_Well,
            site=int(row.Metadata_Site),
            object_numbers=numbers,
            crops=crops,
            masks=masks,
        )
