import numpy as np
import pandas as pd
import pytest
import torch

from db import store
from db.session import make_engine
from models import train
from models.backbones import create_backbone, load_checkpoint
from models.embed import (
    CellEmbedder,
    EmbedConfig,
    build_embedder,
    embed_run,
    minmax_crops,
)
from models.train import (
    TrainConfig,
    augment,
    fine_tune,
    save_checkpoint,
    validation_split,
)
from pipeline.cli import main
from pipeline.errors import InputError
from tests.conftest import shared_data

FAST = {"batch_size": 32, "epochs": 3, "warmup_epochs": 1, "learning_rate": 3e-3,
        "input_size": None}  # fmt: skip


def test_validation_split_holds_out_whole_plates_and_rejects():
    plates = np.repeat(["P1", "P2", "P3", "P4"], 10)
    wells = np.tile(np.repeat(["A01", "B02"], 5), 4)
    is_val = validation_split(plates, wells, 0.25, rng=0)
    assert len(set(plates[is_val])) == 1 and not set(plates[is_val]) & set(
        plates[~is_val]
    )
    with pytest.raises(ValueError, match="one well"):
        validation_split(np.full(4, "P1"), np.full(4, "A01"), 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(plates, wells, 1.0)
    with pytest.raises(ValueError, match="differ"):
        validation_split(plates, wells[:3], 0.5)
    with pytest.raises(ValueError, match="differ"):
        validation_split(plates, wells, 0.5, labels=wells[:3])
    with pytest.raises(ValueError, match="differ"):
        validation_split(plates, wells, 0.5, fields=wells[:3])
    one = np.full(4, "P1")
    with pytest.raises(ValueError, match="more than one label"):
        validation_split(one, np.array(["A01", "A01", "B01", "B01"]), 0.5,
                         labels=np.array(["x", "y", "x", "x"]))  # fmt: skip
    with pytest.raises(ValueError, match="single cell"):
        validation_split(one[:2], np.array(["A01", "B01"]), 0.5,
                         labels=np.array(["x", "y"]))  # fmt: skip


def test_validation_split_on_one_plate_keeps_every_treatment_in_training():
    """Replicated labels lose whole wells; a one-well label loses fields, then cells."""
    wells = np.repeat(["A01", "A02", "A03", "A04", "B01", "C01"], 6)
    labels = np.repeat(["DMSO"] * 4 + ["x @ 1", "y @ 1"], 6)
    fields = np.tile(np.repeat([1, 2, 3], 2), 6)
    fields[wells == "C01"] = 1  # one field: its cells are split
    is_val = validation_split(
        np.full(len(wells), "P1"), wells, 0.25, labels=labels, fields=fields, rng=0
    )
    dmso = labels == "DMSO"
    held = set(wells[dmso & is_val])
    assert len(held) == 1 and not held & set(wells[dmso & ~is_val])
    for well in ("B01", "C01"):
        mine = wells == well
        assert 0 < is_val[mine].sum() < mine.sum()
    b01 = wells == "B01"
    assert len(set(fields[b01 & is_val])) == 1
    assert not set(fields[b01 & is_val]) & set(fields[b01 & ~is_val])
    assert set(labels[is_val]) == set(labels[~is_val]) == set(labels)
    unlabelled = validation_split(np.full(len(wells), "P1"), wells, 0.25, rng=0)
    assert len(set(wells[unlabelled])) == 2  # whole wells: a quarter of the six
    assert not set(wells[unlabelled]) & set(wells[~unlabelled])


def test_augment_keeps_channels_in_step():
    generator = torch.Generator().manual_seed(0)
    crops = torch.ones(64, 3, 8, 8) * torch.tensor([0.1, 0.4, 0.9])[None, :, None, None]
    out, no_masks = augment(crops, generator)
    assert out.shape == crops.shape and no_masks is None
    # one scale and offset per crop for every channel: channel differences scale alike
    ratio = (out[:, 2] - out[:, 0]) / (out[:, 1] - out[:, 0])
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.8 / 0.3))
    assert out[:, 0].std() > 0  # crops differ
    marked = torch.zeros(16, 1, 4, 4)
    marked[:, 0, 0, 0] = 1.0  # a corner pixel moves with flips and rotations
    moved, masks = augment(marked, torch.Generator().manual_seed(1), marked[:, 0] > 0)
    corners = moved[:, 0].flatten(1).argmax(1)
    assert len(set(corners.tolist())) > 1 and set(corners.tolist()) <= {0, 3, 12, 15}
    # the masks move with their crops and stay masks (no intensity jitter)
    assert masks.dtype == torch.bool and masks.sum() == 16
    assert torch.equal(masks.flatten(1).float().argmax(1), corners)


