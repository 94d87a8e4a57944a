"""The PyTorch backend of lowrank-core.

Importing this package imports torch. lowrank-core finds it on its own (entry point ``torch`` in the
group ``lowrank_core.backends``) the first time it meets a ``torch.Tensor``; nothing needs to be
registered by hand. The PyTorch integration: OIALR layers and controller (``lowrank_torch.oialr``),
DLDR (``lowrank_torch.dldr``), CMD (``lowrank_torch.cmd``), low-rank initialization (``lowrank_torch.init``).
The names users start from are importable from the package itself (``from lowrank_torch import OIALR,
OIALRConfig, CMDTracker, SubspaceSGD, low_rank_model``).
"""

from __future__ import annotations

from ._backend import TorchBackend
from .convert import (
    ConversionError,
    NoEligibleLayerWarning,
    UnsupportedLayerError,
    count_trainable,
    eligible_names,
    to_low_rank,
    trainable_share,
)
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

__all__ = ["TorchBackend"]
__all__ += [
    "ConversionError",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankConv3d",
    "LowRankConvNd",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankTransformersConv1D",
    "LowRankWeight",
    "NoEligibleLayerWarning",
    "TransformersConv1D",
    "UnsupportedLayerError",
    "count_trainable",
    "eligible_names",
    "low_rank_attention_",
    "to_low_rank",
    "trainable_share",
]

from .optim_state import (  # noqa: E402
    MAGNITUDE_KEYS,
    SECOND_MOMENT_KEYS,
    dense_to_sigma_state,
    rotate_sigma_state,
    swap_parameter,
    truncate_sigma_state,
)

__all__ += [
    "MAGNITUDE_KEYS",
    "SECOND_MOMENT_KEYS",
    "dense_to_sigma_state",
    "rotate_sigma_state",
    "swap_parameter",
    "truncate_sigma_state",
]

from .cmd import CMDConfig, CMDTracker, NotFittedError  # noqa: E402
from .dldr import SnapshotRecorder, SubspaceBFGS, SubspaceParametrization, SubspaceSGD  # noqa: E402
from .init import frobenius_decay_penalty, init_low_rank_layer_, low_rank_model  # noqa: E402
from .oialr import OIALR, OIALRConfig  # noqa: E402

__all__ += [
    "OIALR",
    "CMDConfig",
    "CMDTracker",
    "NotFittedError",
    "OIALRConfig",
    "SnapshotRecorder",
    "SubspaceBFGS",
    "SubspaceParametrization",
    "SubspaceSGD",
    "frobenius_decay_penalty",
    "init_low_rank_layer_",
    "low_rank_model",
]
