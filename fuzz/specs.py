"""What the sweep calls: one spec per public callable, with its valid call and argument kinds.

Each spec's owner is the module it covers (the findings file groups by it): ``lowrank_core`` (the
linear algebra, factors, rank rules, stability, weights, init and backend modules),
``lowrank_core.cmd``, ``lowrank_core.dldr`` and ``lowrank_torch``.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from fuzz.framework import Arg, Case, Junk, Spec, expand, host, to_lib

# --------------------------------------------------------------------------------------------------
# valid data (fixed seeds)
# --------------------------------------------------------------------------------------------------
_rng = np.random.default_rng(20261201)
M = _rng.standard_normal((6, 5))
_u, _s, _vh = np.linalg.svd(M, full_matrices=False)
U, S, V = _u, np.diag(_s), np.ascontiguousarray(_vh.T)
SPEC = np.array([4.0, 3.0, 2.0, 1.0, 0.5])
B1 = np.linalg.qr(_rng.standard_normal((6, 3)))[0]
B2 = np.linalg.qr(_rng.standard_normal((6, 2)))[0]
W3 = _rng.standard_normal((6, 2, 3))
LEFT, RIGHT = _rng.standard_normal((6, 2)), _rng.standard_normal((5, 2))
# a CMD-like trajectory: t = 8 epochs, D = 24 parameters following 3 profiles
_prof = np.cumsum(_rng.standard_normal((3, 8)), axis=1)
TRAJ = (
    _prof[_rng.integers(0, 3, 24)] * _rng.uniform(0.5, 2, (24, 1)) + _rng.standard_normal((24, 1))
).T
TRAJ = np.ascontiguousarray((TRAJ + 0.01 * _rng.standard_normal(TRAJ.shape)).T)  # (N=24, T=8)
SNAP = np.cumsum(_rng.standard_normal((8, 30)), axis=0)  # DLDR snapshots (t, D)

CORE = "lowrank_core"
CMD = "lowrank_core.cmd"
DLDR = "lowrank_core.dldr"
TORCH = "lowrank_torch"

FLAG = {"kind": "bool"}


def arr(name: str, value: np.ndarray, **opts: Any) -> Arg:
    return Arg(name, "array", value, keyword=opts.pop("keyword", False), opts=opts)


def kw(name: str, kind: str, value: Any, **opts: Any) -> Arg:
    return Arg(name, kind, value, keyword=True, opts=opts)


def pos(name: str, kind: str, value: Any, **opts: Any) -> Arg:
    return Arg(name, kind, value, keyword=False, opts=opts)


def check_finite() -> Arg:
    return kw("check_finite", "bool", True)


def fn(path: str) -> Callable[[str], Callable[..., Any]]:
    """``target`` resolving a dotted name at call time."""

    def target(lib: str) -> Callable[..., Any]:
        import importlib

        mod, _, attr = path.rpartition(".")
        obj: Any = importlib.import_module(mod)
        for part in attr.split("/"):
            obj = getattr(obj, part)
        return obj  # type: ignore[no-any-return]

    return target


def method(build: Callable[[str], Any], name: str) -> Callable[[str], Callable[..., Any]]:
    def target(lib: str) -> Callable[..., Any]:
        return getattr(build(lib), name)  # type: ignore[no-any-return]

    target.bound_object = True  # type: ignore[attr-defined]
    return target


# --------------------------------------------------------------------------------------------------
# lowrank_core: linear algebra, factors, rank rules, stability, weights, init, backends
# --------------------------------------------------------------------------------------------------
def core_specs() -> list[Spec]:
    mat = functools.partial(arr, ndims=(2, 3, 4))
    specs = [
        Spec("svd", CORE, fn("lowrank_core.svd"), [mat("a", M), check_finite()]),
        Spec("qr", CORE, fn("lowrank_core.qr"), [mat("a", M), check_finite()]),
        Spec(
            "orthogonal_factor",
            CORE,
            fn("lowrank_core.orthogonal_factor"),
            [mat("a", M), check_finite()],
        ),
        Spec(
            "polar",
            CORE,
            fn("lowrank_core.polar"),
            [
                mat("a", M),
                kw("side", "choice", "right", valid_alt=[("left", "left")]),
                check_finite(),
            ],
        ),
        Spec(
            "factorize",
            CORE,
            fn("lowrank_core.factorize"),
            [
                mat("a", M),
                pos(
                    "rank",
                    "rank",
                    3,
                    upper=5,
                    optional=True,
                    valid_alt=[("np.int64", np.int64(3)), ("None", None)],
                ),
                check_finite(),
            ],
        ),
        Spec(
            "reconstruct",
            CORE,
            fn("lowrank_core.reconstruct"),
            [mat("U", U), mat("Sigma", S), mat("V", V), check_finite()],
        ),
        Spec(
            "rediagonalize",
            CORE,
            fn("lowrank_core.rediagonalize"),
            [mat("U", U), mat("Sigma", S), mat("V", V), check_finite()],
        ),
        Spec(
            "rotate_sigma",
            CORE,
            fn("lowrank_core.rotate_sigma"),
            [mat("x", S), mat("left", np.eye(5)), mat("right", np.eye(5)), check_finite()],
        ),
        Spec(
            "truncate",
            CORE,
            fn("lowrank_core.truncate"),
            [
                mat("U", U),
                mat("Sigma", S),
                mat("V", V),
                pos("rank", "rank", 2, upper=5, valid_alt=[("np.int64", np.int64(2))]),
                check_finite(),
            ],
        ),
        Spec(
            "update_rank",
            CORE,
            fn("lowrank_core.update_rank"),
            [
                mat("U", U),
                mat("Sigma", S),
                mat("V", V),
                pos("rule", "callable", __import__("lowrank_core").Energy(0.9)),
                kw(
                    "shape",
                    "shape2",
                    (6, 5),
                    valid_alt=[("list", [6, 5]), ("np.int64", (np.int64(6), 5))],
                ),
                check_finite(),
            ],
            extra=[
                (f"rule-returns-{label}", functools.partial(_update_rank_returning, value))
                for label, value in [
                    ("None", None),
                    ("str", "2"),
                    ("nan", math.nan),
                    ("2.5", 2.5),
                    ("bool", True),
                    ("0", 0),
                    ("99", 99),
                ]
            ],
        ),
        Spec(
            "effective_rank",
            CORE,
            fn("lowrank_core.effective_rank"),
            [
                arr(
                    "s",
                    SPEC,
                    ndims=(1, 2, 3),
                    stack=False,
                    nan_index=1,
                    extra_bad=[("negative", -SPEC)],
                )
            ],
        ),
        Spec(
            "stable_rank",
            CORE,
            fn("lowrank_core.stable_rank"),
            [
                arr(
                    "s",
                    SPEC,
                    ndims=(1, 2, 3),
                    stack=False,
                    nan_index=1,
                    extra_bad=[("negative", -SPEC)],
                )
            ],
        ),
        Spec(
            "basis_stability",
            CORE,
            fn("lowrank_core.basis_stability"),
            [mat("previous", M), mat("current", M + 0.1), check_finite()],
        ),
        Spec(
            "polar_stability",
            CORE,
            fn("lowrank_core.polar_stability"),
            [mat("previous_polar", B1), mat("current_polar", B1), check_finite()],
        ),
        Spec(
            "principal_angle_cosines",
            CORE,
            fn("lowrank_core.principal_angle_cosines"),
            [mat("a", B1), mat("b", B2), check_finite()],
        ),
        Spec(
            "projector_distance",
            CORE,
            fn("lowrank_core.projector_distance"),
            [mat("a", B1), mat("b", B2), check_finite()],
        ),
        Spec(
            "matrix_shape",
            CORE,
            fn("lowrank_core.matrix_shape"),
            [
                pos("weight_shape", "shape", (6, 2, 3), valid_alt=[("list", [6, 2, 3])]),
                kw("groups", "int", 2, min=1, valid_alt=[("np.int64", np.int64(2))]),
            ],
            libs=("numpy",),
        ),
        Spec(
            "weight_to_matrix",
            CORE,
            fn("lowrank_core.weight_to_matrix"),
            [
                arr("weight", W3, ndims=(2, 3, 4, 5), stack=False),
                kw("groups", "int", 2, min=1),
                check_finite(),
            ],
        ),
        Spec(
            "matrix_to_weight",
            CORE,
            fn("lowrank_core.matrix_to_weight"),
            [
                arr("matrix", W3.reshape(6, 6), ndims=(2, 3), stack=False),
                pos("weight_shape", "shape", (6, 2, 3)),
                check_finite(),
            ],
        ),
        Spec(
            "get_backend",
            CORE,
            fn("lowrank_core.get_backend"),
            [
                pos(
                    "x",
                    "object",
                    M,
                    convert=True,
                    bad=[
                        ("list", [1.0]),
                        ("float", 1.0),
                        ("None", None),
                        ("str", "x"),
                        ("junk", Junk()),
                    ],
                )
            ],
        ),
        Spec(
            "register_backend",
            CORE,
            fn("lowrank_core.register_backend"),
            [
                pos(
                    "module_name",
                    "object",
                    "fuzz_no_such_lib",
                    bad=[("int", 3), ("dotted", "a.b"), ("empty", ""), ("None", None)],
                ),
                pos("backend", "object", None, bad=[("int", 3), ("str", "x")]),
            ],
            libs=("numpy",),
        ),
        Spec(
            "StandardBackend",
            CORE,
            fn("lowrank_core.StandardBackend"),
            [
                pos(
                    "xp",
                    "object",
                    __import__("array_api_compat").array_namespace(M),
                    bad=[("int", 3), ("str", "numpy"), ("None", None), ("array", M)],
                )
            ],
            libs=("numpy",),
        ),
        Spec(
            "StandardBackend.random_normal",
            CORE,
            method(
                lambda lib: __import__("lowrank_core").get_backend(to_lib(M, lib)), "random_normal"
            ),
            [pos("shape", "shape", (3, 4), not_bad=("zero", "one-dim")), kw("seed", "seed", 1)],
            libs=("numpy",),
        ),
    ]
    # rank rules: construction and call
    lc = __import__("lowrank_core")
    bounds = [
        kw("min_rank", "rank", None, optional=True, min=1),
        kw("max_rank", "rank", None, optional=True, min=1),
    ]
    unit = {"min": 0.0, "max": 1.0, "valid_alt": [("np.float32", np.float32(0.5))]}
    rules: list[tuple[str, list[Arg]]] = [
        (
            "SigmaCutoff",
            [pos("fraction", "float", 0.1, **unit), pos("floor_fraction", "float", 0.01, **unit)],
        ),
        ("TailNorm", [pos("tol", "float", 0.1, min_open=True, **unit)]),
        ("Energy", [pos("energy", "float", 0.9, min_open=True, **unit)]),
        ("OptimalHardThreshold", [pos("scale", "float", 1.0, min=0.0, min_open=True)]),
        ("FixedRank", [pos("rank", "rank", 2, min=1, valid_alt=[("np.int64", np.int64(2))])]),
        ("EffectiveRank", []),
        ("StableRank", []),
    ]
    for name, params in rules:
        specs.append(
            Spec(name, CORE, fn(f"lowrank_core.{name}"), [*params, *bounds], libs=("numpy",))
        )
        rule = getattr(lc, name)(**({"rank": 2} if name == "FixedRank" else {}))
        specs.append(
            Spec(
                f"{name}.__call__",
                CORE,
                lambda lib, rule=rule: rule,
                [
                    arr(
                        "s",
                        SPEC,
                        ndims=(1, 2, 3),
                        stack=False,
                        nan_index=1,
                        extra_bad=[("negative", -SPEC), ("increasing", SPEC[::-1].copy())],
                    ),
                    kw("shape", "shape2", (6, 5)),
                ],
            )
        )
    # init (lowrank_core.init)
    rank5 = {"upper": 5, "valid_alt": [("np.int64", np.int64(2))]}
    specs += [
        Spec(
            "spectral_init",
            CORE,
            fn("lowrank_core.init.spectral_init"),
            [mat("a", M), pos("rank", "rank", 2, **rank5), check_finite()],
        ),
        Spec(
            "spectral_factors",
            CORE,
            fn("lowrank_core.init.spectral_factors"),
            [mat("a", M), pos("rank", "rank", 2, **rank5), check_finite()],
        ),
        Spec(
            "nonlinear_init",
            CORE,
            fn("lowrank_core.init.nonlinear_init"),
            [
                mat("a", M),
                pos("rank", "rank", 2, **rank5),
                kw("refine_steps", "int", 1, min=0),
                check_finite(),
            ],
            extra_valid=[
                (
                    "a=1.34e154",
                    lambda lib: (
                        fn("lowrank_core.init.nonlinear_init")(lib),
                        [to_lib(np.array([[1.34e154]]), lib), 1],
                        {},
                    ),
                )
            ],
        ),
        Spec(
            "nonlinear_factors",
            CORE,
            fn("lowrank_core.init.nonlinear_factors"),
            [
                mat("a", M),
                pos("rank", "rank", 2, **rank5),
                kw("refine_steps", "int", 0, min=0),
                check_finite(),
            ],
        ),
        Spec(
            "random_init",
            CORE,
            fn("lowrank_core.init.random_init"),
            [
                arr("like", M, finite=False, noncontig=False),
                pos("rank", "rank", 2, **rank5),
                kw("shape", "shape", None, valid_alt=[("tuple", (6, 5)), ("list", [6, 5])]),
                kw("std", "float", 0.1, min=0.0, optional=True),
                kw("seed", "seed", 0),
            ],
        ),
        Spec(
            "random_factors",
            CORE,
            fn("lowrank_core.init.random_factors"),
            [
                arr("like", M, finite=False, noncontig=False),
                pos("rank", "rank", 2, **rank5),
                kw("shape", "shape", None, valid_alt=[("tuple", (6, 5)), ("list", [6, 5])]),
                kw("std", "float", 0.1, min=0.0, optional=True),
                kw("seed", "seed", 0),
            ],
        ),
        Spec(
            "relu_function_error",
            CORE,
            fn("lowrank_core.init.relu_function_error"),
            [mat("a", M), mat("b", M * 0.5), kw("relative", "bool", False), check_finite()],
        ),
        Spec(
            "init_weight_factors",
            CORE,
            fn("lowrank_core.init.init_weight_factors"),
            [
                arr("weight", W3, ndims=(2, 3, 4, 5), stack=False),
                pos("rank", "rank", 2, upper=3),
                kw("method", "choice", "spectral"),
                kw("groups", "int", 2, min=1),
                kw("balanced", "bool", False),
                kw("refine_steps", "int", 0, min=0),
                kw("std", "float", None, min=0.0, optional=True),
                kw("seed", "seed", 0),
                check_finite(),
            ],
        ),
        Spec(
            "balanced_to_factors",
            CORE,
            fn("lowrank_core.init.balanced_to_factors"),
            [mat("left", LEFT), mat("right", RIGHT), check_finite()],
        ),
        Spec(
            "factors_to_balanced",
            CORE,
            fn("lowrank_core.init.factors_to_balanced"),
            [mat("U", U), mat("Sigma", S), mat("V", V), check_finite()],
        ),
        Spec(
            "frobenius_decay",
            CORE,
            fn("lowrank_core.init.frobenius_decay"),
            [
                mat("left", LEFT),
                mat("right", RIGHT),
                kw("coefficient", "float", 1.0, min=0.0),
                check_finite(),
            ],
        ),
        Spec(
            "frobenius_decay_grad",
            CORE,
            fn("lowrank_core.init.frobenius_decay_grad"),
            [
                mat("left", LEFT),
                mat("right", RIGHT),
                kw("coefficient", "float", 1.0, min=0.0),
                check_finite(),
            ],
        ),
        Spec(
            "default_init_std",
            CORE,
            fn("lowrank_core.init.default_init_std"),
            [pos("fan_in", "int", 5, min=1)],
            libs=("numpy",),
        ),
    ]
    _with_reference(specs)
    for sp in specs:
        if sp.name in ("random_init", "random_factors"):
            sp.checked = False  # each library draws from its own generator: no common value
        if sp.name in ("nonlinear_init", "nonlinear_factors"):
            sp.tol = 256.0  # a refinement iteration on top of the SVD: a few more roundings
        if sp.name in (
            "basis_stability",
            "polar_stability",
            "principal_angle_cosines",
            "projector_distance",
            "balanced_to_factors",
        ):
            sp.scale_all = True
    return specs


def _svd_canon(result: Any) -> list[Any]:
    """Sign-free parts of an SVD ``(U, S, Vh)``: ``S`` and ``U diag(S) Vh``."""
    U, S, Vh = (host(x) for x in result)
    return [S, (U * S[..., None, :]) @ Vh]


def _factors_canon(result: Any) -> list[Any]:
    """Sign-free parts of ``(U, Sigma, V)``: ``Sigma`` and ``U Sigma V^T``."""
    U, Sigma, V = (host(x) for x in result)
    return [Sigma, U @ Sigma @ np.swapaxes(V, -1, -2)]


def _ref(name: str) -> Callable[[list[Any], dict[str, Any]], Any]:
    """The oracle ``lowrank_reference.<name>`` (one matrix), without the core's ``check_finite``."""

    def oracle(args: list[Any], kwargs: dict[str, Any]) -> Any:
        import importlib

        mod, _, attr = f"lowrank_reference.{name}".rpartition(".")
        kw = {k: v for k, v in kwargs.items() if k != "check_finite"}
        return getattr(importlib.import_module(mod), attr)(*args, **kw)

    return oracle


