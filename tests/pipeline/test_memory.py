"""A run's workers and `phenoscreen segment` keep large freed blocks (glibc)."""

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.run import dask_client, downsample_field

ROOT = Path(__file__).resolve().parents[2]
RETAINED_AFTER_FREE = """
import sys
from pathlib import Path
from pipeline.config import MeasureConfig
from pipeline.memory import keep_freed_memory
from pipeline.run import downsample_field, process_field, segment_files
mode, field = sys.argv[1], sys.argv[2]
if mode == "keep_freed_memory":
    assert keep_freed_memory() is True
elif mode == "process_field":
    process_field([field], channel_indexes=[None], channel_names=["DNA"],
                  nuclei_channel="DNA", cytoplasm_channel=None, illumination=None,
                  segment={"method": "classical"}, measure=MeasureConfig())
elif mode == "downsample_field":
    downsample_field([field], channel_indexes=[None], size_px=16)
elif mode == "segment_files":
    segment_files([Path(field)], Path(field).parent / "masks",
                  segment={"method": "classical"})
from tests.pipeline.test_memory import retained_mib
print(retained_mib())
"""
glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)


@pytest.fixture
def field(tmp_path):
    """A small nuclear-stain TIFF."""
    path = tmp_path / "field.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 200, (96, 96), dtype=np.uint16))
    return path


def retained_mib() -> int:
    """MiB still resident after a 256 MiB array is freed in this process's thread."""
    import re  # noqa: PLC0415 - runs on Dask workers too

    def rss_mib():
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) // 1024

    before = rss_mib()
    block = np.ones(256 * 2**20 // 8)  # written
    del block
    return rss_mib() - before


@glibc_only
@pytest.mark.parametrize(
    "mode", ["keep_freed_memory", "process_field", "downsample_field", "segment_files"]
)
def test_each_entry_keeps_large_freed_blocks_in_its_process(mode, field):
    def in_fresh_process(mode):
        done = subprocess.run(
            [sys.executable, "-c", RETAINED_AFTER_FREE, mode, str(field)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        return int(done.stdout.split()[-1])

    assert in_fresh_process("nothing") < 32  # glibc's default: unmapped when freed
    assert in_fresh_process(mode) > 200  # kept on the heap for the next field


@glibc_only
def test_a_dask_worker_keeps_freed_memory_once_it_ran_a_field(field):
    with dask_client(None, n_workers=1, processes=True) as client:
        [before] = client.run(retained_mib).values()
        client.submit(
            downsample_field, [str(field)], channel_indexes=[None], size_px=16
        ).result()
        [after] = client.run(retained_mib).values()
    assert before < 32 and after > 200
