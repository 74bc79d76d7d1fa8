"""Gallery images (compositing, outlines, sampling, crops) and the store caches."""

import numpy as np
import pandas as pd
import pytest

from db import store
from db.session import make_engine
from pipeline.cells.stored import StoredFieldReader, iter_field_crops
from pipeline.config import HitsConfig, ProfileConfig
from pipeline.images.io import resolve_under
from pipeline.views.export import (
    hit_table_names,
    hit_tables,
    read_hit_tables,
    read_profiles,
    read_well_profiles,
)
from pipeline.views.gallery import (
    composite,
    display_limits,
    draw_outlines,
    field_thumbnail,
    parse_cell_label,
    sample_cell_crops,
    sample_fields,
    selection_wells,
)
from tests.conftest import copy_store


def test_composite_colours_each_channel_between_its_limits():
    images = np.zeros((2, 2, 4, 4), np.float32)
    images[0, 0] = 10.0  # channel 0 of image 0 at its upper limit -> blue
    images[1, 1, 0, 0] = 5.0  # half of channel 1's range -> half green
    limits = np.array([[0.0, 10.0], [0.0, 10.0]])
    rgb = composite(images, limits)
    assert rgb.shape == (2, 4, 4, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0, 0]) == (0, 114, 255)
    assert tuple(rgb[1, 0, 0]) == (0, 127, 0) and rgb[1, 1, 1].sum() == 0
    only_green = composite(images, limits, channels=[1])
    assert only_green[0].sum() == 0
    with pytest.raises(ValueError, match="do not match"):
        composite(images, limits[:1])
    with pytest.raises(ValueError, match="out of range"):
        composite(images, limits, channels=[2])


def test_display_limits_are_per_channel_percentiles():
    rng = np.random.default_rng(0)
    image = np.stack([rng.uniform(0, 1, (50, 50)), rng.uniform(100, 200, (50, 50))])
    limits = display_limits(image, low=0, high=100)
    np.testing.assert_allclose(limits, [[image[0].min(), image[0].max()],
                                        [image[1].min(), image[1].max()]])  # fmt: skip
    flat = display_limits(np.zeros((1, 4, 4)))
    assert flat[0, 1] > flat[0, 0]  # never a zero range
    with pytest.raises(ValueError, match="expected"):
        display_limits(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="percentiles"):
        display_limits(image, low=50, high=10)


def test_draw_outlines_paints_object_boundaries_only():
    rgb = np.zeros((9, 9, 3), np.uint8)
    labels = np.zeros((9, 9), int)
    labels[2:7, 2:7] = 1
    out = draw_outlines(rgb, labels, color=(255, 0, 0))
    painted = out[..., 0] == 255
    assert painted[2, 2:7].all() and not painted[4, 4] and not painted[0, 0]
    assert rgb.sum() == 0  # a copy
    with pytest.raises(ValueError, match="line up"):
        draw_outlines(rgb, labels[:5])


def test_field_thumbnail_shrinks_large_fields_and_rejects_tiny_sides():
    image = np.random.default_rng(1).uniform(0, 1, (2, 1000, 600)).astype(np.float32)
    labels = np.zeros((1000, 600), int)
    labels[100:300, 100:300] = 1
    thumb = field_thumbnail(image, labels, labels, limits=display_limits(image),
                            max_side=250)  # fmt: skip
    assert thumb.shape == (250, 150, 3)
    with pytest.raises(ValueError, match="max_side"):
        field_thumbnail(image, None, None, limits=display_limits(image), max_side=4)


def test_sample_fields_spreads_over_wells_first():
    fields = pd.DataFrame(
        {"field_id": range(8), "Metadata_Plate": "P",
         "Metadata_Well": ["A01"] * 4 + ["A02"] * 3 + ["A03"],
         "n_cells": [5, 5, 5, 5, 5, 5, 5, 0]}
    )  # fmt: skip
    picked = sample_fields(fields, 2, rng=3)
    assert set(picked["Metadata_Well"]) == {"A01", "A02"}  # A03 has no cells
    assert len(sample_fields(fields, 100)) == 7
    pd.testing.assert_frame_equal(sample_fields(fields, 3, rng=5),
                                  sample_fields(fields, 3, rng=5))  # fmt: skip
    with pytest.raises(ValueError, match="n_fields"):
        sample_fields(fields, 0)
    with pytest.raises(ValueError, match="lacks"):
        sample_fields(fields.drop(columns="n_cells"), 1)