# name -> (reference oracle, canonical form, degree of each output under joint scaling of the float
# inputs, float16/bfloat16 taken, batched stacks taken)
REFERENCE: dict[str, tuple[Any, Any, tuple[int, ...] | None, bool, bool]] = {
    "svd": (_ref("svd"), _svd_canon, (1, 1), True, True),
    "qr": (_ref("qr"), None, (0, 1), True, True),
    "polar": (_ref("polar"), None, (0, 1), True, True),
    "orthogonal_factor": (_ref("orthogonal_factor"), None, (0,), True, True),
    "factorize": (_ref("factorize"), _factors_canon, (1, 1), True, True),
    "reconstruct": (_ref("reconstruct"), None, None, True, True),
    "rotate_sigma": (_ref("rotate_sigma"), None, None, True, True),
    "effective_rank": (_ref("effective_rank"), None, (0,), True, False),
    "stable_rank": (_ref("stable_rank"), None, (0,), True, False),
    "basis_stability": (_ref("basis_stability"), None, (0,), True, True),
    "principal_angle_cosines": (_ref("principal_angle_cosines"), None, (0,), True, True),
    "projector_distance": (_ref("projector_distance"), None, (0,), True, True),
    "relu_function_error": (_ref("init.relu_function_error"), None, (2,), True, True),
    "frobenius_decay": (_ref("init.frobenius_decay"), None, (4,), False, True),
}


