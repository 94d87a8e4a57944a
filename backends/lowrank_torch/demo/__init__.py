"""The main job of lowrank-core: small models on MNIST-1D, dense training against low-rank methods.

Run ``python -m lowrank_torch.demo`` (or ``lowrank-compare``) for the comparison table; ``--help`` lists
the options. Needs ``pip install 'lowrank-core[demo]'`` (torch, mnist1d, tqdm).

- :mod:`.data`: :func:`load_mnist1d`, MNIST-1D generated locally and standardized.
- :mod:`.models`: :class:`MLP`, :class:`CNN1d`, :class:`TinyTransformer`, :func:`build_model`.
- :mod:`.methods`: the :class:`Method` protocol and the registry (``dense``, ``oialr``, ...).
- :mod:`.train`: :func:`train`, one deterministic loop for every model and method.
- :mod:`.cli`: :func:`main`, the command line.
"""

from __future__ import annotations

from .data import MNIST1D, load_mnist1d
from .methods import Dense, Method, MethodUnavailable, make_method, method_names, register_method
from .models import MLP, MODELS, CNN1d, TinyTransformer, build_model, count_params
from .train import (
    DEFAULT_METHOD_OPTIONS,
    DEFAULT_SETTINGS,
    RunResult,
    TrainSettings,
    evaluate,
    train,
)

__all__ = [
    "DEFAULT_METHOD_OPTIONS",
    "DEFAULT_SETTINGS",
    "MLP",
    "MNIST1D",
    "MODELS",
    "CNN1d",
    "Dense",
    "Method",
    "MethodUnavailable",
    "RunResult",
    "TinyTransformer",
    "TrainSettings",
    "build_model",
    "count_params",
    "evaluate",
    "load_mnist1d",
    "make_method",
    "method_names",
    "register_method",
    "train",
]
