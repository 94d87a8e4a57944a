"""Checkpoints of a (partly) low-rank training run, loadable into a freshly built dense model.

A checkpoint holds the model's, the optimizer's, the OIALR controller's and (optionally) an LR
scheduler's state, plus an ``extra`` dict. Because the controller's state says which layers were
switched and at which ranks, :func:`load_checkpoint` can rebuild that structure on a model built the
usual (dense) way, then load the weights and the optimizer state into it: a resumed run continues
exactly where the saved one stopped.

The file is the core's container (:mod:`lowrank_core.checkpoint`; this module is the tree glue): one
NumPy ``.npz`` archive (no pickle: loading runs no code) with a JSON manifest, written atomically (a
temporary file, then a rename: a crash while saving never destroys the previous checkpoint) and carrying
a SHA-256 digest of the manifest and of every array's dtype, shape and bytes, checked when it is loaded:
a file changed on disk (a flipped bit, a partial overwrite) is refused instead of loading silently wrong
values. The digest guards against corruption, not against a deliberate forgery (anyone can compute it).
Tensors are stored as NumPy arrays of their dtype (``bfloat16`` and the ``float8`` types, which NumPy
lacks, as their raw bits with the dtype's name) and come back as tensors of that dtype, on
``map_location``; loading them into the model and the optimizer places them on those objects' devices.

Files of version 0.1.0 (format ``"lowrank_torch.checkpoint/2"``, and ``/1`` before it, written with
``torch.save``) are still read, through ``torch.load(weights_only=True)``
(:mod:`lowrank_torch.legacy_checkpoint`).

Loading is all or nothing: everything is checked against the target model, optimizer, controller and
scheduler (names, shapes, ranks, optimizer type and per-parameter state) before any value is written;
when something does not fit, :class:`CheckpointError` names it and every object is left exactly as it
was (layers not converted, optimizer groups not swapped).
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import lowrank_core as lc
from lowrank_core import checkpoint as container
from lowrank_core._validate import check_bool, describe

from . import legacy_checkpoint as legacy
from .oialr import OIALR, CheckpointError
from .undo import Undo

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

#: the format written: the core's container (``.npz``, JSON manifest, SHA-256 digest)
FORMAT = "lowrank_torch.checkpoint/3"
#: the ``torch.save`` formats of version 0.1.0, still read
FORMAT_V2 = legacy.FORMAT_V2
FORMAT_V1 = legacy.FORMAT_V1
DIGEST = container.DIGEST

#: tensor dtypes NumPy holds natively (stored as they are; every other dtype as raw bits)
_NUMPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def _as_path(path: object) -> Path:
    if isinstance(path, str | os.PathLike) and not isinstance(path, bytes):
        return Path(path)
    raise lc.ParameterTypeError(f"`path` must be a str or os.PathLike, got {describe(path)}")


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------------
# tree glue: tensors to NumPy arrays (or raw bits) and back
# --------------------------------------------------------------------------------------------------
def _to_numpy(t: Tensor, where: str) -> np.ndarray | container.RawArray:
    """A tensor as a NumPy array of its dtype, or its raw bits with the dtype's name."""
    if t.layout != torch.strided:
        raise lc.ParameterTypeError(
            f"{where} is a {t.layout} tensor; a checkpoint keeps dense (strided) tensors"
        )
    if t.device.type == "meta":
        raise lc.DeviceError(f"{where} is a tensor on the meta device (no values to save)")
    t = t.detach().resolve_conj().resolve_neg().cpu().contiguous()
    if t.dtype in _NUMPY_DTYPES:
        return t.numpy()
    bits = _BITS.get(t.element_size())
    if bits is None:
        raise lc.ParameterTypeError(
            f"{where} has the dtype {t.dtype}, which a checkpoint cannot keep"
        )
    return container.RawArray(t.view(bits).numpy(), str(t.dtype).removeprefix("torch."))


