"""Every check lowrank-core has, one nox session each.

    nox                       # lint, typecheck, tests (every CPU backend), docs
    nox -s tests              # the four CPU backends: numpy, array_api_strict, torch, jax
    nox -s "tests(torch)"     # a single backend; arguments after -- go to pytest
    nox -s gpu                # torch CUDA + CuPy, with the current interpreter (no installs)
    nox -s demo               # the main job: MNIST-1D, dense vs OIALR, result table
    nox -s bench -- --quick   # benchmarks/run.py
    nox -s fuzz               # input sweep (4 backends) + property suite with random seeds (not in CI)
    nox -s docs               # the documentation site, strict (figures, backend matrix, API)
    nox -s package            # sdist + wheel, twine check, installed-wheel quick starts

Every session that installs torch passes ``-c constraints/cpu.txt``: an unpinned torch would pull
the multi-GB CUDA build. The constraints file is passed to every install, so no session can drift.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"  # nox.project.dependency_groups
nox.options.default_venv_backend = "virtualenv"  # seeds pip itself; needs no ensurepip
nox.options.sessions = ["lint", "typecheck", "tests", "docs"]

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
CONSTRAINTS = ("-c", str(ROOT / "constraints" / "cpu.txt"))

# The array libraries the CPU test matrix covers; the value goes into LOWRANK_TEST_BACKENDS.
CPU_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")
# The GPU backends, in the order the gpu session passes them.
GPU_BACKENDS = ("torch_cuda", "cupy")


def group(*names: str) -> tuple[str, ...]:
    """The requirements of the given ``[dependency-groups]`` of pyproject.toml."""
    return nox.project.dependency_groups(PYPROJECT, *names)


def install(session: nox.Session, *args: str) -> None:
    """``pip install`` under the CPU constraints (pins torch to the CPU build)."""
    session.install(*CONSTRAINTS, *args)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    install(session, *group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the packages listed in [tool.mypy] of pyproject.toml.

    torch (CPU, pinned) and JAX (CPU wheels) are installed so that the integrations are checked against
    their frameworks' own type hints, exactly as on a developer's machine; without them every torch or
    jax type would be Any (and the ignores written for the real types would be unused)."""
    install(session, "-e", ".[torch,jax]", *group("typecheck"))
    session.run("mypy", *session.posargs)


# JAX compiles every new array shape, which makes one Hypothesis example ~10x dearer than on NumPy:
# tests(jax) runs the whole suite with the ``ci-jax`` profile (derandomized, a tenth of the examples)
# on two pytest-xdist workers. ``nox -s "tests(jax)" -- --hypothesis-profile=ci tests`` runs CI's count.
JAX_ENV = {"HYPOTHESIS_PROFILE": "ci-jax"}
JAX_ARGS = ("-n", "2", "tests")


@nox.session
@nox.parametrize("backend", [nox.param(name, id=name) for name in CPU_BACKENDS])
def tests(session: nox.Session, backend: str) -> None:
    """pytest over one array library (LOWRANK_TEST_BACKENDS=<backend>)."""
    # jax: the CPU wheels (jax + jaxlib from PyPI are CPU-only; CUDA would need jax[cuda12]) and
    # optax / flax for the JAX integration tests (tests/jax_integration)
    extra = {"torch": "[torch]", "jax": "[jax]"}.get(backend, "")
    # the torch session also gets the model packages of the model-zoo tests (torchvision, timm,
    # transformers), which fail loudly there when they cannot be imported
    models = group("models", "integrations") if backend == "torch" else ()
    install(session, "-e", f".{extra}", *group("test"), *models)
    # The test suite skips a backend it cannot import; make sure that cannot happen silently here.
    probe = f"import {backend} as m; print(m.__name__, getattr(m, '__version__', '?'), m.__file__)"
    session.run("python", "-c", probe)
    env = {"LOWRANK_TEST_BACKENDS": backend, **(JAX_ENV if backend == "jax" else {})}
    args = session.posargs or (JAX_ARGS if backend == "jax" else ())
    session.run("pytest", *args, env=env)


_DETECT_GPU = """
import json
found = {}
try:
    import torch
    found["torch_cuda"] = bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    found["torch"] = torch.__version__
except Exception as exc:
    found["torch_cuda"] = False
    found["torch"] = f"unavailable ({type(exc).__name__}: {exc})"
try:
    import cupy
    found["cupy"] = bool(cupy.cuda.runtime.getDeviceCount() > 0)
    found["cupy_version"] = cupy.__version__
except Exception as exc:
    found["cupy"] = False
    found["cupy_version"] = f"unavailable ({type(exc).__name__}: {exc})"
print(json.dumps(found))
"""


