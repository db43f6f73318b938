#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating and installing it first if needed.
#   bash launch/venv.sh sskd demo          # the demo (the README's first command)
#   bash launch/venv.sh pytest             # the test suite (the README's second command)
# SSKD_VENV overrides where the environment lives (default: .venv beside this repo).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SSKD_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.sskd-installed"
want="$(cat "$root/pyproject.toml" "$root/launch/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[sskd] creating virtual environment in $venv" >&2
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[sskd] installing the project and its dependencies (first run: a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c "$root/launch/constraints.txt" -e "$root[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
if [ $# -eq 0 ]; then
  echo "usage: bash launch/venv.sh COMMAND [ARGS...]" >&2
  exit 2
fi
exec "$@"
