#!/usr/bin/env bash
# The first thing to run on a GPU node: GPU tests and GPU benchmarks, one JSON report (docs/distributed.md).
#   bash launch/gpu-check.sh                        # writes ./gpu-check/gpu-check.json (+ logs/, data/)
#   bash launch/gpu-check.sh --out DIR              # writes DIR/gpu-check.json; everything it makes stays in DIR
#   bash launch/gpu-check.sh --budget 300           # seconds for everything (default 360), wheels and shards included
#   bash launch/gpu-check.sh --wheels DIR           # first installs the wheels launch/wheels.sh fetched, offline,
#                                                   # into OUT/site-packages (an air-gapped node)
#   bash launch/gpu-check.sh --make-venv            # no Python found below: make .venv with launch/venv.sh (downloads ~6 GB)
# The Python, in this order: $SSKD_VENV/bin/python; .venv/bin/python beside this checkout; the python3 on the
# PATH (a node's own or module-provided PyTorch: nothing is created or downloaded). The project is used from
# this checkout (PYTHONPATH), so it need not be installed. Packages the checks need and cannot import are
# named in the report, and the checks that need them are listed as skipped. Without a CUDA device: one line,
# "cuda": false, exit 0. Each check runs in its own process with its own timeout (python -m
# sskd.bench.gpu_check assembles the JSON), so a failing or hanging check never loses the report.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
make_venv=0
args=()
for a in "$@"; do
  if [ "$a" = "--make-venv" ]; then make_venv=1; else args+=("$a"); fi
done
if [ -n "${SSKD_VENV:-}" ]; then
  py="$SSKD_VENV/bin/python"
  [ -x "$py" ] || [ "$make_venv" = 1 ] || { echo "gpu-check: SSKD_VENV=$SSKD_VENV holds no bin/python" >&2; exit 2; }
elif [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"
elif [ "$make_venv" = 1 ]; then
  py="$root/.venv/bin/python"
else
  py="$(command -v python3 || true)"
  [ -n "$py" ] || { echo "gpu-check: no python3 on the PATH, no .venv, no SSKD_VENV (--make-venv makes .venv)" >&2; exit 2; }
fi
if [ "$make_venv" = 1 ] && [ ! -x "$py" ]; then
  echo "[sskd] --make-venv: making the environment with launch/venv.sh (downloads ~6 GB)" >&2
  bash "$root/launch/venv.sh" true || { echo "gpu-check: could not make the environment" >&2; exit 2; }
fi
# -B: no __pycache__ in the checkout from this start; the checks' bytecode goes under --out.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -B -m sskd.bench.gpu_check ${args[@]+"${args[@]}"}
