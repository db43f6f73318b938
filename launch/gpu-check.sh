#!/usr/bin/env bash
# The first thing to run on a cluster GPU node: GPU tests and GPU benchmarks, one JSON report.
#   bash launch/gpu-check.sh                 # writes ./gpu-check/gpu-check.json (+ logs/, data/)
#   bash launch/gpu-check.sh --out DIR       # writes DIR/gpu-check.json
#   bash launch/gpu-check.sh --budget 300    # seconds for all checks together (default 450, under 8 min)
# Needs nothing from the internet once the project's environment exists (.venv beside this repo, or
# $SSKD_VENV); without one it is made with launch/venv.sh first (that step downloads packages).
# Sections: pytest_gpu, shards, bench_pipeline, bench_distill, bench_train; each with its command, exit
# status, wall time and the JSON the command wrote. No CUDA device: one line, "cuda": false, exit 0.
# No DALI: the torch-only GPU tests run and the DALI checks are listed under "skipped".
# Each check runs in its own process with its own timeout (python -m sskd.bench.gpu_check assembles the JSON),
# so a failing or hanging check never loses the report. Exit status: 0 when every check that ran passed.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SSKD_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[sskd] no environment in $venv: making it with launch/venv.sh (downloads packages)" >&2
  bash "$root/launch/venv.sh" true || { echo "gpu-check: could not make the environment in $venv" >&2; exit 2; }
fi

export PATH="$venv/bin:$PATH"
exec "$venv/bin/python" -m sskd.bench.gpu_check "$@"
