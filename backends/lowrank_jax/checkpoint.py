"""Checkpoints of a JAX training run with OIALR, DLDR or CMD: one ``.npz`` file, checked, all or nothing.

:func:`save_checkpoint` writes the parameter pytree (for OIALR: the trainable tree, a switched kernel
being its ``Sigma``), the optax state, and the state of an :class:`~lowrank_jax.oialr.OIALR` controller,
a :class:`~lowrank_jax.cmd.CMDTracker`, a DLDR :class:`~lowrank_core.Subspace` and a
:class:`~lowrank_jax.dldr.SubspaceBFGS` state, plus an ``extra`` dict (epoch, metrics). The file is the
core's container (:mod:`lowrank_core.checkpoint`, this module is the tree glue): a NumPy ``.npz``
archive (no pickle: loading runs no code) holding every array and a JSON manifest of the rest; it is
written atomically (a temporary file, then a rename: a crash while saving never destroys the previous
checkpoint) and carries a SHA-256 digest of the manifest and of every array's dtype, shape and bytes,
verified at load, so a file changed on disk is refused instead of loading wrong values (the digest
guards against corruption, not against a deliberate forgery).

:func:`load_checkpoint` takes the *fresh* objects of the new run: the parameters as built by the model's
``init`` (the structure and the dense shapes), the optax transformation (``tx``, whose ``init`` gives the
optimizer state's structure), a fresh OIALR controller / CMD tracker, and ``loss_fn`` to rebuild a
:class:`~lowrank_jax.dldr.SubspaceBFGS`. Everything in the file is checked against them first (tree
structure, every leaf's shape and dtype, the OIALR ranks and bases, the optimizer state's structure and
shapes, the CMD state, the subspace's size); any mismatch raises :class:`lowrank_core.CheckpointError`
naming it, and nothing has changed. Only then are the controllers restored and the arrays returned,
each leaf placed like the corresponding leaf of the fresh tree (``jax.device_put`` with its sharding).

A resumed run continues exactly where the saved one stopped: the same parameters, optimizer state, OIALR
schedule (steps, ranks, bases, pending warm-up polar factors), CMD statistics and BFGS state, bit for bit.

Example (OIALR with optax)::

    from lowrank_jax.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint("run.npz", params=trainable, opt_state=opt_state, oialr=ctrl, extra={"epoch": 3})
    ...
    ctrl = OIALR(params, config)                  # fresh, nothing switched
    tx = ctrl.optimizer(optax.adamw(1e-3))        # the run's optimizer, built the same way
    ckpt = load_checkpoint("run.npz", params=params, tx=tx, oialr=ctrl)
    trainable, opt_state = ckpt.params, ckpt.opt_state    # ctrl.frozen holds the bases again
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lowrank_core as lc
from lowrank_core import CheckpointError
from lowrank_core import checkpoint as container
from lowrank_core._validate import describe

from .cmd import CMDTracker
from .dldr import BFGSState, SubspaceBFGS, flatten
from .oialr import OIALR

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = "lowrank_jax.checkpoint/1"
DIGEST = "sha256"
_MANIFEST = "__manifest__"
_DIGEST = "__digest__"
_BFGS_OPTIONS = ("alpha0", "shrink", "c1", "max_trials", "curvature_eps")


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns (the controllers passed to it are restored in place).

    ``params``: the saved parameter pytree (for OIALR the trainable tree); ``opt_state``: the optax
    state (``None`` when the file has none or no ``tx`` was given); ``subspace`` / ``bfgs_state``: the
    DLDR subspace and P-BFGS state (``None`` when not saved); ``bfgs``: a :class:`SubspaceBFGS` rebuilt
    with the saved origin and settings (when the file has one and ``loss_fn`` was given); ``extra``:
    the saved ``extra`` dict.
    """

    params: Any
    opt_state: Any = None
    subspace: lc.Subspace | None = None
    bfgs_state: BFGSState | None = None
    bfgs: SubspaceBFGS | None = None
    extra: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------------
# tree glue over the core container (lowrank_core.checkpoint: the manifest, the digest, the file)
# --------------------------------------------------------------------------------------------------
def _to_host(x: Any) -> Any:
    """JAX arrays as NumPy arrays for the container (everything else as it is)."""
    if isinstance(x, jax.Array):
        return np.asarray(jax.device_get(x))
    return x


