"""The :class:`Subspace`: an affine subspace of the weight space, with projection and lifting."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._array import Array, Namespace, check_finite, check_floating, namespace
from .._validate import check_bool, describe
from ..errors import CheckpointError, ShapeError

_STATE_KEYS = ("centre", "basis", "explained_variance", "total_variance", "num_snapshots")

__all__ = ["Subspace", "check_finite_"]


@dataclass(frozen=True)
class Subspace:
    """An affine subspace ``centre + span(P^T)`` of the weight space.

    ``centre`` ``(D,)``: the mean of the snapshots; ``basis`` ``P`` ``(d, D)``: orthonormal rows, the
    principal directions by decreasing variance; ``explained_variance`` ``(d,)``: the variance of the
    snapshots along each row (sample variance, divided by ``t - 1`` as scikit-learn's PCA does);
    ``total_variance``: the sum over all directions (a Python float), so
    ``explained_variance / total_variance`` is the explained-variance ratio.

    The mapping methods refuse NaN / Inf inputs (``NonFiniteError``) unless ``check_finite=False``
    (which saves a pass over the vector and, on a GPU, a host synchronisation).
    """

    centre: Array
    basis: Array
    explained_variance: Array
    total_variance: float
    num_snapshots: int

    @property
    def d(self) -> int:
        """Dimension of the subspace (number of basis rows)."""
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        """Dimension ``D`` of the ambient (weight) space."""
        return int(self.basis.shape[1])

    @property
    def explained_variance_ratio(self) -> Array:
        """``explained_variance / total_variance``."""
        total = self.total_variance if self.total_variance > 0 else 1.0
        return self.explained_variance / total

    def state_dict(self) -> dict[str, Any]:
        """The fields by name (the arrays themselves, ``total_variance`` a float, ``num_snapshots`` an
        int); :meth:`from_state_dict` rebuilds the subspace (a ``Subspace`` is immutable: loading makes
        a new one)."""
        return {
            "centre": self.centre,
            "basis": self.basis,
            "explained_variance": self.explained_variance,
            "total_variance": float(self.total_variance),
            "num_snapshots": int(self.num_snapshots),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, dim: int | None = None) -> Subspace:
        """A subspace from :meth:`state_dict` (arrays of any one library), every entry checked first.

        ``basis`` must be a real floating ``(d, D)`` array, ``centre`` ``(D,)`` and
        ``explained_variance`` ``(d,)`` (``D == dim`` when given), ``total_variance`` a finite number
        ``>= 0`` and ``num_snapshots`` an integer ``>= 1``. Raises
        :class:`~lowrank_core.errors.CheckpointError` naming the first entry that does not fit; the
        arrays are neither copied nor moved.
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(f"the subspace state must be a dict, got {describe(state)}")
        missing = [k for k in _STATE_KEYS if k not in state]
        extra = sorted(str(k) for k in state if k not in _STATE_KEYS)
        if missing or extra:
            raise CheckpointError(
                f"the subspace state has the wrong entries: missing {missing}, unexpected {extra}"
            )
        centre, basis, variance = state["centre"], state["basis"], state["explained_variance"]
        try:
            xp = namespace(centre=centre, basis=basis, explained_variance=variance)
            for name, x in (("centre", centre), ("basis", basis), ("explained_variance", variance)):
                check_floating(xp, x, name)
        except Exception as exc:
            raise CheckpointError(f"the subspace state's arrays do not fit: {exc}") from None
        if (
            basis.ndim != 2
            or tuple(centre.shape) != (basis.shape[1],)
            or tuple(variance.shape) != (basis.shape[0],)
        ):
            raise CheckpointError(
                f"the subspace state is inconsistent: basis {tuple(basis.shape)}, centre "
                f"{tuple(centre.shape)}, explained variance {tuple(variance.shape)}"
            )
        if dim is not None and int(basis.shape[1]) != dim:
            raise CheckpointError(
                f"the subspace lives in {int(basis.shape[1])} dimensions, these parameters have "
                f"{dim} scalars"
            )
        total, count = state["total_variance"], state["num_snapshots"]
        if (
            isinstance(total, bool)
            or not isinstance(total, numbers.Real)
            or not math.isfinite(total)
            or total < 0
        ):
            raise CheckpointError(
                f"the subspace state's 'total_variance' must be a finite number >= 0, got {total!r}"
            )
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise CheckpointError(
                f"the subspace state's 'num_snapshots' must be an integer >= 1, got {count!r}"
            )
        return cls(centre, basis, variance, float(total), int(count))

    def _xp(self, name: str, x: Array) -> Namespace:
        return namespace(**{name: x, "basis": self.basis})

    def project(self, w: Array, *, origin: Array | None = None, check_finite: bool = True) -> Array:
        """Coordinates ``c = P (w - origin)`` (``origin`` defaults to the centre); ``w`` is ``(D,)``
        or a stack ``(n, D)``."""
        xp = self._xp("w", w)
        finite = check_bool("check_finite", check_finite)
        self._check_ambient(xp, w, "w", finite=finite)
        o = self.centre if origin is None else origin
        if origin is not None:
            self._xp("origin", origin)
            self._check_ambient(xp, origin, "origin", stack=False, finite=finite)
        return self.project_direction(w - o, check_finite=False)

    def project_direction(self, v: Array, *, check_finite: bool = True) -> Array:
        """``P v`` (no centre): coordinates of a direction, e.g. the gradient wrt ``c`` from ``g``."""
        xp = self._xp("v", v)
        self._check_ambient(xp, v, "v", finite=check_bool("check_finite", check_finite))
        P = self.basis if self.basis.dtype == v.dtype else xp.astype(self.basis, v.dtype)
        return v @ xp.matrix_transpose(P)

    def lift(self, c: Array, *, origin: Array | None = None, check_finite: bool = True) -> Array:
        """Weights ``origin + P^T c`` (``origin`` defaults to the centre); ``c`` is ``(d,)`` or ``(n, d)``."""
        finite = check_bool("check_finite", check_finite)
        o = self.centre if origin is None else origin
        if origin is not None:
            xp = self._xp("origin", origin)
            self._check_ambient(xp, origin, "origin", stack=False, finite=finite)
        return o + self.lift_direction(c, check_finite=finite)

    def lift_direction(self, c: Array, *, check_finite: bool = True) -> Array:
        """``P^T c`` (no centre): the weight-space direction of a coordinate step."""
        xp = self._xp("c", c)
        if c.ndim not in (1, 2) or c.shape[-1] != self.d:
            raise ShapeError(
                f"`c` must have shape ({self.d},) or (n, {self.d}), got {tuple(c.shape)}"
            )
        check_floating(xp, c, "c")
        if check_bool("check_finite", check_finite):
            check_finite_(xp, c, "c")
        P = self.basis if self.basis.dtype == c.dtype else xp.astype(self.basis, c.dtype)
        return c @ P

    def _check_ambient(
        self, xp: Namespace, x: Array, name: str, *, stack: bool = True, finite: bool = True
    ) -> None:
        ok_ndim = (1, 2) if stack else (1,)
        if x.ndim not in ok_ndim or x.shape[-1] != self.dim:
            want = f"({self.dim},)" + (f" or (n, {self.dim})" if stack else "")
            raise ShapeError(f"`{name}` must have shape {want}, got {tuple(x.shape)}")
        check_floating(xp, x, name)
        if finite:
            check_finite_(xp, x, name)


check_finite_ = (
    check_finite  # the module-level check, under a name the keyword arguments don't shadow
)
