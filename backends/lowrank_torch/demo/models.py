"""The three demo models for MNIST-1D: an MLP, a 1-D CNN and a small transformer.

Each takes a batch of signals ``(B, 40)`` and returns logits ``(B, 10)``. They are sized so that a
dense run of each takes well under a minute on two CPU cores, yet every hidden layer is wide enough
(at least 64 outputs) for a low-rank method to have something to remove.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["MLP", "MODELS", "CNN1d", "TinyTransformer", "build_model", "count_params"]


class MLP(nn.Module):
    """``40 -> hidden -> hidden -> 10`` with ReLU."""

    def __init__(
        self, in_features: int = 40, hidden: int = 512, num_classes: int = 10, depth: int = 2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


class CNN1d(nn.Module):
    """Four Conv1d layers (the last three with stride 2: 40 -> 20 -> 10 -> 5), then a two-layer head.

    ``(B, 40)`` is read as one input channel. Channels: 1 -> ``c1`` -> ``c2`` -> ``c2`` -> ``c2``;
    kernels 5, 5, 3, 3 with 'same'-style padding; ReLU after each; flatten ``c2 * 5`` -> ``hidden`` ->
    ``num_classes``.
    """

    def __init__(
        self,
        length: int = 40,
        c1: int = 64,
        c2: int = 128,
        hidden: int = 256,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, c1, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.Conv1d(c1, c2, kernel_size=5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(c2, c2, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(c2, c2, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
        )
        out_len = length
        for _ in range(3):
            out_len = (out_len - 1) // 2 + 1
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * out_len, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x.unsqueeze(1)))
        return out


class TinyTransformer(nn.Module):
    """A pre-norm transformer encoder over overlapping patches of the signal.

    The 40 samples are cut into overlapping patches (a Conv1d with kernel ``patch`` and stride
    ``stride``: 9 tokens of 8 samples by default), each embedded into ``d_model`` dimensions, plus a learned
    positional embedding; then ``num_layers`` encoder layers (``nhead`` heads, feed-forward ``4 *
    d_model``, GELU), a final LayerNorm, mean pooling over the tokens and a linear head.
    """

    def __init__(
        self,
        length: int = 40,
        d_model: int = 96,
        nhead: int = 4,
        num_layers: int = 2,
        patch: int = 8,
        stride: int = 4,
        dropout: float = 0.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Conv1d(1, d_model, kernel_size=patch, stride=stride)
        tokens = (length - patch) // stride + 1
        self.pos = nn.Parameter(torch.zeros(1, tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)
        # A ModuleList rather than nn.TransformerEncoder: no nested-tensor fast path, no copies.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                nhead,
                dim_feedforward=4 * d_model,
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.unsqueeze(1)).transpose(1, 2) + self.pos  # (B, T, d)
        for layer in self.layers:
            h = layer(h)
        out: Tensor = self.head(self.norm(h).mean(dim=1))
        return out


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN1d,
    "transformer": TinyTransformer,
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialized model ``name`` (one of :data:`MODELS`), its weights drawn from ``seed``."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    torch.manual_seed(seed)
    return factory()


def count_params(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of scalars in the model's (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
