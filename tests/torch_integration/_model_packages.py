"""Import the optional model packages (torchvision, timm, transformers) the model-zoo tests build on.

The versions are pinned in the ``models`` dependency group of pyproject.toml, which ``nox -s "tests(torch)"``
installs. When the torch backend is tested, a package of that group that cannot be imported is a failure
of the test environment, never a skip: :func:`import_model_packages` returns the import errors, and the
tests that need the package fail with them.

Known trap, worked around here (documented in the ``models`` group of pyproject.toml): the only torchvision
release built for torch 2.13.0 (0.28.0, the ``torch==2.13.0`` requirement of its wheel) is a CUDA build.
Its compiled extension ``torchvision/_C.so`` links ``libtorch_cuda.so`` and does not load with the CPU
torch; torchvision then runs without its compiled ops (its own fallback), except that
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, so ``import torchvision`` raises ``RuntimeError: operator
torchvision::nms does not exist`` (and timm and transformers, which import torchvision, fail with it).
:func:`_declare_torchvision_ops` declares the schemas of those two operators (no kernel) before the first
import when, and only when, the extension does not load. The models the tests use (ResNet, MobileNetV3,
ViT, ConvNeXt, timm ViT) need none of torchvision's compiled ops; calling ``torchvision.ops.nms`` would
still fail, with torch's "no kernel" error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

#: the packages of pyproject.toml's ``models`` dependency group, in import order
MODEL_PACKAGES = ("torchvision", "timm", "transformers")

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fragment: torch.library.Library | None = None


def _extension_loads() -> bool:
    """Whether torchvision's compiled extension loads with this torch (what torchvision tries itself)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to work around
    path = os.path.join(next(iter(spec.submodule_search_locations)), "_C.so")
    if not os.path.exists(path):
        return False
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError):
        return False
    return True


def _declare_torchvision_ops() -> None:
    """Declare ``torchvision::nms`` / ``qnms`` when the compiled extension cannot define them."""
    global _fragment
    if _fragment is not None or _extension_loads():
        return
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        _fragment.define(schema)


def import_model_packages() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """``({name: module}, {name: import error})`` for :data:`MODEL_PACKAGES`."""
    _declare_torchvision_ops()
    found: dict[str, ModuleType] = {}
    errors: dict[str, str] = {}
    for name in MODEL_PACKAGES:
        try:
            found[name] = importlib.import_module(name)
        except Exception as exc:  # any failure to import is reported, with its type
            errors[name] = f"{type(exc).__name__}: {exc}"
    return found, errors
