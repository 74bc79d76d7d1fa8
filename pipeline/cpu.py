"""What this machine's CPU can do, for choices that depend on it."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

#: CPU flags of native bfloat16 arithmetic: AVX-512 BF16 dot products, AMX tiles.
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_fields(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, str] | None:
    """Return the first processor's fields of Linux's CPU description.

    Parameters
    ----------
    cpuinfo : str or Path
        Linux's CPU description.

    Returns
    -------
    dict of str to str or None
        ``model name``, ``flags``, ... with their values, stripped; None where the
        file cannot be read (not Linux).
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    fields = (line.partition(":") for line in text.split("\n\n")[0].splitlines())
    return {key.strip(): value.strip() for key, colon, value in fields if colon}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """Return the ``flags`` field of `cpu_fields` (same `cpuinfo`) as a set.

    None where the file cannot be read or has no flags (not Linux; ARM lists
    ``Features``).
    """
    fields = cpu_fields(cpuinfo) or {}
    return frozenset(fields["flags"].split()) if "flags" in fields else None


def emulated_bfloat16_warning(
    setting: str, device: str, precision: str | None, flags: frozenset[str] | None
) -> str | None:
    """Return the warning for bfloat16 on a CPU without bfloat16 instructions.

    PyTorch then emulates the arithmetic: the U-Net segmented a 1,080 px field in
    8.2 s instead of 1.4 s in float32 on an AVX2-only AMD EPYC (Zen 3), one core
    (`benchmarks/bench_vs_cellprofiler.py`, 2026-12-06). CPUs with AVX-512 but not
    its BF16 extension were not measured.

    Parameters
    ----------
    setting : str
        The setting named in the warning (``segment.precision``).
    device : str
        Where the network runs (``cpu``, ``cuda``).
    precision : str or None
        The setting's value; None: the device's default (float32 on CPUs).
    flags : frozenset of str or None
        `cpu_flags` of the machine; None (unknown): no warning.

    Returns
    -------
    str or None
        The warning, or None when there is nothing to warn of.
    """
    if device != "cpu" or precision != "bfloat16" or flags is None:
        return None
    if not flags.isdisjoint(BFLOAT16_FLAGS):
        return None
    return (
        f'{setting} is "bfloat16" but this machine\'s CPU has no bfloat16 '
        f"instructions ({' or '.join(BFLOAT16_FLAGS)}): PyTorch emulates them, which "
        "made the segmentation U-Net 6x slower than in float32 on an AVX2-only CPU. "
        f"Leave {setting} out (float32 on CPUs) unless the machines that run it "
        "have them."
    )


def warn_if_emulated_bfloat16(setting: str, device: str, precision: str | None) -> None:
    """Log `emulated_bfloat16_warning` for this machine's CPU (`cpu_flags`), if any.

    Parameters
    ----------
    setting, device, precision : str
        As `emulated_bfloat16_warning`; `precision` may be None.
    """
    message = emulated_bfloat16_warning(setting, device, precision, cpu_flags())
    if message:
        logger.warning(message)