def _with_reference(specs: list[Spec]) -> None:
    for sp in specs:
        if sp.name in REFERENCE:
            sp.oracle, sp.canon, sp.degree, sp.half, sp.batch = REFERENCE[sp.name]
            if sp.half:
                sp.tol = 16.0  # half precision: eps is large, 16 eps is already loose


def _update_rank_returning(
    value: Any, lib: str
) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    import lowrank_core as lc

    def rule(s: Any, *, shape: Any = None) -> Any:
        return value

    return lc.update_rank, [to_lib(U, lib), to_lib(S, lib), to_lib(V, lib), rule], {}


# --------------------------------------------------------------------------------------------------
# lowrank_core.cmd
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _cmd_fit(lib: str) -> Any:
    import lowrank_core as lc

    return lc.fit_cmd(to_lib(TRAJ, lib), 3, num_samples=12, seed=0)


def _online(lib: str) -> Any:
    import lowrank_core as lc

    return lc.OnlineCMD.from_trajectory(to_lib(TRAJ, lib), 3, num_samples=12, seed=0)


def cmd_specs() -> list[Spec]:
    traj = functools.partial(arr, ndims=(2,), stack=False)
    common = [
        kw("num_samples", "int", 12, min=1),
        kw("seed", "seed", 0),
        kw("metric", "choice", "correlation", valid_alt=[("euclidean", "euclidean")]),
        kw("chunk_size", "int", 7, min=1),
        check_finite(),
    ]
    import lowrank_core.cmd as cm

    fit = _cmd_fit("numpy")
    sample = np.asarray(TRAJ[:12])
    specs = [
        Spec(
            "fit_cmd",
            CMD,
            fn("lowrank_core.fit_cmd"),
            [traj("trajectory", TRAJ), pos("max_modes", "int", 3, min=1, optional=True), *common],
        ),
        Spec(
            "choose_num_modes",
            CMD,
            fn("lowrank_core.choose_num_modes"),
            [
                traj("sample", sample),
                pos("tol", "float", 0.1, min=0.0),
                kw("max_modes", "int", 4, min=1, optional=True),
                kw("metric", "choice", "correlation"),
                check_finite(),
            ],
        ),
        Spec(
            "cmd.abs_correlation",
            CMD,
            fn("lowrank_core.cmd.abs_correlation"),
            [traj("x", sample), check_finite()],
        ),
        Spec(
            "cmd.find_modes",
            CMD,
            fn("lowrank_core.cmd.find_modes"),
            [
                traj("sample", sample),
                pos("max_modes", "int", 3, min=1, optional=True),
                kw("metric", "choice", "correlation"),
                check_finite(),
            ],
        ),
        Spec(
            "cmd.cluster",
            CMD,
            fn("lowrank_core.cmd.cluster"),
            [
                traj("distance", 1.0 - np.eye(5) * 1.0 + 0.0 * np.ones((5, 5)), noncontig=False),
                pos("max_clusters", "int", 2, min=1),
                check_finite(),
            ],
        ),
        Spec(
            "cmd.assign_modes",
            CMD,
            fn("lowrank_core.cmd.assign_modes"),
            [
                traj("trajectory", TRAJ),
                traj("profiles", np.asarray(fit.profiles)),
                kw("chunk_size", "int", 7, min=1),
                check_finite(),
            ],
        ),
        Spec(
            "cmd.fit_coefficients",
            CMD,
            fn("lowrank_core.cmd.fit_coefficients"),
            [
                traj("trajectory", TRAJ),
                traj("profiles", np.asarray(fit.profiles)),
                arr(
                    "assignment", np.asarray(fit.assignment), ndims=(1,), float=False, finite=False
                ),
                kw("chunk_size", "int", 7, min=1),
                check_finite(),
            ],
        ),
        Spec(
            "cmd.reconstruct_trajectory",
            CMD,
            fn("lowrank_core.cmd.reconstruct_trajectory"),
            [
                traj("profiles", np.asarray(fit.profiles)),
                arr(
                    "assignment", np.asarray(fit.assignment), ndims=(1,), float=False, finite=False
                ),
                arr("a", np.asarray(fit.a), ndims=(1,)),
                arr("b", np.asarray(fit.b), ndims=(1,)),
                kw("start", "int", 0, min=0),
                kw("stop", "int", None, min=0, optional=True),
            ],
        ),
        Spec(
            "cmd.relative_error",
            CMD,
            fn("lowrank_core.cmd.relative_error"),
            [
                traj("trajectory", TRAJ),
                pos("fit", "object", fit, bad=[("None", None), ("junk", Junk())]),
                kw("centered", "bool", True),
                kw("chunk_size", "int", 7, min=1),
            ],
            libs=("numpy",),
        ),
        Spec(
            "cmd.sample_indices",
            CMD,
            fn("lowrank_core.cmd.sample_indices"),
            [
                # a zero-size segment (a tensor with no parameters) is documented as valid
                pos(
                    "sizes",
                    "shape",
                    (10, 14),
                    not_bad=("int", "one-dim", "zero"),
                    valid_alt=[("zero-size-segment", (0, 14))],
                ),
                pos("num_samples", "int", 5, min=1),
                kw("seed", "seed", 0),
            ],
            libs=("numpy",),
        ),
        Spec("CMDFit.reconstruct", CMD, method(_cmd_fit, "reconstruct"), []),
        Spec(
            "OnlineCMD.from_trajectory",
            CMD,
            fn("lowrank_core.OnlineCMD/from_trajectory"),
            [
                traj("trajectory", TRAJ),
                pos("max_modes", "int", 3, min=1, optional=True),
                kw("num_samples", "int", 12, min=1),
                kw("seed", "seed", 0),
            ],
        ),
        Spec(
            "OnlineCMD.update",
            CMD,
            method(_online, "update"),
            [
                arr("weights", np.ascontiguousarray(TRAJ[:, -1]), ndims=(1,), stack=False),
                check_finite(),
            ],
            inplace=True,
        ),
        Spec(
            "OnlineCMD.weights",
            CMD,
            method(_online, "weights"),
            [pos("epoch", "int", -1, min=None, upper=7)],
        ),
        Spec(
            "OnlineCMD.from_state_dict",
            CMD,
            fn("lowrank_core.OnlineCMD/from_state_dict"),
            [
                Arg(
                    "state",
                    "object",
                    lambda: dict(_online("numpy").state_dict()),
                    opts={"factory": True, "bad": [("None", None), ("int", 3), ("empty", {})]},
                )
            ],
            extra=[
                (f"state[{k}]={label}", functools.partial(_state_with, k, v))
                for k in ("profiles", "assignment", "references", "w_mean")
                for label, v in (("None", None), ("nan", "nan"), ("str", "x"), ("3-d", "3d"))
            ],
        ),
    ]
    N = TRAJ.shape[0]
    refs = np.asarray(fit.references)
    specs += [
        Spec("cmd.select_embedding", CMD, fn("lowrank_core.cmd.select_embedding"),
             [arr("a", np.asarray(fit.a), ndims=(1,), stack=False),
              arr("b", np.asarray(fit.b), ndims=(1,), stack=False),
              arr("a_prev", np.asarray(fit.a) * 0.9, ndims=(1,), stack=False),
              arr("b_prev", np.asarray(fit.b) * 0.9, ndims=(1,), stack=False),
              arr("embedded", np.zeros(N, dtype=bool), ndims=(1,), stack=False, float=False,
                  finite=False, noncontig=False),
              pos("references", "object", refs, bad=[("None", None), ("float", refs + 0.5),
                                                     ("out-of-range", refs + 1000)]),
              pos("fraction", "float", 0.1, min=0.0, max=1.0)]),
        Spec("cmd.fit_cmd_shard", CMD, fn("lowrank_core.cmd.fit_cmd_shard"),
             [arr("shard", TRAJ, ndims=(2,), stack=False),
              arr("sample", np.ascontiguousarray(TRAJ[np.asarray(fit.sample)]), ndims=(2,), stack=False),
              # sample_index holds global row numbers: a shard cannot know the global N, so an
              # index beyond the shard is not an error here (the sharded tracker checks it)
              pos("sample_index", "object", np.asarray(fit.sample),
                  bad=[("None", None), ("float", np.asarray(fit.sample) + 0.5)]),
              pos("max_modes", "int", 3, min=1, optional=True), check_finite()]),
    ]  # fmt: skip
    _ = cm
    return specs


