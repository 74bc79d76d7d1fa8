"""Helpers shared by the benchmark scripts: machine facts, saving figures, demo runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu() -> dict[str, Any]:
    """The CPU's model name and bfloat16 flags (AMX tiles, AVX-512 BF16; Linux only)."""
    from pipeline.cpu import cpu_fields  # noqa: PLC0415 - after sys.path

    fields = cpu_fields() or {}
    flags = fields.get("flags", "").split()
    return {
        "cpu": fields.get("model name", platform.processor()),
        "cpu_bfloat16_flags": sorted(
            f for f in flags if f.startswith(("amx", "avx512_bf16"))
        ),
    }


def commit(checkout: Path = RESULTS.parent) -> str:
    """A checkout's commit (``-dirty`` with uncommitted changes), or "unknown"."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=checkout,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    """Return what the figures were measured on, and the code's commit."""
    return {
        "commit": commit(),
        **_cpu(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save(name: str, figures: dict[str, Any]) -> Path:
    """Write figures (with machine facts) to benchmarks/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps({"machine": machine(), **figures}, indent=1, default=str)
    )
    print(f"saved {path}")
    return path


def run_demo(out: Path, **plate: Any) -> tuple[str, dict[str, Path]]:
    """Write a demo experiment (`pipeline.images.demo.write_demo_plate` with `plate`) into
    `out` and run it into ``out/store.db`` as the demo command does (cytoplasm
    Actin; the 5-channel set with ``n_channels=5``); return the store URL and the
    demo's paths."""
    from pipeline.config import config_from_dict  # noqa: PLC0415 - after sys.path
    from pipeline.images.demo import (  # noqa: PLC0415
        CHANNELS,
        CHANNELS_5,
        write_demo_plate,
    )
    from pipeline.run import run_experiment  # noqa: PLC0415

    demo = write_demo_plate(out, **plate)
    url = f"sqlite:///{out}/store.db"
    channels = CHANNELS_5 if plate.get("n_channels") == 5 else CHANNELS
    config = {"input": {"layout": "imagexpress", "channels": channels,
                        "nuclei_channel": "DNA", "cytoplasm_channel": "Actin"}}  # fmt: skip
    run_experiment(
        demo["images"], demo["platemap"], config=config_from_dict(config), db_url=url
    )
    return url, demo