def _tree(tree: Any) -> dict[str, Any]:
    """A pytree as its structure, leaf paths and leaves (checked against a fresh tree at load)."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, leaf in leaves_with_paths:
        where = jax.tree_util.keystr(path)
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float | bool):
            raise lc.ParameterTypeError(
                f"the pytree leaf {where} is {describe(leaf)}; a checkpoint keeps array leaves"
            )
        leaves.append(np.asarray(jax.device_get(leaf)))
    return {
        "treedef": str(treedef),
        "paths": [jax.tree_util.keystr(p) for p, _ in leaves_with_paths],
        "leaves": leaves,
    }


def _array(x: Any, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise CheckpointError(f"the checkpoint's {what} must be an array, got {describe(x)}")
    return x


def _check_controllers(oialr: object, cmd: object) -> None:
    if oialr is not None and not isinstance(oialr, OIALR):
        raise lc.ParameterTypeError(
            f"`oialr` must be a lowrank_jax OIALR controller or None, got {describe(oialr)}"
        )
    if cmd is not None and not isinstance(cmd, CMDTracker):
        raise lc.ParameterTypeError(
            f"`cmd` must be a lowrank_jax CMDTracker or None, got {describe(cmd)}"
        )


def _as_path(path: object) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise lc.ParameterTypeError(f"`path` must be a str or os.PathLike, got {describe(path)}")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    params: Any,
    opt_state: Any = None,
    oialr: OIALR | None = None,
    cmd: CMDTracker | None = None,
    subspace: lc.Subspace | None = None,
    bfgs: SubspaceBFGS | None = None,
    bfgs_state: BFGSState | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the run's state to ``path`` (a ``.npz`` file) atomically, with its digest; returns the path.

    ``params``: the parameter pytree the run trains (with OIALR, the trainable tree); ``opt_state``: the
    optax state; ``oialr`` / ``cmd``: the controllers; ``subspace``: a DLDR subspace (for P-SGD; taken
    from ``bfgs`` when that is given); ``bfgs`` and ``bfgs_state``: a P-BFGS solver (its subspace, origin
    and settings are kept; the loss function is code and is passed again at load) and its state;
    ``extra``: numbers, strings, arrays, lists and dicts to keep beside (epoch, metrics).
    """
    target = _as_path(path)
    if target.is_dir():
        raise lc.ParameterError(f"`path` {str(target)!r} is a directory; give a file name")
    _check_controllers(oialr, cmd)
    if bfgs is not None and not isinstance(bfgs, SubspaceBFGS):
        raise lc.ParameterTypeError(f"`bfgs` must be a SubspaceBFGS or None, got {describe(bfgs)}")
    if (bfgs is None) != (bfgs_state is None):
        raise lc.ParameterError("`bfgs` and `bfgs_state` go together: give both or neither")
    if bfgs_state is not None and not isinstance(bfgs_state, BFGSState):
        raise lc.ParameterTypeError(
            f"`bfgs_state` must be a lowrank_jax BFGSState, got {describe(bfgs_state)}"
        )
    if bfgs is not None:
        if subspace is not None and subspace is not bfgs.subspace:
            raise lc.ParameterError("`subspace` differs from the subspace of `bfgs`; give one")
        subspace = bfgs.subspace
    if subspace is not None and not isinstance(subspace, lc.Subspace):
        raise lc.ParameterTypeError(
            f"`subspace` must be a lowrank_core Subspace or None, got {describe(subspace)}"
        )
    if extra is not None and not isinstance(extra, dict):
        raise lc.ParameterTypeError(f"`extra` must be a dict or None, got {describe(extra)}")
    if oialr is not None:
        oialr.check_tree(params)

    content: dict[str, Any] = {"params": _tree(params)}
    if opt_state is not None:
        content["opt_state"] = _tree(opt_state)
    if oialr is not None:
        content["oialr"] = oialr.state_dict()
    if cmd is not None:
        content["cmd"] = cmd.state_dict()
    if subspace is not None:
        content["subspace"] = subspace.state_dict()
    if bfgs is not None and bfgs_state is not None:
        content["bfgs"] = {
            "origin": bfgs.origin,
            "options": {k: getattr(bfgs, k) for k in _BFGS_OPTIONS},
            "state": bfgs_state.state_dict(),
        }
    if extra is not None:
        content["extra"] = extra
    return container.save(target, content, format=FORMAT, convert=_to_host)


