"""PyTorch modules that hold a weight as OIALR factors: frozen bases and a trainable mixing matrix.

A :class:`LowRankLayer` stores the weight matrix ``W = U @ Sigma @ V.T`` (see ``lowrank_core`` and
``docs/SPEC.md``) as

- ``U`` ``(m, r)`` and ``V`` ``(n, r)``: persistent buffers (saved in the ``state_dict``, never trained);
- ``sigma`` ``(r, r)``: a dense ``nn.Parameter``, the only trained part of the weight;
- ``bias``: an optional dense trainable ``nn.Parameter``, as in the dense layer.

``W`` is the matrix view of the dense weight (``lowrank_core.weight_to_matrix``): ``(out, in)`` for a
Linear, ``(out, in/groups * prod(kernel))`` for a ConvNd. A grouped ConvNd holds one factor set per group,
stacked: ``U (g, out/g, r)``, ``sigma (g, r, r)``, ``V (g, cols, r)``; all groups share one rank.

All the linear algebra (factorization, reconstruction, weight/matrix views) is done by ``lowrank_core``;
these modules only wire it into ``torch.nn``.

Forward paths and the ``"auto"`` rule
-------------------------------------
Each layer runs either the *factorized* path (thin products with the factors, never forming ``W``) or
the *dense* path (``W`` rebuilt with ``lowrank_core.reconstruct`` and one ordinary GEMM/conv), chosen by
``forward_mode``: ``"factorized"``, ``"dense"`` or ``"auto"``.

Costs are counted in multiply-accumulates (MACs) of one forward pass, with ``m x n`` the (per-group)
matrix, ``r`` the rank, ``g`` the number of groups and ``T`` the number of *tokens*: rows of the input
of a Linear (the product of its leading dimensions), output positions of a ConvNd (batch times the
product of the output's spatial sizes). :meth:`LowRankLayer.flops` returns them:

- Linear, factorized: ``T r (m + n) + r^2 min(T, m, n)``. The forward picks the cheapest association of
  ``x V Sigma^T U^T``: three thin matmuls (``T r (m + n + r)``) when ``T <= min(m, n)``, otherwise
  ``Sigma`` is first merged into the smaller of ``U`` (``m r^2``) and ``V`` (``n r^2``).
- ConvNd, factorized: ``g T r (n + m) + g m r^2``: a conv with the ``g r`` filters ``V[:, j]``
  (same stride/padding/dilation, ``groups=g``: ``g r n`` per position), then a 1x1 conv with
  ``U Sigma`` (``out x r`` per group, ``groups=g``: ``g m r`` per position), ``U Sigma`` formed once
  per call (``g m r^2``).
- dense (both): ``g T m n + g m r (r + n)``, the second term being the reconstruction
  ``(U Sigma) V^T``.

``"auto"`` on a Linear compares the two totals above for the call's own ``T`` and takes the cheaper
path (ties go to dense), with the current rank, at every call; when autograd records the call
(training: grad enabled and ``sigma`` trainable) it compares forward plus backward
(:meth:`LowRankLayer.flops` with ``backward=True``), because the dense path's backward also forms
``dL/dW`` (``T m n``) and projects it onto ``sigma`` while the factorized one never forms anything of
size ``m n``; the dense path also pays the reconstruction of ``W`` at every call, which the factorized
path never does. The counts are those of the matmuls torch runs (tested with
``torch.utils.flop_counter``); measured timings of both paths are in ``benchmarks/bench_oialr.py``'s
output and the CHANGELOG. A Linear may therefore take
different paths for different batch sizes; both compute the same product up to rounding. ConvNd (and
:meth:`LowRankLayer.resolved_mode` without ``tokens``) use the batch-independent per-token rule: the
factorized path exactly when ``r (m + n + r) < m n`` (the factorized per-token cost without merging,
an upper bound of the merged cost).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import lowrank_core as lc
from lowrank_core._array import check_device
from lowrank_core._validate import check_int, check_shape
from lowrank_core.errors import ParameterError, ParameterTypeError

__all__ = [
    "FORWARD_MODES",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankConv3d",
    "LowRankConvNd",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankTransformersConv1D",
    "LowRankWeight",
    "TransformersConv1D",
    "attention_is_low_rank",
    "dense_matrix_shape",
    "is_transformers_conv1d",
    "low_rank_attention_",
]

FORWARD_MODES = ("auto", "factorized", "dense")


def _as_factor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise lc.ArrayTypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


class LowRankLayer(nn.Module):
    """Common base: a weight of shape ``weight_shape`` held as ``U @ sigma @ V.T`` (one per group).

    ``U``, ``V`` are persistent buffers (frozen), ``sigma`` is the trainable ``nn.Parameter`` and ``bias``
    an optional trainable ``nn.Parameter``. The factors are copied (detached) on construction.
    """

    U: Tensor
    V: Tensor
    sigma: nn.Parameter
    bias: nn.Parameter | None
    #: forward modes a subclass accepts
    _modes: ClassVar[tuple[str, ...]] = FORWARD_MODES
    #: the axis of ``weight_shape`` that the bias runs along (the output features)
    _bias_axis: ClassVar[int] = 0

    def __init__(
        self,
        U: Tensor,
        Sigma: Tensor,
        V: Tensor,
        bias: Tensor | None,
        *,
        weight_shape: Sequence[int],
        groups: int = 1,
        forward_mode: str = "auto",
    ) -> None:
        super().__init__()
        self.weight_shape: tuple[int, ...] = check_shape("weight_shape", weight_shape, min_ndim=2)
        self.groups = int(check_int("groups", groups, min=1))
        want = lc.matrix_shape(self.weight_shape, groups=self.groups)
        self.rows, self.cols = int(want[-2]), int(want[-1])
        U, Sigma, V = (_as_factor(U, "U"), _as_factor(Sigma, "Sigma"), _as_factor(V, "V"))
        self._check_factors(U, Sigma, V)
        dtype, device = Sigma.dtype, Sigma.device
        self.register_buffer("U", self._copy(U, dtype, device), persistent=True)
        self.register_buffer("V", self._copy(V, dtype, device), persistent=True)
        self.sigma = nn.Parameter(self._copy(Sigma, dtype, device))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            b = _as_factor(bias, "bias")
            out = self.weight_shape[self._bias_axis]
            if tuple(b.shape) != (out,):
                raise lc.ShapeError(f"`bias` must have shape ({out},), got {tuple(b.shape)}")
            if not b.is_floating_point():
                raise lc.DTypeError(f"`bias` must be a floating tensor, got {b.dtype}")
            check_device(b, "bias")
            if not bool(torch.isfinite(b).all()):
                raise lc.NonFiniteError("`bias` contains NaN or Inf")
            self.bias = nn.Parameter(self._copy(b, dtype, device))
        self._forward_mode = "auto"
        self.forward_mode = forward_mode

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _copy(x: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        return x.detach().to(device=device, dtype=dtype, copy=True).contiguous()

    def _check_factors(self, U: Tensor, Sigma: Tensor, V: Tensor) -> None:
        batch: tuple[int, ...] = () if self.groups == 1 else (self.groups,)
        nd = len(batch) + 2
        for name, x in (("U", U), ("Sigma", Sigma), ("V", V)):
            if x.ndim != nd:
                raise lc.ShapeError(
                    f"`{name}` must have {nd} dimensions for groups={self.groups}, "
                    f"got shape {tuple(x.shape)}"
                )
            if not x.is_floating_point():
                raise lc.DTypeError(f"`{name}` must be a floating tensor, got {x.dtype}")
            check_device(x, name)
            if not bool(torch.isfinite(x).all()):
                raise lc.NonFiniteError(f"`{name}` contains NaN or Inf")
        r = int(Sigma.shape[-1])
        k = min(self.rows, self.cols)
        expect = {
            "U": (*batch, self.rows, r),
            "Sigma": (*batch, r, r),
            "V": (*batch, self.cols, r),
        }
        for name, x in (("U", U), ("Sigma", Sigma), ("V", V)):
            if tuple(x.shape) != expect[name]:
                raise lc.ShapeError(
                    f"factors do not fit a weight of shape {self.weight_shape} (groups={self.groups}): "
                    f"`{name}` has shape {tuple(x.shape)}, expected {expect[name]}"
                )
        if not 1 <= r <= k:
            raise lc.RankError(f"the rank must lie in 1..{k}, got {r}")

    # ----------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The current rank ``r`` (shared by all groups)."""
        return int(self.sigma.shape[-1])

    @property
    def max_rank(self) -> int:
        """``min(m, n)`` of the (per-group) weight matrix."""
        return min(self.rows, self.cols)

    @property
    def factors(self) -> lc.LowRankFactors:
        """The current ``(U, sigma, V)`` (the live tensors, not copies)."""
        return lc.LowRankFactors(self.U, self.sigma, self.V)

    @property
    def weight(self) -> Tensor:
        """The dense weight, rebuilt from the factors (differentiable with respect to ``sigma``)."""
        matrix = lc.reconstruct(self.U, self.sigma, self.V, check_finite=False)
        weight: Tensor = lc.matrix_to_weight(matrix, self.weight_shape, check_finite=False)
        return weight

    @property
    def forward_mode(self) -> str:
        """``"auto"``, ``"factorized"`` or ``"dense"`` (see the module docstring for ``"auto"``)."""
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, mode: str) -> None:
        if mode not in self._modes:
            raise (ParameterError if isinstance(mode, str) else ParameterTypeError)(
                f"`forward_mode` of {type(self).__name__} must be one of {self._modes}, got {mode!r}"
            )
        self._forward_mode = mode

    def factorized_is_cheaper(self) -> bool:
        """The ``"auto"`` rule: ``r (m + n + r) < m n`` for the current rank (per group, per token)."""
        r, m, n = self.rank, self.rows, self.cols
        return r * (m + n + r) < m * n

    def resolved_mode(self, tokens: int | None = None, *, backward: bool = False) -> str:
        """The path a forward takes: ``"factorized"`` or ``"dense"``.

        With ``tokens`` (what :class:`LowRankLinear`'s forward passes) ``"auto"`` compares the whole
        cost of the call, :meth:`flops` ``(tokens, backward=backward)``, per-call reconstruction
        included; the forward passes ``backward=True`` when autograd records it (training), since the
        two paths' backward passes differ more than their forwards. Without ``tokens``, the
        batch-independent per-token rule :meth:`factorized_is_cheaper`.
        """
        if self._forward_mode == "auto":
            if tokens is not None:
                cost = self.flops(tokens, backward=backward)
                return "factorized" if cost["factorized"] < cost["dense"] else "dense"
            return "factorized" if self.factorized_is_cheaper() else "dense"
        return self._forward_mode

    def flops(self, tokens: int, *, backward: bool = False) -> dict[str, int]:
        """Multiply-accumulates of one forward pass over ``tokens`` tokens, per path (module docstring).

        ``backward=True``: of the forward and the backward pass together (the gradients of ``sigma``
        and of the input; ``U``, ``V`` are frozen). The dense path's backward computes the input
        gradient and ``dL/dW`` (``2 T m n``) and projects ``dL/dW`` onto ``sigma`` (``m r (n + r)``).
        """
        tokens = check_int("tokens", tokens, min=0)
        g, r, m, n, T = self.groups, self.rank, self.rows, self.cols, tokens
        dense = g * (T * m * n + m * r * (r + n))
        if backward:
            dense += g * (2 * T * m * n + m * r * (n + r))
        return {"factorized": self._factorized_flops(T, backward), "dense": dense}

    def _factorized_flops(self, T: int, backward: bool = False) -> int:
        g, r, m, n = self.groups, self.rank, self.rows, self.cols
        k = min(m, n)
        fwd = T * r * (m + n) + r * r * min(T, m, n)
        if not backward:
            return g * fwd
        # three thin matmuls (T <= k): dh2 = G U, dSigma, dh1 = dh2 Sigma, dx = dh1 V^T; otherwise
        # Sigma merged into the smaller side (size k): two gradients there, dSigma, dx
        thin = T * r * (m + n + 2 * r)
        merged = T * r * (m + n + k) + k * r * r
        bwd = thin if k >= T else merged
        return g * (fwd + bwd)

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_factors(self, U: Tensor, Sigma: Tensor, V: Tensor) -> None:
        """Replace the factors in place; the rank may change (e.g. after ``lowrank_core.update_rank``).

        Tensors whose shape does not change are written in place: ``sigma`` stays the same
        ``nn.Parameter`` (an optimizer and a DDP wrapper keep working). When the rank changes, ``sigma``
        becomes a NEW ``nn.Parameter`` (resizing a leaf in place breaks autograd) and ``U`` / ``V`` are
        re-assigned as buffers: the caller moves the new parameter into its optimizer
        (:func:`lowrank_torch.optim_state.swap_parameter`; :class:`lowrank_torch.oialr.OIALR` does this).
        Optimizer state is not touched here. Values are copied to the layer's dtype and device.
        """
        U, Sigma, V = (_as_factor(U, "U"), _as_factor(Sigma, "Sigma"), _as_factor(V, "V"))
        self._check_factors(U, Sigma, V)
        dtype, device = self.sigma.dtype, self.sigma.device
        new_sigma = self._copy(Sigma, dtype, device)
        with torch.no_grad():
            if new_sigma.shape == self.sigma.shape:
                # same shape: write in place, so every reference to these tensors (an optimizer, a DDP
                # wrapper's buffer list and gradient buckets) stays valid and no DDP rebuild is needed
                self.sigma.copy_(new_sigma)
            else:
                # a new shape needs a new Parameter: autograd caches a leaf's shape in its gradient
                # accumulator, so resizing ``.data`` breaks the next backward while an old graph lives
                self.sigma = nn.Parameter(new_sigma, requires_grad=self.sigma.requires_grad)
            for name, value in (("U", U), ("V", V)):
                current: Tensor = getattr(self, name)
                if tuple(current.shape) == tuple(value.shape):
                    current.copy_(value)
                else:
                    setattr(self, name, self._copy(value, dtype, device))

    def extra_repr(self) -> str:
        parts = [
            f"weight_shape={self.weight_shape}",
            f"rank={self.rank}/{self.max_rank}",
        ]
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        parts.append(f"bias={self.bias is not None}")
        parts.append(f"forward_mode={self._forward_mode!r}")
        return ", ".join(parts)


