"""Run the benchmark modules ``benchmarks/bench_*.py``, print their tables, save JSON results.

    python benchmarks/run.py                 # every module
    python benchmarks/run.py --quick         # tiny sizes, a smoke run
    python benchmarks/run.py core            # only bench_core.py (names or globs, e.g. 'c*')
    python benchmarks/run.py --list          # what there is

Each module ``bench_<name>.py`` defines ``DESCRIPTION`` and ``run(config) -> Report`` (see
``_common.py``); its results go to ``benchmarks/results/<name>.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script or as `python -m benchmarks.run`
    sys.path.insert(0, str(HERE))
if importlib.util.find_spec("lowrank_core") is None:
    # Not installed (e.g. a GPU machine without network): use the source tree, as `nox -s gpu` does.
    sys.path += [str(HERE.parent / d) for d in (".", "backends", "reference")]

from _common import Config, Report  # noqa: E402


def discover() -> dict[str, Path]:
    """Benchmark modules by short name (``bench_core.py`` -> ``core``), sorted."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def select(available: dict[str, Path], patterns: list[str]) -> list[str]:
    if not patterns:
        return list(available)
    chosen: list[str] = []
    for pattern in patterns:
        matches = [name for name in available if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise SystemExit(
                f"run.py: no benchmark matches {pattern!r}; available: {', '.join(available)}"
            )
        chosen += [name for name in matches if name not in chosen]
    return chosen


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all); globs allowed")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats")
    parser.add_argument("--repeat", type=int, help="timed runs per case (median is reported)")
    parser.add_argument("--warmup", type=int, help="untimed runs per case before timing")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=HERE / "results",
        help="where <name>.json goes (default: benchmarks/results)",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write JSON results")
    args = parser.parse_args(argv)

    available = discover()
    if args.list:
        for name, path in available.items():
            module = importlib.import_module(path.stem)
            print(f"{name:16} {getattr(module, 'DESCRIPTION', '')}")
        return 0

    config = Config(quick=args.quick, repeat=args.repeat, warmup=args.warmup)
    failed: list[str] = []
    for name in select(available, args.names):
        print(f"\n### benchmark {name} ({available[name].name})\n", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(available[name].stem)
            report: Report = module.run(config)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        elapsed = time.perf_counter() - start
        for table in report.tables:
            print(table.render(), end="\n\n")
        print(f"({name}: {elapsed:.1f} s)", flush=True)
        if not args.no_save:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            out = args.output_dir / f"{name}.json"
            payload = {
                "benchmark": name,
                "config": dataclasses.asdict(config),
                "environment": environment(),
                "elapsed_s": elapsed,
                **report.data,
            }
            out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {out}")
    if failed:
        print(f"\nrun.py: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
