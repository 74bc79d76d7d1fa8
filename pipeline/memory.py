"""How the process's C library hands out memory, for work over many fields."""

from __future__ import annotations

import ctypes
from functools import cache

#: glibc's `mallopt` parameters (malloc.h) and the largest trim threshold it takes.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _LARGEST_INT = -1, -4, 2**31 - 1


@cache
def keep_freed_memory() -> bool:
    """Let glibc serve large blocks from its heap and keep memory freed for reuse.

    By default glibc maps blocks over a threshold (at most 32 MiB) fresh from the
    kernel and returns them when freed, and gives back the heap's free top beyond
    twice that threshold, so each field's large arrays are page-faulted and
    zero-filled again: the U-Net's largest feature maps in every pass (those of the
    finest level once a field or tile exceeds 512 px at network scale; ~0.13 of a
    768 px pass's 0.42 s on one core), and the megabyte-sized images, labels and
    maps of segmentation and measurement. Served from the heap and kept, one
    field's blocks are reused by the next. Peak memory grows a little (fragments);
    memory freed stays with the process, whose resident size stays near its peak.
    In threads other than the main one (a Dask worker runs its tasks in one)
    blocks over 64 MiB are still mapped afresh: glibc's per-thread arenas.
    Process-wide, once per process: a run's tasks apply it in each Dask worker
    process they run in (`pipeline.run.process_field`,
    `pipeline.run.downsample_field`; in the run's own process with thread workers;
    on an external cluster the worker keeps it after the run), ``phenoscreen
    segment`` before its first image.

    Returns
    -------
    bool
        True where applied (glibc: Linux), False where the C library has no
        `mallopt` (macOS, Windows) or refuses (musl's does nothing), which is then
        left as it is.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc; Windows: no CDLL(None)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _LARGEST_INT)
    )
