"""File I/O of CMD: the read-ahead hint for the sampled rows of a NumPy memmap."""

from __future__ import annotations

import mmap
import os

import numpy as np

from .._array import Array


def _advise_rows(x: Array, rows: np.ndarray) -> None:
    """Ask the OS to start reading the file pages of ``rows`` of a NumPy memmap, all at once.

    The sample is ``K`` rows scattered over the whole file: read one by one from a file that is not in the
    page cache, each costs a disk round trip; announced together with ``POSIX_FADV_WILLNEED`` the reads
    are queued at once (``benchmarks/bench_cmd.py`` measures both). Only for a C-contiguous ``np.memmap``
    that maps its file directly (not a view of another memmap), where ``posix_fadvise`` exists; otherwise,
    and on any OS error, nothing happens. A hint about which pages will be read: it changes no result.
    """
    advise = getattr(os, "posix_fadvise", None)
    base: object = getattr(x, "base", None)  # the mmap itself for a memmap of its own file
    if (
        advise is None
        or not isinstance(x, np.memmap)
        or not isinstance(base, mmap.mmap)
        or not x.flags.c_contiguous
        or not x.filename
    ):
        return
    start, row = int(x.offset), int(x.strides[0])
    try:
        fd = os.open(x.filename, os.O_RDONLY)
    except OSError:
        return
    try:
        for r in rows.tolist():
            advise(fd, start + int(r) * row, row, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
