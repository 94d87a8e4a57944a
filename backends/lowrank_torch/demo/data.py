"""MNIST-1D, generated locally (no download) and standardized with the training set's statistics.

MNIST-1D (Greydanus & Kobak, 2020) is a procedurally generated 1-D analogue of MNIST: ten template
signals, randomly padded, scaled, sheared, translated and noised, resampled to 40 points. The
``mnist1d`` package builds it from its seed in about a second; nothing is fetched from the network.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["MNIST1D", "load_mnist1d"]

DEFAULT_NUM_SAMPLES = 10_000
_INSTALL_HINT = (
    "the MNIST-1D demo needs the `mnist1d` package: pip install 'lowrank-core[demo]' "
    "(or pip install mnist1d)"
)


class MNIST1D(NamedTuple):
    """The four arrays of one MNIST-1D draw: float32 signals ``(N, 40)`` and int64 labels ``(N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def length(self) -> int:
        """Number of samples of one signal (40)."""
        return int(self.x_train.shape[1])


# (seed, num_samples, train_split) -> (x_train, y_train, x_test, y_test) as NumPy arrays, raw.
_CACHE: dict[tuple[int, int, float], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def _generate(
    seed: int, num_samples: int, train_split: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    args = get_dataset_args()
    args.seed = int(seed)
    args.num_samples = int(num_samples)
    args.train_split = float(train_split)
    # make_dataset seeds Python's and NumPy's global generators; leave both as they were.
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return (
        np.asarray(d["x"]),
        np.asarray(d["y"]),
        np.asarray(d["x_test"]),
        np.asarray(d["y_test"]),
    )


def load_mnist1d(
    seed: int = 0, num_samples: int = DEFAULT_NUM_SAMPLES, *, train_split: float = 0.8
) -> MNIST1D:
    """Generate MNIST-1D from ``seed`` (cached per process) and return it as torch tensors.

    ``num_samples`` is split ``train_split`` / rest into training and test sets (MNIST-1D draws the same
    number of samples per class, so it is rounded down to a multiple of 10). The signals are shifted and
    scaled by the mean and standard deviation of the *training* signals (one scalar each, so the
    translation structure the convolutional and attention models exploit is untouched), and returned as
    float32 ``(N, 40)``; labels are int64 ``(N,)``. Each call returns fresh tensors.
    """
    if isinstance(num_samples, bool) or int(num_samples) < 20:
        raise ValueError(f"`num_samples` must be an int >= 20, got {num_samples!r}")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"`train_split` must lie in (0, 1), got {train_split}")
    key = (int(seed), int(num_samples), float(train_split))
    if key not in _CACHE:
        _CACHE[key] = _generate(*key)
    x_tr, y_tr, x_te, y_te = _CACHE[key]
    mean = float(x_tr.mean())
    std = float(x_tr.std()) or 1.0
    return MNIST1D(
        x_train=torch.as_tensor((x_tr - mean) / std, dtype=torch.float32),
        y_train=torch.as_tensor(y_tr, dtype=torch.int64),
        x_test=torch.as_tensor((x_te - mean) / std, dtype=torch.float32),
        y_test=torch.as_tensor(y_te, dtype=torch.int64),
    )
