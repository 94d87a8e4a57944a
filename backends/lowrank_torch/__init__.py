"""The PyTorch backend of lowrank-core.

Importing this package imports torch. lowrank-core finds it on its own (entry point ``torch`` in the
group ``lowrank_core.backends``) the first time it meets a ``torch.Tensor``; nothing needs to be
registered by hand. The PyTorch integration: OIALR layers and controller (``lowrank_torch.oialr``),
DLDR (``lowrank_torch.dldr``), CMD (``lowrank_torch.cmd``), low-rank initialization (``lowrank_torch.init``).
The names users start from are importable from the package itself (``from lowrank_torch import OIALR,
OIALRConfig, CMDTracker, SubspaceSGD, low_rank_model, save_checkpoint``); the optimizer-state functions
OIALR uses stay in :mod:`lowrank_torch.optim_state`.
"""

from __future__ import annotations

from lowrank_core.oialr import LayerSelection

from ._backend import TorchBackend
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cmd import CMDConfig, CMDTracker, NotFittedError
from .convert import (
    ConversionError,
    NoEligibleLayerWarning,
    UnsupportedLayerError,
    count_trainable,
    eligible_names,
    to_low_rank,
    trainable_share,
)
from .dldr import SnapshotRecorder, SubspaceBFGS, SubspaceParametrization, SubspaceSGD
from .init import frobenius_decay_penalty, init_low_rank_layer_, low_rank_model
from .layers import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankConv3d,
    LowRankConvNd,
    LowRankLayer,
    LowRankLinear,
    LowRankTransformersConv1D,
    LowRankWeight,
    TransformersConv1D,
    low_rank_attention_,
)
from .oialr import OIALR, OIALRConfig

__all__ = [
    "OIALR",
    "CMDConfig",
    "CMDTracker",
    "CheckpointError",
    "ConversionError",
    "LayerSelection",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankConv3d",
    "LowRankConvNd",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankTransformersConv1D",
    "LowRankWeight",
    "NoEligibleLayerWarning",
    "NotFittedError",
    "OIALRConfig",
    "SnapshotRecorder",
    "SubspaceBFGS",
    "SubspaceParametrization",
    "SubspaceSGD",
    "TorchBackend",
    "TransformersConv1D",
    "UnsupportedLayerError",
    "count_trainable",
    "eligible_names",
    "frobenius_decay_penalty",
    "init_low_rank_layer_",
    "load_checkpoint",
    "low_rank_attention_",
    "low_rank_model",
    "save_checkpoint",
    "to_low_rank",
    "trainable_share",
]