def _two_phenotypes(n=96, rng=0):
    """Crops of a bright round cell vs a dim elongated one on 4 plates, the cells'
    masks and the plates."""
    generator = np.random.default_rng(rng)
    yy, xx = np.mgrid[:32, :32] - 15.5
    round_cell = (yy**2 + xx**2 < 60).astype(np.float32)
    long_cell = ((yy / 3) ** 2 + (xx / 12) ** 2 < 1).astype(np.float32)
    labels = np.array(["round", "long"] * (n // 2), dtype=object)
    crops = np.stack(
        [
            np.stack([(round_cell if lab == "round" else long_cell * 0.6)] * 2)
            + generator.normal(0, 0.1, (2, 32, 32))
            for lab in labels
        ]
    ).astype(np.float32)
    masks = np.stack(
        [(round_cell if lab == "round" else long_cell) > 0 for lab in labels]
    )
    return crops * 2 - 1, labels, masks, np.repeat(["P1", "P2", "P3", "P4"], n // 4)


def test_fine_tune_learns_frozen_then_unfrozen_and_rejects():
    crops, labels, masks, plates = _two_phenotypes()
    is_val = plates == "P4"
    config = TrainConfig(**FAST, patience=5, layer="pooled")  # blocks.3: other test
    result = fine_tune(crops, labels, is_val, config, masks=masks)
    log = result.log
    assert list(log["phase"]) == ["frozen", "unfrozen", "unfrozen"]
    assert result.classes == ["long", "round"]
    assert log["val_accuracy"].max() >= 0.9  # chance is 0.5
    assert log["val_balanced_accuracy"].max() >= 0.9
    assert result.best_epoch == int(log.loc[log["val_loss"].idxmin(), "epoch"])
    with torch.inference_mode():
        logits = result.model(
            torch.from_numpy(crops[is_val]), torch.from_numpy(masks[is_val])
        )
    assert logits.shape == (is_val.sum(), 2)
    with pytest.raises(ValueError, match="two treatment labels"):
        fine_tune(
            crops, np.full(len(labels), "x"), is_val, TrainConfig(**FAST), masks=masks
        )
    with pytest.raises(ValueError, match="no training or no validation"):
        fine_tune(
            crops, labels, np.zeros(len(labels), bool), TrainConfig(**FAST), masks=masks
        )
    with pytest.raises(ValueError, match="same N crops"):
        fine_tune(crops[:3], labels, is_val, TrainConfig(**FAST), masks=masks)
    with pytest.raises(ValueError, match="needs a cell mask"):
        fine_tune(crops, labels, is_val, TrainConfig(**FAST))


def test_fine_tune_at_an_intermediate_layer():
    crops, labels, masks, plates = _two_phenotypes()
    is_val = plates == "P4"
    config = TrainConfig(**(FAST | {"epochs": 5}), layer="blocks.3", patience=5)
    result = fine_tune(crops, labels, is_val, config, masks=masks)
    assert result.log["val_accuracy"].max() >= 0.9  # chance is 0.5
    assert result.model.head.in_features == 2 * 80  # blocks.3: 80 per image channel
    trained = result.model.embedder.backbone.state_dict()
    imagenet = create_backbone(config.model_name, in_chans=3)[0].state_dict()
    learned = [not torch.equal(trained[k], imagenet[k]) for k in trained]
    early = ("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3")
    stages = [k.startswith(early) for k in trained]
    # the stages up to the layer learn; those after it are never run
    assert any(c and s for c, s in zip(learned, stages, strict=True))
    assert not any(c and not s for c, s in zip(learned, stages, strict=True))
    with pytest.raises(InputError, match="blocks.99"):
        fine_tune(
            crops, labels, is_val, TrainConfig(**FAST, layer="blocks.99"), masks=masks
        )


def test_train_config_rejects():
    with pytest.raises(ValueError, match="label"):
        TrainConfig(label="moa")
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=0)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="grey")
    with pytest.raises(ValueError, match="pool 'nucleus'"):
        TrainConfig(pool="nucleus")
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(label_smoothing=1)
    with pytest.raises(ValueError, match="layer 'block3'"):
        TrainConfig(layer="block3")
    for ema_epochs in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ema_epochs"):
            TrainConfig(ema_epochs=ema_epochs)


def test_fine_tune_keeps_the_moving_average_of_the_weights():
    """By default the network validated and kept is the weights' moving average;
    ema_epochs = 0 keeps the network as trained. Both learn."""
    crops, labels, masks, plates = _two_phenotypes()
    is_val = plates == "P4"
    kept = {}
    for ema_epochs in (1.0, 0.0):
        config = TrainConfig(
            **(FAST | {"epochs": 5}),
            patience=5,
            layer="blocks.3",
            ema_epochs=ema_epochs,
        )
        result = fine_tune(crops, labels, is_val, config, masks=masks)
        assert result.log["val_accuracy"].max() >= 0.9  # chance is 0.5
        kept[ema_epochs] = result.model.state_dict()
    assert TrainConfig().ema_epochs == 1.0
    assert kept[1.0].keys() == kept[0.0].keys()  # same checkpoint layout
    trained = [k for k, v in kept[0.0].items() if v.is_floating_point()]
    assert any(not torch.equal(kept[1.0][k], kept[0.0][k]) for k in trained)


def test_fine_tune_resumes_after_a_kill(tmp_path, monkeypatch, caplog):
    crops, labels, masks, plates = _two_phenotypes()  # 2 batches an epoch: EMA 0.5
    is_val = plates == "P4"
    config = TrainConfig(**FAST)
    state = tmp_path / "ft.state"
    real_evaluate, calls = train._evaluate, []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed during epoch 2
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "_evaluate", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(crops, labels, is_val, config, masks=masks, state_path=state)
    assert state.is_file()
    monkeypatch.setattr(train, "_evaluate", real_evaluate)
    with caplog.at_level("INFO"):
        result = fine_tune(crops, labels, is_val, config, masks=masks, state_path=state)
    assert "resuming fine-tuning after epoch 1" in caplog.text
    assert list(result.log["epoch"]) == [1, 2, 3]
    # the same network as a training never killed: weights, their moving average
    # and the batches' order all resumed
    whole = fine_tune(crops, labels, is_val, config, masks=masks)
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value)
    other = TrainConfig(**(FAST | {"learning_rate": 1e-3}))  # another config: anew
    caplog.clear()
    fine_tune(crops, labels, is_val, other, masks=masks, state_path=state)
    assert "belongs to another config" in caplog.text