def test_parse_cell_label_and_rejects():
    assert parse_cell_label("PL/ATE-1/B03/s2#17") == ("PL/ATE-1", "B03", 2, 17)
    with pytest.raises(ValueError, match="plate/well"):
        parse_cell_label("P1/B03")


def test_selection_wells_maps_points_to_wells():
    wells = pd.DataFrame(
        {"Metadata_Plate": ["P1", "P1", "P2", "P1"],
         "Metadata_Well": ["A01", "A02", "A01", "A03"],
         "Metadata_Compound": ["X", "X", "X", "DMSO"],
         "Metadata_Concentration": [1.0, 0.1, 1.0, np.nan]}
    )  # fmt: skip
    points = pd.DataFrame(
        {"level": ["compound_dose", "well", "compound_dose"],
         "plate": [None, "P1", None], "well": [None, "A02", None],
         "compound": ["X", "X", "DMSO"], "concentration": [1.0, 0.1, np.nan]}
    )  # fmt: skip
    got = selection_wells(points, wells)
    assert set(got.itertuples(index=False, name=None)) == {
        ("P1", "A02"), ("P1", "A01"), ("P2", "A01"), ("P1", "A03")
    }  # fmt: skip
    with pytest.raises(ValueError, match="points lacks"):
        selection_wells(points.drop(columns="level"), wells)


def test_resolve_under_refuses_paths_outside_the_root(tmp_path):
    (tmp_path / "images").mkdir()
    assert resolve_under(tmp_path / "images", "a/b.tif") == (
        tmp_path / "images" / "a" / "b.tif"
    )
    for escape in ("../secret.tif", "/etc/passwd", "a/../../x.tif"):
        with pytest.raises(ValueError, match="outside the image root"):
            resolve_under(tmp_path / "images", escape)


def test_sample_cell_crops_of_wells_and_of_exact_cells(demo_run):
    engine = make_engine(demo_run[0], create=False)
    wells = pd.DataFrame({"Metadata_Plate": ["DEMO-P1"] * 3,
                          "Metadata_Well": ["B02", "C03", "D04"]})  # fmt: skip
    crops, masks, table = sample_cell_crops(engine, 1, wells=wells, n_cells=10)
    assert len(crops) == len(masks) == len(table) == 10
    assert crops.shape[1] == 3 and masks.dtype == bool and masks.any(axis=(1, 2)).all()
    assert set(table["Metadata_Well"]) <= {"B02", "C03", "D04"}
    again = sample_cell_crops(engine, 1, wells=wells, n_cells=10)[2]
    pd.testing.assert_frame_equal(table, again)  # seeded
    exact = [tuple(table.iloc[0]), tuple(table.iloc[1])]
    crops2, _, table2 = sample_cell_crops(engine, 1, cells=exact)
    assert list(table2.itertuples(index=False, name=None)) == sorted(exact)
    # each crop's mask is its own stored cell: centred on the crop
    centre = crops2.shape[-1] // 2
    assert sample_cell_crops(engine, 1, cells=exact)[1][:, centre, centre].all()
    none = sample_cell_crops(engine, 1, wells=wells.iloc[:0])
    assert len(none[0]) == 0 and list(none[2].columns)[-1] == "Metadata_ObjectNumber"
    with pytest.raises(ValueError, match="give wells or cells"):
        sample_cell_crops(engine, 1)
    with pytest.raises(ValueError, match="n_cells"):
        sample_cell_crops(engine, 1, wells=wells, n_cells=0)