def _overflowing(path: str, *args: Any) -> list[tuple[str, Callable[[str], Any]]]:
    """Bad variants: snapshots at a scale whose squares the dtype cannot hold (must be refused)."""

    def build(
        factor: float, dtype: Any, lib: str
    ) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
        return fn(path)(lib), [to_lib((SNAP * factor).astype(dtype), lib), *args], {}

    return [
        ("snapshots=scaled-1e+160 (result overflows)", functools.partial(build, 1e160, np.float64)),
        ("all-float32-scaled-3e19 (result overflows)", functools.partial(build, 3e19, np.float32)),
    ]


def _store_add_overflowing(lib: str) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    store = _store(lib)
    return store.add, [to_lib(SNAP[0] * 1e160, lib)], {}


def _state_with(
    key: str, value: Any, lib: str
) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    import lowrank_core as lc

    state = dict(_online(lib).state_dict())
    if key in state:
        v = state[key]
        if value == "nan":
            x = np.array(np.asarray(v), dtype=np.float64, copy=True)
            x.reshape(-1)[0] = np.nan
            value = to_lib(x, lib)
        elif value == "3d":
            value = to_lib(np.stack([np.asarray(v)] * 2)[None], lib)
        state[key] = value
    return lc.OnlineCMD.from_state_dict, [state], {}


# --------------------------------------------------------------------------------------------------
# lowrank_core.dldr
# --------------------------------------------------------------------------------------------------
def _subspace(lib: str) -> Any:
    import lowrank_core as lc

    return lc.fit_subspace(to_lib(SNAP, lib), 3)


def _store(lib: str) -> Any:
    import lowrank_core as lc

    st = lc.SnapshotStore()
    for row in SNAP:
        st.add(to_lib(np.array(row), lib))
    return st