def _gpu_pythons() -> list[str]:
    """Interpreters to try: $LOWRANK_GPU_PYTHON alone if set, else nox's own, python, python3."""
    chosen = os.environ.get("LOWRANK_GPU_PYTHON")
    if chosen:
        return [chosen]
    found = [sys.executable, shutil.which("python"), shutil.which("python3")]
    return list(dict.fromkeys(path for path in found if path))


def _probe(python: str) -> dict[str, object]:
    """What `python` sees of torch CUDA and CuPy, asked in a subprocess (never imported here)."""
    try:
        proc = subprocess.run(
            [python, "-c", _DETECT_GPU], capture_output=True, text=True, check=False, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"torch_cuda": False, "cupy": False, "error": f"{type(exc).__name__}: {exc}"}
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"torch_cuda": False, "cupy": False, "error": proc.stderr.strip()[-500:]}
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """pytest on torch CUDA and CuPy, with the current interpreter; skips without a CUDA device.

    Installs nothing (the GPU machine has no network): the repository root, backends/ and
    reference/ go on PYTHONPATH. The interpreter is the first of nox's own, `python` and
    `python3` on PATH that sees a CUDA device; set LOWRANK_GPU_PYTHON to choose it yourself.
    """
    reports = []
    for python in _gpu_pythons():
        found = _probe(python)
        if "error" in found and os.environ.get("LOWRANK_GPU_PYTHON"):
            session.error(f"LOWRANK_GPU_PYTHON={python} does not run: {found['error']}")
        summary = found.get("error") or f"torch {found['torch']}, cupy {found['cupy_version']}"
        reports.append(f"{python}: {summary}")
        backends = [name for name in GPU_BACKENDS if found[name]]
        if backends:
            break
    else:
        session.skip("no CUDA device visible to torch or cupy; probed " + "; ".join(reports))
    session.log(reports[-1])
    missing = [name for name in GPU_BACKENDS if name not in backends]
    if missing:
        session.warn(f"testing {', '.join(backends)} only; not usable here: {', '.join(missing)}")

    pythonpath = [str(ROOT), str(ROOT / "backends"), str(ROOT / "reference")]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    env = {"LOWRANK_TEST_BACKENDS": ",".join(backends), "PYTHONPATH": os.pathsep.join(pythonpath)}
    session.run(python, "-m", "pytest", *session.posargs, env=env, external=True)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: dense vs low-rank training on MNIST-1D, with a result table (args go to the CLI)."""
    install(session, "-e", ".[demo]")
    session.run("lowrank-compare", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """benchmarks/run.py on torch CPU (arguments after -- go to the runner, e.g. --quick)."""
    install(session, "-e", ".[demo]", *group("bench"))
    session.run("python", "benchmarks/run.py", *session.posargs)


# The property tests the fuzz session reruns with random Hypothesis seeds and more examples.
FUZZ_PROPERTY_TESTS = (
    "tests/test_rank_rules.py",
    "tests/test_spectrum.py",
    "tests/test_factors.py",
    "tests/test_linalg.py",
    "tests/test_init.py",
    "tests/test_weights.py",
    "tests/test_subspace.py",
    "tests/test_cmd.py",
    "tests/test_dldr.py",
)


@nox.session(venv_backend="none")
def fuzz(session: nox.Session) -> None:
    """Input sweep (fuzz/sweep.py), then the property suite with random Hypothesis seeds.

    Runs with the current interpreter (it needs numpy, array_api_strict, torch, jax, pytest and
    hypothesis; nothing is installed), the source trees on PYTHONPATH. The sweep covers every backend
    of the test matrix (CPU_BACKENDS), torch tensors and models on the meta device (and CUDA when
    present), array_api_strict's second device, and valid variants compared with lowrank_reference
    in float64; it prints a table per function and per backend and fails on any generic exception,
    wrong value, silent acceptance of a bad input, rejected valid input, crash or mutated input.
    The property suite runs on NumPy under the ``fuzz`` Hypothesis profile (more examples, not
    derandomized) with a fresh seed, printed so that a failure can be replayed with
    ``--hypothesis-seed``. ``-- --sweep-only`` skips the property suite; other arguments after
    ``--`` go to pytest.
    """
    pythonpath = [str(ROOT), str(ROOT / "backends"), str(ROOT / "reference")]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    env = {"PYTHONPATH": os.pathsep.join(pythonpath), "OMP_NUM_THREADS": "1"}
    args = list(session.posargs)
    sweep_only = "--sweep-only" in args
    args = [a for a in args if a != "--sweep-only"]
    session.log(f"input sweep over {', '.join(CPU_BACKENDS)}: python -m fuzz.sweep")
    sweep = subprocess.run(
        [sys.executable, "-m", "fuzz.sweep", "--lib", ",".join(CPU_BACKENDS)],
        cwd=ROOT,
        env={**os.environ, **env},
        check=False,
    )
    if not sweep_only:
        _fuzz_properties(session, env, args)
    if sweep.returncode != 0:
        session.error(
            "the input sweep found generic exceptions, wrong values, silent acceptances, rejected "
            "valid inputs, crashes or mutated inputs (tables above)"
        )


def _fuzz_properties(session: nox.Session, env: dict[str, str], args: list[str]) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    session.log(f"property suite: HYPOTHESIS_PROFILE=fuzz, --hypothesis-seed={seed}")
    env.update(LOWRANK_TEST_BACKENDS="numpy", HYPOTHESIS_PROFILE="fuzz")
    session.run(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        f"--hypothesis-seed={seed}", *FUZZ_PROPERTY_TESTS, *args, env=env, external=True,
    )  # fmt: skip


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs + Material + mkdocstrings), strict: any warning fails the build.

    First the generated pages: the figures of the tutorials from real short runs (docs/figures.py)
    and the per-function backend table from the test matrix (docs/backend_matrix.py)."""
    # everything the test suite imports, so that the backend table's collection sees every test
    install(session, "-e", ".[demo,jax]", *group("docs", "test", "models", "integrations"))
    env = {"OMP_NUM_THREADS": "1", "NO_MKDOCS_2_WARNING": "1"}
    session.run("python", "docs/figures.py", env=env)
    session.run("python", "docs/backend_matrix.py", env=env)
    session.run("mkdocs", "build", "--strict", *session.posargs, env=env)