def _encode(x: Any, where: str) -> Any:
    """The tree with every tensor as a NumPy array or raw bits; other values as they are (the container
    checks them and names any it cannot keep)."""
    if isinstance(x, Tensor):
        return _to_numpy(x, where)
    if isinstance(x, np.ndarray):
        raise lc.ParameterTypeError(
            f"{where} is a NumPy array; a torch checkpoint keeps tensors (torch.from_numpy(...))"
        )
    if isinstance(x, dict):
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in x.items()}
    if isinstance(x, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return tuple(_encode(v, f"{where}[{i}]") for i, v in enumerate(x))
    return x


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(
            f"the checkpoint holds an array of dtype {name!r}, unknown to PyTorch"
        )
    return dtype


def _to_tensor(a: np.ndarray | container.RawArray, device: torch.device | None) -> Tensor:
    """A stored array as a tensor of its saved dtype (on ``device`` when given)."""
    if isinstance(a, container.RawArray):
        bits, dtype = a.bits, _torch_dtype(a.dtype)
    elif a.dtype.kind in "biufc":
        bits, dtype = a, None
    else:  # a dtype NumPy knows through ml_dtypes (bfloat16, float8_*): reinterpret its bits
        bits, dtype = a.view(np.dtype(f"u{a.dtype.itemsize}")), _torch_dtype(a.dtype.name)
    if not bits.flags.writeable:
        bits = bits.copy()
    t = torch.from_numpy(bits)
    if dtype is not None and t.numel() == 0:  # no bits to reinterpret (and no element size stored)
        t = torch.empty(t.shape, dtype=dtype)
    elif dtype is not None:
        if dtype.itemsize != t.element_size():
            raise CheckpointError(
                f"the checkpoint holds {dtype} values stored in {t.element_size()}-byte elements"
            )
        t = t.view(dtype)
    return t if device is None else t.to(device)


def _decode(x: Any, device: torch.device | None) -> Any:
    """The loaded tree with every array as a tensor."""
    if isinstance(x, np.ndarray | container.RawArray):
        return _to_tensor(x, device)
    if isinstance(x, dict):
        return {k: _decode(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v, device) for v in x]
    if isinstance(x, tuple):
        return tuple(_decode(v, device) for v in x)
    return x


def _device(map_location: Any) -> torch.device | None:
    if map_location is None:
        return None
    if isinstance(map_location, str | torch.device):
        try:
            return torch.device(map_location)
        except RuntimeError as exc:
            raise lc.ParameterError(
                f"`map_location` {map_location!r} is not a device: {exc}"
            ) from None
    raise lc.ParameterTypeError(
        f"`map_location` must be a str, a torch.device or None, got {describe(map_location)}"
    )


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    oialr: OIALR | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the run's state to ``path`` atomically, with its digest; returns the path.

    ``extra`` holds anything else to keep (epoch, metrics): tensors, numbers (NaN and infinities
    included), strings, ``None``, lists, tuples and dicts of them (keys: strings, numbers, ``None`` or
    tuples of them). Any other value (a NumPy array: pass a tensor; an arbitrary object) raises
    :class:`~lowrank_core.ParameterTypeError` naming the entry, before anything is written; so does a
    state of the model, optimizer or scheduler that holds one.
    """
    if not isinstance(model, nn.Module):
        raise lc.ParameterTypeError(f"`model` must be an nn.Module, got {describe(model)}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise lc.ParameterTypeError(
            f"`optimizer` must be a torch.optim.Optimizer or None, got {describe(optimizer)}"
        )
    if oialr is not None and not isinstance(oialr, OIALR):
        raise lc.ParameterTypeError(
            f"`oialr` must be an OIALR controller or None, got {describe(oialr)}"
        )
    if extra is not None and not isinstance(extra, dict):
        raise lc.ParameterTypeError(f"`extra` must be a dict or None, got {describe(extra)}")
    target = _as_path(path)
    if target.is_dir():
        raise lc.ParameterError(f"`path` {str(target)!r} is a directory; give a file name")
    inner = getattr(model, "module", model)
    state = inner.state_dict()
    payload: dict[str, Any] = {"model": dict(state)}
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # the modules' state versions, read by their _load_from_state_dict
        payload["model_metadata"] = {k: dict(v) for k, v in metadata.items()}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        payload["optimizer_type"] = _type_name(optimizer)
    if oialr is not None:
        payload["oialr"] = oialr.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
        payload["scheduler_type"] = _type_name(scheduler)
    if extra is not None:
        payload["extra"] = extra
    tree = {k: _encode(v, f"the checkpoint[{k!r}]") for k, v in payload.items()}
    return container.save(target, tree, format=FORMAT)


# --------------------------------------------------------------------------------------------------
# reading and checking (nothing here changes the target objects)
# --------------------------------------------------------------------------------------------------
def _read(path: Path, map_location: Any, verify: bool) -> dict[str, Any]:
    """The checkpoint's entries, tensors as tensors: the container's file (always checked against its
    digest), or a ``torch.save`` file of version 0.1.0 (checked when ``verify``)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if legacy.is_torch_save(path):
        blob = legacy.read(path, map_location, verify)
    else:
        device = _device(map_location)
        found, tree = container.load(path, formats=(FORMAT,))
        blob = {"format": found, **_decode(tree, device)}
        metadata = blob.pop("model_metadata", None)
        if isinstance(blob.get("model"), dict) and isinstance(metadata, dict):
            model_state: Any = OrderedDict(blob["model"])
            model_state._metadata = OrderedDict(metadata)
            blob["model"] = model_state
    if "model" not in blob:
        raise CheckpointError(f"{path} holds no model state")
    return blob


def _few(names: Any, k: int = 5) -> str:
    items = sorted(names, key=str)
    text = ", ".join(repr(n) for n in items[:k])
    return text + (f", ... ({len(items)} in all)" if len(items) > k else "")


def _check_model_state(saved: Any, model: nn.Module) -> None:
    """Keys, shapes and kinds of a model state against ``model`` (as it is now)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"the model state must be a dict, got {describe(saved)}")
    target = model.state_dict()
    missing = target.keys() - saved.keys()
    unexpected = saved.keys() - target.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise CheckpointError(f"the model state does not fit this model: {'; '.join(parts)}")
    for key, want in target.items():
        got = saved[key]
        if not isinstance(want, Tensor):
            continue
        if not isinstance(got, Tensor):
            raise CheckpointError(
                f"the model state does not fit this model: {key!r} must be a tensor, got "
                f"{describe(got)}"
            )
        if got.shape != want.shape:
            raise CheckpointError(
                f"the model state does not fit this model: {key!r} has shape {tuple(got.shape)}, "
                f"the model needs {tuple(want.shape)}"
            )
        if (got.is_floating_point(), got.is_complex()) != (
            want.is_floating_point(),
            want.is_complex(),
        ):
            raise CheckpointError(
                f"the model state does not fit this model: {key!r} has dtype {got.dtype}, the "
                f"model needs {want.dtype}"
            )


def _check_optimizer_meta(blob: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Type and group layout of the saved optimizer state (before any layer is converted)."""
    saved = blob["optimizer"]
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("state"), dict)
        or not isinstance(saved.get("param_groups"), list)
        or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"]
        )
    ):
        raise CheckpointError("the optimizer state is malformed (no 'state' / 'param_groups')")
    saved_type = blob.get("optimizer_type")
    if saved_type is not None and saved_type != _type_name(optimizer):
        raise CheckpointError(
            f"the optimizer state does not fit: it was saved from a {saved_type}, the optimizer "
            f"given is a {_type_name(optimizer)}"
        )
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the optimizer state does not fit: it has {len(groups)} param groups, the optimizer "
            f"{len(optimizer.param_groups)}"
        )
    for i, (g, mine) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        if saved_type is None:  # an old file: the hyper-parameter names must agree
            keys = set(g) - {"params", "param_names"}
            want = set(mine) - {"params", "param_names"}
            if keys != want:
                raise CheckpointError(
                    f"the optimizer state does not fit: param group {i} has the settings "
                    f"{sorted(keys)}, the optimizer {sorted(want)} (another optimizer type?)"
                )
        lr = g.get("lr")
        if isinstance(lr, float) and not (lr >= 0.0 and lr < float("inf")):
            raise CheckpointError(f"the optimizer state is invalid: param group {i} has lr={lr}")
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in g["params"]):
            raise CheckpointError(
                f"the optimizer state is malformed: param group {i} lists non-integer parameters"
            )


