"""Checkpoints of a (partly) low-rank training run, loadable into a freshly built dense model.

A checkpoint holds the model's, the optimizer's, the OIALR controller's and (optionally) an LR
scheduler's state. Because the controller's state says which layers were switched and at which ranks,
:func:`load_checkpoint` can rebuild that structure on a model built the usual (dense) way, then load the
weights and the optimizer state into it: a resumed run continues exactly where the saved one stopped.

Files are written atomically (to a temporary file, then renamed), so a crash while saving never
destroys the previous checkpoint. Each file carries a SHA-256 digest of its content (every tensor's
dtype, shape and bytes, and every other entry), checked when it is loaded: a file changed on disk (a
flipped bit, a partial overwrite) is refused instead of loading silently wrong values. The digest guards
against corruption, not against a deliberate forgery (anyone can compute it). Loading uses
``torch.load(weights_only=True)``.

Loading is all or nothing: everything is checked against the target model, optimizer, controller and
scheduler (names, shapes, ranks, optimizer type and per-parameter state) before any value is written;
when something does not fit, :class:`CheckpointError` names it and every object is left exactly as it
was (layers not converted, optimizer groups not swapped).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lowrank_core as lc
from lowrank_core._validate import check_bool, describe

from .oialr import OIALR, CheckpointError
from .undo import Undo

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "lowrank_torch.checkpoint/2"
#: the previous format: the same entries, no digest (loadable with ``verify=False``)
FORMAT_V1 = "lowrank_torch.checkpoint/1"
DIGEST = "sha256"


# --------------------------------------------------------------------------------------------------
# the digest
# --------------------------------------------------------------------------------------------------
def _sort_key(key: object) -> tuple[str, str]:
    return type(key).__name__, repr(key)


def _feed(h: Any, x: object) -> None:
    """Feed a canonical encoding of ``x`` (tensors, containers, scalars) into the hash ``h``."""
    if isinstance(x, Tensor):
        t = x.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(x, dict):
        h.update(f"D{len(x)};".encode())
        for key in sorted(x, key=_sort_key):
            _feed(h, key)
            _feed(h, x[key])
    elif isinstance(x, list | tuple):
        h.update(f"L{len(x)};".encode())
        for value in x:
            _feed(h, value)
    else:
        text = f"{type(x).__name__}:{x!r};"
        h.update(f"S{len(text)};{text}".encode())


def _digest(payload: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def _seal(payload: dict[str, Any]) -> dict[str, Any]:
    """The blob written to disk: the payload, its format tag and the digest of both."""
    blob: dict[str, Any] = {"format": FORMAT, **payload}
    blob["digest"] = {"algorithm": DIGEST, "value": _digest(blob)}
    return blob


def _as_path(path: object) -> Path:
    if isinstance(path, str | os.PathLike) and not isinstance(path, bytes):
        return Path(path)
    raise lc.ParameterTypeError(f"`path` must be a str or os.PathLike, got {describe(path)}")


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


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

    ``extra`` holds anything else to keep (epoch, metrics); it must be made of tensors, numbers,
    strings, lists and dicts (what ``torch.load(weights_only=True)`` accepts).
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
    payload: dict[str, Any] = {"model": inner.state_dict()}
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
    blob = _seal(payload)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(blob, fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# --------------------------------------------------------------------------------------------------
# reading and checking (nothing here changes the target objects)
# --------------------------------------------------------------------------------------------------
def _read(path: Path, map_location: Any, verify: bool) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): {exc}"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") not in (FORMAT, FORMAT_V1):
        raise CheckpointError(
            f"{path} is not a lowrank_torch checkpoint (format {FORMAT!r} expected)"
        )
    if verify:
        if blob["format"] == FORMAT_V1:
            raise CheckpointError(
                f"{path} was written by an older version without a digest, so its integrity cannot "
                "be checked; pass verify=False to load it unchecked"
            )
        saved = blob.get("digest")
        if (
            not isinstance(saved, dict)
            or saved.get("algorithm") != DIGEST
            or not isinstance(saved.get("value"), str)
        ):
            raise CheckpointError(f"{path} has no valid digest entry (corrupt?)")
        actual = _digest({k: v for k, v in blob.items() if k != "digest"})
        if actual != saved["value"]:
            raise CheckpointError(
                f"{path} is corrupt: its content does not match the digest written with it "
                f"({DIGEST} {actual[:16]}... != {saved['value'][:16]}...); the file was changed "
                "after it was saved"
            )
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
    (``verify=False`` skips that, and also loads files of the previous format, which had none), then
    every part is checked against its target: the controller's layers and ranks, the model's keys and
    shapes (after the controller rebuilt the low-rank layers), the optimizer's type, param groups and
    per-parameter state (shapes, and for ``torch.optim`` optimizers the state entries they keep), the
    scheduler's type and entries. Only then are values written. A file that cannot be read or does not
    fit raises :class:`CheckpointError` naming the part that does not fit, and the model, optimizer,
    controller and scheduler are left exactly as they were.
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
