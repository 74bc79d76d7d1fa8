"""The C library keeps large freed blocks once fields are segmented (glibc)."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.memory import keep_freed_memory

ROOT = Path(__file__).resolve().parents[2]
RETAINED_AFTER_FREE = """
import re, sys
import numpy as np
from pipeline.cells.segment import segment_field
if sys.argv[1] == "segment":
    segment_field(np.zeros((64, 64)), method="classical", nucleus_diameter_px=10)
def rss_mib():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1)) // 1024
before = rss_mib()
block = np.ones(256 * 2**20 // 8)  # 256 MiB, written
del block
print(rss_mib() - before)
"""


def retained_mib(mode: str) -> int:
    """MiB still resident after a 256 MiB array is freed, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", RETAINED_AFTER_FREE, mode],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only"
)
def test_segmenting_a_field_keeps_large_freed_blocks_for_the_next_one():
    assert retained_mib("none") < 32  # glibc's default: unmapped when freed
    assert retained_mib("segment") > 200  # kept on the heap for the next field
    assert keep_freed_memory() is True  # glibc here; once per process
