import re
import threading
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from db import store
from db.schema import FeatureSet
from db.session import make_engine, session_scope
from models.backbones import create_backbone
from models.embed import (
    CellEmbedder,
    EmbedConfig,
    block_index,
    embed_array,
    embed_run,
    embed_with_backoff,
    fit_channel_ranges,
    mask_pool,
    minmax_crops,
    normalize_crops,
    prefetch,
    recipe_digest,
    scale_crops,
)
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.views.export import iter_cell_tables, read_profiles, read_well_profiles
from tests.conftest import copy_store


def test_fit_channel_ranges_and_normalize():
    rng = np.random.default_rng(0)
    crops = rng.uniform(0, 100, (4, 2, 8, 8)).astype(np.float32)
    crops[:, 1] *= 10
    masks = np.ones((4, 8, 8), bool)
    ranges = fit_channel_ranges(crops, masks, (0, 100))
    np.testing.assert_allclose(ranges[:, 0], crops.min(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(ranges[:, 1], crops.max(axis=(0, 2, 3)), rtol=1e-6)
    normalized = normalize_crops(crops, ranges)
    assert normalized.min() == pytest.approx(-1) and normalized.max() == pytest.approx(
        1
    )
    assert normalized.dtype == np.float32
    # a constant channel in raw counts still gets a range and finite values
    flat = np.full((2, 1, 8, 8), 5000, np.uint16)
    flat_range = fit_channel_ranges(flat, np.ones((2, 8, 8), bool), (1, 99))
    assert flat_range[0, 1] > flat_range[0, 0]
    assert np.isfinite(normalize_crops(flat, flat_range)).all()


def test_fit_and_normalize_reject():
    with pytest.raises(ValueError, match="no cell pixels"):
        fit_channel_ranges(np.zeros((1, 1, 4, 4)), np.zeros((1, 4, 4), bool), (1, 99))
    with pytest.raises(ValueError, match=r"\(N, C, S, S\)"):
        fit_channel_ranges(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), (1, 99))
    with pytest.raises(ValueError, match=r"\(C, 2\)"):
        normalize_crops(np.zeros((1, 2, 4, 4)), np.zeros((3, 2)))
    with pytest.raises(InputError, match="strategy"):
        EmbedConfig(strategy="mean")
    with pytest.raises(InputError, match="percentiles"):
        EmbedConfig(percentiles=(50, 10))
    with pytest.raises(InputError, match="layer"):
        EmbedConfig(layer="head")
    with pytest.raises(InputError, match="scaling"):
        EmbedConfig(scaling="global")
    with pytest.raises(InputError, match="embed.pool"):
        EmbedConfig(pool="nucleus")
    with pytest.raises(InputError, match="input_size"):
        EmbedConfig(input_size=4)


def test_minmax_and_scale_crops():
    crops = np.zeros((2, 2, 4, 4), np.float32)
    crops[0, 0] = np.arange(16).reshape(4, 4)
    crops[0, 1] = 5.0  # constant channel
    crops[1] = 100 + 2 * crops[0]
    scaled = minmax_crops(crops)
    assert scaled[0, 0].min() == -1 and scaled[0, 0].max() == 1
    np.testing.assert_array_equal(scaled[0, 1], -1)
    np.testing.assert_allclose(scaled[0], scaled[1])  # brightness is scaled away
    ranges = np.array([[0, 30], [0, 10]], np.float32)
    np.testing.assert_allclose(
        scale_crops(crops, "plate", ranges), normalize_crops(crops, ranges)
    )
    np.testing.assert_allclose(scale_crops(crops, "crop"), scaled)
    with pytest.raises(ValueError, match="ranges"):
        scale_crops(crops, "plate")
    with pytest.raises(ValueError, match="scaling"):
        scale_crops(crops, "well")
    with pytest.raises(ValueError, match=r"\(N, C, S, S\)"):
        minmax_crops(crops[0])


def test_cell_embedder_layers_strategies_and_sizes():
    crops = np.random.default_rng(1).uniform(-1, 1, (5, 3, 32, 32)).astype(np.float32)
    rgb, _ = create_backbone(in_chans=3)
    cpu = torch.device("cpu")
    pooled = CellEmbedder(
        rgb, strategy="stem", layer="pooled", input_size=None, pool="crop"
    )
    a = embed_array(pooled, crops, batch_size=2, device=cpu)
    b = embed_array(pooled, crops, batch_size=5, device=cpu)
    assert a.shape == (5, rgb.num_features) == (5, pooled.width(3))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # batch size does not matter
    per_channel = CellEmbedder(
        rgb, strategy="rgb", layer="blocks.5", input_size=64, pool="crop"
    )
    vectors = embed_array(per_channel, crops, batch_size=4, device=cpu)
    assert vectors.shape == (5, 3 * 192) == (5, per_channel.width(3))
    with torch.inference_mode():  # channel c of the vector is channel c as RGB
        (maps,) = rgb.forward_intermediates(
            torch.nn.functional.interpolate(
                torch.from_numpy(crops[:, 1:2]).expand(-1, 3, -1, -1), size=(64, 64),
                mode="bilinear", align_corners=False,
            ),
            indices=[6], intermediates_only=True, extra_blocks=True,
        )  # fmt: skip
    np.testing.assert_allclose(
        vectors[:, 192:384], maps.mean((-2, -1)).numpy(), rtol=1e-4, atol=1e-4
    )
    assert embed_array(pooled, crops[:0], batch_size=2, device=cpu).shape[0] == 0
    # network input pixels per crop: stem one image at its own side, rgb one per
    # channel at input_size
    assert pooled.pixels_per_crop(3, 32) == 32 * 32
    assert per_channel.pixels_per_crop(3, 32) == 3 * 64 * 64
    with pytest.raises(ValueError, match="strategy"):
        CellEmbedder(rgb, strategy="mean", layer="pooled", input_size=None, pool="crop")
    with pytest.raises(ValueError, match="pool 'box'"):
        CellEmbedder(rgb, strategy="rgb", layer="pooled", input_size=None, pool="box")
    with pytest.raises(InputError, match="blocks.0 to blocks.6"):
        block_index(rgb, "blocks.7")
    with pytest.raises(InputError, match="EfficientNet"):
        block_index(torch.nn.Linear(2, 2), "blocks.1")
    assert block_index(rgb, "pooled") is None and block_index(rgb, "blocks.2") == 3


def test_mask_pool_averages_over_the_cell_and_rejects():
    maps = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True  # the top-left quarter: grid squares (0..1, 0..1)
    masks[0, 0, 4] = True  # a quarter of square (0, 2)
    pooled = mask_pool(maps, masks)
    weights = torch.zeros(4, 4)
    weights[:2, :2], weights[0, 2] = 1.0, 0.25
    expected = (maps[0] * weights).sum((-2, -1)) / weights.sum()
    torch.testing.assert_close(pooled[0], expected)
    # an empty mask (no cell pixel in the crop): the whole map
    torch.testing.assert_close(pooled[1], maps[1].mean((-2, -1)))
    with pytest.raises(ValueError, match="same B"):
        mask_pool(maps, masks[:1])
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        mask_pool(maps[0], masks)


def test_cell_pooling_embedder_reads_the_masks():
    rng = np.random.default_rng(2)
    crops = torch.from_numpy(rng.uniform(-1, 1, (3, 2, 32, 32)).astype(np.float32))
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    rgb, _ = create_backbone(in_chans=3)
    cell = CellEmbedder(rgb, strategy="rgb", layer="blocks.3", input_size=64,
                        pool="cell").eval()  # fmt: skip
    crop = CellEmbedder(rgb, strategy="rgb", layer="blocks.3", input_size=64,
                        pool="crop").eval()  # fmt: skip
    with torch.inference_mode():
        (maps,) = rgb.forward_intermediates(
            torch.nn.functional.interpolate(
                crops.reshape(6, 1, 32, 32), size=(64, 64), mode="bilinear",
                align_corners=False,
            ).expand(-1, 3, -1, -1),
            indices=[4], intermediates_only=True, extra_blocks=True,
        )  # fmt: skip
        maps = maps.reshape(3, 2 * 80, *maps.shape[-2:])
        torch.testing.assert_close(cell(crops, masks), mask_pool(maps, masks))
        torch.testing.assert_close(crop(crops), maps.mean((-2, -1)))
        assert cell.width(2) == 160
        final = CellEmbedder(rgb, strategy="rgb", layer="pooled", input_size=None,
                             pool="cell").eval()  # fmt: skip
        full = torch.ones(3, 32, 32, dtype=torch.bool)  # the whole crop: as timm pools
        torch.testing.assert_close(
            final(crops, full), rgb(crops.reshape(6, 1, 32, 32).expand(-1, 3, -1, -1))
            .reshape(3, -1), rtol=1e-4, atol=1e-5,
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs each crop's cell mask"):
        cell(crops)
    with pytest.raises(ValueError, match=r"masks \(3, 16, 16\)"):
        embed_array(cell, crops.numpy(), masks[:, :16, :16].numpy(), batch_size=2,
                    device=torch.device("cpu"))  # fmt: skip


FAST_RECIPE = EmbedConfig(
    crop_size=32, input_size=None, layer="blocks.2", batch_size=128
)
FAST_NAME = "tf_efficientnet_lite0_rgb_blocks.2_cell_native_plate_median"


def test_embed_run_writes_one_vector_per_cell_and_resumes(demo_run, capsys):
    url, summary = demo_run
    engine = make_engine(url, create=False)
    result = embed_run(engine, summary.run_id, FAST_RECIPE)
    name = result["feature_set"]
    assert re.fullmatch(rf"{re.escape(FAST_NAME)}_[0-9a-f]{{6}}", name)
    assert result["combined_feature_set"] == f"combined_{name}"
    assert result["n_cells"] == summary.n_cells
    assert result["n_fields"] == 95  # the demo has one field without cells (cell loss)
    feature_set_id, names = store.read_feature_set(engine, summary.run_id, name)
    assert len(names) == 3 * 40  # blocks[2] has 40 channels, one block per channel
    cells = sum(
        len(c) for _, c, f in store.iter_plate_cells(engine, summary.run_id, name)
    )
    assert cells == summary.n_cells
    again = embed_run(engine, summary.run_id, FAST_RECIPE)
    assert again["n_fields"] == 0 and again["n_cells"] == 0  # resumed: nothing to do
    assert store.resolve_feature_set(engine, summary.run_id, "deep") == (
        name, "embedding"
    )  # fmt: skip
    profiles = read_well_profiles(
        engine, summary.run_id, summary.experiment_id, feature_set="deep"
    )
    assert profiles.filter(like=name).shape[1] == 120
    # the recipe's median: a well's profile is the median of its cells' vectors
    well = profiles.iloc[0]
    _, cells, vectors = next(store.iter_plate_cells(engine, summary.run_id, name))
    wells = store.read_wells(engine, summary.experiment_id)
    well_id = int(wells.loc[(wells["Metadata_Plate"] == well["Metadata_Plate"])
                            & (wells["Metadata_Well"] == well["Metadata_Well"]),
                            "well_id"].iloc[0])  # fmt: skip
    np.testing.assert_allclose(
        profiles.filter(like=name).iloc[0].to_numpy(float),
        vectors[(cells["well_id"] == well_id).to_numpy()].median().to_numpy(float),
        rtol=1e-5,
    )
    raw, normalized = read_profiles(
        engine, summary.run_id, summary.experiment_id, feature_set="combined"
    )
    assert raw.filter(like=name).shape[1] == 120
    assert "Nuclei_AreaShape_Area" in raw.columns
    deep = [c for c in normalized.columns if c.startswith(name)]
    classical = [c for c in normalized.columns if c.startswith(("Nuclei_", "Cells_"))]
    assert deep and classical
    with pytest.raises(ValueError, match="one feature set at a time"):
        next(iter_cell_tables(engine, summary.run_id, summary.experiment_id,
                              feature_set="combined"))  # fmt: skip
    for feature_set in ("deep", "combined"):
        assert main(["hits", "--db", url, "--feature-set", feature_set]) == 0
        assert "Nucleomax" in capsys.readouterr().out
        assert main(["qc", "--db", url, "--feature-set", feature_set]) == 0
        out = tmp_out = Path(url.removeprefix("sqlite:///")).with_name(
            f"wells_{feature_set}.csv"
        )
        assert main(["export", "--db", url, "--table", "wells", "--feature-set",
                     feature_set, "--out", str(tmp_out)]) == 0  # fmt: skip
        assert out.is_file()
    assert main(["hits", "--db", url, "--feature-set", "resnet"]) == 2
    err = capsys.readouterr().err
    assert "has no feature set 'resnet'" in err and "deep" in err and "combined" in err
    other = embed_run(engine, summary.run_id, replace(FAST_RECIPE, crop_size=24))
    assert other["feature_set"] != name and other["n_cells"] == summary.n_cells
    assert (
        store.resolve_feature_set(engine, summary.run_id, "deep")[0]
        == (other["feature_set"])
    )  # another crop size is another feature set, and the latest one


def test_embed_command_takes_the_recipe_from_flags_and_config(
    demo_run, tmp_path, capsys
):
    url, _ = demo_run
    config = tmp_path / "run.toml"
    config.write_text('[embed]\nlayer = "blocks.1"\nscaling = "crop"\n')
    code = main(["embed", "--db", url, "--config", str(config), "--crop-size", "24",
                 "--input-size", "0", "--strategy", "stem", "--batch-size", "256"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_lite0_stem_blocks.1_cell_native_crop_median" in out


def test_embed_precision_is_the_runs_choice_and_its_own_feature_set(
    demo_run, tmp_path, capsys
):
    shared, summary = demo_run
    url = copy_store(shared, tmp_path)  # the shared store's "deep" stays as it was
    engine = make_engine(url, create=False)
    exact = embed_run(engine, summary.run_id, FAST_RECIPE)["feature_set"]
    flags = ["--crop-size", "32", "--input-size", "0", "--layer", "blocks.2",
             "--batch-size", "128"]  # FAST_RECIPE  # fmt: skip
    assert main(["embed", "--db", url, *flags, "--precision", "bfloat16"]) == 0
    fast = re.search(rf"{re.escape(FAST_NAME)}_[0-9a-f]{{6}}", capsys.readouterr().out)
    assert fast and fast[0] != exact  # never mixed with the float32 vectors
    with session_scope(engine) as session:  # the arithmetic stored with the vectors
        stored = dict(session.execute(select(FeatureSet.name, FeatureSet.config)).all())
    assert stored[fast[0]]["precision"] == "bfloat16"
    assert stored[exact]["precision"] == "float32"  # the CPU's default, recorded
    (_, _, a), (_, _, b) = (
        next(store.iter_plate_cells(engine, summary.run_id, name))
        for name in (exact, fast[0])
    )
    a, b = a.to_numpy(float), b.to_numpy(float)
    change = np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)
    assert 0 < np.median(change) < 0.05  # bfloat16 arithmetic, close to float32
    applied = asdict(replace(EmbedConfig(), enabled=True)) | {"crop_size": 40}
    assert recipe_digest(applied, "package:x") == "b80f68"  # as before the option
    float32 = applied | {"precision": "float32"}  # as embed_run records it on a CPU
    assert recipe_digest(float32, "package:x") == "b80f68"
    bfloat16 = applied | {"precision": "bfloat16"}  # chosen, or CUDA's default
    assert recipe_digest(bfloat16, "package:x") != "b80f68"
    with pytest.raises(InputError, match="embed.precision = 'half' is unknown"):
        EmbedConfig(precision="half")
    crops = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(InputError, match="embed.precision = 'fp8' is unknown"):
        embed_array(lambda x: x, crops, batch_size=2, device=torch.device("cpu"),
                    precision="fp8")  # fmt: skip


def test_embed_run_rejects_unknown_model_and_layer(demo_run, capsys):
    url, summary = demo_run
    assert main(["embed", "--db", url, "--model", "resnet_9000"]) == 2
    assert main(["embed", "--db", url, "--layer", "blocks.9"]) == 2
    assert "blocks.0 to blocks.6" in capsys.readouterr().err


def test_write_fields_vectors_rejects_misaligned_cells(demo_run):
    url, summary = demo_run
    engine = make_engine(url, create=False)
    name = embed_run(engine, summary.run_id, FAST_RECIPE)["feature_set"]
    feature_set_id, _ = store.read_feature_set(engine, summary.run_id, name)
    field_id = next(
        iter(store.embedded_field_ids(engine, summary.run_id, feature_set_id))
    )

    def write(*fields):
        store.write_fields_vectors(
            engine, run_id=summary.run_id, feature_set_id=feature_set_id,
            fields=[{"field_id": field_id} | f for f in fields],
        )  # fmt: skip

    with pytest.raises(ValueError, match="1 object numbers but 2 vectors"):
        write({"object_numbers": np.array([1]), "vectors": np.zeros((2, 4))})
    with pytest.raises(ValueError, match="stored cells"):
        write({"object_numbers": np.array([999]), "vectors": np.zeros((1, 4))})
    one = {"object_numbers": np.array([1]), "vectors": np.zeros((1, 4))}
    with pytest.raises(ValueError, match="name a field twice"):
        write(one, one)


def test_out_of_memory_halves_the_batch_and_goes_on(caplog):
    """A GPU out-of-memory error (raised here for batches above 8 crops) halves the
    batch size until it fits; the vectors are the same as with a small batch."""
    model, _ = create_backbone(in_chans=3)

    def small_gpu(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return model(batch)

    crops = np.random.default_rng(2).uniform(-1, 1, (20, 3, 32, 32)).astype(np.float32)
    cpu = torch.device("cpu")
    vectors, batch_size = embed_with_backoff(
        small_gpu, crops, batch_size=64, device=cpu
    )
    assert batch_size == 8 and "batch size reduced to 8" in caplog.text
    expected = embed_array(model, crops, batch_size=4, device=cpu)
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)

    def no_gpu(batch: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        embed_with_backoff(no_gpu, crops, batch_size=4, device=cpu)


def test_prefetch_yields_in_order_and_raises_producer_errors():
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise OSError("field.tif is truncated")

    items = prefetch(broken())
    assert next(items) == 1
    with pytest.raises(OSError, match="truncated"):
        next(items)
    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    early = prefetch(endless(), depth=2)
    assert next(early) == 0
    early.close()  # the consumer gives up: the producer stops too
    assert len(produced) < 10
    assert not [t for t in threading.enumerate() if t.name == "phenoscreen-prefetch"]


def test_embed_batch_is_the_devices_by_default_and_changes_no_vector(
    demo_run, tmp_path, monkeypatch
):
    """Without ``batch_size`` a CPU embeds as many crops per pass as make 40 images
    of 64 px (recorded with the feature set and returned); the vectors are those
    of 128 per pass to float rounding (the same bits with 2 threads, not with 1:
    oneDNN picks kernels by shape and thread count)."""
    from models import embed

    shared, summary = demo_run
    real, used = embed.embed_with_backoff, []

    def spy(*args, **kwargs):
        used.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "embed_with_backoff", spy)
    vectors, configs = {}, {}
    for batch in (None, 128):
        folder = tmp_path / str(batch)
        folder.mkdir()
        engine = make_engine(copy_store(shared, folder), create=False)
        # a crop size no other test embeds into the shared store: a fresh feature set
        recipe = replace(FAST_RECIPE, crop_size=28, batch_size=batch)
        used.clear()
        result = embed_run(engine, summary.run_id, recipe, device="cpu")
        assert result["n_cells"] == summary.n_cells  # embedded here, not resumed
        default = 70  # 40 * 64 * 64 pixels / (3 channels, each one 28 px image)
        assert set(used) == {default if batch is None else 128}
        assert result["batch_size"] == (default if batch is None else 128)
        with session_scope(engine) as session:
            configs[batch] = session.scalar(
                select(FeatureSet.config).where(
                    FeatureSet.name == result["feature_set"]
                )
            )
        vectors[batch] = np.concatenate([
            v.to_numpy() for _, _, v in store.iter_plate_cells(
                engine, summary.run_id, result["feature_set"])
        ])  # fmt: skip
        engine.dispose()
    assert configs[None]["batch_size"] == default and configs[128]["batch_size"] == 128
    assert vectors[None].shape == (summary.n_cells, 120)
    np.testing.assert_allclose(vectors[None], vectors[128], rtol=1e-4, atol=1e-4)