def dldr_specs() -> list[Spec]:
    vec = functools.partial(arr, ndims=(1,), stack=False)
    vec12 = functools.partial(arr, ndims=(1, 2), stack=False)  # (D,) or a stack (n, D)
    H = np.eye(3)
    specs = [
        Spec(
            "fit_subspace",
            DLDR,
            fn("lowrank_core.fit_subspace"),
            [
                # scale=False: at 1e160 (float64) or 3e19 (float32) the Subspace's own explained
                # variances (scale^2) are not representable; that refusal is checked in `extra`
                arr("snapshots", SNAP, ndims=(2,), stack=False, scale=False),
                pos("d", "rank", 3, upper=7),
                kw("method", "choice", "exact", valid_alt=[("randomized", "randomized")]),
                kw("oversample", "int", 5, min=0),
                kw("power_iterations", "int", 1, min=0),
                kw("seed", "seed", 0),
                kw("orthonormalize", "bool", True),
                check_finite(),
            ],
            extra=_overflowing("lowrank_core.fit_subspace", 3),
        ),
        Spec(
            "dldr.gram_matrix",
            DLDR,
            fn("lowrank_core.dldr.gram_matrix"),
            # the result X X^T itself overflows at 1e160 / float32 3e19: refused (checked in `extra`)
            [arr("snapshots", SNAP, ndims=(2,), stack=False, scale=False), check_finite()],
            extra=_overflowing("lowrank_core.dldr.gram_matrix"),
        ),
        Spec(
            "dldr.centred_gram",
            DLDR,
            fn("lowrank_core.dldr.centred_gram"),
            [arr("gram", SNAP @ SNAP.T, ndims=(2,), stack=False)],
        ),
        Spec("Subspace.project", DLDR, method(_subspace, "project"), [vec12("w", SNAP[-1])]),
        Spec(
            "Subspace.project_direction",
            DLDR,
            method(_subspace, "project_direction"),
            [vec12("v", SNAP[-1])],
        ),
        Spec("Subspace.lift", DLDR, method(_subspace, "lift"), [vec12("c", np.ones(3))]),
        Spec(
            "Subspace.lift_direction",
            DLDR,
            method(_subspace, "lift_direction"),
            [vec12("c", np.ones(3))],
        ),
        Spec(
            "SnapshotStore",
            DLDR,
            fn("lowrank_core.SnapshotStore"),
            [
                kw(
                    "path",
                    "object",
                    None,
                    bad=[("dir", tempfile.gettempdir()), ("int", 3), ("junk", Junk())],
                ),
                kw("shift", "bool", True),
                kw("block_rows", "int", 4, min=1),
                check_finite(),
            ],
            libs=("numpy",),
        ),
        Spec(
            "SnapshotStore.add",
            DLDR,
            method(lambda lib: _store(lib), "add"),
            # the store's Gram entries (scale^2) overflow at 1e160: refused, checked in `extra`
            [vec("w", SNAP[0], scale=False)],
            extra=[("w=scaled-1e+160 (Gram overflows)", _store_add_overflowing)],
            inplace=True,
        ),
        Spec(
            "SnapshotStore.fit",
            DLDR,
            method(_store, "fit"),
            [
                pos("d", "rank", 3, upper=7),
                kw("method", "choice", "exact"),
                kw("oversample", "int", 5, min=0),
                kw("power_iterations", "int", 1, min=0),
                kw("seed", "seed", 0),
                kw("orthonormalize", "bool", True),
            ],
        ),
        Spec(
            "SnapshotStore.vector",
            DLDR,
            method(_store, "vector"),
            [pos("i", "int", 0, min=None, upper=7)],
        ),
        Spec(
            "dldr.subspace_from_gram",
            DLDR,
            fn("lowrank_core.dldr.subspace_from_gram"),
            [
                # mix=False: the Gram is a host NumPy array by design (the store and the sharded
                # recorder pass one beside vectors of the training library)
                arr("gram", SNAP @ SNAP.T, ndims=(2,), stack=False, mix=False),
                pos("d", "rank", 3, upper=7),
                pos("rows", "callable", lambda: iter([(0, SNAP)])),
                arr("centre", SNAP.mean(axis=0), ndims=(1,), stack=False, keyword=True),
                kw("orthonormalize", "bool", True),
            ],
            libs=("numpy",),  # rows() yields NumPy blocks,
        ),
        Spec(
            "dldr.curvature_ok",
            DLDR,
            fn("lowrank_core.dldr.curvature_ok"),
            [vec("s", np.ones(3)), vec("y", np.ones(3)), kw("eps", "float", 1e-8, min=0.0)],
        ),
        Spec(
            "dldr.bfgs_update",
            DLDR,
            fn("lowrank_core.dldr.bfgs_update"),
            [
                arr("H", H, ndims=(2,), stack=False),
                vec("s", np.ones(3)),
                vec("y", np.ones(3) * 2),
                kw("eps", "float", 1e-8, min=0.0),
            ],
        ),
        Spec(
            "dldr.bfgs_direction",
            DLDR,
            fn("lowrank_core.dldr.bfgs_direction"),
            [arr("H", H, ndims=(2,), stack=False), vec("g", np.ones(3))],
        ),
        Spec(
            "dldr.armijo_condition",
            DLDR,
            fn("lowrank_core.dldr.armijo_condition"),
            [
                pos("f_new", "float", 0.5, not_bad=("nan", "inf", "-inf")),
                pos("f0", "float", 1.0),
                pos("alpha", "float", 1.0, min=0.0),
                pos("slope", "float", -1.0),
                kw("c1", "float", 0.4, min=0.0, max=1.0),
            ],
            libs=("numpy",),
        ),
        Spec(
            "dldr.armijo_backtracking",
            DLDR,
            fn("lowrank_core.dldr.armijo_backtracking"),
            [
                pos("f", "callable", lambda a: 1.0 - a),
                pos("f0", "float", 1.0),
                pos("slope", "float", -1.0),
                kw("alpha0", "float", 1.0, min=0.0),
                kw("shrink", "float", 0.4, min=0.0, max=1.0),
                kw("c1", "float", 0.4, min=0.0, max=1.0),
                kw("max_trials", "int", 5, min=1),
            ],
            libs=("numpy",),
        ),
    ]
    return specs


# --------------------------------------------------------------------------------------------------
# lowrank_torch
# --------------------------------------------------------------------------------------------------
def _torch() -> Any:
    import torch

    return torch


def _mlp(lib: str = "torch") -> Any:
    torch = _torch()
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def _oialr(lib: str) -> Any:
    import lowrank_torch.oialr as lo

    torch = _torch()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return lo.OIALR(model, opt, lo.OIALRConfig(switch_step=1, update_every=1, keep_last=False))


def _on_meta(build: Callable[[], Any]) -> Any:
    """``build()`` under ``torch.device("meta")``: parameters with shapes and no values."""
    with _torch().device("meta"):
        return build()


def _lr_linear(lib: str) -> Any:
    import lowrank_torch as lt

    torch = _torch()
    torch.manual_seed(0)
    return lt.LowRankLinear.from_dense(torch.nn.Linear(6, 5), rank=3)


