"""Exceptions raised by lowrank-core.

Every error derives from :class:`LowRankError` *and* from the built-in exception a NumPy or PyTorch user
would expect (``TypeError`` for wrong kinds of input, ``ValueError`` for wrong values), so both
``except LowRankError`` and ``except ValueError`` work. Messages name the argument and the problem.
"""

from __future__ import annotations

__all__ = [
    "ArrayTypeError",
    "CheckpointError",
    "DTypeError",
    "DeviceError",
    "DeviceMismatchError",
    "IntegrationError",
    "LowRankError",
    "NonFiniteError",
    "ParameterError",
    "ParameterTypeError",
    "RankError",
    "ShapeError",
    "SnapshotStoreError",
    "SpectrumError",
]


class LowRankError(Exception):
    """Base class of every error raised by lowrank-core."""


class ArrayTypeError(LowRankError, TypeError):
    """An argument is not an array, or arrays of two different libraries were mixed."""


class DTypeError(LowRankError, TypeError):
    """An array has a dtype the operation cannot work in (integer, boolean, complex)."""


class ShapeError(LowRankError, ValueError):
    """An array has the wrong number of dimensions, or shapes do not fit together."""


class NonFiniteError(LowRankError, ValueError):
    """An input contains NaN or infinity."""


class DeviceError(LowRankError, ValueError):
    """An array lives on a device that cannot compute: PyTorch's ``meta`` device holds shapes and dtypes
    but no values (what ``torch.device("meta")`` model construction gives). Materialize it first."""


class DeviceMismatchError(DeviceError):
    """Arrays that must be combined live on different devices."""


class RankError(LowRankError, ValueError):
    """A rank (or rank bound) is not a positive integer within the allowed range."""


class SpectrumError(LowRankError, ValueError):
    """A spectrum is not a valid list of singular values (negative, or not in descending order)."""


class ParameterError(LowRankError, ValueError):
    """A scalar or option argument has an invalid value (out of range, NaN, not one of the choices)."""


class ParameterTypeError(ParameterError, TypeError):
    """A scalar, option or shape argument has the wrong type (a string, None, bool, float for an int).

    Also a ``ParameterError`` (so ``except ParameterError`` catches every bad parameter) and a
    ``TypeError``.
    """


class SnapshotStoreError(LowRankError, OSError):
    """A :class:`~lowrank_core.dldr.SnapshotStore` cannot serve the call: it is closed, its file is
    locked by another store, was truncated under it, or cannot be created or grown."""


class CheckpointError(LowRankError, ValueError):
    """A checkpoint cannot be read (missing, corrupt, not a checkpoint), or does not fit the model,
    optimizer or controller it is loaded into. Raised before anything is changed.

    The same class for every framework (``lowrank_torch.checkpoint``, ``lowrank_jax.checkpoint``).
    """


class IntegrationError(LowRankError, RuntimeError):
    """A trainer integration (Lightning, the Hugging Face ``Trainer``) is used out of order (not started
    yet, attached twice, resumed unseen) or on a setup it does not support (several processes)."""
