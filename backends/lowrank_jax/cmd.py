"""Online CMD for JAX: a parameter pytree's trajectory, CMD weights swapped in for evaluation.

:class:`CMDTracker` flattens the pytree (``jax.flatten_util.ravel_pytree``) once per epoch. During the
warm-up it keeps the flattened snapshots; at the end of the warm-up it fits the modes with
:meth:`lowrank_core.OnlineCMD.from_trajectory` (outside ``jit``: clustering chooses shapes), and from then
on every epoch is one :meth:`lowrank_core.OnlineCMD.update` (jitted, ``check_finite=False``).
:meth:`CMDTracker.evaluation_params` gives the pytree of CMD weights ``a r(t) + b`` to evaluate with (the
trained parameters are untouched: in JAX "swapping in" is passing this tree instead).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lowrank_core as lc

from .dldr import flatten

__all__ = ["CMDTracker"]

_STATE_KEYS = ("assignment", "profiles", "r_mean", "r_m2", "w_mean", "c_wr")
#: arrays of a saved state, the centroid profiles' (``profile='centroid'``) included
_ARRAY_KEYS = (*_STATE_KEYS, "mix", "mix_offset")


class CMDTracker:
    """Online CMD over a parameter pytree (see the module docstring).

    ``warmup_epochs`` (>= 2) epochs are recorded before the fit; ``max_modes`` (2, as
    :class:`lowrank_torch.cmd.CMDConfig`) / ``tol`` /
    ``num_samples`` / ``seed`` / ``metric`` go to :func:`lowrank_core.fit_cmd`.
    """

    def __init__(
        self, params: Any, warmup_epochs: int = 20, max_modes: int | None = 2, **fit_options: Any
    ) -> None:
        if isinstance(warmup_epochs, bool) or int(warmup_epochs) < 2:
            raise lc.ParameterError(f"`warmup_epochs` must be an int >= 2, got {warmup_epochs!r}")
        flat, self.unflatten = flatten(params)
        self._treedef = jax.tree_util.tree_structure(params)
        self.dim = int(flat.shape[0])
        self.warmup_epochs = int(warmup_epochs)
        self.max_modes = max_modes
        self.fit_options = dict(fit_options)
        self.cmd: lc.OnlineCMD | None = None
        self._warmup: list[jax.Array] = []
        self._update: Any = None

    @property
    def fitted(self) -> bool:
        return self.cmd is not None

    @property
    def epochs(self) -> int:
        return self.cmd.epochs if self.cmd is not None else len(self._warmup)

    def _flat(self, params: Any) -> jax.Array:
        if jax.tree_util.tree_structure(params) != self._treedef:  # type: ignore[operator]
            raise lc.ShapeError(
                "`params` does not have the structure of the tree this tracker follows"
            )
        flat, _ = flatten(params)
        return flat

    def after_epoch(self, params: Any) -> None:
        """Feed this epoch's parameters (record during the warm-up, fit at its end, update after)."""
        flat = self._flat(params)
        if self.cmd is None:
            self._warmup.append(flat)
            if len(self._warmup) >= self.warmup_epochs:
                trajectory = jnp.stack(self._warmup, axis=1)
                self.cmd = lc.OnlineCMD.from_trajectory(
                    trajectory, self.max_modes, **self.fit_options
                )
                self._warmup = []
            return
        rows = self.cmd.mix_rows  # profile='centroid' only, else None
        if self._update is None:  # the references are static (host metadata): closed over
            refs, unit = self.cmd.references, self.cmd.unit
            self._update = jax.jit(lambda st, w: self._update_state(st, refs, unit, rows, w))
        keys = _STATE_KEYS if rows is None else (*_STATE_KEYS, "mix", "mix_offset")
        state = {k: getattr(self.cmd, k) for k in keys}
        new = self._update(state, flat)
        self.cmd = lc.OnlineCMD(
            references=self.cmd.references, unit=self.cmd.unit, mix_rows=rows, **new
        )

    @staticmethod
    def _update_state(
        state: dict[str, jax.Array],
        references: np.ndarray,
        unit: float,
        mix_rows: np.ndarray | None,
        flat: jax.Array,
    ) -> dict[str, jax.Array]:
        cmd = lc.OnlineCMD(
            references=references, unit=unit, mix_rows=mix_rows, **state, check_finite=False
        )
        cmd.update(flat, check_finite=False)
        return {k: getattr(cmd, k) for k in state}

    def evaluation_params(self, params: Any) -> Any:
        """The CMD weights as a pytree (``params`` itself before the fit)."""
        if self.cmd is None:
            return params
        self._flat(params)
        return self.unflatten(self.cmd.weights().astype(self._flat(params).dtype))

    def state_dict(self) -> dict[str, Any]:
        """NumPy arrays and host metadata (for :mod:`lowrank_jax.checkpoint`)."""
        out: dict[str, Any] = {
            "format": "lowrank_jax.CMDTracker/1",
            "dim": self.dim,
            "warmup_epochs": self.warmup_epochs,
            "warmup": [np.asarray(w) for w in self._warmup],
        }
        if self.cmd is not None:
            out["cmd"] = {
                k: v if k == "unit" else np.asarray(v) for k, v in self.cmd.state_dict().items()
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Everything is checked first: :class:`lowrank_core.CheckpointError`
        names what does not fit (other parameters, another warm-up length, a damaged CMD state) and the
        tracker is left as it was."""
        self.apply_state(self.check_state(state))

    def check_state(self, state: Any) -> dict[str, Any]:
        """The tracker's new fields from ``state`` (a :meth:`state_dict`), validated; changes nothing
        (:class:`lowrank_core.CheckpointError` names what does not fit). Apply with :meth:`apply_state`."""
        err = lc.CheckpointError
        if not isinstance(state, dict) or state.get("format") != "lowrank_jax.CMDTracker/1":
            raise err("not a lowrank_jax CMDTracker state (missing or unknown 'format' entry)")
        missing = [k for k in ("dim", "warmup_epochs", "warmup") if k not in state]
        if missing:
            raise err(f"the CMD state lacks the entries {missing}")
        try:
            dim, warmup_epochs = int(state["dim"]), int(state["warmup_epochs"])
            warmup = [np.asarray(w) for w in state["warmup"]]
        except (TypeError, ValueError) as exc:
            raise err(f"the CMD state is invalid: {exc}") from None
        if dim != self.dim:
            raise err(f"the CMD state follows {dim} scalars, these parameters have {self.dim}")
        if warmup_epochs != self.warmup_epochs:
            raise err(
                f"the CMD state was made with warmup_epochs={warmup_epochs}, "
                f"this tracker has {self.warmup_epochs}"
            )
        if len(warmup) >= warmup_epochs or any(w.shape != (dim,) for w in warmup):
            raise err(
                f"the CMD state's warm-up snapshots must be fewer than {warmup_epochs} vectors of "
                f"shape ({dim},)"
            )
        cmd: lc.OnlineCMD | None = None
        if "cmd" in state:
            if warmup:
                raise err("the CMD state holds both warm-up snapshots and a fitted model")
            saved = state["cmd"]
            if not isinstance(saved, dict):
                raise err("the CMD state's 'cmd' entry must be a dict")
            try:
                cmd = lc.OnlineCMD.from_state_dict(
                    {
                        **{k: jnp.asarray(saved[k]) for k in _ARRAY_KEYS if k in saved},
                        **{k: saved[k] for k in saved if k not in _ARRAY_KEYS},
                    }
                )
            except lc.LowRankError as exc:
                raise err(f"the saved CMD model is invalid: {exc}") from None
            if int(cmd.assignment.shape[0]) != dim:
                raise err(
                    f"the saved CMD model follows {int(cmd.assignment.shape[0])} scalars, these "
                    f"parameters have {dim}"
                )
        return {"warmup": [jnp.asarray(w) for w in warmup], "cmd": cmd}

    def apply_state(self, fields: dict[str, Any]) -> None:
        """Take the fields :meth:`check_state` returned (cannot fail)."""
        self._warmup = fields["warmup"]
        self.cmd = fields["cmd"]
        self._update = None
