#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating and installing it first if needed.
#   bash launch/venv.sh sskd demo          # the demo (the README's first command)
#   bash launch/venv.sh pytest             # the test suite (the README's second command)
# SSKD_VENV overrides where the environment lives (default: .venv beside this repo). pip's own output
# goes to $SSKD_VENV/install.log; on a failure its last lines are shown.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SSKD_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.sskd-installed"
want="$(cat "$root/pyproject.toml" "$root/launch/constraints.txt" | sha256sum | cut -c1-16)"
say() { echo "[sskd] $*" >&2; }
if [ ! -x "$venv/bin/python" ]; then
  say "1/3 creating a virtual environment in $venv"
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log="$venv/install.log"
  : > "$log"
  pip_quiet() {
    if ! "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" >> "$log" 2>&1; then
      say "pip failed; the end of $log:"
      tail -n 25 "$log" >&2
      exit 1
    fi
  }
  say "2/3 updating pip"
  pip_quiet install --upgrade pip
  say "3/3 installing sskd and its dependencies: torch, torchvision, nvidia-dali, accelerate, webdataset, ..."
  say "    (about 6 GB on a first run, a few minutes; progress in $log)"
  pip_quiet install -c "$root/launch/constraints.txt" -e "$root[dev]"
  echo "$want" > "$stamp"
  say "environment ready: $venv (activate it with: source $venv/bin/activate)"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
if [ $# -eq 0 ]; then
  echo "usage: bash launch/venv.sh COMMAND [ARGS...]" >&2
  exit 2
fi
exec "$@"