def _probe_state(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Any:
    """The state a fresh optimizer of this type and settings keeps for ``param``'s shape after a step.

    Only for ``torch.optim`` optimizers (their constructors take the group's settings as keywords);
    ``None`` when it cannot be built (another kind of optimizer, or settings it refuses).
    """
    cls = type(optimizer)
    if not cls.__module__.startswith("torch.optim") or isinstance(optimizer, torch.optim.LBFGS):
        return None
    dummy = nn.Parameter(torch.zeros_like(param, memory_format=torch.contiguous_format))
    dummy.grad = torch.ones_like(dummy)
    try:
        accepted = inspect.signature(cls.__init__).parameters
        settings = {k: v for k, v in group.items() if k in accepted and k != "params"}
        probe = cls([dummy], **settings)
        probe.step()
    except Exception:
        return None
    return dict(probe.state[dummy])


def _check_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """The saved per-parameter state against the optimizer's parameters (after the conversion)."""
    groups = saved["param_groups"]
    index: dict[int, tuple[Tensor, dict[str, Any], int]] = {}
    for gi, (g, mine) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        if len(g["params"]) != len(mine["params"]):
            raise CheckpointError(
                f"the optimizer state does not fit: param group {gi} has {len(g['params'])} "
                f"parameters, the optimizer {len(mine['params'])}"
            )
        for i, p in zip(g["params"], mine["params"], strict=True):
            index[i] = (p, g, gi)
    probes: dict[tuple[Any, ...], Any] = {}
    for key, entry in saved["state"].items():
        if key not in index:
            raise CheckpointError(
                f"the optimizer state does not fit: it has state for parameter {key!r}, which no "
                "param group lists"
            )
        if not isinstance(entry, dict):
            raise CheckpointError(
                f"the optimizer state is malformed: the state of parameter {key} is {describe(entry)}"
            )
        param, group, gi = index[key]
        where = (gi, tuple(param.shape), param.dtype, param.device)
        if where not in probes:
            probes[where] = _probe_state(optimizer, group, param)
        probe = probes[where]
        shape = tuple(param.shape)
        if probe is not None and set(entry) != set(probe):
            raise CheckpointError(
                f"the optimizer state does not fit: parameter {key} (shape {shape}) has the state "
                f"{sorted(entry)}, a {type(optimizer).__name__} with these settings keeps "
                f"{sorted(probe)}"
            )
        for name, value in entry.items():
            _check_state_entry(key, name, value, param, probe)


def _check_state_entry(key: int, name: str, value: Any, param: Tensor, probe: Any) -> None:
    """One state entry of one parameter; ``probe``: what a fresh optimizer keeps (or ``None``)."""
    shape = tuple(param.shape)

    def refuse(problem: str) -> None:
        raise CheckpointError(
            f"the optimizer state does not fit: {name!r} of parameter {key} (shape {shape}) {problem}"
        )

    if probe is None:  # another kind of optimizer: only a parameter-sized tensor has a known shape
        if (
            isinstance(value, Tensor)
            and value.ndim > 0
            and value.numel() == param.numel()
            and tuple(value.shape) != shape
        ):
            refuse(f"has shape {tuple(value.shape)}")
        return
    want = probe[name]
    if want is None:  # e.g. SGD's momentum buffer before the first step
        if value is not None and not (isinstance(value, Tensor) and tuple(value.shape) == shape):
            refuse(f"must be None or a tensor of the parameter's shape, got {describe(value)}")
        return
    if not isinstance(want, Tensor):
        return
    if want.ndim == 0 and isinstance(value, int | float) and not isinstance(value, bool):
        return  # a step count saved as a number (older PyTorch)
    if not isinstance(value, Tensor):
        refuse(f"must be a tensor of shape {tuple(want.shape)}, got {describe(value)}")
    if value.shape != want.shape:
        refuse(f"has shape {tuple(value.shape)}, this optimizer keeps {tuple(want.shape)}")
    if (
        value.is_floating_point() != want.is_floating_point()
        or value.is_complex() != want.is_complex()
    ):
        refuse(f"has dtype {value.dtype}, this optimizer keeps {want.dtype}")


def _check_scheduler(blob: dict[str, Any], scheduler: Any) -> None:
    saved = blob["scheduler"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"the scheduler state must be a dict, got {describe(saved)}")
    saved_type = blob.get("scheduler_type")
    if saved_type is not None and saved_type != _type_name(scheduler):
        raise CheckpointError(
            f"the scheduler state does not fit: it was saved from a {saved_type}, the scheduler "
            f"given is a {_type_name(scheduler)}"
        )
    want = scheduler.state_dict()
    if isinstance(want, dict) and set(saved) != set(want):
        raise CheckpointError(
            f"the scheduler state does not fit this {type(scheduler).__name__}: it has the entries "
            f"{_few(saved)}, the scheduler {_few(want)}"
        )


def _walk_tensors(x: Any) -> Iterator[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _walk_tensors(v)
    elif isinstance(x, list | tuple):
        for v in x:
            yield from _walk_tensors(v)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    oialr: OIALR | None = None,
    scheduler: Any = None,
    map_location: Any = "cpu",
    verify: bool = True,
) -> dict[str, Any]:
    """Restore a run saved by :func:`save_checkpoint` into a freshly built model; returns ``extra``.

    Build the model, the optimizer (from ``model.parameters()``), the :class:`OIALR` controller (same
    config) and the scheduler exactly as for a new run, then call this. The file's digest is checked
    first (always for the current format; for a ``torch.save`` file of version 0.1.0, ``verify=False``
    skips that and also loads the format before it, which had none), then every part is checked
    against its target: the controller's layers and ranks, the model's keys and shapes (after the
    controller rebuilt the low-rank layers), the optimizer's type, param groups and per-parameter state
    (shapes, and for ``torch.optim`` optimizers the state entries they keep), the scheduler's type and
    entries. Only then are values written. A file that cannot be read or does not
    fit raises :class:`CheckpointError` naming the part that does not fit, and the model, optimizer,
    controller and scheduler are left exactly as they were.

    The saved tensors are read onto ``map_location`` (a device name, a ``torch.device``, or ``None``
    for the CPU; for a ``torch.save`` file anything ``torch.load`` takes) in their saved dtypes; loading
    them into the model and the optimizer places them where those objects' tensors are.
    """
    if not isinstance(model, nn.Module):
        raise lc.ParameterTypeError(f"`model` must be an nn.Module, got {describe(model)}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise lc.ParameterTypeError(
            f"`optimizer` must be a torch.optim.Optimizer or None, got {describe(optimizer)}"
        )
    if oialr is not None and not isinstance(oialr, OIALR):
        raise lc.ParameterTypeError(
            f"`oialr` must be an OIALR controller or None, got {describe(oialr)}"
        )
    verify = check_bool("verify", verify)
    blob = _read(_as_path(path), map_location, verify)
    for part, given in (("optimizer", optimizer), ("oialr", oialr), ("scheduler", scheduler)):
        if given is not None and part not in blob:
            raise CheckpointError(
                f"{path} holds no {part} state, but a {part} was given to restore"
            )
    if "oialr" in blob and oialr is None:
        raise CheckpointError(
            f"{path} was saved from an OIALR run: pass the controller (oialr=...) to rebuild its layers"
        )
    inner = getattr(model, "module", model)
    if oialr is not None and oialr.model is not inner:
        raise CheckpointError("`oialr` drives another model than the `model` given")
    if oialr is not None and optimizer is not None and oialr.optimizer is not optimizer:
        raise CheckpointError("`oialr` drives another optimizer than the `optimizer` given")

    # 1. everything that can be checked on the targets as they are
    try:
        if oialr is not None:
            oialr.check_state(blob["oialr"])
        if optimizer is not None:
            _check_optimizer_meta(blob, optimizer)
        if scheduler is not None:
            _check_scheduler(blob, scheduler)
    except CheckpointError as exc:
        raise CheckpointError(f"{path} does not fit: {exc}") from exc

    # 2. rebuild the structure, check what depends on it, then write (undone on any failure)
    undo = Undo(inner, optimizer, oialr, scheduler)
    try:
        if oialr is not None:
            oialr.load_state_dict(blob["oialr"])
        _check_model_state(blob["model"], inner)
        if optimizer is not None:
            _check_optimizer_state(blob["optimizer"], optimizer)
            optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(blob["scheduler"])
        inner.load_state_dict(blob["model"])  # last: it writes in place, and was checked above
    except BaseException as exc:
        undo.restore()
        if isinstance(exc, CheckpointError):
            raise CheckpointError(f"{path} does not fit: {exc}") from exc
        if isinstance(exc, ValueError | KeyError | TypeError | RuntimeError):
            raise CheckpointError(f"{path} does not fit: {exc}") from exc
        raise
    extra: dict[str, Any] = blob.get("extra") or {}
    return extra
