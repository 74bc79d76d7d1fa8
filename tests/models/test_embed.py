import threading

import numpy as np
import pytest
import torch
from sqlalchemy import select

from db import store
from db.schema import FeatureSet
from db.session import make_engine, session_scope
from models.backbones import create_backbone
from models.embed import (
    EmbedConfig,
    embed_array,
    embed_run,
    embed_with_backoff,
    fit_channel_ranges,
    fit_control_pca,
    make_embedder,
    normalize_crops,
    prefetch,
)
from pipeline.cli import main
from pipeline.export import read_well_profiles


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


def test_fit_and_normalize_reject():
    with pytest.raises(ValueError, match="no cell pixels"):
        fit_channel_ranges(np.zeros((1, 1, 4, 4)), np.zeros((1, 4, 4), bool), (1, 99))
    with pytest.raises(ValueError, match=r"\(N, C, S, S\)"):
        fit_channel_ranges(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), (1, 99))
    with pytest.raises(ValueError, match=r"\(C, 2\)"):
        normalize_crops(np.zeros((1, 2, 4, 4)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="strategy"):
        EmbedConfig(strategy="mean")
    with pytest.raises(ValueError, match="percentiles"):
        EmbedConfig(percentiles=(50, 10))


def test_strategies_and_deterministic_batches():
    crops = np.random.default_rng(1).uniform(-1, 1, (5, 3, 32, 32)).astype(np.float32)
    stem, _ = create_backbone(in_chans=3)
    a = embed_array(
        make_embedder(stem, "stem"), crops, batch_size=2, device=torch.device("cpu")
    )
    b = embed_array(
        make_embedder(stem, "stem"), crops, batch_size=5, device=torch.device("cpu")
    )
    assert a.shape == (5, stem.num_features)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # batch size does not matter
    rgb = embed_array(
        make_embedder(stem, "rgb"), crops, batch_size=4, device=torch.device("cpu")
    )
    assert rgb.shape == (5, 3 * stem.num_features)
    assert embed_array(make_embedder(stem, "stem"), crops[:0], batch_size=2,
                       device=torch.device("cpu")).shape[0] == 0  # fmt: skip
    with pytest.raises(ValueError, match="strategy"):
        make_embedder(stem, "mean")


def test_embed_run_writes_one_vector_per_cell_and_resumes(demo_run, capsys):
    url, summary = demo_run
    engine = make_engine(url, create=False)
    config = EmbedConfig(crop_size=32, batch_size=128)
    result = embed_run(engine, summary.run_id, config)
    assert result["n_cells"] == summary.n_cells
    assert result["n_fields"] == 95  # the demo has one field without cells (cell loss)
    feature_set_id, names = store.read_feature_set(
        engine, summary.run_id, "tf_efficientnet_lite0_stem"
    )
    assert len(names) == 1280
    cells = sum(
        len(c)
        for _, c, f in store.iter_plate_cells(
            engine, summary.run_id, "tf_efficientnet_lite0_stem"
        )
    )
    assert cells == summary.n_cells
    again = embed_run(engine, summary.run_id, config)
    assert again["n_fields"] == 0 and again["n_cells"] == 0  # resumed: nothing to do
    profiles = read_well_profiles(
        engine,
        summary.run_id,
        summary.experiment_id,
        feature_set="tf_efficientnet_lite0_stem",
    )
    assert profiles.filter(like="tf_efficientnet_lite0_stem_").shape[1] == 1280
    assert len(store.embedded_field_ids(engine, summary.run_id, feature_set_id)) == 95
    code = main(
        ["embed", "--db", url, "--strategy", "rgb", "--crop-size", "24",
         "--batch-size", "256"]
    )  # fmt: skip
    assert code == 0
    assert "tf_efficientnet_lite0_rgb" in capsys.readouterr().out
    hits = ["hits", "--db", url, "--feature-set", "tf_efficientnet_lite0_rgb"]
    assert main(hits) == 0
    assert "Mitoglow" in capsys.readouterr().out
    assert main(["hits", "--db", url, "--feature-set", "resnet"]) == 2
    assert "has no feature set 'resnet'" in capsys.readouterr().err


def test_embed_run_rejects_unknown_model(demo_run):
    url, summary = demo_run
    assert main(["embed", "--db", url, "--model", "resnet_9000"]) == 2


def test_write_field_vectors_rejects_misaligned_cells(demo_run):
    url, summary = demo_run
    engine = make_engine(url, create=False)
    feature_set_id, _ = store.read_feature_set(
        engine, summary.run_id, "tf_efficientnet_lite0_stem"
    )
    field_id = next(
        iter(store.embedded_field_ids(engine, summary.run_id, feature_set_id))
    )
    with pytest.raises(ValueError, match="object numbers but"):
        store.write_field_vectors(
            engine, run_id=summary.run_id, field_id=field_id,
            feature_set_id=feature_set_id, object_numbers=np.array([1]),
            vectors=np.zeros((2, 4)),
        )  # fmt: skip
    with pytest.raises(ValueError, match="stored cells"):
        store.write_field_vectors(
            engine, run_id=summary.run_id, field_id=field_id,
            feature_set_id=feature_set_id, object_numbers=np.array([999]),
            vectors=np.zeros((1, 4)),
        )  # fmt: skip


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


def test_control_pca_is_stored_with_its_feature_set(demo_run):
    url, summary = demo_run
    engine = make_engine(url, create=False)
    embed_run(engine, summary.run_id, EmbedConfig(crop_size=32, batch_size=128))
    result = fit_control_pca(engine, summary.run_id, "tf_efficientnet_lite0_stem", 8)
    assert result["feature_set"] == "tf_efficientnet_lite0_stem_pca8"
    assert result["n_fields"] == 95 and 0 < result["explained_variance"] <= 1
    _, names = store.read_feature_set(engine, summary.run_id, result["feature_set"])
    assert len(names) == 8
    profiles = read_well_profiles(
        engine, summary.run_id, summary.experiment_id, feature_set=result["feature_set"]
    )
    assert profiles.filter(like="_pca8_").shape[1] == 8
    with session_scope(engine) as session:
        config = session.scalar(
            select(FeatureSet.config).where(FeatureSet.name == result["feature_set"])
        )
    components = np.array(config["components"])
    np.testing.assert_allclose(components @ components.T, np.eye(8), atol=1e-5)
    again = fit_control_pca(engine, summary.run_id, "tf_efficientnet_lite0_stem", 8)
    assert again["n_fields"] == 0  # resumed
    with pytest.raises(ValueError, match="principal components"):
        fit_control_pca(engine, summary.run_id, "tf_efficientnet_lite0_stem", 10**6)
    with pytest.raises(ValueError, match="pca_dim"):
        EmbedConfig(pca_dim=0)
