"""The JAX integration tests need jax, optax and flax; they are skipped where those are missing."""

from __future__ import annotations

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
