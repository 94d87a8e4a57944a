"""The CuPy backend of lowrank-core.

Importing this package imports cupy. lowrank-core finds it on its own (entry point ``cupy`` in the
group ``lowrank_core.backends``) the first time it meets a ``cupy.ndarray``.
"""

from __future__ import annotations

from ._backend import CupyBackend

__all__ = ["CupyBackend"]
