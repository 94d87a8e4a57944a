"""The input sweep: ``python -m fuzz.sweep`` (or ``nox -s fuzz``).

Every public callable of ``lowrank_core`` (with ``cmd``, ``dldr``, ``init``) and ``lowrank_torch``
is called, on every library of the test matrix (NumPy, array_api_strict, PyTorch, JAX), with bad
inputs and with valid variants derived from its argument kinds (see ``fuzz/framework.py`` and
``fuzz/specs.py``). Each outcome is one of

- ``clear``: a bad input got a ``LowRankError`` subclass (the goal);
- ``generic``: any other exception, for a bad or a valid input;
- ``wrong``: a valid variant returned a value that differs from the float64 oracle
  (``lowrank_reference``, else the core on float64 NumPy) by more than the dtype-aware tolerance,
  or NaN / Inf where the oracle has none;
- ``accepted``: a bad-looking input that the spec documents as valid returned a value;
- ``silent``: any other bad input returned (it was accepted without a word);
- ``rejected``: a valid variant raised a ``LowRankError``;
- ``crash``: the worker process died (SIGSEGV, SIGBUS, ...) or hung past the time limit;
- ``ok``: a valid variant returned the right value;

and every input (arrays of each library, module and optimizer state) is compared before and after the
call: ``mutated`` counts calls that changed an input. Calls run in a worker subprocess that reports one
line per case; when it dies, the case it was running is recorded as a crash and a new worker continues
after it. The table is printed per function and per backend. Exit status 0 only when there is no
generic exception, wrong value, silent acceptance, rejected valid input, crash or mutation.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------------
def _snapshot(obj: Any, out: list[tuple[Any, Any]], seen: set[int], depth: int = 0) -> None:
    import numpy as np

    if depth > 4 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        out.append((obj, np.array(obj, copy=True)))
        return
    mod = type(obj).__module__.split(".")[0]
    if mod == "array_api_strict" and hasattr(obj, "__array_namespace__"):
        from fuzz.framework import host

        out.append((obj, host(obj)))
        return
    if mod == "torch":
        import torch

        if isinstance(obj, torch.Tensor):
            if not obj.is_meta:
                out.append((obj, obj.detach().clone()))
            return
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.state_dict().values()):
                _snapshot(t, out, seen, depth + 1)
            return
        if isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                for p in group["params"]:
                    _snapshot(p, out, seen, depth + 1)
            for st in obj.state.values():
                for v in st.values():
                    _snapshot(v, out, seen, depth + 1)
            return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _snapshot(v, out, seen, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            _snapshot(v, out, seen, depth + 1)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            _snapshot(getattr(obj, name, None), out, seen, depth + 1)


def _changed(pairs: list[tuple[Any, Any]]) -> bool:
    import numpy as np

    from fuzz.framework import host

    for live, saved in pairs:
        if isinstance(saved, np.ndarray) and not isinstance(live, np.ndarray):  # array_api_strict
            now = host(live)
            if now is None or now.shape != saved.shape or now.dtype != saved.dtype:
                return True
            if not np.array_equal(now, saved, equal_nan=now.dtype.kind in "fc"):
                return True
            continue
        if isinstance(live, np.ndarray):
            if live.shape != saved.shape or live.dtype != saved.dtype:
                return True
            if not np.array_equal(live, saved, equal_nan=live.dtype.kind in "fc"):
                return True
        else:
            import torch

            if live.shape != saved.shape or live.dtype != saved.dtype:
                return True
            if live.is_complex() or live.is_floating_point():
                same = torch.equal(torch.nan_to_num(live.detach()), torch.nan_to_num(saved)) and (
                    torch.equal(torch.isnan(live.detach()), torch.isnan(saved))
                )
            else:
                same = torch.equal(live.detach(), saved)
            if not same:
                return True
    return False


def _has_nan(result: Any) -> bool:
    import numpy as np

    try:
        if isinstance(result, np.ndarray | np.floating):
            return bool(np.isnan(result).any()) if np.asarray(result).dtype.kind in "fc" else False
        if isinstance(result, float):
            return result != result
        if type(result).__module__.split(".")[0] == "torch":
            import torch

            if isinstance(result, torch.Tensor) and result.is_floating_point():
                return bool(torch.isnan(result).any())
        if isinstance(result, tuple | list):
            return any(_has_nan(v) for v in result)
    except Exception:
        return False
    return False


def run_worker(start: int, stop: int, only: str | None, libs: tuple[str, ...] | None) -> None:
    import warnings

    warnings.simplefilter("ignore")
    sys.path[:0] = [ROOT, os.path.join(ROOT, "backends"), os.path.join(ROOT, "reference")]
    from fuzz.specs import all_cases
    from lowrank_core.errors import LowRankError

    cases = all_cases(only, libs)
    out = sys.stdout
    for index in range(start, min(stop, len(cases))):
        c = cases[index]
        out.write(json.dumps({"start": index}) + "\n")
        out.flush()
        record: dict[str, Any] = {"i": index}
        try:
            fn, args, kwargs = c.build()
        except Exception as exc:
            record.update(outcome="build-error", exc=type(exc).__name__, msg=str(exc)[:200])
            out.write(json.dumps(record) + "\n")
            out.flush()
            continue
        pairs: list[tuple[Any, Any]] = []
        _snapshot((args, kwargs, getattr(fn, "__self__", None)), pairs, set())
        try:
            result = fn(*args, **kwargs)
            record["outcome"] = "returned"
            record["nan"] = _has_nan(result)
            record["msg"] = repr(result)[:120]
            if c.valid and c.check is not None:
                try:
                    wrong = c.check(result)
                except Exception as exc:  # the comparison itself failed: report it as wrong
                    wrong = f"cannot compare: {type(exc).__name__}: {exc}"
                if wrong:
                    record["wrong"] = wrong[:200]
        except LowRankError as exc:
            record.update(outcome="clear", exc=type(exc).__name__, msg=str(exc)[:200])
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{os.path.relpath(tb[-1].filename, ROOT)}:{tb[-1].lineno}" if tb else "?"
            record.update(
                outcome="generic", exc=type(exc).__name__, msg=str(exc)[:200], where=where
            )
        try:
            record["mutated"] = _changed(pairs)
        except Exception as exc:  # comparing must not break the sweep
            record["mutated"] = False
            record["compare_error"] = repr(exc)[:100]
        out.write(json.dumps(record) + "\n")
        out.flush()


# --------------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------------
def _spawn(
    start: int, stop: int, only: str | None, libs: tuple[str, ...] | None
) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "fuzz.sweep", "--worker", str(start), str(stop)]
    if only:
        cmd += ["--only", only]
    if libs:
        cmd += ["--lib", ",".join(libs)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "backends"), os.path.join(ROOT, "reference")]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def run_all(only: str | None, libs: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    sys.path[:0] = [ROOT, os.path.join(ROOT, "backends"), os.path.join(ROOT, "reference")]
    from fuzz.specs import all_cases

    cases = all_cases(only, libs)
    results: dict[int, dict[str, Any]] = {}
    nxt = 0
    while nxt < len(cases):
        proc = _spawn(nxt, len(cases), only, libs)
        assert proc.stdout is not None
        current: int | None = None
        deadline = time.monotonic() + CASE_TIMEOUT_S
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "start" in msg:
                    current = msg["start"]
                    deadline = time.monotonic() + CASE_TIMEOUT_S
                else:
                    results[msg["i"]] = msg
                    current = None
                    nxt = msg["i"] + 1
            elif time.monotonic() > deadline:
                proc.kill()
                if current is not None:
                    results[current] = {"i": current, "outcome": "crash", "msg": "timeout"}
                    nxt = current + 1
                    current = None
                break
        rc = proc.wait()
        if current is not None:
            results[current] = {"i": current, "outcome": "crash", "msg": f"worker exit {rc}"}
            nxt = current + 1
        elif rc != 0 and nxt < len(cases) and nxt not in results:
            results[nxt] = {"i": nxt, "outcome": "crash", "msg": f"worker exit {rc} at start"}
            nxt += 1
        if nxt >= len(cases) or (rc == 0 and current is None and nxt >= len(cases)):
            break
    rows = []
    for i, c in enumerate(cases):
        r = results.get(i, {"outcome": "crash", "msg": "not run"})
        rows.append(
            {
                "spec": c.spec,
                "owner": c.owner,
                "label": c.label,
                "lib": c.lib,
                "valid": c.valid,
                "accepted_why": c.accepted,
                **r,
                "mutated": bool(r.get("mutated")) and not (c.valid and c.inplace),
            }
        )
    return rows


COLUMNS = ("clear", "generic", "wrong", "accepted", "silent", "rejected", "crash", "mutated", "ok")
FAILING = ("generic", "wrong", "silent", "rejected", "crash", "mutated")


def verdict(row: dict[str, Any]) -> str:
    """The category of a row (see the module docstring); ``mutated`` is counted beside it."""
    o = row["outcome"]
    if o in ("crash", "generic"):
        return str(o)
    if row["valid"]:
        if o == "returned":
            return "wrong" if row.get("wrong") else "ok"
        return "rejected"  # a LowRankError (or the case could not be built)
    if o == "returned":
        return "accepted" if row.get("accepted_why") else "silent"
    return "silent" if o == "build-error" else str(o)


def _table(
    title: str, keys: list[str], counts: dict[str, Counter[str]], extra: dict[str, str], out: Any
) -> Counter[str]:
    width = max([len(k) for k in keys] + [len(title), 5]) + 2
    xw = max([len(v) for v in extra.values()] + [0]) + 2 if extra else 0
    head = f"{title:<{width}}" + (f"{'owner':<{xw}}" if extra else "")
    print(head + "".join(f"{c:>10}" for c in COLUMNS), file=out)
    total: Counter[str] = Counter()
    for k in keys:
        cnt = counts[k]
        total.update(cnt)
        owner = f"{extra.get(k, ''):<{xw}}" if extra else ""
        print(f"{k:<{width}}{owner}" + "".join(f"{cnt[c]:>10}" for c in COLUMNS), file=out)
    pad = f"{'':<{xw}}" if extra else ""
    print(f"{'TOTAL':<{width}}{pad}" + "".join(f"{total[c]:>10}" for c in COLUMNS), file=out)
    return total


def report(rows: list[dict[str, Any]], out: Any = sys.stdout) -> int:
    per: dict[str, Counter[str]] = defaultdict(Counter)
    per_lib: dict[str, Counter[str]] = defaultdict(Counter)
    owners: dict[str, str] = {}
    for r in rows:
        v = verdict(r)
        for key, table in ((r["spec"], per), (r["lib"], per_lib)):
            table[key][v] += 1
            table[key]["mutated"] += bool(r.get("mutated"))
        owners[r["spec"]] = r["owner"]
    names = sorted(per, key=lambda n: (owners[n], n))
    total = _table("function", names, per, owners, out)
    print("", file=out)
    libs = [lib for lib in ("numpy", "array_api_strict", "torch", "jax") if lib in per_lib]
    _table("backend", libs + sorted(set(per_lib) - set(libs)), per_lib, {}, out)
    bad = sum(total[c] for c in ("clear", "generic", "accepted", "silent", "crash"))
    print(
        f"\n{len(rows)} cases; failing categories: "
        + ", ".join(f"{c} {total[c]}" for c in FAILING)
        + f"; clear errors {total['clear']}, documented acceptances {total['accepted']}, "
        f"right values {total['ok']} ({bad} bad-input cases)",
        file=out,
    )
    return 0 if sum(total[c] for c in FAILING) == 0 else 1


def failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if verdict(r) in FAILING or r.get("mutated")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, type=int, metavar=("START", "STOP"), help=argparse.SUPPRESS)
    p.add_argument("--only", help="only specs whose name contains this string")
    p.add_argument(
        "--lib",
        help="comma list of libraries to sweep (numpy, array_api_strict, torch, jax; default all)",
    )
    p.add_argument("--json", help="write every row to this JSON file")
    p.add_argument("--failures", action="store_true", help="list every failing case")
    p.add_argument(
        "--selftest",
        action="store_true",
        help="sweep functions of known outcome (checks the harness)",
    )
    a = p.parse_args(argv)
    if a.selftest:
        os.environ["FUZZ_SELFTEST"] = "1"
    libs = tuple(x.strip() for x in a.lib.split(",") if x.strip()) if a.lib else None
    if a.worker:
        run_worker(a.worker[0], a.worker[1], a.only, libs)
        return 0
    t0 = time.monotonic()
    rows = run_all(a.only, libs)
    rc = report(rows)
    if a.failures:
        print("\nfailing cases:")
        for r in failures(rows):
            extra = " MUTATED" if r.get("mutated") else ""
            print(
                f"  [{r['owner']}] {r['spec']}({r['label']}) [{r['lib']}]: {verdict(r)}{extra} "
                f"{r.get('exc', '')} {r.get('where', '')} "
                f"{(r.get('wrong') or r.get('msg', ''))[:160]!r}"
            )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    from fuzz.specs import NOT_FUZZED_KINDS, uncovered_names

    gaps = [] if a.selftest or a.only else uncovered_names()
    more = f"; no spec yet: {', '.join(gaps)}" if gaps else ""
    print(f"\nnot fuzzed: {NOT_FUZZED_KINDS}{more}")
    print(f"\n{len(rows)} cases in {time.monotonic() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