# --------------------------------------------------------------------------------------------------
# reading and checking (nothing here changes the target objects)
# --------------------------------------------------------------------------------------------------
def _restore_tree(saved: Any, template: Any, what: str) -> tuple[Any, list[np.ndarray]]:
    """The saved leaves checked against ``template`` (structure, shapes, dtypes); nothing is placed yet."""
    if not isinstance(saved, dict) or not {"treedef", "paths", "leaves"} <= set(saved):
        raise CheckpointError(f"the checkpoint's {what} entry is damaged")
    t_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    if saved["treedef"] != str(treedef):
        s_paths, t_paths = list(saved["paths"]), [jax.tree_util.keystr(p) for p, _ in t_leaves]
        only_saved = sorted(set(s_paths) - set(t_paths))[:5]
        only_here = sorted(set(t_paths) - set(s_paths))[:5]
        hint = (
            f" (only in the checkpoint: {only_saved}; only here: {only_here})"
            if only_saved or only_here
            else " (the same leaves in another structure: another optimizer or container?)"
        )
        raise CheckpointError(f"the checkpoint's {what} has another tree structure{hint}")
    leaves = [_array(leaf, what) for leaf in saved["leaves"]]
    if len(leaves) != len(t_leaves):
        raise CheckpointError(f"the checkpoint's {what} entry is damaged (wrong number of leaves)")
    for (path, want), got in zip(t_leaves, leaves, strict=True):
        where = jax.tree_util.keystr(path)
        want_shape, want_dtype = tuple(np.shape(want)), jnp.result_type(want)
        if tuple(got.shape) != want_shape:
            raise CheckpointError(
                f"the checkpoint's {what} does not fit: {where} has shape {tuple(got.shape)} in the "
                f"checkpoint, {want_shape} here"
            )
        if got.dtype != want_dtype:
            raise CheckpointError(
                f"the checkpoint's {what} does not fit: {where} is {got.dtype} in the checkpoint, "
                f"{want_dtype} here"
            )
    return treedef, leaves


def _place(treedef: Any, leaves: list[np.ndarray], template: Any) -> Any:
    placed = []
    for leaf, like in zip(leaves, jax.tree_util.tree_leaves(template), strict=True):
        sharding = getattr(like, "sharding", None)
        placed.append(jax.device_put(leaf, sharding) if sharding is not None else jnp.asarray(leaf))
    return jax.tree_util.tree_unflatten(treedef, placed)


def _subspace(saved: Any, dim: int) -> lc.Subspace:
    if not isinstance(saved, dict):
        raise CheckpointError(f"the checkpoint's subspace entry is damaged: {describe(saved)}")
    sub = lc.Subspace.from_state_dict(saved, dim=dim)
    return lc.Subspace(
        centre=jnp.asarray(sub.centre),
        basis=jnp.asarray(sub.basis),
        explained_variance=jnp.asarray(sub.explained_variance),
        total_variance=sub.total_variance,
        num_snapshots=sub.num_snapshots,
    )


