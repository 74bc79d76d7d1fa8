"""A synthetic but realistic 96-well Cell Painting-like demo plate with ground truth.

Three channels (DNA, Actin = cytoplasm, Mito = punctate organelles), uneven
illumination, blur, shot and read noise, 12-bit uint16. DMSO wells in columns 1 and 12,
a positive control in column 11, and nine compounds in columns 2-10 as 8-point
half-log dose series (rows A-H, 10 uM down to 3.2 nM) whose true effects differ:
nuclear size up or down, cell elongation, organelle intensity, organelle texture, cell
loss, a weak compound and two inactive ones. The ground truth (true actives, EC50s,
masks of a subset of fields) is written beside the images. It serves the demo, tests
and benchmarks; real data in ../shared/data is the evidence that methods work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi
from skimage.draw import ellipse

from pipeline.images.platemap import PLATE_FORMATS, format_well

CHANNELS = {"DNA": "w1", "Actin": "w2", "Mito": "w3"}
#: The five Cell Painting-like channels of `write_demo_plate(n_channels=5)`.
CHANNELS_5 = CHANNELS | {"ER": "w4", "RNA": "w5"}
DOSES_UM = tuple(float(10 * 10 ** (-0.5 * k)) for k in range(8))


@dataclass(frozen=True)
class DemoCompound:
    """A demo compound: its phenotype and potency (Hill curve)."""

    name: str
    effect: str
    ec50_um: float
    hill: float
    moa: str


COMPOUNDS = (
    DemoCompound("Nucleomax", "nuclear_size_up", 0.3, 1.5, "DNA synthesis inhibitor"),
    DemoCompound("Condensin-7", "nuclear_size_down", 1.0, 2.0, "apoptosis inducer"),
    DemoCompound("Elongatin", "cell_elongation", 0.1, 1.2, "ROCK inhibitor"),
    DemoCompound(
        "Mitoglow", "organelle_intensity", 0.5, 1.5, "mitochondrial uncoupler"
    ),
    DemoCompound("Speckletin", "organelle_texture", 2.0, 1.5, "autophagy inducer"),
    DemoCompound("Toxicol", "cell_loss", 1.0, 2.0, "cytotoxic"),
    DemoCompound("Weakamide", "nuclear_size_up", 30.0, 1.5, "DNA synthesis inhibitor"),
    DemoCompound("Inertin-A", "none", float("inf"), 1.0, "inactive"),
    DemoCompound("Inertin-B", "none", float("inf"), 1.0, "inactive"),
)
POSITIVE_CONTROL = DemoCompound(
    "Nucleomax", "nuclear_size_up", 0.3, 1.5, "DNA synthesis inhibitor"
)
POSITIVE_CONTROL_DOSE_UM = 10.0
#: A compound is truly active when its effect at the top dose reaches this fraction.
MIN_TRUE_EFFECT = 0.1


def demo_platemap(plates: list[str], *, plate_format: int = 96) -> pd.DataFrame:
    """Return the demo plate map: DMSO in columns 1 and 12, positive control in 11.

    On 384- and 1536-well plates the 96-well layout is interleaved as a liquid
    handler stamps four (sixteen) 96-well plates: 96-well (row, column) becomes
    (k row + i, k column + j) for every quadrant (i, j) with k = 2 (4), so each
    compound-dose has 4 (16) wells per plate.

    Parameters
    ----------
    plates : list of str
        Plate names; every plate gets the same layout.
    plate_format : {96, 384, 1536}

    Returns
    -------
    DataFrame
        Columns ``plate, well, compound, concentration_uM, role, moa``;
        `plate_format` rows per plate.

    Raises
    ------
    ValueError
        If `plates` is empty or `plate_format` is not 96, 384 or 1536.
    """
    if not plates:
        raise ValueError("plates is empty; name at least one plate.")
    if plate_format not in PLATE_FORMATS:
        raise ValueError(f"plate_format = {plate_format}; choose 96, 384 or 1536.")
    k = PLATE_FORMATS[plate_format][0] // 8
    rows = []
    for plate in plates:
        for r in range(8 * k):
            for c in range(12 * k):
                well = format_well(r, c)
                column = c // k
                if column in (0, 11):
                    row = ("DMSO", 0.1, "negative_control", "control")
                elif column == 10:
                    row = (
                        POSITIVE_CONTROL.name,
                        POSITIVE_CONTROL_DOSE_UM,
                        "positive_control",
                        POSITIVE_CONTROL.moa,
                    )
                else:
                    compound = COMPOUNDS[column - 1]
                    row = (compound.name, DOSES_UM[r // k], "treatment", compound.moa)
                rows.append((plate, well, *row))
    return pd.DataFrame(
        rows, columns=["plate", "well", "compound", "concentration_uM", "role", "moa"]
    )


def effect_size(compound: DemoCompound, concentration_um: float) -> float:
    """Return the fractional effect in [0, 1] of a compound at a concentration (Hill)."""
    if (
        compound.effect == "none"
        or not np.isfinite(compound.ec50_um)
        or concentration_um <= 0
    ):
        return 0.0
    ratio = (concentration_um / compound.ec50_um) ** compound.hill
    return float(ratio / (1.0 + ratio))


#: The phenotypes a demo compound can have (`DemoCompound.effect`).
EFFECTS = (
    "none", "nuclear_size_up", "nuclear_size_down", "cell_elongation",
    "organelle_intensity", "organelle_texture", "cell_loss",
)  # fmt: skip


def cell_params(
    effect: str, strength: float, rng: np.random.Generator, n_max: int
) -> dict:
    """Return one field's cell parameters under an effect of a given strength.

    Parameters
    ----------
    effect : str
        One of `EFFECTS`.
    strength : float
        In [0, 1] (`effect_size`).
    rng : numpy.random.Generator
        Draws the field's cell count (Poisson).
    n_max : int
        Mean cell count of an unaffected field.

    Returns
    -------
    dict
        ``n_cells``, ``nucleus_scale``, ``dna_gain``, ``elongation``, ``mito_gain``
        and ``spot_factor``, as `render_field` takes them.

    Raises
    ------
    ValueError
        If `effect` is unknown, `strength` outside [0, 1] or `n_max` negative.
    """
    if effect not in EFFECTS:
        raise ValueError(f"effect {effect!r} is unknown; use one of {EFFECTS}.")
    if not 0 <= strength <= 1 or n_max < 0:
        raise ValueError(f"need strength {strength} in [0, 1] and n_max {n_max} >= 0.")
    n_cells = rng.poisson(
        n_max * (1 - 0.85 * strength if effect == "cell_loss" else 1.0)
    )
    nucleus_scale = {
        "nuclear_size_up": 1 + 0.6 * strength,
        "nuclear_size_down": 1 - 0.35 * strength,
    }
    return {
        "n_cells": int(n_cells),
        "nucleus_scale": nucleus_scale.get(effect, 1.0),
        "dna_gain": 1 + 0.8 * strength if effect == "nuclear_size_down" else 1.0,
        "elongation": 1 + 1.5 * strength if effect == "cell_elongation" else 1.0,
        "mito_gain": 1 + 1.5 * strength if effect == "organelle_intensity" else 1.0,
        "spot_factor": 1 + 3.0 * strength if effect == "organelle_texture" else 1.0,
    }


def render_field(
    params: dict,
    *,
    shape: tuple[int, int],
    illumination: np.ndarray,
    nucleus_radius_px: float,
    rng: np.random.Generator,
    n_channels: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one field of cells.

    Parameters
    ----------
    params : dict
        From `cell_params`.
    shape : tuple of int
        (Y, X) of the field.
    illumination : ndarray of shape (Y, X)
        Multiplicative illumination, about 0.6-1.
    nucleus_radius_px : float
        Mean DMSO nucleus radius.
    rng : Generator
    n_channels : {3, 5}
        5 adds ER (a perinuclear glow) and RNA (nucleoli and faint cytoplasm),
        drawn after the first three, which stay as with 3.

    Returns
    -------
    image : ndarray of shape (n_channels, Y, X), uint16
        DNA, Actin, Mito (, ER, RNA); 12-bit range.
    nuclei_labels, cell_labels : ndarray of shape (Y, X), uint16
        True objects 1..N.
    """
    height, width = shape
    nuclei = np.zeros(shape, np.uint16)
    cells = np.zeros(shape, np.uint16)
    dna = np.zeros(shape, np.float32)
    actin = np.zeros(shape, np.float32)
    spots = np.zeros(shape, np.float32)
    min_distance = 2.6 * nucleus_radius_px * max(params["nucleus_scale"], 1.0)
    placed = np.empty((params["n_cells"], 2))  # rejection sampling, vectorized
    n_placed = 0
    for _ in range(params["n_cells"] * 30):
        if n_placed == params["n_cells"]:
            break
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        distance2 = (y - placed[:n_placed, 0]) ** 2 + (x - placed[:n_placed, 1]) ** 2
        if (distance2 > min_distance**2).all():
            placed[n_placed] = y, x
            n_placed += 1
    centres = [(float(y), float(x)) for y, x in placed[:n_placed]]
    nucleus_shapes = []
    for k, (y, x) in enumerate(centres, start=1):
        radius = max(2.5, rng.normal(nucleus_radius_px, 0.12 * nucleus_radius_px))
        radius *= params["nucleus_scale"]
        ratio = rng.uniform(1.0, 1.35)
        angle = rng.uniform(-np.pi, np.pi)
        nucleus_shapes.append((y, x, radius * ratio, radius / ratio, angle))
        cell_radius = radius / params["nucleus_scale"] * rng.uniform(2.0, 2.5)
        cell_ratio = rng.uniform(1.0, 1.4) * params["elongation"]
        rr, cc = ellipse(
            y,
            x,
            cell_radius * np.sqrt(cell_ratio),
            cell_radius / np.sqrt(cell_ratio),
            shape=shape,
            rotation=rng.uniform(-np.pi, np.pi),
        )
        cells[rr, cc] = k
        actin[rr, cc] = rng.normal(800, 120)
    for k, (y, x, a, b, angle) in enumerate(nucleus_shapes, start=1):
        rr, cc = ellipse(y, x, a, b, shape=shape, rotation=angle)
        nuclei[rr, cc] = k
        cells[rr, cc] = k
        dna[rr, cc] = rng.normal(2000, 250) * params["dna_gain"]
    cytoplasm = np.flatnonzero((cells > 0) & (nuclei == 0))
    n_spots = rng.poisson(14 * params["spot_factor"] * max(len(centres), 1))
    if len(cytoplasm) and n_spots:
        where = rng.choice(cytoplasm, size=n_spots)
        np.add.at(
            spots.ravel(), where, rng.gamma(4.0, 180.0 / params["spot_factor"], n_spots)
        )
    texture = ndi.gaussian_filter(rng.normal(1.0, 0.25, shape).astype(np.float32), 1.5)
    dna *= np.clip(texture, 0.5, 1.5)
    mito = ndi.gaussian_filter(spots, 1.2) * 9.0 * params["mito_gain"]
    mito += 0.25 * actin * params["mito_gain"]
    image = np.stack([ndi.gaussian_filter(ch, 1.0) for ch in (dna, actin * 0.9, mito)])
    image = image * illumination + 100.0
    noisy = rng.poisson(np.clip(image, 0, None)) + rng.normal(0, 6, image.shape)
    if n_channels == 5:
        noisy = np.concatenate([noisy, _er_rna(nuclei, cells, actin, nucleus_radius_px,
                                               illumination, rng)])  # fmt: skip
    return np.clip(noisy, 0, 4095).astype(np.uint16), nuclei, cells


