#!/usr/bin/env bash
# The prepared GPU run, for one call on a machine with an NVIDIA GPU and no network:
#
#   bash benchmarks/gpu.sh            # results: $OUT/gpu_suite.json (or benchmarks/results/), tables on stdout
#   bash benchmarks/gpu.sh --dry-run  # the same script on CPU at tiny sizes (checks the script here)
#
# Installs nothing from the network. If array-api-compat is missing, a wheel carried in .whl/ is
# installed into /tmp/site (see the device notes: pip download it here into .whl/ first).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${LOWRANK_GPU_PYTHON:-python3}"
if ! "$PY" -c "import array_api_compat" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu.sh: array-api-compat is not importable and no wheel is in .whl/" >&2
        exit 1
    fi
fi
export PYTHONUNBUFFERED=1
exec timeout 470 "$PY" benchmarks/gpu_suite.py "$@"
