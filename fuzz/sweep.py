"""The bad-input sweep: ``python -m fuzz.sweep`` (or ``nox -s fuzz``).

Every public callable of ``lowrank_core`` (with ``cmd``, ``dldr``, ``init``) and ``lowrank_torch``
is called with bad inputs derived from its argument kinds (see ``fuzz/specs.py``). Each outcome is

- ``clear``: a ``LowRankError`` subclass was raised (the goal);
- ``generic``: any other exception;
- ``silent``: the call returned (an invalid input was accepted, NaN results included);
- ``crash``: the worker process died (SIGSEGV, SIGBUS, ...) or hung past the time limit;

and every input array (and module/optimizer state) is compared before and after the call:
``mutated`` counts calls that changed an input. Valid variants (the plain call, non-contiguous
views, NumPy scalars, inputs scaled by 1e160 and 1e-160) must succeed: ``rejected`` counts those
that raised, ``nan-output`` those that returned NaN.

Calls run in a worker subprocess that reports one line per case; when it dies, the case it was
running is recorded as a crash and a new worker continues after it. Exit status 0 only when every
bad input got a clear error, no valid variant failed, and nothing was mutated.
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
    if mod == "torch":
        import torch

        if isinstance(obj, torch.Tensor):
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

    for live, saved in pairs:
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


def run_worker(start: int, stop: int, only: str | None) -> None:
    import warnings

    warnings.simplefilter("ignore")
    sys.path[:0] = [ROOT, os.path.join(ROOT, "backends"), os.path.join(ROOT, "reference")]
    from fuzz.specs import all_cases
    from lowrank_core.errors import LowRankError

    cases = all_cases(only)
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
            record["outcome"] = "silent"
            record["nan"] = _has_nan(result)
            record["msg"] = repr(result)[:120]
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
def _spawn(start: int, stop: int, only: str | None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "fuzz.sweep", "--worker", str(start), str(stop)]
    if only:
        cmd += ["--only", only]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "backends"), os.path.join(ROOT, "reference")]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def run_all(only: str | None) -> list[dict[str, Any]]:
    sys.path[:0] = [ROOT, os.path.join(ROOT, "backends"), os.path.join(ROOT, "reference")]
    from fuzz.specs import all_cases

    cases = all_cases(only)
    results: dict[int, dict[str, Any]] = {}
    nxt = 0
    while nxt < len(cases):
        proc = _spawn(nxt, len(cases), only)
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
                **r,
                "mutated": bool(r.get("mutated")) and not (c.valid and c.inplace),
            }
        )
    return rows


def verdict(row: dict[str, Any]) -> str:
    """The category of a row: for bad inputs clear/generic/silent/crash; for valid ones ok/rejected."""
    o = row["outcome"]
    if row["valid"]:
        if o == "silent":
            return "nan-output" if row.get("nan") else "ok"
        return "crash" if o == "crash" else "rejected"
    return "silent" if o == "build-error" else o


def report(rows: list[dict[str, Any]], out: Any = sys.stdout) -> int:
    per: dict[str, Counter[str]] = defaultdict(Counter)
    owners: dict[str, str] = {}
    for r in rows:
        v = verdict(r)
        per[r["spec"]][v] += 1
        per[r["spec"]]["mutated"] += bool(r.get("mutated"))
        owners[r["spec"]] = r["owner"]
    cols = ["clear", "generic", "silent", "crash", "mutated", "ok", "rejected", "nan-output"]
    width = max(len(s) for s in per) + 2
    print(f"{'function':<{width}}{'owner':<34}" + "".join(f"{c:>11}" for c in cols), file=out)
    total: Counter[str] = Counter()
    for name in sorted(per, key=lambda n: (owners[n], n)):
        cnt = per[name]
        total.update(cnt)
        print(
            f"{name:<{width}}{owners[name]:<34}" + "".join(f"{cnt[c]:>11}" for c in cols), file=out
        )
    print(f"{'TOTAL':<{width}}{'':<34}" + "".join(f"{total[c]:>11}" for c in cols), file=out)
    bad = sum(total[c] for c in ("clear", "generic", "silent", "crash"))
    share = 100.0 * total["clear"] / bad if bad else 100.0
    print(
        f"\nbad inputs: {bad}, clear library errors: {total['clear']} ({share:.1f}%), generic "
        f"{total['generic']}, silent {total['silent']}, crash {total['crash']}; mutated inputs "
        f"{total['mutated']}; valid variants: {total['ok']} ok, {total['rejected']} rejected, "
        f"{total['nan-output']} with NaN output",
        file=out,
    )
    failed = sum(
        total[c] for c in ("generic", "silent", "crash", "mutated", "rejected", "nan-output")
    )
    return 0 if failed == 0 else 1


def failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if verdict(r) in ("generic", "silent", "crash", "rejected", "nan-output")
        or r.get("mutated")
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, type=int, metavar=("START", "STOP"), help=argparse.SUPPRESS)
    p.add_argument("--only", help="only specs whose name contains this string")
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
    if a.worker:
        run_worker(a.worker[0], a.worker[1], a.only)
        return 0
    t0 = time.monotonic()
    rows = run_all(a.only)
    rc = report(rows)
    if a.failures:
        print("\nfailing cases:")
        for r in failures(rows):
            extra = " MUTATED" if r.get("mutated") else ""
            print(
                f"  [{r['owner']}] {r['spec']}({r['label']}) [{r['lib']}]: {verdict(r)}{extra} "
                f"{r.get('exc', '')} {r.get('where', '')} {r.get('msg', '')[:140]!r}"
            )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    from fuzz.specs import NOT_FUZZED_KINDS, uncovered_names

    gaps = [] if a.selftest else uncovered_names()
    more = f"; no spec yet: {', '.join(gaps)}" if gaps else ""
    print(f"\nnot fuzzed: {NOT_FUZZED_KINDS}{more}")
    print(f"\n{len(rows)} cases in {time.monotonic() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
