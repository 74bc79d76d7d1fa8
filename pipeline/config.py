"""Run configuration: one frozen dataclass per step, loaded from and saved as TOML.

Field names of `SegmentConfig` match the keyword arguments of
`pipeline.cells.segment.segment_field`, so ``segment_field(plane, **asdict(config.segment))``
works (a test checks this); `MeasureConfig` is passed whole to
`pipeline.measure.features.measure_cells`. Also the facts every stage shares:
`PLATE_FORMATS`, the `SEGMENTERS` and how the networks (the U-Net, the embedding
CNN) run on each device (`DEVICE_PRECISION`, `network_precision`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from pipeline.errors import InputError

#: Plate formats as (rows, columns).
PLATE_FORMATS: dict[int, tuple[int, int]] = {96: (8, 12), 384: (16, 24), 1536: (32, 48)}
#: Nuclei segmenters (`pipeline.cells.segment` implements each).
SEGMENTERS = ("classical", "unet", "cellpose", "stardist")

#: How the networks (the U-Net segmenter, the embedding CNN) run on each kind of
#: device unless ``segment.precision`` / ``embed.precision`` say otherwise: bfloat16
#: autocast on CUDA, float32 on every CPU (`network_precision`).
DEVICE_PRECISION = {"cuda": "bfloat16", "cpu": "float32"}
#: The arithmetic ``segment.precision`` and ``embed.precision`` may choose.
PRECISIONS = ("float32", "bfloat16")
#: Crops per forward pass of the embedding CNN on CUDA unless ``embed.batch_size``
#: says otherwise (`embed_batch_size`).
CUDA_EMBED_BATCH = 32
#: Network input pixels per forward pass on a CPU (images x side x side) unless
#: ``embed.batch_size`` says otherwise: 40 images of 64 px, which keeps the
#: activations in the caches. That is 8 crops for the default recipe with 5 channels
#: (each channel is one image), 13 with 3, 40 with the ``stem`` strategy (one image
#: per crop) and 4 at 96 px with 5 channels, near the fastest batch of each recipe
#: (`benchmarks/bench_embed_batch.py`).
CPU_EMBED_PIXELS = 40 * 64 * 64


def network_precision(
    device: str, precision: str | None = None, *, setting: str = "segment.precision"
) -> str:
    """Return a network's arithmetic on a device: `precision`, or the device's default.

    Parameters
    ----------
    device : str
        A device type (``cpu``, ``cuda``); others default to float32.
    precision : {"float32", "bfloat16"}, optional
        The run's choice; None: the device's default (`DEVICE_PRECISION`).
    setting : str
        The setting `precision` came from, named in the error.

    Returns
    -------
    str
        One of `PRECISIONS`.

    Raises
    ------
    InputError
        If `precision` is not one of `PRECISIONS`.
    """
    if precision is None:
        return DEVICE_PRECISION.get(device, "float32")
    if precision not in PRECISIONS:
        raise InputError(
            f"{setting} = {precision!r} is unknown; choose "
            f"{' or '.join(map(repr, PRECISIONS))}, or remove it (the device's "
            f"default: {', '.join(f'{v} on {k}' for k, v in DEVICE_PRECISION.items())})."
        )
    return precision


def embed_batch_size(
    device: str, batch_size: int | None = None, *, pixels_per_crop: int
) -> int:
    """Return the embedding's crops per forward pass: `batch_size`, or the device's.

    CUDA takes `CUDA_EMBED_BATCH` crops; a CPU (and any other device) about as
    many as fill `CPU_EMBED_PIXELS` input pixels (rounded), at least one. Only the
    speed and the memory change, and the vectors by float rounding at most (about
    1e-5): oneDNN and CUDA pick their kernels by the pass's shape and the thread
    count. With 2 CPU threads, every pass of two or more images gave the same bits
    (`benchmarks/bench_embed_batch.py`) and a single-image pass (the last crop of
    a group of fields, with ``stem`` or one channel) other bits; with one thread,
    passes of up to 15 images did too.

    Parameters
    ----------
    device : str
        A device type (``cpu``, ``cuda``).
    batch_size : int, optional
        The run's choice (``embed.batch_size``); None: the device's default.
    pixels_per_crop : int
        Network input pixels one crop takes (`models.embed.CellEmbedder.pixels_per_crop`).

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If `batch_size` is given and < 1, or `pixels_per_crop` < 1.
    """
    if pixels_per_crop < 1:
        raise ValueError(
            f"pixels_per_crop {pixels_per_crop} must be >= 1: the network input "
            "pixels of one crop (images x side x side)."
        )
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"embed.batch_size = {batch_size} must be >= 1.")
        return batch_size
    if device == "cuda":
        return CUDA_EMBED_BATCH
    return max(1, round(CPU_EMBED_PIXELS / pixels_per_crop))


def check_unet_precision(method: str, precision: str | None) -> None:
    """Raise InputError unless `precision` is None or a known one for ``unet``.

    Parameters
    ----------
    method : str
        The segmenter (``segment.method``).
    precision : {"float32", "bfloat16"}, optional
        ``segment.precision``.

    Raises
    ------
    InputError
        If `precision` is unknown, or given for another segmenter than ``unet``.
    """
    network_precision("cpu", precision)  # raises for an unknown precision
    if precision is not None and method != "unet":
        raise InputError(
            f'segment.precision is for method = "unet" only (method is {method!r}); '
            'remove it or set method = "unet".'
        )


@dataclass(frozen=True, kw_only=True)
class InputConfig:
    """How image files are named and which channel is which.

    Attributes
    ----------
    layout : str or None
        ``imagexpress``, ``phenix`` or ``multichannel``; None when `pattern` is given.
    pattern : str or None
        A user regex (see `pipeline.images.io.compile_pattern`).
    channels : dict of str to str
        Channel name -> file token (``w1``, ``ch5``) or 0-based index in a
        multi-channel file.
    nuclei_channel : str
        The nuclear stain; must be a key of `channels`.
    cytoplasm_channel : str or None
        A cytoplasm or cell-body stain that cells are grown over; None makes each
        cell a ring around its nucleus.
    allow_unimaged_wells : bool
        Accept plate-map wells without images.
    plate_format : {96, 384, 1536} or None
        The plates' well count; None infers it from each plate's imaged wells.
    """

    layout: str | None = "imagexpress"
    pattern: str | None = None
    channels: dict[str, str] = field(default_factory=dict)
    nuclei_channel: str = "DNA"
    cytoplasm_channel: str | None = None
    allow_unimaged_wells: bool = False
    plate_format: int | None = None

    def __post_init__(self) -> None:
        if (self.layout is None) == (self.pattern is None):
            raise InputError("input: give exactly one of layout and pattern.")
        if self.plate_format is not None and self.plate_format not in PLATE_FORMATS:
            raise InputError(
                f"input: plate_format = {self.plate_format!r}; choose one of "
                f"{', '.join(map(str, PLATE_FORMATS))}, or leave it out to infer it "
                "from the imaged wells."
            )
        for key, flag in (
            ("nuclei_channel", "--nuclei-channel"),
            ("cytoplasm_channel", "--cytoplasm-channel"),
        ):
            name = getattr(self, key)
            if self.channels and name is not None and name not in self.channels:
                raise InputError(
                    f"input: {key} {name!r} is not among the channels "
                    f"{', '.join(self.channels)}; pass {flag} NAME with one of them."
                )


@dataclass(frozen=True, kw_only=True)
class IlluminationConfig:
    """Per-plate, per-channel illumination correction (see `pipeline.images.illumination`).

    Attributes
    ----------
    enabled : bool
        Divide every field by its plate's illumination function.
    max_fields_per_plate : int
        Fields (evenly spread over the plate) averaged into the function.
    size_px : int
        Longer side of the stored, block-averaged function.
    smoothing_frac : float
        Gaussian smoothing of the function, as a fraction of `size_px`.
    """

    enabled: bool = True
    max_fields_per_plate: int = 200
    size_px: int = 128
    smoothing_frac: float = 0.06

    def __post_init__(self) -> None:
        _check_range(
            "illumination", "max_fields_per_plate", self.max_fields_per_plate, 1, 10**6
        )  # noqa: E501
        _check_range("illumination", "size_px", self.size_px, 8, 4096)
        _check_range("illumination", "smoothing_frac", self.smoothing_frac, 0, 1)


@dataclass(frozen=True, kw_only=True)
class SegmentConfig:
    """Options of `pipeline.cells.segment.segment_field` (same names).

    ``device = "cuda"`` runs the U-Net on the GPU in bfloat16
    (`DEVICE_PRECISION`); its cells differ slightly from float32 on
    the CPU, so the device is part of the run's analysis key. ``precision``
    overrides the device's arithmetic: ``"bfloat16"`` on a CPU with AMX tiles
    segments 1.4-1.7x faster with the same DSB2018 accuracy (CPUs without bfloat16
    instructions emulate it: 6x slower on an AVX2-only AMD EPYC; the run warns,
    `pipeline.cpu.emulated_bfloat16_warning`), ``"float32"`` on CUDA avoids
    bfloat16's rounding (cuDNN may still use TF32); a precision other than the
    device's default is part of the key.
    """

    method: str = "unet"  # = pipeline.cells.segment.DEFAULT_SEGMENTER
    nucleus_diameter_px: float | None = None
    background_diameters: float = 1.0
    seed_fraction: float = 0.8
    edge_fraction: float = 0.3
    declump_min_distance_diameters: float = 0.2
    intensity_weight: float = 0.5
    min_nucleus_area_fraction: float = 0.1
    exclude_border_nuclei: bool = False
    ring_width_px: float | None = None
    weights: str | None = None
    device: str = "cpu"
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SEGMENTERS:
            raise InputError(
                f"segment.method = {self.method!r} is unknown; choose one of "
                f"{', '.join(SEGMENTERS)}."
            )
        if self.device not in ("cpu", "cuda"):
            raise InputError(
                f'segment.device = {self.device!r} is unknown; choose "cpu" or "cuda".'
            )
        check_unet_precision(self.method, self.precision)
        if self.device == "cuda" and self.method != "unet":
            raise InputError(
                f'segment.device = "cuda" runs the "unet" segmenter only (method is '
                f'{self.method!r}); remove it or set method = "unet".'
            )
        if self.weights is not None and self.method != "unet":
            raise InputError(
                f'segment.weights = {self.weights!r} is for method = "unet" only '
                f'(method is {self.method!r}); remove it or set method = "unet".'
            )
        if self.nucleus_diameter_px is not None:
            _check_range(
                "segment", "nucleus_diameter_px", self.nucleus_diameter_px, 2, 1000
            )  # noqa: E501
        _check_range(
            "segment", "background_diameters", self.background_diameters, 0, 100
        )  # noqa: E501
        _check_range("segment", "seed_fraction", self.seed_fraction, 0.01, 1)
        _check_range("segment", "edge_fraction", self.edge_fraction, 0, 0.99)
        _check_range(
            "segment",
            "declump_min_distance_diameters",
            self.declump_min_distance_diameters,
            0,
            10,
        )  # noqa: E501
        _check_range("segment", "intensity_weight", self.intensity_weight, 0, 100)
        _check_range(
            "segment",
            "min_nucleus_area_fraction",
            self.min_nucleus_area_fraction,
            0,
            10,
        )  # noqa: E501
        if self.ring_width_px is not None:
            _check_range("segment", "ring_width_px", self.ring_width_px, 0, 1000)


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """What `pipeline.measure.features.measure_cells` measures.

    Attributes
    ----------
    zernike_degree : int
        Zernike moments up to this degree (9 gives CellProfiler's 30).
    texture_scales : tuple of int
        Pixel distances of the grey-level co-occurrence pairs.
    texture_levels : int
        Grey levels of the co-occurrence matrices.
    radial_bins : int
        Rings from the nucleus centre to the cell edge.
    granularity_scales : int
        Openings of the granular spectrum.
    neighbor_distance_px : int
        Also count nuclei within this distance; 0 for none.
    cytoplasm : bool
        Measure the cytoplasm (each cell minus its nucleus) as a third compartment.
        False drops its shape, intensity and texture features (about a quarter of
        them, and of the measuring time), as a CellProfiler pipeline that
        measures nuclei and cells only; keep it for translocation readouts.
    """

    zernike_degree: int = 9
    texture_scales: tuple[int, ...] = (3, 5)
    texture_levels: int = 16
    radial_bins: int = 4
    granularity_scales: int = 8
    neighbor_distance_px: int = 0
    cytoplasm: bool = True

    def __post_init__(self) -> None:
        _check_range("measure", "zernike_degree", self.zernike_degree, 0, 20)
        for scale in self.texture_scales:
            _check_range("measure", "texture_scales", scale, 1, 100)
        _check_range("measure", "texture_levels", self.texture_levels, 2, 256)
        _check_range("measure", "radial_bins", self.radial_bins, 1, 32)
        _check_range("measure", "granularity_scales", self.granularity_scales, 0, 32)
        _check_range(
            "measure", "neighbor_distance_px", self.neighbor_distance_px, 0, 10**4
        )  # noqa: E501


@dataclass(frozen=True, kw_only=True)
class QCConfig:
    """Thresholds that flag a field.

    Flagged fields stay stored but leave profiles (exports and hit calling) unless
    asked for with ``--include-flagged``.

    Attributes
    ----------
    max_saturated_frac : float
        Flag a field where more than this fraction of a channel's pixels are at the
        maximum value.
    focus_mad : float
        Flag a field whose nuclear-channel focus score (power-spectrum log-log
        slope) lies more than this many robust standard deviations below its
        plate's median (blurred); 0 turns it off.
    intensity_mad : float
        Flag a field whose median intensity in any channel lies more than this many
        robust standard deviations from its plate's median; 0 turns it off.
    min_cells : int
        Flag a field with fewer cells; 0 turns it off.
    """

    max_saturated_frac: float = 0.01
    focus_mad: float = 5.0
    intensity_mad: float = 0.0
    min_cells: int = 0

    def __post_init__(self) -> None:
        _check_range("qc", "max_saturated_frac", self.max_saturated_frac, 0, 1)
        _check_range("qc", "focus_mad", self.focus_mad, 0, 1000)
        _check_range("qc", "intensity_mad", self.intensity_mad, 0, 1000)
        _check_range("qc", "min_cells", self.min_cells, 0, 10**6)


EMBED_STRATEGIES = ("rgb", "stem")
EMBED_SCALINGS = ("crop", "plate")
EMBED_POOLS = ("cell", "crop")
AGGREGATIONS = ("median", "mean")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """How cells are embedded by a CNN (`models.embed`; saved with the feature set).

    Attributes
    ----------
    enabled : bool
        `phenoscreen run` embeds the run's cells when it completes (``--embed``).
    model_name : str
        A timm model name.
    weights : str
        ``auto``, ``package``, ``hub`` or a checkpoint path
        (`models.backbones.create_backbone`).
    checkpoint : str or None
        A fine-tuned checkpoint (`models.train.save_checkpoint`) to embed with
        instead of `model_name` and `weights`.
    strategy : {"rgb", "stem"}
        ``rgb``: each channel as a grey image replicated to RGB, embedded on its
        own by the ImageNet network, the C vectors concatenated; ``stem``: one
        pass through a C-channel stem adapted by timm from the RGB weights.
    layer : str
        ``pooled`` (the network's final features) or ``blocks.K``: the output of
        stage K (EfficientNet ``blocks[K]``), an intermediate layer that keeps
        more of the cell's appearance; averaged as `pool` says.
    pool : {"cell", "crop"}
        Where the layer's feature map is averaged: over the crop's own cell
        (its segmentation mask, shrunk to the map's grid by area, each grid
        square weighed by the share of it the cell covers; the whole crop when
        the mask is empty), so neighbours and background do not dilute it, or
        over the whole crop. In one run each, ``cell`` ordered BBBC021 doses
        about as well (Spearman 0.740 vs 0.729), separated BBBC014
        translocation tiles where ``crop`` did not (Z' 0.129 vs -0.238) and
        called the demo's weak active (README, Deep profiles).
    crop_size : int or None
        Crop side in pixels at the image's resolution, centred on each nucleus;
        None (0 in TOML): four median nucleus diameters.
    input_size : int or None
        The crops are resized (bilinear) to this side before the network; None
        (0 in TOML) keeps the crop size.
    scaling : {"plate", "crop"}
        ``plate``: between `percentiles` of the plate's negative-control cells
        (keeps brightness differences between cells and wells); ``crop``: each
        crop's channels between their own minimum and maximum (shape and
        pattern only).
    percentiles : tuple of float
        With ``plate`` scaling: low and high percentiles of control-cell pixels.
    aggregate : {"median", "mean"}
        How a well's cells are aggregated into its profile.
    batch_size : int or None
        Crops per forward pass; None (0 in TOML): the device's default
        (`embed_batch_size`: 32 on CUDA; on a CPU as many as make 40 images of
        64 px, e.g. 8 crops for this recipe with 5 channels, 40 with ``stem``). The
        batch changes the vectors by float rounding at most (`embed_batch_size`).
    max_control_fields : int
        Negative-control fields per plate used to fit the ``plate`` scaling.
    precision : {"float32", "bfloat16"} or None
        The network's arithmetic; None: the device's default (`network_precision`:
        float32 on CPU, bfloat16 on CUDA). ``"bfloat16"`` on a CPU with AMX tiles
        embeds faster. The arithmetic used is recorded with the feature set, and
        bfloat16 is part of its digest, so bfloat16 and float32 vectors never mix
        in one feature set.
    """

    enabled: bool = False
    model_name: str = "tf_efficientnet_lite0"
    weights: str = "auto"
    checkpoint: str | None = None
    strategy: str = "rgb"
    layer: str = "blocks.3"
    pool: str = "cell"
    crop_size: int | None = None
    input_size: int | None = 64
    scaling: str = "plate"
    percentiles: tuple[float, float] = (1.0, 99.9)
    aggregate: str = "median"
    batch_size: int | None = None
    max_control_fields: int = 20
    precision: str | None = None

    def __post_init__(self) -> None:
        # TOML has no None: 0 stands for it
        for name in ("crop_size", "input_size", "batch_size"):
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)
        problems = []
        for key, value, valid in (
            ("strategy", self.strategy, EMBED_STRATEGIES),
            ("scaling", self.scaling, EMBED_SCALINGS),
            ("pool", self.pool, EMBED_POOLS),
            ("aggregate", self.aggregate, AGGREGATIONS),
        ):
            if value not in valid:
                problems.append(
                    f"embed.{key} = {value!r} is unknown; choose one of "
                    f"{', '.join(valid)}."
                )
        if not is_layer_name(self.layer):
            problems.append(
                f"embed.layer = {self.layer!r} must be 'pooled' or 'blocks.K' "
                "(K = 0, 1, ...: a stage of the network)."
            )
        try:
            network_precision("cpu", self.precision, setting="embed.precision")
        except InputError as error:
            problems.extend(error.problems)
        if len(self.percentiles) != 2 or not (
            0 <= self.percentiles[0] < self.percentiles[1] <= 100
        ):
            problems.append(
                f"embed.percentiles = {list(self.percentiles)} must be two rising "
                "values in [0, 100]."
            )
        if problems:
            raise InputError(problems)
        for name in ("crop_size", "input_size"):
            if getattr(self, name) is not None:
                _check_range("embed", name, getattr(self, name), 8, 1024)
        if self.batch_size is not None:
            _check_range("embed", "batch_size", self.batch_size, 1, 65536)
        _check_range("embed", "max_control_fields", self.max_control_fields, 1, 10**6)


def is_layer_name(layer: str) -> bool:
    """Return whether `layer` is ``pooled`` or names a stage, ``blocks.K`` (K >= 0)."""
    head, _, index = layer.partition(".")
    return layer == "pooled" or (head == "blocks" and index.isdigit())


WHITENINGS = ("none", "controls")
WHITEN_SCOPES = ("plate", "batch", "all")


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """How well profiles become comparable profiles (`pipeline.profiling.profiles`).

    Every feature set of the run (classical, deep, combined, imported) goes
    through the same recipe, in this order: each plate's wells are robust-z
    scaled to the plate's negative-control wells (or to all its wells); features
    are selected as pycytominer does (too many missing values, near-constant,
    correlated above a threshold with a kept feature); then, optionally, profiles
    are whitened on the control wells (TVN: the controls' covariance, shrunk by
    Ledoit-Wolf so few controls in many dimensions stay well conditioned, is made
    the identity), per plate, per batch or over all plates.

    Attributes
    ----------
    normalize_to : {"controls", "all"}
        Scale each plate to its negative-control wells, or to all its wells (for
        screens whose controls are few or unrepresentative).
    scale_by : {"batch", "plate"}
        Each plate is centred on its own wells of reference; the spread features
        are divided by is that of the reference wells of all plates of its
        ``Metadata_Batch`` (of all plates without a batch column), centred per
        plate (``batch``), or of the plate alone (``plate``, pycytominer's way).
        The MAD of a plate's 16-24 DMSO wells is itself uncertain by 24-29 % per
        feature (relative standard deviation for normal values); on JUMP-MOA and
        LINCS dealt into plates of 4-12 DMSO wells, per-plate spreads lowered the
        share of compounds called active at every split, and Percent Replicating
        at 12 and 8 wells per plate (`benchmarks/bench_profile_recipe.py`).
    feature_select : bool
        Drop missing, near-constant and correlated features (see
        `pipeline.profiling.featureselect.select_features`).
    corr_threshold : float
        Of the feature selection: the absolute correlation above which a feature
        is dropped. 0.95 rather than pycytominer's 0.9: at 0.9 the demo lost a
        weak true active (`benchmarks/bench_profile_recipe.py`).
    corr_on : {"controls", "all"}
        Wells whose profiles measure those correlations: the negative controls
        (when there are at least `pipeline.profiling.profiles.MIN_CORRELATION_CONTROLS`,
        else all wells, logged), so that features moved together by a treatment
        (every readout of a translocation, of a strong positive control) are not
        merged into one; or all wells, as pycytominer does.
    whiten : {"none", "controls"}
        ``controls``: whiten on the negative-control wells.
    whiten_scope : {"plate", "batch", "all"}
        Fit the whitening per plate, per ``Metadata_Batch``, or once on the
        controls of all plates.
    """

    normalize_to: str = "controls"
    scale_by: str = "batch"
    feature_select: bool = True
    corr_threshold: float = 0.95
    corr_on: str = "controls"
    whiten: str = "none"
    whiten_scope: str = "all"

    def __post_init__(self) -> None:
        if self.normalize_to not in ("controls", "all"):
            raise InputError(
                f"profile.normalize_to = {self.normalize_to!r} is unknown; choose "
                "controls or all."
            )
        if self.scale_by not in ("batch", "plate"):
            raise InputError(
                f"profile.scale_by = {self.scale_by!r} is unknown; choose batch or "
                "plate."
            )
        _check_range("profile", "corr_threshold", self.corr_threshold, 0.5, 1)
        if self.corr_on not in ("controls", "all"):
            raise InputError(
                f"profile.corr_on = {self.corr_on!r} is unknown; choose controls or "
                "all."
            )
        if self.whiten not in WHITENINGS:
            raise InputError(
                f"profile.whiten = {self.whiten!r} is unknown; choose one of "
                f"{', '.join(WHITENINGS)}."
            )
        if self.whiten_scope not in WHITEN_SCOPES:
            raise InputError(
                f"profile.whiten_scope = {self.whiten_scope!r} is unknown; choose "
                f"one of {', '.join(WHITEN_SCOPES)}."
            )


@dataclass(frozen=True, kw_only=True)
class HitsConfig:
    """How compounds are called hits (`pipeline.calls.hits.call_hits`).

    Attributes
    ----------
    fdr : float
        False discovery rate of the hit list and of active doses.
    toxicity_threshold : float
        A compound-dose whose median cell count is below this fraction of the
        negative controls' is toxic.
    cell_count_control : str
        A compound (any role) declared to change cell count, e.g. a cytotoxic
        positive control: plate QC then reports Z' of the cell count of its wells
        against the negative controls. Empty: no cell-count Z'.
    """

    fdr: float = 0.05
    toxicity_threshold: float = 0.5
    cell_count_control: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.fdr < 1:
            raise InputError(f"hits.fdr = {self.fdr!r} must lie in (0, 1), e.g. 0.05.")
        _check_range("hits", "toxicity_threshold", self.toxicity_threshold, 0, 1)


@dataclass(frozen=True, kw_only=True)
class ExecutionConfig:
    """Where and how fields are processed; does not change results.

    Attributes
    ----------
    scheduler : str or None
        Address of a running Dask scheduler (``tcp://host:8786``); None starts a
        LocalCluster.
    n_workers : int or None
        LocalCluster worker processes; None means one per core.
    processes : bool
        LocalCluster workers as processes (True) or threads in this process.
    max_failed_fields_frac : float
        The run fails when more than this fraction of fields cannot be processed.
    """

    scheduler: str | None = None
    n_workers: int | None = None
    processes: bool = True
    max_failed_fields_frac: float = 0.05

    def __post_init__(self) -> None:
        if self.n_workers is not None:
            _check_range("execution", "n_workers", self.n_workers, 1, 4096)
        _check_range(
            "execution", "max_failed_fields_frac", self.max_failed_fields_frac, 0, 1
        )

    def resolved_n_workers(self) -> int:
        """Return the number of LocalCluster workers to start."""
        return self.n_workers or os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a run needs besides the images and the plate map."""

    input: InputConfig = field(default_factory=InputConfig)
    illumination: IlluminationConfig = field(default_factory=IlluminationConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    hits: HitsConfig = field(default_factory=HitsConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)


_SECTION_CLASSES = {
    "input": InputConfig,
    "illumination": IlluminationConfig,
    "segment": SegmentConfig,
    "measure": MeasureConfig,
    "qc": QCConfig,
    "embed": EmbedConfig,
    "profile": ProfileConfig,
    "hits": HitsConfig,
    "execution": ExecutionConfig,
}
# Keys of earlier versions: a config naming one is refused with this advice; the
# configs stored with earlier runs still load (the key is dropped).
_RETIRED_KEYS = {
    ("segment", "hysteresis_fraction"): (
        "the classical segmenter now seeds nuclei above seed_fraction of the Otsu "
        "threshold and cuts each at edge_fraction of its own peak; use those"
    ),
}


def _check_range(
    section: str, name: str, value: float, low: float, high: float
) -> None:
    if not low <= value <= high:
        raise InputError(f"{section}.{name} = {value!r} must lie in [{low}, {high}].")


def _type_problem(section: str, key: str, value: Any, annotation: str) -> str | None:
    """Return why `value` does not fit a field annotated `annotation`, or None."""
    if value is None and "None" in annotation:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    kinds = (
        ("bool", isinstance(value, bool), "true or false"),
        ("tuple", isinstance(value, list | tuple), "a list, e.g. [1, 2]"),
        ("dict", isinstance(value, dict), 'a table of NAME = "TOKEN" pairs'),
        (
            "int",
            isinstance(value, int) and not isinstance(value, bool),
            "a whole number",
        ),
        ("float", number, "a number"),
        ("str", isinstance(value, str), 'text in quotes, e.g. "name"'),
    )
    for kind, fits, wanted in kinds:
        if annotation.startswith(kind):
            return None if fits else f"[{section}] {key} = {value!r} must be {wanted}."
    return None


def config_from_dict(
    data: dict[str, Any], *, source: str = "config", stored: bool = False
) -> RunConfig:
    """Build a `RunConfig` from nested dicts (parsed TOML), rejecting unknown keys.

    Parameters
    ----------
    data : dict
        Sections of key-value pairs.
    source : str
        Named in error messages.
    stored : bool
        The config was saved with an earlier run: retired keys are dropped
        instead of refused.

    Raises
    ------
    InputError
        Naming every unknown section or key with the valid ones (retired keys with
        their replacement), a value of the wrong type (with the type wanted), or a
        value out of range.
    """
    problems = []
    for section in data:
        if section not in _SECTION_CLASSES:
            problems.append(
                f"unknown section [{section}]; valid: {', '.join(_SECTION_CLASSES)}."
            )
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        values = dict(data.get(name, {}))
        for (section, key), advice in _RETIRED_KEYS.items():
            if section == name and key in values:
                del values[key]
                if not stored:
                    problems.append(f"[{name}] {key} was retired: {advice}.")
        annotations = {f.name: str(f.type) for f in fields(cls)}
        for key, value in values.items():
            if key not in annotations:
                problems.append(
                    f"[{name}] has unknown key {key!r}; valid: "
                    f"{', '.join(annotations)}."
                )
            elif problem := _type_problem(name, key, value, annotations[key]):
                problems.append(problem)
        if problems:
            continue
        if name == "input" and "pattern" in values:
            values.setdefault("layout", None)  # a pattern replaces the default layout
        if stored and name == "profile":  # saved before these settings existed:
            values.setdefault("feature_select", False)  # its results stay as they were
            values.setdefault("corr_on", "all")
            values.setdefault("scale_by", "plate")
        for key in ("texture_scales", "percentiles"):
            if key in values:
                values[key] = tuple(values[key])
        try:
            sections[name] = cls(**values)
        except TypeError as exc:
            problems.append(f"[{name}]: {exc}.")
    if problems:
        raise InputError(problems, source=source)
    return RunConfig(**sections)


def load_config(path: str | Path) -> RunConfig:
    """Read a run config TOML file.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    InputError
        If the TOML is malformed or has unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"is not valid TOML: {exc}.", source=str(path)) from exc
    return config_from_dict(data, source=str(path))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple):
        return list(value)
    return value


def dump_config(config: RunConfig) -> str:
    """Return the config as TOML text (None values are omitted).

    The embedding's sizes are written as 0 when None (TOML has no None, and an
    omitted key would read back as the default).
    """
    data = asdict(config)
    for key in ("crop_size", "input_size"):
        if data["embed"][key] is None:
            data["embed"][key] = 0
    return tomli_w.dumps(_drop_none(data))


def analysis_key(config: RunConfig, weights_sha256: str | None = None) -> str:
    """Return a hash of what determines cells (input, illumination, segment, measure).

    Two runs of one experiment with the same key are the same run: a rerun resumes
    it. Execution settings, QC thresholds, the embedding, the profile recipe and the
    hit settings are left out: they do not change the cells (flags are recomputed
    at the end of every run; an embedding recipe is a feature set of its own). `weights_sha256`, the
    learned segmenter's weights, counts too: new weights at the same path make a
    new run.
    """
    payload = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("execution", "qc", "embed", "profile", "hits")
    }
    for key in ("allow_unimaged_wells", "plate_format"):  # validation, not cells
        payload["input"].pop(key)
    segment = payload["segment"]
    device, precision = segment["device"], segment["precision"]
    if network_precision(device, precision) == network_precision(device):
        segment.pop("precision")  # the device's default: keys from before the option
    if segment["device"] == "cpu":  # keys of runs from before the option
        segment.pop("device")
    if payload["measure"]["cytoplasm"]:  # keys of runs from before the option
        payload["measure"].pop("cytoplasm")
    if weights_sha256:
        payload["segment"]["weights_sha256"] = weights_sha256
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_overrides(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """Return a copy with some keys of some sections replaced; None values are ignored.

    Examples
    --------
    >>> cfg = with_overrides(RunConfig(), execution={"n_workers": 2})
    >>> cfg.execution.n_workers
    2
    """
    updates = {}
    for name, values in sections.items():
        if name not in _SECTION_CLASSES:
            raise ValueError(
                f"unknown section {name!r}; valid: {', '.join(_SECTION_CLASSES)}."
            )
        kept = {k: v for k, v in values.items() if v is not None}
        if kept:
            updates[name] = replace(getattr(config, name), **kept)
    return replace(config, **updates)
