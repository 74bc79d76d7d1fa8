"""Run configuration: one frozen dataclass per step, loaded from and saved as TOML.

Field names of `SegmentConfig` and `MeasureConfig` match the keyword arguments of
`pipeline.segment.segment_field` and `pipeline.features.measure_cells`, so
``segment_field(image, **asdict(config.segment))`` works (a test checks this).
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


@dataclass(frozen=True, kw_only=True)
class InputConfig:
    """How image files are named and which channel is which.

    Attributes
    ----------
    layout : str or None
        ``imagexpress``, ``phenix`` or ``multichannel``; None when `pattern` is given.
    pattern : str or None
        A user regex (see `pipeline.io.compile_pattern`).
    channels : dict of str to str
        Channel name -> file token (``w1``, ``ch5``) or 0-based index in a
        multi-channel file.
    nuclei_channel : str
        The nuclear stain; must be a key of `channels`.
    allow_unimaged_wells : bool
        Accept plate-map wells without images.
    """

    layout: str | None = "imagexpress"
    pattern: str | None = None
    channels: dict[str, str] = field(default_factory=dict)
    nuclei_channel: str = "DNA"
    allow_unimaged_wells: bool = False

    def __post_init__(self) -> None:
        if (self.layout is None) == (self.pattern is None):
            raise InputError("input: give exactly one of layout and pattern.")
        if self.channels and self.nuclei_channel not in self.channels:
            raise InputError(
                f"input: nuclei_channel {self.nuclei_channel!r} is not among the channels "
                f"{', '.join(self.channels)}; pass --nuclei-channel NAME or name the "
                "nuclear stain DNA in --channels."
            )


@dataclass(frozen=True, kw_only=True)
class SegmentConfig:
    """Options of `pipeline.segment.segment_field` (baseline Otsu segmenter)."""

    smoothing_sigma_px: float = 1.0
    min_nucleus_area_px: int = 20
    declump_min_distance_px: int = 5
    cell_expansion_px: int = 8

    def __post_init__(self) -> None:
        _check_range("segment", "smoothing_sigma_px", self.smoothing_sigma_px, 0, 50)
        _check_range(
            "segment", "min_nucleus_area_px", self.min_nucleus_area_px, 1, 10**6
        )
        _check_range(
            "segment", "declump_min_distance_px", self.declump_min_distance_px, 0, 1000
        )
        _check_range("segment", "cell_expansion_px", self.cell_expansion_px, 0, 1000)


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """Options of `pipeline.features.measure_cells`."""

    intensity_quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)

    def __post_init__(self) -> None:
        for q in self.intensity_quantiles:
            _check_range("measure", "intensity_quantiles", q, 0, 1)


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
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)


_SECTION_CLASSES = {
    "input": InputConfig,
    "segment": SegmentConfig,
    "measure": MeasureConfig,
    "execution": ExecutionConfig,
}


def _check_range(
    section: str, name: str, value: float, low: float, high: float
) -> None:
    if not low <= value <= high:
        raise InputError(f"{section}.{name} = {value!r} must lie in [{low}, {high}].")


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a `RunConfig` from nested dicts (parsed TOML), rejecting unknown keys.

    Raises
    ------
    InputError
        Naming every unknown section or key with the valid ones, or a value out of
        range.
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
        valid = [f.name for f in fields(cls)]
        for key in values:
            if key not in valid:
                problems.append(
                    f"[{name}] has unknown key {key!r}; valid: {', '.join(valid)}."
                )
        if problems:
            continue
        if name == "input" and "pattern" in values:
            values.setdefault("layout", None)  # a pattern replaces the default layout
        if "intensity_quantiles" in values:
            values["intensity_quantiles"] = tuple(values["intensity_quantiles"])
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
    """Return the config as TOML text (None values are omitted)."""
    return tomli_w.dumps(_drop_none(asdict(config)))


def analysis_key(config: RunConfig) -> str:
    """Return a hash of what determines results (input, segment, measure).

    Two runs of one experiment with the same key are the same run: a rerun resumes
    it. Execution settings are left out, since they do not change results.
    """
    payload = {k: v for k, v in asdict(config).items() if k != "execution"}
    payload["input"].pop("allow_unimaged_wells")
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
