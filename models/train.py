"""Fine-tuning by transfer learning on treatment labels (weak supervision).

The DeepProfiler recipe on timm: an ImageNet-pretrained backbone, fed as the
embedding recipe feeds it (`models.embed.CellEmbedder`: each channel as a grey
image replicated to RGB by default, crops resized to ``input_size``), learns to
tell single-cell crops apart by their treatment (compound, or compound and dose;
the negative controls are a class too), so its features become sensitive to what
compounds do to cells. Training: validation on whole held-out plates (on one
plate, a share of each treatment's wells, or of its only well's fields or cells),
class-balanced sampling (every treatment equally often, not
DMSO most of the time), label smoothing, a warm-up with the backbone frozen (only
the new classifier learns) then everything unfrozen at a lower learning rate,
AdamW with a cosine schedule, an exponential moving average of the weights over
about an epoch (the averaged network is validated and kept), early stopping on
the validation loss (the best epoch is kept), microscopy augmentation (flips,
90-degree rotations, one intensity scale and offset per crop for all channels: no
colour jitter between channels), mixed precision (bfloat16) on CUDA. The training
state (the moving average included) is written after every epoch, so a killed
training resumes from its last epoch. The checkpoint is saved with its recipe,
classes and a SHA-256 and registered in the store with a per-epoch log;
``phenoscreen embed --checkpoint`` embeds with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import recall_score
from sqlalchemy import Engine
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from db import store
from models.backbones import DEFAULT_MODEL, create_backbone, on_device
from models.embed import CellEmbedder, plate_channel_ranges, scale_crops
from pipeline.cells.stored import iter_field_crops
from pipeline.config import (
    EMBED_POOLS,
    EMBED_SCALINGS,
    EMBED_STRATEGIES,
    EmbedConfig,
    is_layer_name,
)

logger = logging.getLogger(__name__)

LABELS = ("compound_dose", "compound")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How a backbone is fine-tuned (saved in the checkpoint and the store).

    Attributes
    ----------
    model_name : str
        A timm model name.
    weights : str
        Starting weights: ``auto``, ``package``, ``hub`` (`create_backbone`).
    label : {"compound_dose", "compound"}
        What the network learns to predict.
    epochs : int
        At most this many epochs (early stopping may end sooner).
    warmup_epochs : int
        Leading epochs with the backbone frozen.
    batch_size : int
    learning_rate : float
        Of the classifier; the backbone's is ``learning_rate * backbone_lr_scale``.
    backbone_lr_scale : float
    weight_decay : float
        AdamW decoupled weight decay.
    patience : int
        Epochs without a lower validation loss before stopping.
    val_fraction : float
        Share of plates held out for validation (with one plate: of each
        treatment's wells, fields or cells, `validation_split`).
    max_cells : int
        Cells sampled uniformly from the run to train on.
    crop_size : int or None
        Crop side; None: four median nucleus diameters.
    strategy : {"rgb", "stem"}
        How channels are fed (`models.embed.CellEmbedder`); kept in the checkpoint.
    input_size : int or None
        Side crops are resized to (None: their own); kept in the checkpoint.
    scaling : {"crop", "plate"}
        Intensity scaling (`models.embed.scale_crops`); kept in the checkpoint.
    label_smoothing : float
        Of the cross-entropy (treatments that look alike are not penalized as
        hard).
    balanced : bool
        Sample every class equally often per epoch.
    ema_epochs : float
        Horizon, in epochs, of an exponential moving average of the weights
        (timm's ``ModelEmaV3``, decay ``1 - 1 / (ema_epochs * batches per
        epoch)``, at least 0, updated after every batch); the averaged network is
        validated, kept and saved. 0: no averaging, the network as trained.
        Default 1: on BBBC021 (`benchmarks/bench_bbbc021_quality.py`, seeds 0-4)
        the fine-tuned dose Spearman was 0.734 on average against 0.692 without
        (higher for 4 of the 5 seeds; README, Deep profiles).
    layer : str
        The features the classifier reads: ``pooled`` (the network's final
        layer) or ``blocks.K`` (stage K), averaged as `pool` says. Default: the
        embedding recipe's layer (`pipeline.config.EmbedConfig`), so training
        shapes the very features that are embedded; the stages after it are not
        run, so not trained (on BBBC021 comparable or better than ``pooled``
        training, Spearman 0.63 vs 0.57 in two runs before cell pooling, and
        faster per epoch: README, Deep profiles).
    pool : {"cell", "crop"}
        Average the layer's map over each crop's cell or the whole crop
        (`models.embed.CellEmbedder`); kept in the checkpoint. Default: the
        embedding recipe's.
    seed : int
    """

    model_name: str = DEFAULT_MODEL
    weights: str = "auto"
    label: str = "compound_dose"
    epochs: int = 8
    warmup_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    patience: int = 3
    val_fraction: float = 0.25
    max_cells: int = 16_000
    crop_size: int | None = None
    strategy: str = "rgb"
    input_size: int | None = 64
    scaling: str = "plate"
    label_smoothing: float = 0.1
    balanced: bool = True
    ema_epochs: float = 1.0
    layer: str = EmbedConfig.layer
    pool: str = EmbedConfig.pool
    seed: int = 0

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(
                f"label {self.label!r} is unknown; choose one of {LABELS}."
            )
        if self.epochs < 1 or not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"need epochs >= 1 and 0 <= warmup_epochs <= epochs; got "
                f"{self.epochs} and {self.warmup_epochs}."
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction = {self.val_fraction} must lie in (0, 1).")
        if min(self.batch_size, self.patience, self.max_cells) < 1:
            raise ValueError("batch_size, patience and max_cells must be >= 1.")
        if self.learning_rate <= 0 or self.backbone_lr_scale <= 0:
            raise ValueError("learning_rate and backbone_lr_scale must be > 0.")
        if (
            self.strategy not in EMBED_STRATEGIES
            or self.scaling not in EMBED_SCALINGS
            or self.pool not in EMBED_POOLS
        ):
            raise ValueError(
                f"strategy {self.strategy!r} / scaling {self.scaling!r} / pool "
                f"{self.pool!r}: use one of {EMBED_STRATEGIES} / {EMBED_SCALINGS} / "
                f"{EMBED_POOLS}."
            )
        if not is_layer_name(self.layer):
            raise ValueError(
                f"layer {self.layer!r} must be 'pooled' or 'blocks.K' (K = 0, 1, ...: "
                "a stage of the network)."
            )
        if not 0 <= self.ema_epochs < float("inf"):
            raise ValueError(
                f"ema_epochs = {self.ema_epochs} must be finite and >= 0 (0: no "
                "averaging)."
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"label_smoothing = {self.label_smoothing} must be in [0, 1)."
            )


