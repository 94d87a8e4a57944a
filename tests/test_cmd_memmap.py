"""CMD's post-hoc fit on a NumPy memmap (the benchmark's 4.4 GB case, tiny): the same fit as in memory.

``fit_cmd`` asks the OS to read the sampled rows of a memmap ahead (``posix_fadvise``, a hint only);
the fit must not depend on it: a memmap, a view of one (no hint possible) and an in-memory copy give
bit-identical results (same float32 operations on the same values, row chunks independent).
"""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_core import cmd
from lowrank_core.cmd import readahead


def _trajectory(n: int = 3000, t: int = 12, modes: int = 4) -> np.ndarray:
    rng = np.random.default_rng(5)
    profiles = np.cumsum(rng.standard_normal((modes, t)), axis=1)
    mode = rng.integers(0, modes, n)
    x = rng.standard_normal(n)[:, None] * profiles[mode] + rng.standard_normal(n)[:, None]
    x += 0.05 * rng.standard_normal((n, t))
    x[::7] = 3.0  # constant rows
    return x.astype(np.float32)


@pytest.mark.parametrize("chunk", [256, cmd.DEFAULT_CHUNK_SIZE])
def test_fit_on_a_memmap_equals_the_fit_in_memory(tmp_path, chunk):
    x = _trajectory()
    path = tmp_path / "traj.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap)
    want = cmd.fit_cmd(x, 4, sizes=[1000, 2000], num_samples=200, chunk_size=chunk)
    for got in (
        cmd.fit_cmd(mm, 4, sizes=[1000, 2000], num_samples=200, chunk_size=chunk),
        cmd.fit_cmd(mm[:, :], 4, sizes=[1000, 2000], num_samples=200, chunk_size=chunk),
    ):
        np.testing.assert_array_equal(got.references, want.references)
        for name in ("labels", "profiles", "assignment", "a", "b"):
            np.testing.assert_array_equal(np.asarray(getattr(got, name)), getattr(want, name))
    del mm


def test_advise_rows_ignores_what_it_cannot_advise(tmp_path):
    x = _trajectory(50, 4)
    readahead._advise_rows(x, np.arange(5))  # an ndarray: nothing to do
    path = tmp_path / "t.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    readahead._advise_rows(mm[:, 1:], np.arange(5))  # a non-contiguous view: skipped
    readahead._advise_rows(mm, np.arange(50))  # the whole file
    path.unlink()  # a vanished file: the open fails quietly
    readahead._advise_rows(mm, np.arange(3))
    del mm