def torch_specs() -> list[Spec]:
    T = ("torch",)
    MODEL = [("None", None), ("int", 3), ("tensor", np.ones(3)), ("junk", Junk())]

    def mod(name: str, build: Callable[[], Any]) -> Arg:
        # and the same module built on the meta device (shapes, no values): a DeviceError
        meta = ("meta-device", _on_meta(build))
        return Arg(name, "object", build, opts={"factory": True, "bad": [*MODEL, meta]})

    tU, tS, tV = U[:, :3], S[:3, :3], V[:, :3]
    specs = [
        Spec(
            "LowRankLinear",
            TORCH,
            fn("lowrank_torch.LowRankLinear"),
            [
                arr("U", tU, ndims=(2,), stack=False),
                arr("Sigma", tS, ndims=(2,), stack=False),
                arr("V", tV, ndims=(2,), stack=False),
                arr("bias", np.zeros(6), ndims=(1,), stack=False, keyword=True, optional=True),
                kw("forward_mode", "choice", "auto"),
            ],
            libs=T,
        ),
        Spec(
            "LowRankLinear.set_factors",
            TORCH,
            method(_lr_linear, "set_factors"),
            [
                arr("U", np.linalg.qr(M[:5, :3])[0], ndims=(2,), stack=False),
                arr("Sigma", tS, ndims=(2,), stack=False),
                arr("V", tU, ndims=(2,), stack=False),
            ],
            libs=T,
            inplace=True,
        ),
        Spec(
            "LowRankLinear.from_dense",
            TORCH,
            fn("lowrank_torch.LowRankLinear/from_dense"),
            [
                mod("dense", lambda: _torch().nn.Linear(6, 5)),
                kw("rank", "rank", 3, upper=5, optional=True),
            ],
            libs=T,
        ),
        Spec(
            "LowRankWeight",
            TORCH,
            fn("lowrank_torch.LowRankWeight"),
            [
                arr("U", tU, ndims=(2, 3), stack=False),
                arr("Sigma", tS, ndims=(2, 3), stack=False),
                arr("V", tV, ndims=(2, 3), stack=False),
                kw("weight_shape", "shape", (6, 5)),
            ],
            libs=T,
        ),
        Spec(
            "to_low_rank",
            TORCH,
            fn("lowrank_torch.to_low_rank"),
            # a rank above a layer's min(m, n) is clipped to it, per layer (documented)
            [
                mod("model", _mlp),
                kw(
                    "rank",
                    "rank",
                    2,
                    optional=True,
                    upper=6,
                    not_bad=("too-big",),
                    valid_alt=[("too-big-clipped", 7)],
                ),
            ],
            libs=T,
            inplace=True,
        ),
        Spec(
            "low_rank_model",
            TORCH,
            fn("lowrank_torch.low_rank_model"),
            [
                mod("model", _mlp),
                pos("rank_fraction", "float", 0.5, min=0.0, max=1.0, min_open=True),
                kw("init", "choice", "spectral"),
                kw("train_bases", "bool", True),
                kw("refine_steps", "int", 0, min=0),
                kw("from_scratch", "bool", False),
                kw("seed", "seed", 0),
                kw("keep_first", "bool", False),
                kw("keep_last", "bool", False),
                kw("min_aspect", "float", 0.1, min=0.0),
            ],
            libs=T,
            inplace=True,
        ),
        Spec(
            "count_trainable",
            TORCH,
            fn("lowrank_torch.count_trainable"),
            [mod("model", _mlp)],
            libs=T,
        ),
        Spec(
            "trainable_share",
            TORCH,
            fn("lowrank_torch.trainable_share"),
            [mod("model", _mlp), pos("dense_count", "int", 90, min=1)],
            libs=T,
        ),
        Spec(
            "low_rank_attention_",
            TORCH,
            fn("lowrank_torch.low_rank_attention_"),
            [
                mod("mha", lambda: _torch().nn.MultiheadAttention(8, 2)),
                pos("rank", "rank", 2, optional=True, upper=8),
            ],
            libs=T,
            inplace=True,
        ),
        Spec(
            "frobenius_decay_penalty",
            TORCH,
            fn("lowrank_torch.frobenius_decay_penalty"),
            [mod("model", _mlp), pos("coefficient", "float", 1.0, min=0.0)],
            libs=T,
        ),
        Spec(
            "init.layer_rank",
            TORCH,
            fn("lowrank_torch.init.layer_rank"),
            [
                pos("shape", "shape", (6, 5)),
                pos("rank_fraction", "float", 0.5, min=0.0, max=1.0, min_open=True),
            ],
            libs=T,
        ),
        Spec(
            "OIALRConfig",
            TORCH,
            fn("lowrank_torch.oialr.OIALRConfig"),
            [
                kw("switch_step", "int", 10, min=0, optional=True),
                kw("stability_threshold", "float", None, min=0.0, max=1.0, optional=True),
                kw("stability_every", "int", 10, min=1),
                kw("update_every", "int", 10, min=1),
                kw("rule", "callable", __import__("lowrank_core").SigmaCutoff()),
                kw("progressive", "bool", False),
                kw("keep_first", "bool", False),
                kw("keep_last", "bool", True),
                kw("min_aspect", "float", 0.1, min=0.0),
            ],
            libs=T,
        ),
        Spec(
            "CMDConfig",
            TORCH,
            fn("lowrank_torch.cmd.CMDConfig"),
            [
                kw("warmup_epochs", "int", 5, min=1),
                kw("max_modes", "int", 3, min=1, optional=True),
                kw("tol", "float", None, min=0.0, optional=True),
                kw("num_samples", "int", 10, min=1),
                kw("seed", "seed", 0),
                kw("metric", "choice", "correlation"),
                kw("chunk_size", "int", 64, min=1),
                kw("embed", "bool", False),
                kw("embed_every", "int", 10, min=1),
                kw("embed_fraction", "float", 0.1, min=0.0, max=1.0, min_open=True),
                kw("every_n_steps", "int", None, min=1, optional=True),
            ],
            libs=T,
        ),
        Spec(
            "CMDTracker",
            TORCH,
            fn("lowrank_torch.cmd.CMDTracker"),
            [mod("model", _mlp), pos("config", "object", None, bad=[("int", 3), ("junk", Junk())])],
            libs=T,
        ),
        Spec(
            "SnapshotRecorder",
            TORCH,
            fn("lowrank_torch.dldr.SnapshotRecorder"),
            [
                mod("model", _mlp),
                pos("store", "object", None, bad=[("int", 3), ("junk", Junk())]),
                kw("every", "int", 1, min=1),
                kw("include_buffers", "bool", False),
            ],
            libs=T,
        ),
        Spec(
            "SubspaceSGD",
            TORCH,
            fn("lowrank_torch.dldr.SubspaceSGD"),
            [
                Arg(
                    "params",
                    "object",
                    lambda: list(_mlp().parameters()),
                    opts={"factory": True, "bad": [("None", None), ("int", 3)]},
                ),
                Arg(
                    "subspace",
                    "object",
                    lambda: _model_subspace(),
                    opts={"factory": True, "bad": [("None", None), ("junk", Junk())]},
                ),
                pos("lr", "float", 0.01, min=0.0),
                pos("momentum", "float", 0.9, min=0.0, max=1.0),
                pos("weight_decay", "float", 0.0, min=0.0),
                pos("nesterov", "bool", False),
            ],
            libs=T,
        ),
        Spec(
            "SubspaceBFGS",
            TORCH,
            fn("lowrank_torch.dldr.SubspaceBFGS"),
            [
                Arg(
                    "params",
                    "object",
                    lambda: list(_mlp().parameters()),
                    opts={"factory": True, "bad": [("None", None), ("int", 3)]},
                ),
                Arg(
                    "subspace",
                    "object",
                    lambda: _model_subspace(),
                    opts={"factory": True, "bad": [("None", None), ("junk", Junk())]},
                ),
                kw("alpha0", "float", 1.0, min=0.0, min_open=True),
                kw("shrink", "float", 0.4, min=0.0, max=1.0),
                kw("c1", "float", 0.4, min=0.0, max=1.0),
                kw("max_trials", "int", 5, min=1),
                kw("curvature_eps", "float", 1e-8, min=0.0),
            ],
            libs=T,
        ),
    ]
    conv = lambda: _torch().nn.Conv2d(3, 4, 3)  # noqa: E731
    specs += [
        Spec("LowRankConv2d.from_dense", TORCH, fn("lowrank_torch.LowRankConv2d/from_dense"),
             [mod("module", conv), pos("rank", "rank", 2, optional=True, upper=4),
              kw("forward_mode", "choice", "auto")], libs=T),
        Spec("LowRankConv1d.from_dense", TORCH, fn("lowrank_torch.LowRankConv1d/from_dense"),
             [mod("module", lambda: _torch().nn.Conv1d(3, 4, 3)),
              pos("rank", "rank", 2, optional=True, upper=4)], libs=T),
        Spec("LowRankConv3d.from_dense", TORCH, fn("lowrank_torch.LowRankConv3d/from_dense"),
             [mod("module", lambda: _torch().nn.Conv3d(2, 4, 2)),
              pos("rank", "rank", 2, optional=True, upper=4)], libs=T),
        Spec("LowRankConvNd.from_dense", TORCH, fn("lowrank_torch.LowRankConvNd/from_dense"),
             [mod("module", conv), pos("rank", "rank", 2, optional=True, upper=4)], libs=T),
        Spec("LowRankLayer", TORCH, fn("lowrank_torch.LowRankLayer"),
             [arr("U", tU, ndims=(2, 3), stack=False), arr("Sigma", tS, ndims=(2, 3), stack=False),
              arr("V", tV, ndims=(2, 3), stack=False),
              pos("bias", "object", None, bad=[("int", 3), ("str", "b")]),
              kw("weight_shape", "shape", (6, 5)), kw("groups", "int", 1, min=1),
              kw("forward_mode", "choice", "auto")], libs=T),
        Spec("init_low_rank_layer_", TORCH, fn("lowrank_torch.init_low_rank_layer_"),
             [Arg("layer", "object", lambda: _lr_linear("torch"), opts={"factory": True, "bad": MODEL}),
              arr("weight", np.ascontiguousarray(M.T[:5]), ndims=(2,), stack=False, scale=False), kw("init", "choice", "spectral"),
              kw("train_bases", "bool", True), kw("refine_steps", "int", 0, min=0),
              kw("seed", "seed", 0)], libs=T, inplace=True),
        Spec("SubspaceParametrization", TORCH, fn("lowrank_torch.dldr.SubspaceParametrization"),
             [Arg("params", "object", lambda: list(_mlp().parameters()),
                  opts={"factory": True, "bad": [("None", None), ("int", 3)]}),
              Arg("subspace", "object", lambda: _model_subspace(),
                  opts={"factory": True, "bad": [("None", None), ("junk", Junk())]})], libs=T),
    ]  # fmt: skip
    specs += [
        Spec("eligible_names", TORCH, fn("lowrank_torch.eligible_names"),
             [mod("model", _mlp), kw("keep_first", "bool", False), kw("keep_last", "bool", True),
              kw("min_aspect", "float", 0.1, min=0.0), kw("allow_rank_one", "bool", False)], libs=T),
        Spec("LowRankTransformersConv1D", TORCH, fn("lowrank_torch.LowRankTransformersConv1D"),
             [arr("U", V[:, :3], ndims=(2,), stack=False), arr("Sigma", tS, ndims=(2,), stack=False),
              arr("V", tU, ndims=(2,), stack=False), kw("forward_mode", "choice", "auto")], libs=T),
    ]  # fmt: skip
    specs += bound_torch_specs()
    shapes_only = "reads only the parameters' shapes and flags, which a meta model has"
    documented = {
        "count_trainable": shapes_only,
        "trainable_share": shapes_only,
        "eligible_names": shapes_only,
        "frobenius_decay_penalty": "a torch expression: on meta it is a meta tensor, as any torch op",
    }
    for sp in specs:
        if sp.name in documented:
            sp.accepted["model=meta-device"] = documented[sp.name]
        if sp.name == "LowRankConvNd.from_dense":  # an abstract base: no valid call
            sp.skip_valid = True  # type: ignore[attr-defined]
    specs.append(
        Spec(
            "TorchBackend.random_normal",
            TORCH,
            method(
                lambda lib: __import__("lowrank_core").get_backend(to_lib(M, lib)), "random_normal"
            ),
            [pos("shape", "shape", (3, 4), not_bad=("zero", "one-dim")), kw("seed", "seed", 1)],
            libs=T,
        )
    )
    specs.append(
        Spec(
            "OIALR.step",
            TORCH,
            method(_oialr, "step"),
            [],
            libs=T,
            inplace=True,
            extra=[("nan-weights", _oialr_nan_step)],
        )
    )
    return specs