class Classifier(nn.Module):
    """A `models.embed.CellEmbedder` (at `TrainConfig.layer`) and a linear head."""

    def __init__(self, embedder: CellEmbedder, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.embedder = embedder
        self.head = nn.Linear(n_features, n_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, crops: torch.Tensor, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the class logits (B, n_classes) of crops (B, C, S, S).

        `masks` (B, S, S) are the crops' cell masks, for an embedder that pools
        over cells.
        """
        return self.head(self.embedder(crops, masks))


@dataclass
class FineTuned:
    """The result of `fine_tune`: best model, classes and the per-epoch log."""

    model: Classifier
    classes: list[str]
    log: pd.DataFrame
    best_epoch: int


def validation_split(
    plates: np.ndarray,
    wells: np.ndarray,
    val_fraction: float,
    *,
    labels: np.ndarray | None = None,
    fields: np.ndarray | None = None,
    rng: int = 0,
) -> np.ndarray:
    """Return a boolean mask of the cells held out for validation.

    With two or more plates, whole plates are held out (at least one, at most all
    but one), so validation measures what happens on a new plate. With a single
    plate, validation must still see treatments the network learns: of every
    label found in two or more wells (controls, replicate wells) a share of the
    wells is held out; of a label found in one well only (a compound-dose without
    replicate) a share of that well's fields, or of its cells when the well has
    one field.

    Parameters
    ----------
    plates, wells : ndarray of shape (N,)
        Plate and well of each cell.
    val_fraction : float
        Share of plates (or wells, fields, cells) to hold out, in (0, 1).
    labels : ndarray of shape (N,), optional
        Training label of each cell, one per well; default: one label for all
        (a share of the wells is held out).
    fields : ndarray of shape (N,), optional
        Field (image) of each cell; default: every cell its own field.
    rng : int
        Seed.

    Returns
    -------
    ndarray of shape (N,), bool

    Raises
    ------
    ValueError
        If the lengths differ, `val_fraction` is out of range, there is only one
        well, a well holds two labels, or nothing can be held out (every label of
        a single plate has a single cell).
    """
    n = len(plates)
    if len(wells) != n or any(a is not None and len(a) != n for a in (labels, fields)):
        raise ValueError(
            f"plates ({n}), wells ({len(wells)}), labels and fields differ in length."
        )
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction = {val_fraction} must lie in (0, 1).")
    generator = np.random.default_rng(rng)

    def hold_out(units: np.ndarray) -> np.ndarray:
        names = pd.unique(units)
        k = min(max(1, round(val_fraction * len(names))), len(names) - 1)
        return np.isin(units, generator.permutation(names)[:k])

    plates = np.asarray(plates, dtype=object)
    if len(pd.unique(plates)) >= 2:
        return hold_out(plates)
    wells = np.asarray(wells, dtype=object)
    if len(pd.unique(wells)) < 2:
        raise ValueError("one well only: nothing to hold out for validation.")
    labels = np.zeros(n) if labels is None else np.asarray(labels, dtype=object)
    fields = np.arange(n) if fields is None else np.asarray(fields, dtype=object)
    is_val = np.zeros(n, dtype=bool)
    rows_of_well = pd.Series(np.arange(n)).groupby(wells).indices
    label_counts = pd.Series(labels).groupby(wells).nunique()
    if (label_counts > 1).any():
        raise ValueError(
            f"wells {label_counts.index[label_counts > 1].tolist()[:5]} hold cells of "
            "more than one label; a well is one treatment."
        )
    well_label = pd.Series(labels).groupby(wells).first()
    for _, label_wells in well_label.groupby(well_label, sort=True):
        rows = np.sort(np.concatenate([rows_of_well[w] for w in label_wells.index]))
        units = wells[rows] if len(label_wells) >= 2 else fields[rows]
        if len(pd.unique(units)) == 1:
            units = rows  # a one-field well: its cells
        if len(units) >= 2:
            is_val[rows] = hold_out(units)
    if not is_val.any():
        raise ValueError(
            "no cells to hold out for validation: every treatment has a single cell. "
            "Image more cells or wells."
        )
    return is_val


def augment(
    batch: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly flip, rotate by 90-degree steps and jitter the intensity of crops.

    Parameters
    ----------
    batch : Tensor of shape (B, C, S, S)
        Normalized crops.
    generator : torch.Generator
    masks : Tensor of shape (B, S, S), optional
        The crops' cell masks: flipped and rotated with them.

    Returns
    -------
    crops : Tensor of shape (B, C, S, S)
        One scale in [0.8, 1.2] and one offset in [-0.1, 0.1] per crop, the same
        for all its channels.
    masks : Tensor of shape (B, S, S) or None
    """
    n, channels = len(batch), batch.shape[1]
    if masks is not None:  # moved as one more channel
        batch = torch.cat([batch, masks[:, None].to(batch.dtype)], dim=1)
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    turns = torch.randint(0, 4, (n,), generator=generator)
    rotated = batch.clone()
    for k in range(1, 4):
        chosen = turns == k
        if chosen.any():
            rotated[chosen] = torch.rot90(batch[chosen], k, dims=(-2, -1))
    scale = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
    offset = torch.empty(n, 1, 1, 1).uniform_(-0.1, 0.1, generator=generator)
    crops = rotated[:, :channels] * scale + offset
    return crops, (rotated[:, channels] > 0.5 if masks is not None else None)


def _set_backbone_trainable(model: Classifier, trainable: bool) -> None:
    for parameter in model.embedder.parameters():
        parameter.requires_grad_(trainable)


def _evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[float, float, float]:
    """Mean cross-entropy, accuracy and balanced accuracy of a loader.

    Balanced accuracy is the mean recall of the classes present: with
    class-balanced training its chance level is one over their number, while
    plain accuracy is best matched against the share of the largest class.
    """
    model.eval()
    loss_sum, truth, predicted = 0.0, [], []
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for crops, labels, *masks in loader:
            crops = crops.to(device, non_blocking=cuda)
            labels = labels.to(device, non_blocking=cuda)
            masks = [m.to(device, non_blocking=cuda) for m in masks]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(crops, *masks).float()
            loss_sum += nn.functional.cross_entropy(
                logits, labels, reduction="sum"
            ).item()
            truth.append(labels.cpu())
            predicted.append(logits.argmax(1).cpu())
    y, pred = torch.cat(truth).numpy(), torch.cat(predicted).numpy()
    # balanced_accuracy_score's value, without its warning for predictions of
    # classes absent from y (warnings.catch_warnings is not thread-safe)
    balanced = recall_score(y, pred, labels=np.unique(y), average="macro")
    return loss_sum / len(y), float((pred == y).mean()), float(balanced)


def fine_tune(
    crops: np.ndarray,
    labels: np.ndarray,
    is_val: np.ndarray,
    config: TrainConfig,
    *,
    masks: np.ndarray | None = None,
    device: str | None = None,
    state_path: str | Path | None = None,
) -> FineTuned:
    """Fine-tune an ImageNet-pretrained backbone to classify crops by treatment.

    Parameters
    ----------
    crops : ndarray of shape (N, C, S, S), float32
        Scaled crops (`models.embed.scale_crops`).
    labels : ndarray of shape (N,)
        Class name of each crop.
    is_val : ndarray of shape (N,), bool
        Validation cells (`validation_split`).
    config : TrainConfig
    masks : ndarray of shape (N, S, S), bool, optional
        Each crop's own-cell mask; needed when ``config.pool`` is ``cell``.
    device : str, optional
        ``cuda`` or ``cpu``; default CUDA when available.
    state_path : str or Path, optional
        The training state is written here after every epoch (atomically); when
        the file exists and belongs to the same config and data, training
        resumes after its last epoch. Removed by the caller when done.

    Returns
    -------
    FineTuned
        The model (eval mode; its moving average when ``config.ema_epochs`` > 0)
        at the epoch of lowest validation loss, the classes
        (output order) and the log: ``epoch``, ``phase`` (``frozen``/``unfrozen``),
        ``train_loss``, ``val_loss``, ``val_accuracy``, ``val_balanced_accuracy``
        (mean recall of the validation classes), ``learning_rate``,
        ``seconds``.

    Raises
    ------
    ValueError
        If shapes disagree, the masks are missing for ``pool = "cell"``, there
        are fewer than two classes, or either split is empty.
    """
    if crops.ndim != 4 or len(crops) != len(labels) or len(labels) != len(is_val):
        raise ValueError(
            f"crops {crops.shape}, labels ({len(labels)}) and is_val ({len(is_val)}) "
            "must describe the same N crops (N, C, S, S)."
        )
    if config.pool == "cell" and (
        masks is None or masks.shape != (len(crops), *crops.shape[2:])
    ):
        raise ValueError(
            f"pool = 'cell' needs a cell mask (N, S, S) per crop {crops.shape}; got "
            f"{None if masks is None else masks.shape}."
        )
    classes = sorted(pd.unique(np.asarray(labels, dtype=object)).tolist())
    if len(classes) < 2:
        raise ValueError(
            f"fine-tuning needs at least two treatment labels; all cells are "
            f"{classes[0] if classes else 'unlabelled'!r}."
        )
    if is_val.all() or not is_val.any():
        raise ValueError(
            "the validation split leaves no training or no validation cells."
        )
    torch.manual_seed(config.seed)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = target.type == "cuda"
    index = {name: i for i, name in enumerate(classes)}
    y = torch.tensor([index[v] for v in labels], dtype=torch.long)
    x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    m = (
        torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
        if config.pool == "cell"
        else None
    )
    val = torch.tensor(np.asarray(is_val, dtype=bool))  # a copy: may be read-only
    generator = torch.Generator().manual_seed(config.seed)
    y_train = y[~val]
    sampler = None
    if config.balanced:  # every class equally often; as many draws as cells
        counts = torch.bincount(y_train, minlength=len(classes)).float()
        weights = (1.0 / counts.clamp(min=1))[y_train]
        sampler = torch.utils.data.WeightedRandomSampler(
            weights, num_samples=len(y_train), replacement=True, generator=generator
        )
    train_loader = DataLoader(
        TensorDataset(x[~val], y_train, *([] if m is None else [m[~val]])),
        batch_size=config.batch_size,
        shuffle=sampler is None, sampler=sampler, generator=generator,
        pin_memory=cuda, drop_last=len(y_train) > config.batch_size,
    )  # fmt: skip
    val_loader = DataLoader(
        TensorDataset(x[val], y[val], *([] if m is None else [m[val]])),
        batch_size=config.batch_size, pin_memory=cuda,
    )  # fmt: skip
    backbone, _ = create_backbone(
        config.model_name,
        in_chans=3 if config.strategy == "rgb" else crops.shape[1],
        weights=config.weights,
    )
    embedder = CellEmbedder(
        backbone, strategy=config.strategy, layer=config.layer,
        input_size=config.input_size, pool=config.pool,
    )  # fmt: skip
    model = Classifier(embedder, embedder.width(crops.shape[1]), len(classes))
    model = on_device(model, target)
    head = list(model.head.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.embedder.parameters()),
             "lr": config.learning_rate * config.backbone_lr_scale},
            {"params": head, "lr": config.learning_rate},
        ],
        weight_decay=config.weight_decay,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * max(len(train_loader), 1)
    )
    rows, best_loss, best_state, best_epoch, stale = [], np.inf, None, 0, 0
    key = {"config": asdict(config), "classes": classes, "n": len(y),
           "n_val": int(val.sum())}  # fmt: skip
    resumed = _load_state(state_path, key)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        generator.set_state(resumed["generator"])
        rows, best_loss, best_epoch, stale = (
            resumed["rows"], resumed["best_loss"], resumed["best_epoch"], resumed["stale"]
        )  # fmt: skip
        best_state = resumed["best_state"]
        logger.info("resuming fine-tuning after epoch %d (%s)", len(rows), state_path)
    ema = None
    if config.ema_epochs > 0:  # the network validated and kept
        steps = config.ema_epochs * max(len(train_loader), 1)
        ema = ModelEmaV3(model, decay=max(1 - 1 / steps, 0.0))
        if resumed is not None:
            ema.module.load_state_dict(resumed["ema"])
    kept = model if ema is None else ema.module
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for epoch in range(len(rows) + 1, config.epochs + 1):
        if stale >= config.patience:
            break
        frozen = epoch <= config.warmup_epochs
        _set_backbone_trainable(model, not frozen)
        model.train()
        if frozen:  # BN statistics of the frozen backbone stay
            model.embedder.eval()
        start, loss_sum, seen = time.perf_counter(), 0.0, 0
        batches = tqdm(
            train_loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
            disable=None, leave=False,
        )  # fmt: skip
        for crops_batch, label_batch, *mask_batch in batches:
            crops_batch, mask = augment(crops_batch, generator, *mask_batch)
            crops_batch = crops_batch.to(target, non_blocking=cuda).contiguous(
                memory_format=torch.channels_last
            )
            label_batch = label_batch.to(target, non_blocking=cuda)
            masks_batch = [] if mask is None else [mask.to(target, non_blocking=cuda)]
            with torch.autocast(target.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_fn(model(crops_batch, *masks_batch).float(), label_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            loss_sum += loss.item() * len(label_batch)
            seen += len(label_batch)
        val_loss, val_accuracy, val_balanced = _evaluate(kept, val_loader, target)
        rows.append(
            {"epoch": epoch, "phase": "frozen" if frozen else "unfrozen",
             "train_loss": loss_sum / max(seen, 1), "val_loss": val_loss,
             "val_accuracy": val_accuracy, "val_balanced_accuracy": val_balanced,
             "learning_rate": optimizer.param_groups[1]["lr"],
             "seconds": time.perf_counter() - start}
        )  # fmt: skip
        logger.info(
            "epoch %d (%s): train loss %.3f, validation loss %.3f, accuracy %.3f, "
            "balanced accuracy %.3f", epoch, rows[-1]["phase"], rows[-1]["train_loss"],
            val_loss, val_accuracy, val_balanced,
        )  # fmt: skip
        if val_loss < best_loss:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = {
                k: v.detach().cpu().clone() for k, v in kept.state_dict().items()
            }
        else:
            stale += 1
            if stale >= config.patience:
                logger.info("early stop: no lower validation loss in %d epochs", stale)
        _save_state(
            state_path, key, model=model.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), generator=generator.get_state(), rows=rows,
            best_loss=best_loss, best_epoch=best_epoch, stale=stale, best_state=best_state,
            ema=None if ema is None else ema.module.state_dict(),
        )  # fmt: skip
    model.load_state_dict(best_state)
    return FineTuned(model.eval(), classes, pd.DataFrame(rows), best_epoch)


def _save_state(path: str | Path | None, key: dict[str, Any], **state: Any) -> None:
    """Write the training state after an epoch (to a temporary file, then renamed)."""
    if path is None:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, **state}, tmp)
    os.replace(tmp, path)


