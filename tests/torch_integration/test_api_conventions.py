"""The public API keeps the conventions docs/api-conventions.md records (a review, checked here)."""

from __future__ import annotations

import builtins
import inspect

import pytest

torch = pytest.importorskip("torch")

import lowrank_core as lc  # noqa: E402
import lowrank_torch as lt  # noqa: E402
from lowrank_torch import cmd, oialr  # noqa: E402


@pytest.mark.parametrize("module", [lc, lt], ids=lambda m: m.__name__)
def test_every_name_in_all_exists(module):
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing
    assert len(set(module.__all__)) == len(module.__all__)


def test_the_entry_points_import_from_the_package():
    # users write `from lowrank_torch import OIALR` (as `from torch.optim import SGD`)
    assert lt.OIALR is oialr.OIALR and lt.OIALRConfig is oialr.OIALRConfig
    assert lt.CMDTracker is cmd.CMDTracker and lt.NotFittedError is cmd.NotFittedError


@pytest.mark.parametrize("module", [lc, lt], ids=lambda m: m.__name__)
def test_every_public_error_is_also_a_builtin_error(module):
    # like scipy.linalg.LinAlgError (a ValueError) and sklearn's NotFittedError: catchable either way
    errors = [
        getattr(module, n)
        for n in module.__all__
        if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), Exception)
    ]
    assert errors
    builtin = tuple(
        t for t in vars(builtins).values() if isinstance(t, type) and issubclass(t, Exception)
    )
    for err in errors:
        if issubclass(err, Warning) or err is lc.LowRankError:
            continue
        assert issubclass(err, lc.LowRankError), err
        assert any(b is not Exception and issubclass(err, b) for b in builtin), err


def test_result_types_unpack_like_their_namesakes():
    a = torch.randn(5, 3, dtype=torch.float64)
    U, S, Vh = lc.svd(a)  # torch.linalg.svd / array API: (U, S, Vh), a = U diag(S) Vh
    assert torch.allclose(U @ torch.diag(S) @ Vh, a)
    u, p = lc.polar(a)  # scipy.linalg.polar: a = u p
    assert torch.allclose(u @ p, a)
    Q, R = lc.qr(a)  # array API qr, mode="reduced"
    assert torch.allclose(Q @ R, a)


@pytest.mark.parametrize(
    "cls", [lt.OIALR, lt.CMDTracker, lt.SubspaceSGD, lt.SubspaceBFGS], ids=lambda c: c.__name__
)
def test_stateful_objects_checkpoint_like_torch(cls):
    # torch's convention: state_dict() -> dict, load_state_dict(dict)
    for name in ("state_dict", "load_state_dict"):
        assert callable(getattr(cls, name, None)), name
    assert len(inspect.signature(cls.load_state_dict).parameters) >= 2  # self, the state


def test_per_step_controllers_have_step_returning_none():
    # like AveragedModel.update_parameters / LRScheduler.step(): called after every optimizer step,
    # returns None (what changed is an attribute: OIALR.structure_changed, CMDTracker.time_points)
    for cls in (lt.OIALR, lt.CMDTracker):
        assert callable(cls.step)
        assert inspect.signature(cls.step).return_annotation in (None, "None"), cls