def _factorize(weight: Tensor, rank: int | None, groups: int) -> lc.LowRankFactors:
    matrix = lc.weight_to_matrix(weight.detach(), groups=groups)
    return lc.factorize(matrix, rank)


def _bias_copy(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach()


# ==================================================================================================
# Linear
# ==================================================================================================
class LowRankLinear(LowRankLayer):
    """``y = x V Sigma^T U^T + b``: a Linear ``(out, in)`` held as OIALR factors.

    ``U (out, r)``, ``Sigma (r, r)``, ``V (in, r)``. Build one from a dense layer with :meth:`from_dense`.
    """

    def __init__(
        self,
        U: Tensor,
        Sigma: Tensor,
        V: Tensor,
        bias: Tensor | None = None,
        *,
        forward_mode: str = "auto",
    ) -> None:
        U, V = _as_factor(U, "U"), _as_factor(V, "V")
        if U.ndim != 2 or V.ndim != 2:
            raise lc.ShapeError(
                f"LowRankLinear needs 2-D U and V, got {tuple(U.shape)} and {tuple(V.shape)}"
            )
        super().__init__(
            U,
            Sigma,
            V,
            bias,
            weight_shape=(int(U.shape[0]), int(V.shape[0])),
            forward_mode=forward_mode,
        )

    @property
    def in_features(self) -> int:
        return self.cols

    @property
    def out_features(self) -> int:
        return self.rows

    @classmethod
    def from_dense(
        cls, module: nn.Linear, rank: int | None = None, *, forward_mode: str = "auto"
    ) -> LowRankLinear:
        """Factorize ``module.weight`` (full rank by default: exact); the bias is copied."""
        if not isinstance(module, nn.Linear):
            raise ParameterTypeError(
                f"LowRankLinear.from_dense needs an nn.Linear, got {type(module).__name__}"
            )
        f = _factorize(module.weight, rank, 1)
        return cls(f.U, f.Sigma, f.V, _bias_copy(module.bias), forward_mode=forward_mode)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the reconstructed weight (and a copy of the bias)."""
        out = nn.Linear(
            self.cols,
            self.rows,
            bias=self.bias is not None,
            device=self.sigma.device,
            dtype=self.sigma.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None and out.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
        backward = torch.is_grad_enabled() and self.sigma.requires_grad
        if self.resolved_mode(tokens, backward=backward) == "factorized":
            return self._forward_factorized(x)
        return self._forward_dense(x)

    def _forward_dense(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _forward_factorized(self, x: Tensor) -> Tensor:
        m, n = self.rows, self.cols
        tokens = x.numel() // n if n else 0
        if tokens <= min(m, n):  # three thin matmuls: T r (n + r + m)
            h = F.linear(F.linear(x, self.V.mT), self.sigma)
            return F.linear(h, self.U, self.bias)
        if m <= n:  # merge U Sigma (m r^2), then T r (n + m)
            return F.linear(F.linear(x, self.V.mT), self.U @ self.sigma, self.bias)
        # merge Sigma V^T (n r^2), then T r (n + m)
        return F.linear(F.linear(x, self.sigma @ self.V.mT), self.U, self.bias)


# ==================================================================================================
# transformers' Conv1D (a Linear with a transposed weight)
# ==================================================================================================
def is_transformers_conv1d(cls: type) -> bool:
    """Whether ``cls`` is (a subclass of) Hugging Face transformers' ``Conv1D`` (``pytorch_utils.Conv1D``).

    Decided from the class hierarchy by name and module, so that lowrank_torch never imports
    transformers: a class named ``Conv1D`` defined in a ``transformers`` module, an ``nn.Module``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return False
    return any(
        k.__name__ == "Conv1D" and str(k.__module__).split(".")[0] == "transformers"
        for k in cls.__mro__
    )


class _Conv1DMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return is_transformers_conv1d(type(obj))

    def __subclasscheck__(cls, sub: type) -> bool:
        return sub is cls or is_transformers_conv1d(sub)


class TransformersConv1D(metaclass=_Conv1DMeta):
    """Stands for transformers' ``Conv1D`` in ``include`` lists and ``isinstance`` checks, without importing it.

    ``isinstance(module, TransformersConv1D)`` is :func:`is_transformers_conv1d` of the module's type;
    ``issubclass(transformers.pytorch_utils.Conv1D, TransformersConv1D)`` holds. Never instantiated.
    """

    def __new__(cls) -> TransformersConv1D:  # pragma: no cover - a marker only
        raise ParameterTypeError("TransformersConv1D is a marker class; it has no instances")


class LowRankTransformersConv1D(LowRankLayer):
    """transformers' ``Conv1D`` held as OIALR factors: ``y = x U Sigma V^T + b``.

    Not to be confused with :class:`LowRankConv1d` (lower-case ``d``, the factorized ``nn.Conv1d``):
    each name mirrors the layer it replaces, ``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed
    Linear) and ``torch.nn.Conv1d``.

    A ``Conv1D(nf, nx)`` is a Linear whose weight is stored transposed, ``(in, out) = (nx, nf)``, and
    computes ``x @ weight + bias``. Its matrix view is that weight as it is (the transpose of
    :class:`LowRankLinear`'s ``(out, in)``): ``U (in, r)``, ``Sigma (r, r)``, ``V (out, r)``, and
    :attr:`weight` has the dense layer's ``(in, out)`` shape, so code that reads ``module.weight`` and
    optimizer state of the dense weight keep their layout. The forward paths, their costs and the
    ``"auto"`` rule are :class:`LowRankLinear`'s with ``m = in`` and ``n = out``.
    """

    _bias_axis = 1

    def __init__(
        self,
        U: Tensor,
        Sigma: Tensor,
        V: Tensor,
        bias: Tensor | None = None,
        *,
        forward_mode: str = "auto",
    ) -> None:
        U, V = _as_factor(U, "U"), _as_factor(V, "V")
        if U.ndim != 2 or V.ndim != 2:
            raise lc.ShapeError(
                f"LowRankTransformersConv1D needs 2-D U and V, got {tuple(U.shape)} and {tuple(V.shape)}"
            )
        super().__init__(
            U,
            Sigma,
            V,
            bias,
            weight_shape=(int(U.shape[0]), int(V.shape[0])),
            forward_mode=forward_mode,
        )

    @property
    def nx(self) -> int:
        """Input features (transformers' name)."""
        return self.rows

    @property
    def nf(self) -> int:
        """Output features (transformers' name)."""
        return self.cols

    in_features = nx
    out_features = nf

    @classmethod
    def from_dense(
        cls, module: nn.Module, rank: int | None = None, *, forward_mode: str = "auto"
    ) -> LowRankTransformersConv1D:
        """Factorize a transformers ``Conv1D``'s weight ``(in, out)`` (full rank by default: exact)."""
        if not is_transformers_conv1d(type(module)):
            raise ParameterTypeError(
                f"LowRankTransformersConv1D.from_dense needs a transformers Conv1D, got {type(module).__name__}"
            )
        weight: Any = module.weight
        bias: Any = getattr(module, "bias", None)
        f = _factorize(weight, rank, 1)
        return cls(f.U, f.Sigma, f.V, _bias_copy(bias), forward_mode=forward_mode)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
        backward = torch.is_grad_enabled() and self.sigma.requires_grad
        if self.resolved_mode(tokens, backward=backward) == "factorized":
            return self._forward_factorized(x)
        return self._forward_dense(x)

    def _forward_dense(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.mT, self.bias)

    def _forward_factorized(self, x: Tensor) -> Tensor:
        m, n = self.rows, self.cols  # in, out
        tokens = x.numel() // m if m else 0
        if tokens <= min(m, n):  # three thin matmuls: T r (m + r + n)
            h = F.linear(F.linear(x, self.U.mT), self.sigma.mT)
            return F.linear(h, self.V, self.bias)
        if m <= n:  # merge U Sigma (m r^2), then T r (m + n)
            return F.linear(F.linear(x, (self.U @ self.sigma).mT), self.V, self.bias)
        # merge Sigma V^T (n r^2), then T r (m + n)
        return F.linear(F.linear(x, self.U.mT), self.V @ self.sigma.mT, self.bias)

    def to_dense(self) -> nn.Module:
        """A transformers ``Conv1D`` with the reconstructed weight (imports transformers)."""
        from transformers.pytorch_utils import Conv1D

        out: Any = Conv1D(self.nf, self.nx).to(device=self.sigma.device, dtype=self.sigma.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
            else:
                out.bias = None
        assert isinstance(out, nn.Module)
        return out


# ==================================================================================================
# ConvNd
# ==================================================================================================
_ConvFn = Any


def _tuple(value: int | Sequence[int], nd: int, name: str) -> tuple[int, ...]:
    """An int (NumPy integer scalars included) repeated ``nd`` times, or a sequence of ``nd`` ints."""
    if not isinstance(value, (tuple, list)):
        return (int(check_int(name, value)),) * nd
    t = tuple(int(check_int(f"{name}[{i}]", v)) for i, v in enumerate(value))
    if len(t) != nd:
        raise ParameterError(f"`{name}` must be an int or a sequence of {nd} ints, got {value!r}")
    return t


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _explicit_padding(
    padding: str | tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> list[int]:
    """``F.pad`` amounts (last dimension first, left/right) equivalent to a ConvNd's ``padding``."""
    nd = len(kernel)
    if padding == "valid":
        return [0] * (2 * nd)
    if padding == "same":
        pads = [0] * (2 * nd)
        for i, (d, k) in enumerate(zip(dilation, kernel, strict=True)):
            total = d * (k - 1)
            j = 2 * (nd - 1 - i)
            pads[j], pads[j + 1] = total // 2, total - total // 2
        return pads
    assert isinstance(padding, tuple)
    return [p for p in reversed(padding) for _ in range(2)]


class LowRankConvNd(LowRankLayer):
    """A ConvNd whose weight ``(out, in/g, *kernel)`` is held as factors.

    The matrix view is ``(out, in/g * prod(kernel))``, split into ``g`` groups for a grouped conv.
    Subclasses fix the number of spatial dimensions (:class:`LowRankConv1d`, ``2d``, ``3d``). Every
    ``padding_mode`` of ``torch.nn`` is supported: other than ``'zeros'``, the input is padded first
    (``F.pad`` with that mode, as ``nn.ConvNd`` does) and both paths convolve it without padding.
    """

    _nd: ClassVar[int] = 0
    _dense_type: ClassVar[type[nn.Module]] = nn.Module

    def __init__(
        self,
        U: Tensor,
        Sigma: Tensor,
        V: Tensor,
        bias: Tensor | None = None,
        *,
        in_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        forward_mode: str = "auto",
    ) -> None:
        nd = self._nd
        if nd not in (1, 2, 3):
            raise ParameterTypeError("use LowRankConv1d, LowRankConv2d or LowRankConv3d")
        if padding_mode not in PADDING_MODES:
            raise ParameterError(
                f"`padding_mode` must be one of {PADDING_MODES}, got {padding_mode!r}"
            )
        U = _as_factor(U, "U")
        g = int(groups)
        if g < 1 or in_channels % g:
            raise lc.ShapeError(f"in_channels={in_channels} is not divisible by groups={g}")
        out = int(U.shape[-2]) * (g if U.ndim == 3 else 1)
        kernel = _tuple(kernel_size, nd, "kernel_size")
        self.in_channels = int(in_channels)
        self.out_channels = out
        self.kernel_size = kernel
        self.stride = _tuple(stride, nd, "stride")
        self.padding: str | tuple[int, ...] = (
            padding if isinstance(padding, str) else _tuple(padding, nd, "padding")
        )
        self.dilation = _tuple(dilation, nd, "dilation")
        self.padding_mode = padding_mode
        self._pad = _explicit_padding(self.padding, kernel, self.dilation)
        super().__init__(
            U,
            Sigma,
            V,
            bias,
            weight_shape=(out, self.in_channels // g, *kernel),
            groups=g,
            forward_mode=forward_mode,
        )

    def _conv(self) -> _ConvFn:
        return (F.conv1d, F.conv2d, F.conv3d)[self._nd - 1]

    @classmethod
    def from_dense(
        cls, module: nn.Module, rank: int | None = None, *, forward_mode: str = "auto"
    ) -> LowRankConvNd:
        """Factorize ``module.weight`` per group (full rank by default: exact); the bias is copied."""
        dense_type = cls._dense_type
        if cls._nd == 0 or not isinstance(module, dense_type):
            raise ParameterTypeError(
                f"{cls.__name__}.from_dense needs an nn.{dense_type.__name__}, got {type(module).__name__}"
            )
        assert isinstance(module, nn.modules.conv._ConvNd)
        f = _factorize(module.weight, rank, module.groups)
        return cls(
            f.U,
            f.Sigma,
            f.V,
            _bias_copy(module.bias),
            in_channels=module.in_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            forward_mode=forward_mode,
        )

    def to_dense(self) -> nn.Module:
        """A plain ``nn.ConvNd`` with the same hyper-parameters and the reconstructed weight."""
        out: Any = self._dense_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.sigma.device,
            dtype=self.sigma.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        assert isinstance(out, nn.Module)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.resolved_mode() == "factorized":
            return self._forward_factorized(x)
        return self._forward_dense(x)

    def _padded(self, x: Tensor) -> tuple[Tensor, str | tuple[int, ...]]:
        """The input and the padding the (first) convolution applies, per ``padding_mode``."""
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self._pad, mode=self.padding_mode), (0,) * self._nd

    def _forward_dense(self, x: Tensor) -> Tensor:
        x, padding = self._padded(x)
        y: Tensor = self._conv()(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups
        )
        return y

    def _forward_factorized(self, x: Tensor) -> Tensor:
        g, r, nd = self.groups, self.rank, self._nd
        conv = self._conv()
        x, padding = self._padded(x)
        # the g*r filters V[..., :, j], each (in/g, *kernel): lowrank_core's view of V^T as a weight
        filters = lc.matrix_to_weight(
            self.V.mT, (g * r, self.in_channels // g, *self.kernel_size), check_finite=False
        )
        h = conv(x, filters, None, self.stride, padding, self.dilation, g)
        mix = lc.matrix_to_weight(
            self.U @ self.sigma, (self.out_channels, r, *((1,) * nd)), check_finite=False
        )
        y: Tensor = conv(h, mix, self.bias, 1, 0, 1, g)
        return y

    def _factorized_flops(self, T: int, backward: bool = False) -> int:
        g, r, m, n = self.groups, self.rank, self.rows, self.cols
        fwd = T * r * (m + n) + m * r * r
        # backward: the 1x1 conv's input and weight gradients (2 T m r), dSigma from the latter
        # (m r^2), the input gradient of the conv with the frozen V filters (T r n)
        bwd = T * r * (2 * m + n) + m * r * r if backward else 0
        return g * (fwd + bwd)

    def extra_repr(self) -> str:
        hyper = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )
        if self.padding_mode != "zeros":
            hyper += f", padding_mode={self.padding_mode!r}"
        return f"{hyper}, {super().extra_repr()}"


class LowRankConv1d(LowRankConvNd):
    """Factorized ``nn.Conv1d`` (see :class:`LowRankConvNd`); for transformers' ``Conv1D`` (a transposed
    Linear, upper-case ``D``) see :class:`LowRankTransformersConv1D`."""

    _nd = 1
    _dense_type = nn.Conv1d


class LowRankConv2d(LowRankConvNd):
    """Factorized ``nn.Conv2d`` (see :class:`LowRankConvNd`)."""

    _nd = 2
    _dense_type = nn.Conv2d


class LowRankConv3d(LowRankConvNd):
    """Factorized ``nn.Conv3d`` (see :class:`LowRankConvNd`)."""

    _nd = 3
    _dense_type = nn.Conv3d


# ==================================================================================================
# Attention
# ==================================================================================================
class LowRankWeight(LowRankLayer):
    """A parametrization (``torch.nn.utils.parametrize``) that rebuilds a weight from OIALR factors.

    Used for ``nn.MultiheadAttention.in_proj_weight`` (one ``(3E, E)`` matrix): the attention code reads
    the tensor, so this weight always runs dense (``forward_mode`` is fixed to ``"dense"``, no compute
    saving); only ``sigma`` is trained. Its forward ignores the (empty) original tensor. :meth:`flops`
    reports the dense cost (weight rebuild plus product) under both keys.
    """

    _modes = ("dense",)

    def __init__(
        self,
        U: Tensor,
        Sigma: Tensor,
        V: Tensor,
        *,
        weight_shape: Sequence[int],
    ) -> None:
        super().__init__(U, Sigma, V, None, weight_shape=weight_shape, forward_mode="dense")

    def forward(self, original: Tensor) -> Tensor:
        return self.weight

    def _factorized_flops(self, T: int, backward: bool = False) -> int:
        return self.flops(T, backward=backward)["dense"]


def attention_is_low_rank(mha: nn.MultiheadAttention) -> bool:
    """Whether :func:`low_rank_attention_` was applied to ``mha``."""
    out_proj: nn.Module = mha.out_proj
    return isinstance(out_proj, LowRankLayer) or parametrize.is_parametrized(mha, "in_proj_weight")


def low_rank_attention_(
    mha: nn.MultiheadAttention, rank: int | None = None
) -> dict[str, LowRankLayer]:
    """Put an ``nn.MultiheadAttention`` into OIALR form, in place; returns the new low-rank parts.

    - ``out_proj`` becomes a :class:`LowRankLinear` (MHA reads ``out_proj.weight`` / ``.bias``, which it
      provides; the attention itself calls the dense product, so there is no compute saving there).
    - ``in_proj_weight`` ``(3E, E)`` (only with ``_qkv_same_embed_dim``) is factorized as one matrix and
      re-registered as a parametrization :class:`LowRankWeight`: reading ``mha.in_proj_weight`` rebuilds
      the dense tensor, and attention runs the dense product (no compute saving). The original parameter
      is replaced by an empty buffer (so it is neither trained nor kept in memory).
    - ``in_proj_bias`` and the out bias stay dense and trainable; separate ``q/k/v_proj_weight`` (when
      the key/value dims differ) are left as they are.

    The returned names are relative to ``mha`` (``"out_proj"``, ``"parametrizations.in_proj_weight.0"``).
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise ParameterTypeError(
            f"low_rank_attention_ needs an nn.MultiheadAttention, got {type(mha).__name__}"
        )
    if attention_is_low_rank(mha):
        raise ParameterError("this MultiheadAttention is already in low-rank form")
    out: dict[str, LowRankLayer] = {}
    new_in: LowRankWeight | None = None
    if mha._qkv_same_embed_dim and mha.in_proj_weight is not None:
        w = mha.in_proj_weight
        f = _factorize(w, rank, 1)
        new_in = LowRankWeight(f.U, f.Sigma, f.V, weight_shape=tuple(w.shape))
    out_lr = LowRankLinear.from_dense(mha.out_proj, rank)  # validates rank before anything changes
    if new_in is not None:
        w = mha.in_proj_weight
        del mha._parameters["in_proj_weight"]
        mha.register_buffer("in_proj_weight", w.new_empty(0).detach())
        parametrize.register_parametrization(mha, "in_proj_weight", new_in, unsafe=True)
        out["parametrizations.in_proj_weight.0"] = new_in
    mha.out_proj = out_lr  # type: ignore[assignment]
    out["out_proj"] = out_lr
    return out


def conv_class(module: nn.Module) -> type[LowRankConvNd] | None:
    for cls in (LowRankConv1d, LowRankConv2d, LowRankConv3d):
        if isinstance(module, cls._dense_type):
            return cls
    return None


def dense_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(m, n)`` of the (per-group) matrix view of a Linear's, transformers Conv1D's or ConvNd's weight."""
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    if is_transformers_conv1d(type(module)):
        weight: Any = module.weight
        return int(weight.shape[0]), int(weight.shape[1])
    if isinstance(module, nn.modules.conv._ConvNd):
        g = int(module.groups)
        cols = int(module.in_channels) // g * math.prod(module.kernel_size)
        return int(module.out_channels) // g, cols
    raise ParameterTypeError(f"no matrix view for {type(module).__name__}")