def _model_subspace() -> Any:
    import lowrank_core as lc

    torch = _torch()
    n = sum(p.numel() for p in _mlp().parameters())
    snaps = torch.from_numpy(np.cumsum(np.random.default_rng(1).standard_normal((6, n)), axis=0))
    return lc.fit_subspace(snaps.float(), 2)


def _oialr_nan_step(lib: str) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    o = _oialr(lib)
    torch = _torch()
    with torch.no_grad():
        for p in o.model.parameters() if hasattr(o, "model") else []:
            p.fill_(float("nan"))
    return o.step, [], {}


# --------------------------------------------------------------------------------------------------
def _selftest_specs() -> list[Spec]:
    """Functions with known outcomes, to check the harness itself (``--selftest``)."""
    import os
    import signal

    from lowrank_core.errors import ShapeError

    def crash(x: Any) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)

    def clear(x: Any) -> None:
        raise ShapeError("always")

    def generic(x: Any) -> None:
        raise ValueError("always")

    def silent(x: Any) -> Any:
        return x

    def mutate(x: Any) -> None:
        x[...] = 0

    owner = "selftest"
    one = [arr("x", np.ones((2, 2)), ndims=(), noncontig=False, scale=False)]
    return [
        Spec(f"selftest.{f.__name__}", owner, lambda lib, f=f: f, one, libs=("numpy",))
        for f in (crash, clear, generic, silent, mutate)
    ]


OIALR = "lowrank_core.oialr"


def oialr_specs() -> list[Spec]:
    """lowrank_core.oialr: the framework-free settings, the rank budget and its allocation."""
    spectra = {"a": np.linspace(1.0, 0.1, 6), "b": np.geomspace(1.0, 1e-3, 6)}
    shapes = {"a": (8, 8), "b": (8, 12)}
    bad_maps = [("None", None), ("int", 3), ("list", [1.0, 2.0]), ("junk", Junk())]
    return [
        Spec(
            "oialr.LayerSelection",
            OIALR,
            fn("lowrank_core.oialr.LayerSelection"),
            [
                kw(
                    "exclude",
                    "object",
                    ("head*",),
                    bad=[("int", 3), ("mixed", ("a", 1)), ("None", None)],
                ),
                kw("keep_first", "bool", False),
                kw("keep_last", "bool", True),
                kw("min_aspect", "float", 0.1, min=0.0, max=1.0),
                kw("allow_rank_one", "bool", False),
            ],
            libs=("numpy",),
        ),
        Spec(
            "oialr.RankBudget",
            OIALR,
            fn("lowrank_core.oialr.RankBudget"),
            [
                pos("target", "float", 0.5, min=0.0, max=1.0, min_open=True),
                kw("measure", "choice", "flops"),
                kw("min_rank", "int", 1, min=1),
                kw(
                    "reach_at",
                    "object",
                    0.9,
                    bad=[("above-one", 1.5), ("str", "end"), ("bool", True)],
                ),
            ],
            libs=("numpy",),
        ),
        Spec(
            "oialr.OIALRConfig",
            OIALR,
            fn("lowrank_core.oialr.OIALRConfig"),
            [
                kw("switch_step", "int", 10, min=0, optional=True),
                kw("stability_every", "int", 10, min=1),
                kw("update_every", "int", 10, min=1),
                kw("progressive", "bool", False),
                kw("total_steps", "int", 100, min=1, optional=True),
                kw("switch_fraction", "float", None, min=0.0, max=1.0, optional=True),
                kw(
                    "rotation_threshold",
                    "float",
                    None,
                    min=0.0,
                    max=1.0,
                    min_open=True,
                    optional=True,
                ),
                kw(
                    "moment_kinds",
                    "object",
                    {},
                    bad=[("unknown-kind", {"nu": "third"}), ("int", 3)],
                ),
                kw(
                    "selection",
                    "object",
                    __import__("lowrank_core").oialr.LayerSelection(),
                    bad=[("dict", {})],
                ),
            ],
            libs=("numpy",),
        ),
        Spec(
            "oialr.allocate_ranks",
            OIALR,
            fn("lowrank_core.oialr.allocate_ranks"),
            [
                pos(
                    "spectra",
                    "object",
                    spectra,
                    bad=[*bad_maps, ("nan", {"a": [np.nan], "b": [1.0]})],
                ),
                pos("shapes", "object", shapes, bad=[("None", None), ("other", {"c": (3, 3)})]),
                pos("target", "float", 0.5, min=0.0, max=1.0, min_open=True),
                kw("measure", "choice", "flops"),
                kw("min_rank", "int", 1, min=1),
            ],
            libs=("numpy",),
        ),
    ]


def all_specs(only: str | None = None, libs: tuple[str, ...] | None = None) -> list[Spec]:
    import os

    if os.environ.get("FUZZ_SELFTEST"):
        return _selftest_specs()
    specs = core_specs() + cmd_specs() + dldr_specs() + oialr_specs() + torch_specs()
    if only:
        specs = [s for s in specs if only in s.name or only in s.owner]
    if libs:
        for sp in specs:
            sp.sweep_libs = tuple(lib for lib in sp.libs if lib in libs)
    return specs


def all_cases(only: str | None = None, libs: tuple[str, ...] | None = None) -> list[Case]:
    cases: list[Case] = []
    for spec in all_specs(only, libs):
        for c in expand(spec):
            if c.valid and getattr(spec, "skip_valid", False):
                continue  # the valid call needs objects the spec does not build
            cases.append(c)
    return cases


NOT_FUZZED_KINDS = (
    "exception classes, result containers (NamedTuple/dataclass records), protocols, modules, "
    "constants, callables without arguments"
)


def uncovered_names() -> list[str]:
    """Exported callables no spec targets (printed by the sweep, so gaps are visible)."""
    import dataclasses
    import importlib
    import inspect

    covered = {s.name for s in all_specs()}
    short = {n.split(".")[-1] for n in covered} | {n.split(".")[0] for n in covered}
    missing = []
    modules = (
        "lowrank_core",
        "lowrank_core.cmd",
        "lowrank_core.dldr",
        "lowrank_core.init",
        "lowrank_core.oialr",
    )
    for modname in (*modules, "lowrank_torch"):
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not callable(obj):
                continue
            if inspect.isclass(obj) and (
                issubclass(obj, BaseException)
                or (issubclass(obj, tuple) and hasattr(obj, "_fields"))
                or (dataclasses.is_dataclass(obj) and not hasattr(obj, "__post_init__"))
            ):
                continue
            if name in short or name in covered or getattr(obj, "_is_protocol", False):
                continue
            try:
                if not inspect.signature(obj).parameters:
                    continue  # takes no arguments: nothing to get wrong
            except (TypeError, ValueError):
                pass
            if inspect.isclass(obj) and any(  # an alias or abstract base of a covered class
                getattr(m, c.split(".")[-1], None) is obj
                or issubclass(getattr(m, c.split(".")[-1], object), obj)
                for c in covered
                for m in (mod,)
                if inspect.isclass(getattr(m, c.split(".")[-1], None))
            ):
                continue
            missing.append(f"{modname}.{name}")
    return sorted(set(missing))