def test_stored_masks_match_the_stored_cells(demo_run):
    engine = make_engine(demo_run[0], create=False)
    reader = StoredFieldReader.open(engine, 1)
    field = reader.fields.iloc[5]
    nuclei, cells = store.read_field_masks(engine, 1, [field["field_id"]])[
        field["field_id"]
    ]
    stored = store.read_field_cells(engine, 1, [field["field_id"]])[field["field_id"]]
    assert nuclei.max() == cells.max() == len(stored)
    areas = np.bincount(nuclei.ravel())[1:]
    np.testing.assert_array_equal(areas, stored["area_px"])
    assert reader.read(next(reader.fields.itertuples())).dtype == np.float32


def test_stored_field_reader_refuses_file_names_outside_the_root(demo_run, tmp_path):
    url = copy_store(demo_run[0], tmp_path)
    engine = make_engine(url, create=False)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            'UPDATE field SET files = \'{"DNA": "../../etc/passwd", '
            '"Actin": "x.tif", "Mito": "y.tif"}\' WHERE id = 1'
        )
    with pytest.raises(ValueError, match="outside the image root"):
        next(iter_field_crops(engine, 1, field_ids={1}))


def test_well_profiles_come_from_the_cache_and_equal_a_fresh_aggregation(demo_run,
                                                                         tmp_path):  # fmt: skip
    url = copy_store(demo_run[0], tmp_path)
    engine = make_engine(url, create=False)
    from_store = read_well_profiles(engine, 1, 1)  # cached now if it was not
    cached = store.read_well_aggregates(engine, 1, "classical", include_flagged=False)
    assert cached is not None
    assert len(cached) == (from_store["Metadata_CellCount"] > 0).sum()  # with cells
    with engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM well_aggregate")
    fresh = read_well_profiles(engine, 1, 1)
    pd.testing.assert_frame_equal(from_store, fresh, check_dtype=False)
    pd.testing.assert_frame_equal(read_well_profiles(engine, 1, 1), fresh,
                                  check_dtype=False)  # fmt: skip


def assert_same_table(left, right):
    """Equal values; a missing value may be None or NaN (Parquet keeps None)."""
    pd.testing.assert_frame_equal(
        left.astype(object).where(left.notna(), None),
        right.astype(object).where(right.notna(), None),
    )


def test_hit_tables_are_cached_in_the_store_until_the_run_changes(demo_run, tmp_path):
    url = copy_store(demo_run[0], tmp_path)
    engine = make_engine(url, create=False)
    hits, doses = read_hit_tables(engine, 1, 1)
    # the run's recipe and hit settings: the default ones
    names = hit_table_names(ProfileConfig(), HitsConfig())
    assert names != hit_table_names(ProfileConfig(), HitsConfig(fdr=0.1))
    cached = store.read_cached_tables(
        engine, 1, "classical", include_flagged=False, names=names
    )
    assert cached is not None
    assert_same_table(cached[names[0]], hits)
    assert_same_table(cached[names[1]], doses)
    assert_same_table(read_hit_tables(engine, 1, 1)[0], hits)  # from the cache
    fresh = hit_tables(read_profiles(engine, 1, 1)[1])[0]
    columns = ["rank", "Metadata_Compound", "is_hit", "n_active_doses"]
    pd.testing.assert_frame_equal(hits[columns], fresh[columns])
    looser, _ = read_hit_tables(engine, 1, 1, settings=HitsConfig(fdr=0.2))
    assert (looser["fdr"] == 0.2).all() and looser["is_hit"].sum() >= hits[
        "is_hit"
    ].sum()
    flags = pd.Series({int(store.read_field_qc(engine, 1)["field_id"].iloc[0]): "x"})
    store.write_field_flags(engine, 1, flags)  # the run changed: caches dropped
    assert (
        store.read_cached_tables(
            engine, 1, "classical", include_flagged=False, names=names[:1]
        )
        is None
    )
    with pytest.raises(ValueError, match="at most 50"):
        store.write_cached_tables(
            engine, 1, "classical", include_flagged=False, tables={"x" * 51: hits}
        )