def _load_state(path: str | Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    """Return a saved training state of the same config and data, else None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: start over
        logger.warning("training state %s unreadable (%s): starting over", path, exc)
        return None
    if state.get("key") != key:
        logger.warning(
            "training state %s belongs to another config or data: starting over", path
        )
        return None
    return state


def save_checkpoint(
    path: str | Path,
    fine_tuned: FineTuned,
    *,
    config: TrainConfig,
    in_chans: int,
    crop_size: int,
) -> str:
    """Write a fine-tuned backbone with its recipe and classes; return its SHA-256.

    The file is a plain dict of tensors, strings and numbers (loadable with
    ``weights_only=True``): the backbone's state dict (timm keys, no head), the
    run's channel count, crop size, strategy, input size, scaling, trained
    layer and pooling, the classes and the config; written to ``<path>.tmp`` and
    renamed when complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "state_dict": fine_tuned.model.embedder.backbone.state_dict(),
            "model_name": config.model_name,
            "in_chans": in_chans,
            "backbone_in_chans": 3 if config.strategy == "rgb" else in_chans,
            "crop_size": crop_size,
            "strategy": config.strategy,
            "input_size": config.input_size or 0,
            "scaling": config.scaling,
            "layer": config.layer,
            "pool": config.pool,
            "classes": list(fine_tuned.classes),
            "config": asdict(config),
        },
        tmp,
    )
    os.replace(tmp, path)
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def train_run(
    engine: Engine,
    run_id: int | None,
    config: TrainConfig,
    out: str | Path,
    *,
    device: str | None = None,
) -> dict[str, Any]:
    """Fine-tune on a run's cells, save the checkpoint and register it in the store.

    Crops of QC-passed fields are scaled as ``config.scaling`` says (as
    `models.embed.embed_run` does); up to ``config.max_cells`` cells are sampled
    uniformly. The training state is kept in ``<out>.state`` after every epoch
    (a rerun after a kill resumes there) and removed when the checkpoint is
    written.

    Returns
    -------
    dict
        ``checkpoint_id``, ``path``, ``sha256``, ``n_train``, ``n_val``,
        ``n_classes``, ``best_epoch``, ``val_loss``, ``val_accuracy``,
        ``chance_accuracy`` (share of the largest validation class),
        ``val_balanced_accuracy``, ``balanced_chance`` (one over the validation
        classes), ``val_plates``, ``n_plates``, ``epochs``.

    Raises
    ------
    ValueError
        If the run has no cells, one label, a single well, or no cell to hold out
        for validation (`validation_split`).
    """
    run_id, experiment_id = store.resolve_run(engine, run_id)
    fields = store.read_run_fields(engine, run_id)[2]
    fields = fields[(fields["qc_flags"] == "") & (fields["n_cells"] > 0)]
    if fields.empty:
        raise ValueError(f"run {run_id} has no cells in QC-passed fields to train on.")
    wells = store.read_wells(engine, experiment_id)
    first = next(iter_field_crops(engine, run_id, size=config.crop_size))
    size = first.crops.shape[-1]
    ranges = (
        plate_channel_ranges(
            engine, run_id, fields, wells, size=size, config=EmbedConfig()
        )
        if config.scaling == "plate"
        else {}
    )
    generator = np.random.default_rng(config.seed)
    rate = min(1.0, config.max_cells / int(fields["n_cells"].sum()))
    crops, masks, plates, well_names, field_ids = [], [], [], [], []
    for field in iter_field_crops(
        engine, run_id, size=size, field_ids=set(fields["field_id"]),
        with_masks=config.pool == "cell",
    ):  # fmt: skip
        keep = generator.random(len(field.crops)) < rate
        crops.append(
            scale_crops(field.crops[keep], config.scaling, ranges.get(field.plate))
        )
        if field.masks is not None:
            masks.append(field.masks[keep])
        plates += [field.plate] * int(keep.sum())
        well_names += [field.well] * int(keep.sum())
        field_ids += [field.field_id] * int(keep.sum())
    meta = wells.set_index(["Metadata_Plate", "Metadata_Well"])
    keys = list(zip(plates, well_names, strict=True))
    compounds = meta.loc[keys, "Metadata_Compound"].astype(str).to_numpy()
    if config.label == "compound":
        labels = compounds
    else:
        doses = meta.loc[keys, "Metadata_Concentration"].to_numpy(float)
        labels = np.array(
            [c if np.isnan(d) else f"{c} @ {d:g}" for c, d in zip(compounds, doses, strict=True)],
            dtype=object,
        )  # fmt: skip
    is_val = validation_split(
        np.array(plates), np.array(well_names), config.val_fraction, labels=labels,
        fields=np.array(field_ids), rng=config.seed,
    )  # fmt: skip
    stacked = np.concatenate(crops)
    state = Path(out).with_name(Path(out).name + ".state")
    fine_tuned = fine_tune(
        stacked, labels, is_val, config, masks=np.concatenate(masks) if masks else None,
        device=device, state_path=state,
    )  # fmt: skip
    sha = save_checkpoint(out, fine_tuned, config=config, in_chans=stacked.shape[1],
                          crop_size=size)  # fmt: skip
    state.unlink(missing_ok=True)
    best = fine_tuned.log.loc[fine_tuned.log["epoch"] == fine_tuned.best_epoch].iloc[0]
    metrics = {
        "best_epoch": fine_tuned.best_epoch,
        "val_loss": float(best["val_loss"]),
        "val_accuracy": float(best["val_accuracy"]),
        "val_balanced_accuracy": (  # None: resumed from an older state file
            float(best["val_balanced_accuracy"])
            if pd.notna(best.get("val_balanced_accuracy"))
            else None
        ),
        "balanced_chance": 1 / len(pd.unique(labels[is_val])),
        "chance_accuracy": float(
            pd.Series(labels[is_val]).value_counts(normalize=True).max()
        ),
        "n_train": int((~is_val).sum()),
        "n_val": int(is_val.sum()),
        "val_plates": sorted(map(str, set(np.array(plates)[is_val]))),
        "n_plates": len(set(plates)),
    }
    checkpoint_id = store.register_checkpoint(
        engine, run_id=run_id, model_name=config.model_name, path=str(Path(out).resolve()),
        sha256=sha, config=asdict(config) | {"crop_size": size}, classes=fine_tuned.classes,
        metrics=metrics, log=fine_tuned.log,
    )  # fmt: skip
    return {
        "checkpoint_id": checkpoint_id,
        "path": str(out),
        "sha256": sha,
        "n_classes": len(fine_tuned.classes),
        "epochs": len(fine_tuned.log),
        **metrics,
    }