def _er_rna(
    nuclei: np.ndarray,
    cells: np.ndarray,
    actin: np.ndarray,
    nucleus_radius_px: float,
    illumination: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """ER and RNA channels of a field, shape (2, Y, X), with noise."""
    inside = cells > 0
    er = ndi.gaussian_filter((nuclei > 0).astype(np.float32), nucleus_radius_px)
    er = er * inside * 2400.0 * (nuclei == 0) + (nuclei > 0) * 150.0
    nucleoli = np.zeros(nuclei.shape, np.float32)
    where = np.flatnonzero(nuclei)
    if where.size:
        n_spots = max(int(nuclei.max()), 1) * 3
        np.add.at(
            nucleoli.ravel(), rng.choice(where, n_spots), rng.gamma(4.0, 250.0, n_spots)
        )
    rna = ndi.gaussian_filter(nucleoli, 1.2) * 8.0 + 0.12 * actin
    image = np.stack([ndi.gaussian_filter(ch, 1.0) for ch in (er, rna)])
    image = image * illumination + 100.0
    return rng.poisson(np.clip(image, 0, None)) + rng.normal(0, 6, image.shape)


def vignetting(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Return a smooth illumination falloff: 1 at a random centre, down to 0.65.

    The falloff is quadratic in the distance from the centre and reaches 0.65 at
    0.63 of the longest side from it (the far corners).

    Parameters
    ----------
    shape : tuple of int
        (H, W) of the field, both >= 1.
    rng : numpy.random.Generator
        Places the bright centre within the middle fifth of each axis.

    Returns
    -------
    ndarray of shape (H, W), float32

    Raises
    ------
    ValueError
        If `shape` is not two positive sides.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape {shape} must be two positive sides (H, W).")
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    cy, cx = shape[0] * rng.uniform(0.4, 0.6), shape[1] * rng.uniform(0.4, 0.6)
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.5 * max(shape)) ** 2
    return (1.0 - 0.35 * np.clip(r2, 0, 1.6) / 1.6).astype(np.float32)


def write_demo_plate(
    out_dir: str | Path,
    *,
    n_plates: int = 3,
    fields_per_well: int = 2,
    field_size_px: int = 256,
    cells_per_field: int = 30,
    seed: int = 0,
    plate_format: int = 96,
    n_channels: int = 3,
    nucleus_diameter_px: float = 14.0,
) -> dict[str, Path]:
    """Generate the demo experiment: images, plate map, run config and ground truth.

    Parameters
    ----------
    out_dir : str or Path
        Created if needed; ``images/<plate>/<plate>_<well>_s<site>_w<channel>.tif``
        (ImageXpress naming), ``platemap.csv``, ``demo.toml`` and ``ground_truth/``
        (``truth.json`` and label masks of site 1 of every well of the first plate).
    n_plates : int
        Replicate plates with the same layout (different cells).
    fields_per_well : int
        Sites per well.
    field_size_px : int
        Field side in pixels (nuclei are about 14 px across).
    cells_per_field : int
        Mean cell count of a DMSO field.
    seed : int
        Everything is reproducible from it.
    plate_format : {96, 384, 1536}
        Wells per plate (`demo_platemap`).
    n_channels : {3, 5}
        DNA, Actin, Mito (`CHANNELS`), or also ER and RNA (`CHANNELS_5`).
    nucleus_diameter_px : float
        Mean DMSO nucleus diameter. A real 1080 px Cell Painting field (JUMP)
        holds about 200 nuclei of about 20 px: ``field_size_px=1080,
        cells_per_field=200, nucleus_diameter_px=20``.

    Returns
    -------
    dict of str to Path
        ``images``, ``platemap``, ``config`` and ``truth`` paths.

    Raises
    ------
    ValueError
        If a count or size is out of range.
    """
    if n_plates < 1 or fields_per_well < 1 or cells_per_field < 1:
        raise ValueError("n_plates, fields_per_well and cells_per_field must be >= 1.")
    if not 64 <= field_size_px <= 4096:
        raise ValueError(f"field_size_px = {field_size_px} must lie in [64, 4096].")
    if n_channels not in (3, 5):
        raise ValueError(f"n_channels = {n_channels} must be 3 or 5.")
    if not 4 <= nucleus_diameter_px <= field_size_px / 4:
        raise ValueError(
            f"nucleus_diameter_px = {nucleus_diameter_px} must lie in [4, "
            f"field_size_px / 4 = {field_size_px / 4:g}]."
        )
    channels = CHANNELS_5 if n_channels == 5 else CHANNELS
    out = Path(out_dir)
    images, masks = out / "images", out / "ground_truth" / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    plates = [f"DEMO-P{i + 1}" for i in range(n_plates)]
    platemap = demo_platemap(plates, plate_format=plate_format)
    shape = (field_size_px, field_size_px)
    by_name = {c.name: c for c in COMPOUNDS}
    true_counts = []
    for plate in plates:
        (images / plate).mkdir(parents=True, exist_ok=True)
        illumination = vignetting(shape, rng)
        for row in platemap[platemap["plate"] == plate].itertuples():
            compound = by_name.get(row.compound, POSITIVE_CONTROL)
            strength = (
                0.0
                if row.role == "negative_control"
                else effect_size(compound, row.concentration_uM)
            )
            for site in range(1, fields_per_well + 1):
                params = cell_params(compound.effect, strength, rng, cells_per_field)
                image, nuclei, cells = render_field(
                    params,
                    shape=shape,
                    illumination=illumination,
                    nucleus_radius_px=nucleus_diameter_px / 2,
                    rng=rng,
                    n_channels=n_channels,
                )
                stem = f"{plate}_{row.well}_s{site}"
                for c, token in enumerate(channels.values()):
                    tifffile.imwrite(
                        images / plate / f"{stem}_{token}.tif",
                        image[c],
                        compression="zlib",
                    )
                if plate == plates[0] and site == 1:
                    tifffile.imwrite(
                        masks / f"{stem}_nuclei.tif", nuclei, compression="zlib"
                    )
                    tifffile.imwrite(
                        masks / f"{stem}_cells.tif", cells, compression="zlib"
                    )
                true_counts.append((plate, row.well, site, int(nuclei.max())))
    platemap_path = out / "platemap.csv"
    platemap.to_csv(platemap_path, index=False)
    config_path = out / "demo.toml"
    config_path.write_text(
        "# Run config of the demo plate (see README: Configuration).\n"
        '[input]\nlayout = "imagexpress"\nnuclei_channel = "DNA"\n\n'
        "[input.channels]\n" + "".join(f'{n} = "{t}"\n' for n, t in channels.items())
    )
    truth = {
        "description": "Ground truth of the PhenoScreen demo plate.",
        "seed": seed,
        "plate_format": plate_format,
        "channels": channels,
        "doses_uM": list(DOSES_UM),
        "compounds": [
            {
                "compound": c.name,
                "effect": c.effect,
                "ec50_uM": c.ec50_um if np.isfinite(c.ec50_um) else None,
                "hill": c.hill,
                "moa": c.moa,
                "effect_at_top_dose": round(effect_size(c, max(DOSES_UM)), 3),
                "is_active": effect_size(c, max(DOSES_UM)) >= MIN_TRUE_EFFECT,
            }
            for c in COMPOUNDS
        ],
        "positive_control": {
            "compound": POSITIVE_CONTROL.name,
            "dose_uM": POSITIVE_CONTROL_DOSE_UM,
        },
        "masks": "ground_truth/masks/<plate>_<well>_s1_{nuclei,cells}.tif for the first plate",
        "true_cell_counts": [
            {"plate": p, "well": w, "site": s, "n_cells": n}
            for p, w, s, n in true_counts
        ],
    }
    truth_path = out / "ground_truth" / "truth.json"
    truth_path.write_text(json.dumps(truth, indent=1))
    return {
        "images": images,
        "platemap": platemap_path,
        "config": config_path,
        "truth": truth_path,
    }