# --------------------------------------------------------------------------------------------------
# lowrank_torch functions whose valid call needs consistent objects (an optimizer holding the
# parameter, a checkpoint file): the objects are built per case; each is also replaced by junk.
# --------------------------------------------------------------------------------------------------
def _sgd_with_state(*shapes: tuple[int, ...]) -> tuple[Any, list[Any]]:
    torch = _torch()
    params = [torch.nn.Parameter(torch.ones(sh, dtype=torch.float64)) for sh in shapes]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p_ in params:
        p_.grad = torch.ones_like(p_)
    opt.step()
    return opt, params


def _ctx_rotate() -> dict[str, Any]:
    opt, (sigma,) = _sgd_with_state((3, 3))
    return {"optimizer": opt, "sigma": sigma}


def _ctx_truncate() -> dict[str, Any]:
    opt, (sigma,) = _sgd_with_state((3, 3))
    return {"optimizer": opt, "sigma": sigma}


def _ctx_dense() -> dict[str, Any]:
    torch = _torch()
    opt, (dense,) = _sgd_with_state((6, 5))
    sigma = torch.nn.Parameter(torch.eye(3, dtype=torch.float64))
    return {"optimizer": opt, "dense": dense, "sigma": sigma}


def _ctx_swap() -> dict[str, Any]:
    torch = _torch()
    opt, (old,) = _sgd_with_state((3, 3))
    return {
        "optimizer": opt,
        "old": old,
        "new": torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64)),
    }


def _ctx_oialr() -> dict[str, Any]:
    torch = _torch()
    model = _mlp()
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


_CKPT_DIR = tempfile.mkdtemp(prefix="lowrank_fuzz_")


def _ctx_save() -> dict[str, Any]:
    import os

    return {"path": os.path.join(_CKPT_DIR, "save.pt"), "model": _mlp()}


def _ctx_load() -> dict[str, Any]:
    import os

    import lowrank_torch.checkpoint as ck

    path = os.path.join(_CKPT_DIR, "load.pt")
    if not os.path.exists(path):
        ck.save_checkpoint(path, model=_mlp())
    return {"path": path, "model": _mlp()}


def _ctx_flatten() -> dict[str, Any]:
    return {"tensors": list(_mlp().parameters())}


def _bound(path: str, ctx: Callable[[], dict[str, Any]], keyword: tuple[str, ...] = ()) -> Any:
    """``target`` calling ``path`` with the objects of a fresh ``ctx()`` (positional, in order)."""

    def target(lib: str) -> Callable[..., Any]:
        objs = ctx()
        f = fn(path)(lib)
        pos_objs = [v for k, v in objs.items() if k not in keyword]
        kw_objs = {k: v for k, v in objs.items() if k in keyword}
        return functools.partial(f, *pos_objs, **kw_objs)

    return target


OBJ_JUNK: list[tuple[str, Any]] = [("None", None), ("int", 3), ("junk", Junk())]


def _object_variants(
    path: str,
    ctx: Callable[[], dict[str, Any]],
    args: Callable[[], tuple[list[Any], dict[str, Any]]],
    keyword: tuple[str, ...] = (),
    extra_bad: dict[str, list[tuple[str, Any]]] | None = None,
) -> list[tuple[str, Callable[[str], tuple[Callable[..., Any], list[Any], dict[str, Any]]]]]:
    names = list(ctx().keys())
    out = []
    for name in names:
        for label, value in [*OBJ_JUNK, *(extra_bad or {}).get(name, [])]:

            def build(lib: str, name: str = name, value: Any = value) -> Any:
                objs = ctx()
                objs[name] = value
                a, k = args()
                pos_objs = [v for n, v in objs.items() if n not in keyword]
                kw_objs = {n: v for n, v in objs.items() if n in keyword}
                return fn(path)(lib), [*pos_objs, *a], {**kw_objs, **k}

            out.append((f"{name}={label}", build))
    return out


def bound_torch_specs() -> list[Spec]:
    T = ("torch",)
    eye3 = np.eye(3)
    U3, V3 = np.ascontiguousarray(U[:, :3]), np.ascontiguousarray(V[:, :3])
    return [
        Spec("rotate_sigma_state", TORCH, _bound("lowrank_torch.optim_state.rotate_sigma_state", _ctx_rotate),
             [arr("left", eye3, ndims=(2,), stack=False), arr("right", eye3, ndims=(2,), stack=False)],
             libs=T, inplace=True,
             extra=_object_variants("lowrank_torch.optim_state.rotate_sigma_state", _ctx_rotate,
                                    lambda: ([to_lib(eye3, "torch"), to_lib(eye3, "torch")], {}))),
        Spec("truncate_sigma_state", TORCH, _bound("lowrank_torch.optim_state.truncate_sigma_state", _ctx_truncate),
             [pos("rank", "rank", 2, upper=3)], libs=T, inplace=True,
             extra=_object_variants("lowrank_torch.optim_state.truncate_sigma_state", _ctx_truncate,
                                    lambda: ([2], {}))),
        Spec("dense_to_sigma_state", TORCH, _bound("lowrank_torch.optim_state.dense_to_sigma_state", _ctx_dense),
             [arr("U", U3, ndims=(2,), stack=False), arr("V", V3, ndims=(2,), stack=False),
              kw("groups", "int", 1, min=1)], libs=T, inplace=True,
             extra=_object_variants("lowrank_torch.optim_state.dense_to_sigma_state", _ctx_dense,
                                    lambda: ([to_lib(U3, "torch"), to_lib(V3, "torch")], {}))),
        Spec("swap_parameter", TORCH, _bound("lowrank_torch.optim_state.swap_parameter", _ctx_swap), [], libs=T,
             inplace=True,
             extra=_object_variants("lowrank_torch.optim_state.swap_parameter", _ctx_swap, lambda: ([], {}))),
        Spec("OIALR", TORCH, _bound("lowrank_torch.oialr.OIALR", _ctx_oialr), [
                 pos("config", "object", None, bad=[("int", 3), ("junk", Junk()), ("dict", {})])],
             libs=T, extra=_object_variants("lowrank_torch.oialr.OIALR", _ctx_oialr, lambda: ([], {}))),
        Spec("dldr.flatten", TORCH, _bound("lowrank_torch.dldr.flatten", _ctx_flatten), [], libs=T,
             extra=_object_variants("lowrank_torch.dldr.flatten", _ctx_flatten, lambda: ([], {}),
                                    extra_bad={"tensors": [("empty", []), ("arrays", [np.ones(3)])]})),
        Spec("checkpoint.save_checkpoint", TORCH,
             _bound("lowrank_torch.checkpoint.save_checkpoint", _ctx_save, keyword=("model",)), [],
             libs=T,
             extra=_object_variants("lowrank_torch.checkpoint.save_checkpoint", _ctx_save,
                                    lambda: ([], {}), keyword=("model",),
                                    extra_bad={"path": [("dir", _CKPT_DIR)]})),
        Spec("checkpoint.load_checkpoint", TORCH,
             _bound("lowrank_torch.checkpoint.load_checkpoint", _ctx_load, keyword=("model",)), [],
             libs=T,
             extra=_object_variants("lowrank_torch.checkpoint.load_checkpoint", _ctx_load,
                                    lambda: ([], {}), keyword=("model",),
                                    extra_bad={"path": [("dir", _CKPT_DIR),
                                                        ("missing", "/nonexistent/ckpt.pt")]})),
    ]  # fmt: skip
