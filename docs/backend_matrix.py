"""Generate the documentation's per-function backend table from the test matrix (``nox -s docs``).

    python docs/backend_matrix.py [--out docs/generated/backend_matrix.md]

Two sources, both read from the test suite itself, nothing written by hand:

1. which tests exercise which public function: every test function of ``tests/`` is parsed (``ast``) and
   the ``lowrank_core`` names it references are resolved to objects, directly or through the module-level
   tables, helper functions and ``parametrize`` decorators of its module;
2. which backends each test runs on: ``pytest --collect-only`` with every backend the suite knows
   (``tests/conftest.py``'s ``ALL_BACKENDS``) selected, read from the collected test ids. A test without
   the ``backend`` fixture runs on NumPy; ``tests/torch_integration`` runs on PyTorch (CPU).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SUBMODULES = ("cmd", "dldr", "init")  # public names of these are listed besides the top level


def _all_backends() -> list[str]:
    text = (TESTS / "conftest.py").read_text(encoding="utf-8")
    match = re.search(r"^ALL_BACKENDS\s*=\s*\(([^)]*)\)", text, re.M)
    if not match:
        raise SystemExit("tests/conftest.py has no ALL_BACKENDS tuple")
    return re.findall(r'"([^"]+)"', match.group(1))


def _rows() -> dict[int, str]:
    """id(object) -> display name, for every public function/class of lowrank_core (and submodules)."""
    lc = importlib.import_module("lowrank_core")
    rows: dict[int, str] = {}
    skip = {"errors", "cmd", "dldr", "init", "__version__"}
    for name in lc.__all__:
        obj = getattr(lc, name)
        if (
            name in skip
            or not callable(obj)
            or (isinstance(obj, type) and issubclass(obj, Exception))
        ):
            continue
        rows.setdefault(id(obj), f"lowrank_core.{name}")
    for sub in SUBMODULES:
        mod = importlib.import_module(f"lowrank_core.{sub}")
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if not callable(obj) or (isinstance(obj, type) and issubclass(obj, Exception)):
                continue
            rows.setdefault(id(obj), f"lowrank_core.{sub}.{name}")
    return rows


class _Refs(ast.NodeVisitor):
    """Fully qualified lowrank_core names referenced in a node, and the plain names it loads."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases
        self.qualified: set[str] = set()
        self.names: set[str] = set()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts: list[str] = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in self.aliases:
            base = self.aliases[cur.id]
            chain = [base, *reversed(parts)]
            for k in range(2, len(chain) + 1):
                self.qualified.add(".".join(chain[:k]))
            return
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in self.aliases:
            self.qualified.add(self.aliases[node.id])
        self.names.add(node.id)


def _module_tests(path: Path) -> dict[str, set[str]]:
    """test function name -> fully qualified lowrank_core names it uses (transitively in the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lowrank_core"):
                    aliases[a.asname or a.name.split(".")[0]] = (
                        a.name if a.asname else "lowrank_core"
                    )
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowrank_core"):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    # what every module-level name (table, helper function, constant) uses
    defs: dict[str, _Refs] = {}
    tests: list[str] = []
    for node in tree.body:
        targets: list[str] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            targets = [node.name]
            if node.name.startswith("test_"):
                tests.append(node.name)
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        if targets:
            refs = _Refs(aliases)
            refs.visit(node)
            for t in targets:
                defs[t] = refs
    resolved: dict[str, set[str]] = {}

    def closure(name: str, seen: set[str]) -> set[str]:
        if name in resolved:
            return resolved[name]
        out = set(defs[name].qualified)
        for other in defs[name].names:
            if other in defs and other not in seen and other != name:
                out |= closure(other, seen | {name})
        return out

    for name in defs:
        resolved[name] = closure(name, set())
    return {t: resolved[t] for t in tests}


def _collected(backends: list[str]) -> dict[tuple[str, str], set[str]]:
    """(file, test function) -> backends it is collected for."""
    env = dict(os.environ, LOWRANK_TEST_BACKENDS=",".join(backends))
    paths = os.pathsep.join([str(ROOT), str(ROOT / "backends"), str(ROOT / "reference")])
    env["PYTHONPATH"] = paths + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"pytest --collect-only failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for line in proc.stdout.splitlines():
        if "::" not in line:
            continue
        file, _, rest = line.partition("::")
        func, _, params = rest.partition("[")
        ids = set(params.rstrip("]").split("-")) if params else set()
        hit = [b for b in backends if b in ids]
        if "torch_integration" in file:
            hit = ["torch"]
        elif not hit:
            hit = ["numpy"]
        found[(file, func)].update(hit)
    return found


def build_table() -> str:
    backends = _all_backends()
    rows = _rows()
    collected = _collected(backends)
    counts: dict[str, dict[str, int]] = {name: defaultdict(int) for name in rows.values()}
    for path in sorted(TESTS.rglob("test_*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for test, names in _module_tests(path).items():
            hits = collected.get((rel, test), set())
            objs: set[int] = set()
            for qual in names:
                obj: Any = _resolve(qual)
                if obj is not None and id(obj) in rows:
                    objs.add(id(obj))
            for oid in objs:
                for b in hits:
                    counts[rows[oid]][b] += 1
    gpu = {"torch_cuda", "cupy"}
    head = ["function", *[f"{b} (GPU session)" if b in gpu else b for b in backends]]
    lines = [
        "# Backend test matrix",
        "",
        "Generated by `docs/backend_matrix.py` from the test suite at build time: for each public",
        "function or class, the number of test functions that reference it by name and run on each",
        "backend (a test function runs over several dtypes and Hypothesis examples; methods called on",
        "a returned object count for the function that made it). GPU columns count the tests that the",
        "`gpu` session runs where a CUDA device is present. A blank cell: no such test.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name in sorted(counts):
        cells = [str(counts[name][b]) if counts[name][b] else "" for b in backends]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    untested = [n for n in sorted(counts) if not any(counts[n].values())]
    lines += ["", f"{len(counts)} public names; not referenced by any test: {len(untested)}"]
    if untested:
        lines.append("(" + ", ".join(f"`{n}`" for n in untested) + ")")
    return "\n".join(lines) + "\n"


def _resolve(qualified: str) -> Any:
    parts = qualified.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        try:
            for attr in parts[k:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "generated" / "backend_matrix.md")
    args = p.parse_args()
    table = build_table()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    print(f"wrote {args.out} ({table.count(chr(10))} lines)")


if __name__ == "__main__":
    main()
