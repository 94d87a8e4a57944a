"""The :class:`SnapshotStore`: snapshots added one at a time (memory or memory-mapped file), Gram kept up to date."""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator

import numpy as np

from .._array import Array, Namespace, compute_dtype, namespace
from .._validate import check_bool, check_int, describe
from ..errors import (
    ArrayTypeError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    RankError,
    ShapeError,
    SnapshotStoreError,
)
from .chunked import (
    _OVERFLOW,
    PCAMethod,
    Slabs,
    _check_d,
    _check_vector,
    _chunks,
    _host,
    _sumsq64,
    _to64,
    _to_xp,
)
from .pca import _check_fit_options, _fit_exact, _randomized
from .store_file import _open_locked, _release
from .subspace import Subspace

__all__ = ["SnapshotStore"]


class SnapshotStore:
    """Flattened snapshots, added one at a time, with their Gram matrix kept up to date.

    ``path=None`` keeps the snapshots in memory (copies, in the snapshots' own library and device).
    ``path="somewhere.dat"`` (or ``path=True`` for a temporary file) keeps them on disk in a memory
    map (host memory then holds only what the OS caches; rows are read back column chunk by column
    chunk and moved to the snapshots' library and device when needed). The file is created (or
    emptied) when the store is made, and locked for the store's exclusive use (a second store on the
    same path raises :class:`~lowrank_core.errors.SnapshotStoreError`); it grows as snapshots arrive.
    The store works through its open file, so deleting the file's name does not lose a snapshot (the
    space is freed at :meth:`close`); a file truncated under the store is detected before any access
    (``SnapshotStoreError``, never a crash). A temporary file is deleted at :meth:`close`, or when the
    store is garbage-collected without one.

    With ``shift=True`` (default) the store keeps ``y_i = w_i - w_1`` (the first snapshot is kept
    aside), so the Gram matrix :meth:`gram` is that of the shifted snapshots: centring is shift
    invariant and this avoids cancellation. With ``shift=False`` it is ``X X^T`` of the raw snapshots.
    The Gram matrix is held on the host in float64; its entries are computed in float64 from the
    stored vectors (column chunks of :data:`CHUNK` entries). Adding the ``t``-th snapshot costs ``t``
    dot products of length ``D``.

    Memory: the stored vectors (``t D`` entries) plus the first snapshot and a running sum (``2 D``);
    a fit adds the ``d x D`` result twice (its pieces and the joined result, for a moment), ``3 D``
    (the centre and its pieces) and one column chunk of scratch, ``O(t^2 + (t + d) W)``; on disk the
    host memory holds only what the OS caches of the file. :meth:`add` is thread-safe (one lock); a
    store is usable as a context manager, and every call after :meth:`close` raises
    ``SnapshotStoreError``.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | bool | None = None,
        shift: bool = True,
        block_rows: int = 16,
        check_finite: bool = True,
    ) -> None:
        self.block_rows = check_int("block_rows", block_rows, min=1)
        self.shift = check_bool("shift", shift)
        self.check_finite = check_bool("check_finite", check_finite)
        self._lock = threading.RLock()
        self._closed = False
        self._temp = False
        self._fd: int | None = None
        flag: object = path
        if flag is True or (isinstance(flag, np.bool_) and bool(flag)):
            fd, name = tempfile.mkstemp(prefix="lowrank_dldr_", suffix=".dat")
            self.path: str | None = name
            self._temp = True
            self._fd = _open_locked(name, fd)
        elif flag is None or flag is False or isinstance(flag, np.bool_):
            self.path = None
        elif isinstance(path, (str, os.PathLike)):
            self.path = os.fspath(path)
            if not isinstance(self.path, str):
                raise ParameterTypeError(f"`path` must be a str path, got bytes {self.path!r}")
            self._fd = _open_locked(self.path)
        else:
            raise ParameterTypeError(
                f"`path` must be None, True (a temporary file) or a file path, got {describe(path)}"
            )
        self._finalizer = weakref.finalize(
            self, _release, self._fd, self.path if self._temp else None
        )
        self._rows: list[Array] = []
        self._mm: np.ndarray | None = None
        self._capacity = 0
        self._t = 0
        self._gram = np.zeros((0, 0))
        self._first: Array | None = None
        self._sum: Array | None = None
        self._xp: Namespace = None
        self._like: Array | None = None
        self._dim = 0
        self._itemsize = 0

    # -- properties --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._t

    @property
    def dim(self) -> int | None:
        """Length ``D`` of a snapshot (None while empty)."""
        return None if self._like is None else self._dim

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def nbytes(self) -> int:
        """Bytes the stored snapshots take (in memory or on disk)."""
        return self._t * self._dim * self._itemsize

    def _check_open(self) -> None:
        if self._closed:
            raise SnapshotStoreError("the SnapshotStore is closed")

    # -- the file ----------------------------------------------------------------------------
    def _file_size(self) -> int:
        assert self._fd is not None
        return int(os.fstat(self._fd).st_size)

    def _check_file(self, rows: int) -> None:
        """Raise (before any access to the map) unless the file still holds ``rows`` rows."""
        need = rows * self._dim * self._itemsize
        size = self._file_size()
        if size < need:
            raise SnapshotStoreError(
                f"the snapshot file {self.path!r} was truncated under the store: it has {size} "
                f"bytes, the {rows} stored snapshots need {need}; they are lost on disk (the Gram "
                "matrix is kept: store.gram())"
            )

    def _write_row(self, host: np.ndarray) -> None:
        """Write stored row ``t`` (growing the file and the map when full); the store is unchanged
        when this raises."""
        assert self._fd is not None
        rowbytes = host.shape[0] * host.itemsize
        self._check_file(self._t)
        try:
            if self._mm is None or self._t >= self._capacity:
                new_cap = max(8, 2 * self._capacity)
                os.ftruncate(self._fd, new_cap * rowbytes)
                buf = mmap.mmap(self._fd, new_cap * rowbytes)  # shared, read-write, over our fd
                mm = np.ndarray((new_cap, host.shape[0]), dtype=host.dtype, buffer=buf)
                self._mm, self._capacity = mm, new_cap
            elif self._file_size() < self._capacity * rowbytes:
                os.ftruncate(self._fd, self._capacity * rowbytes)  # cut below the map: extend again
        except OSError as exc:
            raise SnapshotStoreError(
                f"cannot grow the snapshot file {self.path!r}: {exc.strerror or exc}"
            ) from exc
        self._mm[self._t] = host  # a write to the file (host memory map), not to an array argument

    # -- adding ------------------------------------------------------------------------------
    def add(self, w: Array) -> None:
        """Append one flattened snapshot ``w`` (shape ``(D,)``, real floating); it is copied.

        Thread-safe; on any error the store is unchanged."""
        with self._lock:
            self._check_open()
            self._add(w)

    def _add(self, w: Array) -> None:
        if self._xp is None:
            xp = namespace(w=w)
        else:
            assert self._like is not None
            try:
                xp = namespace(w=w, stored=self._like)
            except ArrayTypeError as exc:
                raise ArrayTypeError(
                    f"`w` ({type(w).__module__}) is not of the stored snapshots' library "
                    f"({type(self._like).__module__})"
                ) from exc
        _check_vector(xp, w, "w", finite=self.check_finite)
        first_add = self._like is None
        if not first_add:
            if w.shape[0] != self._dim:
                raise ShapeError(
                    f"snapshot length mismatch: `w` has {w.shape[0]} entries, the stored snapshots "
                    f"have {self._dim}"
                )
            assert self._like is not None
            w = w if w.dtype == self._like.dtype else xp.astype(w, self._like.dtype)
        else:
            w = xp.astype(w, compute_dtype(xp, w.dtype), copy=True)
        D = int(w.shape[0])
        first = self._first
        if self.shift:
            if first is None:
                first = xp.asarray(w, copy=True)
            y = w - first
        else:
            y = xp.asarray(w, copy=True)
        # the new Gram row: float64 dot products with every stored vector, and with itself
        row = self._dots(xp, y, D) if self._t else np.zeros(0)
        sq = None
        for j0, j1 in _chunks(D):
            part = _sumsq64(xp, y[j0:j1])
            sq = part if sq is None else sq + part
        self_dot = float(_host(sq))
        if not (math.isfinite(self_dot) and np.all(np.isfinite(row))):
            raise NonFiniteError(
                _OVERFLOW.format(what="the snapshot's dot products", dtype="float64")
            )
        t = self._t
        G = np.block([[self._gram, row[:, None]], [row[None, :], np.array([[self_dot]])]])
        if self.path is not None:
            if first_add:
                self._itemsize = int(_host(y[:1]).itemsize)
                self._dim = D
            try:
                self._write_row(_host(y))
            except BaseException:
                if first_add:
                    self._itemsize, self._dim = 0, 0
                raise
        else:
            self._rows.append(y)
        # commit
        if first_add:
            self._xp = xp
            self._like = y[:1]
            self._dim = D
            self._itemsize = int(_host(y[:1]).itemsize)
        self._first = first
        self._gram = G
        self._sum = y if self._sum is None else self._sum + y
        self._t = t + 1

    def _dots(self, xp: Namespace, y: Array, D: int) -> np.ndarray:
        """``(t,)`` float64: the stored vectors dotted with ``y``, row by row and column chunk by
        column chunk in float64 (the same operations in memory and on disk)."""
        if self.path is not None:
            self._check_file(self._t)
        acc = None
        with np.errstate(over="ignore", invalid="ignore"):  # overflow: reported by the caller
            for j0, j1 in _chunks(D):
                yj = _to64(xp, y[j0:j1])
                vals = [_to64(xp, r) @ yj for r in self._row_chunks(j0, j1)]
                part = np.stack(vals) if isinstance(yj, np.ndarray) else xp.stack(vals)
                acc = part if acc is None else acc + part
        return _host(acc).astype(np.float64).reshape(-1)

    def _row_chunks(self, j0: int, j1: int) -> Iterator[Array]:
        """Columns ``j0:j1`` of each stored vector (views where the library allows)."""
        if self.path is None:
            for r in self._rows:
                yield r[j0:j1]
            return
        assert self._mm is not None
        assert self._like is not None
        for i in range(self._t):
            yield _to_xp(self._xp, self._mm[i, j0:j1], self._like)

    # -- reading -----------------------------------------------------------------------------
    def _slabs(self, t: int | None = None) -> Iterator[tuple[int, int, Array]]:
        """Columns ``j0:j1`` of the first ``t`` stored vectors, chunk by chunk (see ``Slabs``)."""
        t = self._t if t is None else t
        xp, like = self._xp, self._like
        for j0, j1 in _chunks(self._dim):
            if self.path is None:
                yield j0, j1, xp.stack([r[j0:j1] for r in self._rows[:t]], axis=0)
            else:
                self._check_file(t)
                assert self._mm is not None
                yield j0, j1, _to_xp(xp, np.asarray(self._mm[:t, j0:j1]), like)

    def blocks(self, size: int | None = None) -> Iterator[tuple[int, Array]]:
        """Yield ``(start, block)``: the stored vectors as ``(b, D)`` arrays of the snapshots' library
        (copies of ``b <= size`` rows, ``size`` defaulting to ``block_rows``)."""
        self._check_open()
        size = self.block_rows if size is None else check_int("size", size, min=1)
        t = self._t
        for start in range(0, t, size):
            stop = min(t, start + size)
            self._check_open()
            if self.path is None:
                yield start, self._xp.stack(self._rows[start:stop], axis=0)
            else:
                self._check_file(t)
                assert self._mm is not None
                assert self._like is not None
                yield start, _to_xp(self._xp, np.array(self._mm[start:stop]), self._like)

    def vector(self, i: int) -> Array:
        """The stored vector ``i`` (shifted by the first snapshot when ``shift=True``)."""
        with self._lock:
            self._check_open()
            i = check_int("i", i)
            if not -self._t <= i < self._t:
                raise ParameterError(f"snapshot index {i} out of range for {self._t} snapshots")
            i %= self._t
            if self.path is None:
                return self._rows[i]
            self._check_file(self._t)
            assert self._mm is not None
            assert self._like is not None
            return _to_xp(self._xp, np.array(self._mm[i]), self._like)

    def snapshot(self, i: int) -> Array:
        """Snapshot ``i`` as it was added (up to rounding of the shift)."""
        v = self.vector(i)
        return v + self._first if self._first is not None else v

    def gram(self) -> np.ndarray:
        """The ``t x t`` Gram matrix of the stored vectors (float64, NumPy, a copy)."""
        with self._lock:
            self._check_open()
            return self._gram.copy()

    def centre(self) -> Array:
        """The mean snapshot."""
        with self._lock:
            self._check_open()
            if self._t == 0 or self._sum is None:
                raise ShapeError("the store is empty")
            m = self._sum / self._t
            return m + self._first if self._first is not None else m

    # -- fitting -----------------------------------------------------------------------------
    def fit(
        self,
        d: int,
        *,
        method: PCAMethod = "exact",
        oversample: int = 10,
        power_iterations: int = 2,
        seed: int | None = 0,
        orthonormalize: bool = True,
    ) -> Subspace:
        """The top-``d`` PCA subspace of the stored snapshots (see :func:`fit_subspace`).

        ``"exact"`` uses the streamed Gram matrix (one ``t x t`` eigendecomposition, one pass over the
        snapshots); ``"randomized"`` ignores it and sketches (for very many snapshots).
        """
        with self._lock:
            self._check_open()
            method, oversample, power_iterations, seed, orthonormalize = _check_fit_options(
                method, oversample, power_iterations, seed, orthonormalize
            )
            if self._t < 2:
                raise RankError(f"at least 2 snapshots are needed to fit a subspace, got {self._t}")
            t = self._t
            d = _check_d(d, t)
            centre = self.centre()
            slabs: Slabs = lambda: self._slabs(t)  # noqa: E731
            if method == "exact":
                return _fit_exact(self._xp, self._gram, d, slabs, centre, orthonormalize)
            return _randomized(
                self._xp, slabs, t, centre, d, oversample, power_iterations, seed, orthonormalize
            )

    def close(self) -> None:
        """Release the memory map and the file lock (and delete the file if it was a temporary one).

        Idempotent; every other call on a closed store raises ``SnapshotStoreError``."""
        with self._lock:
            self._closed = True
            self._mm = None
            self._rows = []
            self._sum = None
            self._finalizer()

    def __enter__(self) -> SnapshotStore:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"disk {self.path!r}" if self.path else "memory"
        state = ", closed" if self._closed else ""
        return f"SnapshotStore(t={self._t}, D={self.dim}, {where}, shift={self.shift}{state})"
