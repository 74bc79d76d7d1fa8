import numpy as np
import pytest
import torch

from db import store
from db.session import make_engine
from models.backbones import load_checkpoint
from models.embed import EmbedConfig, embed_run
from models.train import (
    TrainConfig,
    augment,
    fine_tune,
    save_checkpoint,
    validation_split,
)
from pipeline.cli import main
from pipeline.errors import InputError

FAST = {"batch_size": 32, "epochs": 3, "warmup_epochs": 1, "learning_rate": 3e-3}


def test_validation_split_holds_out_whole_plates_or_wells():
    plates = np.repeat(["P1", "P2", "P3", "P4"], 10)
    wells = np.tile(np.repeat(["A01", "B02"], 5), 4)
    is_val = validation_split(plates, wells, 0.25, rng=0)
    assert len(set(plates[is_val])) == 1 and not set(plates[is_val]) & set(
        plates[~is_val]
    )
    one_plate = validation_split(np.full(10, "P1"), wells[:10], 0.5, rng=0)
    assert one_plate.sum() == 5 and len(set(wells[:10][one_plate])) == 1
    with pytest.raises(ValueError, match="one well"):
        validation_split(np.full(4, "P1"), np.full(4, "A01"), 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(plates, wells, 1.0)
    with pytest.raises(ValueError, match="differ"):
        validation_split(plates, wells[:3], 0.5)


def test_augment_keeps_channels_in_step():
    generator = torch.Generator().manual_seed(0)
    crops = torch.ones(64, 3, 8, 8) * torch.tensor([0.1, 0.4, 0.9])[None, :, None, None]
    out = augment(crops, generator)
    assert out.shape == crops.shape
    # one scale and offset per crop for every channel: channel differences scale alike
    ratio = (out[:, 2] - out[:, 0]) / (out[:, 1] - out[:, 0])
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.8 / 0.3))
    assert out[:, 0].std() > 0  # crops differ
    marked = torch.zeros(16, 1, 4, 4)
    marked[:, 0, 0, 0] = 1.0  # a corner pixel moves with flips and rotations
    moved = augment(marked, torch.Generator().manual_seed(1))
    corners = moved[:, 0].flatten(1).argmax(1)
    assert len(set(corners.tolist())) > 1 and set(corners.tolist()) <= {0, 3, 12, 15}


def _two_phenotypes(n=96, rng=0):
    """Crops of a bright round cell vs a dim elongated one on 4 plates."""
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
    return crops * 2 - 1, labels, np.repeat(["P1", "P2", "P3", "P4"], n // 4)


def test_fine_tune_learns_frozen_then_unfrozen_and_rejects():
    crops, labels, plates = _two_phenotypes()
    is_val = plates == "P4"
    result = fine_tune(crops, labels, is_val, TrainConfig(**FAST, patience=5))
    log = result.log
    assert list(log["phase"]) == ["frozen", "unfrozen", "unfrozen"]
    assert result.classes == ["long", "round"]
    assert log["val_accuracy"].max() >= 0.9  # chance is 0.5
    assert result.best_epoch == int(log.loc[log["val_loss"].idxmin(), "epoch"])
    with torch.inference_mode():
        logits = result.model(torch.from_numpy(crops[is_val]))
    assert logits.shape == (is_val.sum(), 2)
    with pytest.raises(ValueError, match="two treatment labels"):
        fine_tune(crops, np.full(len(labels), "x"), is_val, TrainConfig(**FAST))
    with pytest.raises(ValueError, match="no training or no validation"):
        fine_tune(crops, labels, np.zeros(len(labels), bool), TrainConfig(**FAST))
    with pytest.raises(ValueError, match="same N crops"):
        fine_tune(crops[:3], labels, is_val, TrainConfig(**FAST))


def test_train_config_rejects():
    with pytest.raises(ValueError, match="label"):
        TrainConfig(label="moa")
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=0)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0)


def test_checkpoint_roundtrip_and_bad_checkpoints(tmp_path):
    crops, labels, plates = _two_phenotypes(n=32)
    config = TrainConfig(**(FAST | {"epochs": 1}))
    result = fine_tune(crops, labels, plates == "P4", config)
    path = tmp_path / "ft.pt"
    sha = save_checkpoint(path, result, config=config, in_chans=2, crop_size=32)
    model, meta = load_checkpoint(path)
    assert (
        meta["sha256"] == sha
        and meta["in_chans"] == 2
        and meta["classes"]
        == [
            "long",
            "round",
        ]
    )
    batch = torch.from_numpy(crops[:4])
    with torch.inference_mode():
        result.model.reset_classifier(0)
        torch.testing.assert_close(
            model(batch), result.model(batch), atol=1e-4, rtol=1e-3
        )
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
            "--crop-size", "32", "--batch-size", "32", "--label", "compound",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "embed with it: phenoscreen embed" in printed and out.is_file()
    engine = make_engine(url, create=False)
    from sqlalchemy import select

    from db.schema import ModelCheckpoint
    from db.session import session_scope

    with session_scope(engine) as session:
        checkpoint = session.scalars(select(ModelCheckpoint)).one()
        checkpoint_id, sha = checkpoint.id, checkpoint.sha256
        assert checkpoint.metrics["n_val"] > 0 and "DMSO" in checkpoint.classes
    log = store.read_training_log(engine, checkpoint_id)
    assert list(log["epoch"]) == [1, 2] and list(log["phase"]) == ["frozen", "unfrozen"]
    result = embed_run(
        engine, summary.run_id, EmbedConfig(checkpoint=str(out), batch_size=128)
    )
    assert result["feature_set"] == f"tf_efficientnet_lite0_finetuned_{sha[:8]}"
    assert result["n_cells"] == summary.n_cells
    _, names = store.read_feature_set(engine, summary.run_id, result["feature_set"])
    assert len(names) == 1280
    two = tmp_path / "two.pt"  # the demo has 3 channels
    crops, labels, plates = _two_phenotypes(n=16)
    config = TrainConfig(**(FAST | {"epochs": 1}))
    fine = fine_tune(crops, labels, plates == "P4", config)
    save_checkpoint(two, fine, config=config, in_chans=2, crop_size=32)
    with pytest.raises(InputError, match="trained on 2 channels; run 1 has 3"):
        embed_run(engine, summary.run_id, EmbedConfig(checkpoint=str(two)))
    with pytest.raises(ValueError, match="strategy 'stem'"):
        EmbedConfig(checkpoint=str(out), strategy="rgb")
    assert main(["embed", "--db", url, "--checkpoint", str(tmp_path / "no.pt")]) == 2
