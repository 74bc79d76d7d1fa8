"""The C library keeps large freed blocks in runs' workers and `segment` (glibc)."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from pipeline.run import dask_client

ROOT = Path(__file__).resolve().parents[2]
RETAINED_AFTER_FREE = """
import re, sys
import numpy as np
from pipeline.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True
def rss_mib():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1)) // 1024
before = rss_mib()
block = np.ones(256 * 2**20 // 8)  # 256 MiB, written
del block
print(rss_mib() - before)
"""
glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)


def retained_mib() -> int:
    """MiB still resident after a 256 MiB array is freed in this process."""
    import re  # noqa: PLC0415 - runs on Dask workers too

    import numpy as np  # noqa: PLC0415

    def rss_mib():
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) // 1024

    before = rss_mib()
    block = np.ones(256 * 2**20 // 8)  # written
    del block
    return rss_mib() - before


@glibc_only
def test_keep_freed_memory_keeps_large_freed_blocks_in_a_fresh_process():
    def in_fresh_process(mode):
        done = subprocess.run(
            [sys.executable, "-c", RETAINED_AFTER_FREE, mode],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        return int(done.stdout.split()[-1])

    assert in_fresh_process("default") < 32  # glibc's default: unmapped when freed
    assert in_fresh_process("keep") > 200  # kept on the heap for the next field


@glibc_only
def test_a_runs_dask_workers_keep_freed_memory_and_plain_ones_do_not():
    with dask_client(None, n_workers=1, processes=True) as client:
        [kept] = client.run(retained_mib).values()
    with (
        LocalCluster(n_workers=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as plain,
    ):
        [plain_kept] = plain.run(retained_mib).values()
    assert kept > 200 and plain_kept < 32