def _readme_python_blocks() -> list[str]:
    """The ```python blocks of README.md (the quick starts), in order."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python[^\n]*\n(.*?)^```[ \t]*$", text, re.M | re.S)


@nox.session
def package(session: nox.Session) -> None:
    """Build the sdist and wheel, check them, install the wheel alone and run the quick starts.

    twine checks the metadata; the wheel must hold every package's py.typed and no tests or
    benchmarks; then the wheel (with its `demo` extra, torch pinned to the CPU build) is installed
    into this session's fresh environment and, from a directory outside the source tree, the README's
    quick starts and `lowrank-compare --help` run against the installed copy."""
    import tempfile
    import zipfile

    install(session, *group("package"))
    tmp = Path(tempfile.mkdtemp(prefix="lowrank-package-"))
    dist = tmp / "dist"
    session.run("python", "-m", "build", "--outdir", str(dist), str(ROOT))
    artifacts = sorted(str(p) for p in dist.iterdir())
    session.run("twine", "check", "--strict", *artifacts)
    wheels = [p for p in dist.iterdir() if p.suffix == ".whl"]
    if len(wheels) != 1:
        session.error(f"expected one wheel, got {wheels}")
    names = zipfile.ZipFile(wheels[0]).namelist()
    for pkg in (
        "lowrank_core",
        "lowrank_torch",
        "lowrank_cupy",
        "lowrank_jax",
        "lowrank_reference",
    ):
        if f"{pkg}/py.typed" not in names:
            session.error(f"the wheel has no {pkg}/py.typed")
    stray = [
        n for n in names if n.split("/")[0] in ("tests", "benchmarks", "examples", "docs", "fuzz")
    ]
    if stray:
        session.error(f"the wheel must not contain tests or benchmarks: {stray[:5]}")
    session.log(f"{wheels[0].name}: {len(names)} files, py.typed present, no tests/benchmarks")
    install(session, f"{wheels[0]}[demo,jax]")
    run_dir = tmp / "run"
    run_dir.mkdir()
    session.chdir(run_dir)  # the source tree is not importable from here
    session.run(
        "python",
        "-c",
        "import lowrank_core, lowrank_torch; print(lowrank_core.__version__, lowrank_core.__file__)",
    )
    for i, block in enumerate(_readme_python_blocks()):
        script = run_dir / f"quickstart_{i}.py"
        script.write_text(block, encoding="utf-8")
        session.run("python", str(script), env={"OMP_NUM_THREADS": "1"})
    session.run("lowrank-compare", "--help")
