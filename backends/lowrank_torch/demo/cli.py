"""``python -m lowrank_torch.demo`` / ``lowrank-compare``: every model x every method on MNIST-1D, one table.

Each (model, method) pair trains from the same initialization, on the same data, with the same shuffles
and hyper-parameters (the model's entry in :data:`~lowrank_torch.demo.train.DEFAULT_SETTINGS`, or the
command line's overrides); only the method differs. A method's options are its defaults, except where
:data:`~lowrank_torch.demo.train.DEFAULT_METHOD_OPTIONS` sets them for a model (printed above the table).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import torch

from .data import DEFAULT_NUM_SAMPLES, load_mnist1d
from .methods import Method, MethodUnavailable, make_method, method_names
from .models import MODELS, build_model
from .train import DEFAULT_METHOD_OPTIONS, DEFAULT_SETTINGS, RunResult, TrainSettings, train

__all__ = ["QUICK", "format_table", "main", "parse_args", "run"]

# --quick: a smoke test of the whole pipeline in seconds (accuracies are meaningless).
QUICK = {"num_samples": 1000, "epochs": 2}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _prog() -> str:
    """The name the user typed: ``lowrank-compare`` for the console script, else the module form."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return (
        "lowrank-compare" if name.startswith("lowrank-compare") else "python -m lowrank_torch.demo"
    )


# One CPU thread by default: these models are small, and torch's default (one thread per core, with
# OpenMP spin-waiting) collapses on a shared machine: the MLP's dense run took 514 s with two threads
# beside other busy processes and 89 s with one (it is as fast alone on an idle machine).
DEFAULT_THREADS = 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="Train small models on MNIST-1D (generated locally) with several training methods "
        "(dense, OIALR, ...) and print test accuracy, trainable share and wall time.",
    )
    p.add_argument(
        "--models",
        type=_csv,
        default=list(MODELS),
        help=f"comma list of models (default: {','.join(MODELS)})",
    )
    p.add_argument(
        "--methods",
        type=_csv,
        default=method_names(),
        help=f"comma list of methods (default: all of {','.join(method_names())})",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs for every model (default: tuned per model)"
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate for every model")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every model")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the data, the weights and the shuffles"
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help=f"MNIST-1D samples, 80%% train / 20%% test (default: {DEFAULT_NUM_SAMPLES})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"torch CPU threads (default: {DEFAULT_THREADS}; more threads help only on an idle "
        "machine with free cores, and then little for these small models)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK['num_samples']} samples, {QUICK['epochs']} epochs",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results here"
    )
    args = p.parse_args(argv)
    for name in args.models:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in args.methods:
        if name not in method_names():
            p.error(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    if not args.models or not args.methods:
        p.error("--models and --methods need at least one name each")
    for flag in ("epochs", "batch_size", "num_samples", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return args


def _settings(model: str, args: argparse.Namespace) -> TrainSettings:
    s = DEFAULT_SETTINGS[model]
    if args.quick:
        s = replace(s, epochs=QUICK["epochs"])
    if args.epochs is not None:
        s = replace(s, epochs=args.epochs)
    if args.lr is not None:
        s = replace(s, lr=args.lr)
    if args.batch_size is not None:
        s = replace(s, batch_size=args.batch_size)
    return s


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The result table as plain text, one row per (model, method)."""
    header = ["model", "method", "test acc %", "trainable params", "trainable %", "wall time s"]
    body = [
        [
            str(r["model"]),
            str(r["method"]),
            f"{100.0 * r['test_accuracy']:.2f}",
            f"{r['trainable_params']:,} / {r['dense_params']:,}",
            f"{100.0 * r['trainable_share']:.1f}",
            f"{r['wall_time_s']:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    left = {0, 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body)])


def run(args: argparse.Namespace, out: TextIO | None = None) -> dict[str, Any]:
    """Train every requested (model, method) pair; print settings and the table to ``out`` (stdout)."""
    out = sys.stdout if out is None else out
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    num_samples = args.num_samples or (QUICK["num_samples"] if args.quick else DEFAULT_NUM_SAMPLES)
    # Build every method once up front, so a missing implementation fails before any training.
    for name in args.methods:
        make_method(name)
    data = load_mnist1d(seed=args.seed, num_samples=num_samples)
    settings = {m: _settings(m, args) for m in args.models}

    print(
        f"MNIST-1D: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test signals of length "
        f"{data.length}, seed {args.seed}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"CPU thread(s), Python {platform.python_version()}",
        file=out,
    )
    for m, s in settings.items():
        print(
            f"  {m}: {s.epochs} epochs, batch {s.batch_size}, {s.optimizer} lr {s.lr:g} "
            f"wd {s.weight_decay:g}, {s.schedule} schedule",
            file=out,
        )
    for (m, name), options in DEFAULT_METHOD_OPTIONS.items():
        if m in settings and name in args.methods:
            shown = ", ".join(f"{k}={v}" for k, v in options.items())
            print(f"  {m}/{name}: {shown}", file=out)
    out.flush()

    rows: list[dict[str, Any]] = []
    for model_name in args.models:
        s = settings[model_name]
        for method_name in args.methods:
            options = DEFAULT_METHOD_OPTIONS.get((model_name, method_name), {})
            method: Method = make_method(method_name, **options)
            model = build_model(model_name, seed=args.seed)
            result: RunResult = train(
                model,
                data,
                method=method,
                seed=args.seed,
                progress=not args.no_progress,
                desc=f"{model_name}/{method_name}",
                **s.as_kwargs(),
            )
            rows.append(
                {"model": model_name, "method": method_name, "method_repr": repr(method)}
                | result.as_dict()
            )
            if not args.no_progress:
                print(
                    f"  done {model_name}/{method_name}: test acc {100 * result.test_accuracy:.2f}%, "
                    f"{result.wall_time_s:.1f} s",
                    file=sys.stderr,
                )

    print("", file=out)
    print(format_table(rows), file=out)
    report = {
        "dataset": {
            "name": "mnist1d",
            "seed": args.seed,
            "num_samples": num_samples,
            "train": int(data.x_train.shape[0]),
            "test": int(data.x_test.shape[0]),
        },
        "settings": {m: s.as_kwargs() for m, s in settings.items()},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "results": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {args.json}", file=out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lowrank_torch.demo`` and ``lowrank-compare``."""
    args = parse_args(argv)
    try:
        run(args)
    except (ImportError, MethodUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