def test_checkpoint_roundtrip_and_bad_checkpoints(tmp_path):
    crops, labels, masks, plates = _two_phenotypes(n=32)
    config = TrainConfig(**(FAST | {"epochs": 1}))
    result = fine_tune(crops, labels, plates == "P4", config, masks=masks)
    path = tmp_path / "ft.pt"
    sha = save_checkpoint(path, result, config=config, in_chans=2, crop_size=32)
    model, meta = load_checkpoint(path)
    assert meta["sha256"] == sha and meta["in_chans"] == 2
    assert meta["classes"] == ["long", "round"] and meta["strategy"] == "rgb"
    assert meta["input_size"] is None and meta["scaling"] == "plate"
    assert meta["layer"] == config.layer == "blocks.3" and meta["pool"] == "cell"
    with pytest.raises(InputError, match="trained at layer blocks.3"):
        build_embedder(EmbedConfig(checkpoint=str(path), layer="pooled"), 2)
    assert build_embedder(EmbedConfig(checkpoint=str(path), layer="blocks.2"), 2)
    batch, mask = torch.from_numpy(crops[:4]), torch.from_numpy(masks[:4])
    loaded = CellEmbedder(
        model, strategy="rgb", layer=config.layer, input_size=None, pool="cell"
    )
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded(batch, mask), result.model.embedder(batch, mask), atol=1e-4,
            rtol=1e-3,
        )  # fmt: skip
    saved = torch.load(path, weights_only=True)
    del saved["pool"]  # a checkpoint from before the pooling was recorded
    torch.save(saved, tmp_path / "before_pooling.pt")
    assert load_checkpoint(tmp_path / "before_pooling.pt")[1]["pool"] == "crop"
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a PhenoScreen fine-tuned checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="not a PhenoScreen fine-tuned checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_train_command_registers_checkpoint_and_embed_uses_it(
    demo_run, tmp_path, capsys
):
    url, summary = demo_run
    out = tmp_path / "demo_ft.pt"
    args = ["train", "--db", url, "--epochs", "2", "--max-cells", "400",
            "--crop-size", "32", "--input-size", "0", "--batch-size", "32",
            "--label", "compound", "--layer", "pooled", "--ema-epochs", "0.5",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "embed with it: phenoscreen embed" in printed and out.is_file()
    assert "from the wells and fields of each treatment on its one plate" in printed
    assert not out.with_name(out.name + ".state").exists()  # removed when done
    engine = make_engine(url, create=False)
    from sqlalchemy import select

    from db.schema import ModelCheckpoint
    from db.session import session_scope

    with session_scope(engine) as session:
        checkpoint = session.scalars(select(ModelCheckpoint)).one()
        checkpoint_id, sha = checkpoint.id, checkpoint.sha256
        assert checkpoint.metrics["n_val"] > 0 and "DMSO" in checkpoint.classes
        assert checkpoint.metrics["n_plates"] == 1
        assert checkpoint.config["layer"] == "pooled"
        assert checkpoint.config["ema_epochs"] == 0.5
    log = store.read_training_log(engine, checkpoint_id)
    assert list(log["epoch"]) == [1, 2] and list(log["phase"]) == ["frozen", "unfrozen"]
    recipe = EmbedConfig(checkpoint=str(out), batch_size=128, layer="blocks.2")
    result = embed_run(engine, summary.run_id, recipe)
    assert result["feature_set"].startswith(
        f"tf_efficientnet_lite0_finetuned_{sha[:8]}_blocks.2_cell_native_plate_median_"
    )
    assert result["n_cells"] == summary.n_cells
    _, names = store.read_feature_set(engine, summary.run_id, result["feature_set"])
    assert len(names) == 3 * 40  # rgb: the checkpoint's strategy
    two = tmp_path / "two.pt"  # the demo has 3 channels
    crops, labels, masks, plates = _two_phenotypes(n=16)
    config = TrainConfig(**(FAST | {"epochs": 1}))
    fine = fine_tune(crops, labels, plates == "P4", config, masks=masks)
    save_checkpoint(two, fine, config=config, in_chans=2, crop_size=32)
    with pytest.raises(InputError, match="trained on 2 channels; this run has 3"):
        embed_run(engine, summary.run_id, EmbedConfig(checkpoint=str(two)))
    assert main(["embed", "--db", url, "--checkpoint", str(tmp_path / "no.pt")]) == 2


@pytest.mark.slow
def test_fine_tuning_on_real_bbbc021_crops_beats_chance():
    """A few real MCF-7 crops (DMSO vs cycloheximide 50 uM): trained on two plates,
    validated on a third, the network tells the treatments apart."""
    folder = shared_data("cells/bbbc021_singlecell_crops_dmso_vs_cycloheximide")
    meta = pd.read_csv(folder / "metadata.csv").sort_values("crop_index")
    crops = np.moveaxis(np.load(folder / "crops.npz")["crops"], -1, 1)
    plates = ["Week4_27801", "Week4_27821", "Week4_27861"]  # with treated cells
    keep = meta["concentration_uM"].isin([0, 50]) & meta["plate"].isin(plates)
    chosen = meta[keep].groupby(["plate", "concentration_uM"]).head(64).index
    meta, crops = meta.loc[chosen].reset_index(drop=True), crops[chosen]
    labels = np.where(meta["role"] == "negative_control", "DMSO", "cycloheximide")
    is_val = (meta["plate"] == plates[2]).to_numpy()
    config = TrainConfig(epochs=3, warmup_epochs=1, batch_size=32, input_size=32,
                         learning_rate=3e-3, patience=3, pool="crop")  # fmt: skip
    result = fine_tune(minmax_crops(crops[:, :, 2:-2, 2:-2]), labels, is_val, config)
    chance = pd.Series(labels[is_val]).value_counts(normalize=True).max()
    assert result.log["val_accuracy"].max() > chance + 0.1


def test_evaluate_balanced_accuracy_ignores_absent_classes_without_warning():
    """Predictions of classes that y lacks count as misses: the value equals
    sklearn's `balanced_accuracy_score`, with no warning (no thread-unsafe
    `warnings.catch_warnings` needed)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    crops = torch.randn(64, 3)
    labels = torch.arange(64) % 2  # classes 0 and 1 only; the model has four
    model = torch.nn.Linear(3, 4)
    loader = DataLoader(TensorDataset(crops, labels), batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, accuracy, balanced = train._evaluate(model, loader, torch.device("cpu"))
    with torch.no_grad():
        predicted = model(crops).argmax(1).numpy()
    assert set(predicted) - {0, 1}, "the test needs predictions of absent classes"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = balanced_accuracy_score(labels.numpy(), predicted)
    assert balanced == expected
    assert accuracy == (predicted == labels.numpy()).mean() and loss > 0