def _bfgs_state(saved: Any, d: int, dtype: Any) -> BFGSState:
    if not isinstance(saved, dict):
        raise CheckpointError("the checkpoint's P-BFGS state is damaged")
    state = BFGSState.from_state_dict(saved.get("state", {}), d=d, dtype=dtype)
    return BFGSState(*(jnp.asarray(v) for v in state))


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    params: Any,
    tx: Any = None,
    oialr: OIALR | None = None,
    cmd: CMDTracker | None = None,
    loss_fn: Any = None,
) -> LoadedCheckpoint:
    """Read a :func:`save_checkpoint` file into a fresh run; all or nothing (see the module docstring).

    ``params``: the fresh parameter pytree (its structure, dense shapes, dtypes and devices);
    ``tx``: the optax ``GradientTransformation`` the run uses (``tx.init`` of the restored trainable tree
    gives the structure the saved optimizer state must have; without ``tx`` the optimizer state is not
    read); ``oialr`` / ``cmd``: fresh controllers for the same parameters and settings (required when the
    file holds their state, and restored in place); ``loss_fn``: to rebuild the saved
    :class:`SubspaceBFGS` (``loss_fn(params, *batch)``).

    Raises :class:`lowrank_core.CheckpointError` (nothing changed) when the file is missing, corrupt or
    does not fit.
    """
    source = _as_path(path)
    _check_controllers(oialr, cmd)
    if tx is not None and not callable(getattr(tx, "init", None)):
        raise lc.ParameterTypeError(
            f"`tx` must be an optax GradientTransformation or None, got {describe(tx)}"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise lc.ParameterTypeError(f"`loss_fn` must be callable or None, got {describe(loss_fn)}")
    _, manifest = container.load(source, formats=(FORMAT,))

    for key, given, what in (("oialr", oialr, "OIALR"), ("cmd", cmd, "CMD tracker")):
        if key in manifest and given is None:
            raise CheckpointError(
                f"{source} holds an {what} state: pass a fresh `{key}=` controller to restore it"
            )
        if key not in manifest and given is not None:
            raise CheckpointError(f"{source} holds no {what} state, but `{key}=` was given")

    # 1. the controllers' states, checked (nothing applied)
    oialr_fields = None
    template = params
    if oialr is not None:
        state = manifest["oialr"]
        oialr.check_tree(params)
        oialr_fields = oialr.check_state(state)
        ranks = {n: b.rank for n, b in oialr_fields["frozen"].items()}
        template = oialr.state_template(params, ranks)
    cmd_fields = None
    if cmd is not None:
        cmd_fields = cmd.check_state(manifest["cmd"])

    # 2. the parameters and the optimizer state against their templates
    treedef, leaves = _restore_tree(manifest["params"], template, "parameter tree")
    opt_template = opt_def = opt_leaves = None
    if tx is not None:
        if "opt_state" not in manifest:
            raise CheckpointError(f"{source} holds no optimizer state, but `tx=` was given")
        opt_template = tx.init(template)
        opt_def, opt_leaves = _restore_tree(manifest["opt_state"], opt_template, "optimizer state")

    # 3. DLDR
    subspace = bfgs_state = None
    bfgs_entry = manifest.get("bfgs")
    if "subspace" in manifest:
        subspace = _subspace(manifest["subspace"], int(flatten(params)[0].shape[0]))
    if bfgs_entry is not None:
        if subspace is None:
            raise CheckpointError(f"{source} holds a P-BFGS state without its subspace")
        bfgs_state = _bfgs_state(bfgs_entry, subspace.d, subspace.basis.dtype)
        origin = _array(bfgs_entry.get("origin"), "P-BFGS origin")
        if origin.shape != (subspace.dim,):
            raise CheckpointError(
                f"the checkpoint's P-BFGS origin has shape {origin.shape}, expected ({subspace.dim},)"
            )
        options = bfgs_entry.get("options")
        if not isinstance(options, dict) or set(options) != set(_BFGS_OPTIONS):
            raise CheckpointError("the checkpoint's P-BFGS settings are damaged")
    extra = manifest.get("extra")

    # 4. everything fits: apply and place
    bfgs = None
    if bfgs_entry is not None and loss_fn is not None and subspace is not None:
        bfgs = SubspaceBFGS(
            loss_fn, subspace, params, origin=jnp.asarray(origin), **bfgs_entry["options"]
        )
    if oialr is not None and oialr_fields is not None:
        oialr.apply_state(oialr_fields)
    if cmd is not None and cmd_fields is not None:
        cmd.apply_state(cmd_fields)
    opt_state = None
    if opt_def is not None and opt_leaves is not None:
        opt_state = _place(opt_def, opt_leaves, opt_template)
    return LoadedCheckpoint(
        params=_place(treedef, leaves, template),
        opt_state=opt_state,
        subspace=subspace,
        bfgs_state=bfgs_state,
        bfgs=bfgs,
        extra=extra,
    )
